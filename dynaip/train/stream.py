"""What a training stream is, shared by the loader (``dynaip.train.data``) and the weighted mixture
(``dynaip.train.mixture``): the shards (``ShardInfo``), the stream's settings (``StreamSpec``), where
one consumer stands (``WorkerPosition``, saved in checkpoints) and one decoded sample (``Decoded``).
Both modules import these from here, so neither imports the other back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from dynaip.models import sampling

if TYPE_CHECKING:
    from dynaip.features.store import FeatureShardRef


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest lists it."""

    url: str
    """Local path or fsspec URL of the tar."""
    samples: int
    """Sample count from the manifest (a damaged shard may hold fewer; the rest are skipped)."""
    features: FeatureShardRef | None = None
    """Its precomputed features (``dynaip.features``), or None to encode on the fly."""
    dataset: int = 0
    """Index of its dataset in the stage's data list (per-dataset counts and mixtures)."""
    sha256: str | None = None
    """The manifest's hash of the tar; checked while it is read (dynaip/train/shard_integrity.py)."""
    bytes: int | None = None
    """The manifest's size of the tar; checked with the hash."""


@dataclass(kw_only=True)
class StreamSpec:
    """What a stream reads and how it shapes batches (the same on every rank)."""

    shards: list[ShardInfo]
    """All shards of the stage, in manifest order."""
    batch_size: int
    """Samples per batch on one rank."""
    seed: int = 0
    """Keys shard order and block permutations together with epoch, rank and worker."""
    shuffle_block: int = 64
    """Positions permuted together; the memory cost is this many undecoded samples per worker."""
    pair: str | None = None
    """Keep only samples whose json ``pair`` equals this (``intra`` | ``cross``); None keeps all."""
    ref_size: int = 336
    """Side of the square reference image (the CLIP tower's input size)."""
    buckets: list[tuple[int, int]] = field(default_factory=lambda: [(sampling.SIZE, sampling.SIZE)])
    """Target sizes (H, W), multiples of 16; a batch takes the bucket nearest its first sample's aspect ratio."""
    weights: list[float] | None = None
    """One weight per dataset (``ShardInfo.dataset``): a weighted mixture (``dynaip.train.mixture``).
    None: the datasets' shards form one concatenated stream (each sample once per epoch)."""
    filters: dict[str, float] = field(default_factory=dict)
    """Minimum per-sample scores, ``{name: min}`` read from ``json["quality"][name]``; a sample below
    a minimum, or without that score, is dropped and counted under ``min_<name>``."""
    on_corrupt_shard: str = "error"
    """A shard missing or failing its manifest sha256: ``error`` or ``skip`` (dynaip/train/shard_integrity.py)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.shuffle_block < 1:
            raise ValueError(f"shuffle_block must be >= 1, got {self.shuffle_block}")
        if self.pair not in (None, "intra", "cross"):
            raise ValueError(f"pair must be 'intra', 'cross' or null, got {self.pair!r}")
        bad = [b for b in self.buckets if b[0] % 16 or b[1] % 16]
        if bad or not self.buckets:
            raise ValueError(
                f"buckets {bad or self.buckets} must be non-empty (H, W) pairs, multiples of 16 "
                "(VAE /8, then 2×2 packing)"
            )
        self.buckets = [tuple(int(v) for v in b) for b in self.buckets]  # type: ignore[misc]
        if self.weights is not None:
            have = {s.dataset for s in self.shards}
            if len(self.weights) < 1 or any(w <= 0 for w in self.weights):
                raise ValueError(f"mixture weights {self.weights} must be a non-empty list of numbers > 0")
            empty = sorted(set(range(len(self.weights))) - have)
            if empty or max(have) >= len(self.weights):
                raise ValueError(
                    f"mixture of {len(self.weights)} weights but datasets {empty or sorted(have)} have no "
                    "samples or no weight; every weighted dataset needs samples in its manifest"
                )

    @property
    def total(self) -> int:
        return sum(s.samples for s in self.shards)


@dataclass
class WorkerPosition:
    """Where one consumer (rank, logical worker) stands; JSON-serialisable."""

    epoch: int = 0
    offset: int = 0
    """Positions of the current epoch's range already consumed (emitted, skipped or filtered)."""
    skipped: int = 0
    """Damaged samples skipped so far (cumulative over epochs)."""
    filtered: int = 0
    """Samples dropped by the ``pair`` selection or a quality filter so far (the sum of ``dropped``)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Filtered samples by reason: ``pair``, ``min_aesthetic``, ... (a sample counts under its first failed test)."""
    seen: dict[str, int] = field(default_factory=dict)
    """Samples emitted (put into batches) per dataset index (as a string: JSON keys)."""
    slot: int = 0
    """Mixture only: schedule slots consumed, each one emitted sample (``dynaip.train.mixture``)."""
    sources: list[dict[str, Any]] = field(default_factory=list)
    """Mixture only: every dataset's own position (a ``WorkerPosition`` as a dict) in this consumer."""
    corrupt_shards: int = 0
    """Missing or hash-failing shards this consumer met (``on_corrupt_shard: skip``); cumulative."""


@dataclass
class Decoded:
    key: str
    ref: torch.Tensor
    """(3, S, S) uint8, reference padded to square on white, resized to ``ref_size``."""
    tgt: Image.Image
    """Target RGB, still at its own size (the batch picks the bucket)."""
    txt: str
    pair: str
    features: FeatureShardRef | None = None
    """Where this sample's precomputed features are (its shard's), if any."""
