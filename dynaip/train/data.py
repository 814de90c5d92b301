"""Streaming, deterministic, exactly resumable input from WebDataset shards.

Why not webdataset's pipeline: its shuffle buffer and ``split_by_worker`` keep no position
that can be saved and restored, so a resumed run would see different batches. Here the tar
streaming is our own (``tarfile`` over ``fsspec``; local paths and URLs alike) and every
sample has an address that a checkpoint can name.

The layout of one epoch (identical on every rank, computed from the manifests alone)::

    shards in a permuted order keyed by (seed, epoch)
      └─ their samples concatenated into one stream of N positions
          └─ split into C = world_size × workers contiguous ranges of K = ceil(N / C) positions
             (consumer c = rank × workers + worker reads positions [c·K, (c+1)·K), wrapping
             past N to the stream's start, so every consumer gets exactly K and none starves,
             even with fewer shards than consumers or uneven shard sizes)
              └─ each range cut into blocks of ``shuffle_block`` positions, each block emitted
                 in a permutation keyed by (seed, epoch, consumer, block)

A consumer reads only the shards its range touches (seeking over the members before its
range start), decodes in its DataLoader worker and never copies a shard to disk. It streams its
range sequentially, each shard opened once per epoch (``shard_samples``), and fills each block's
shuffle buffer with the next ``shuffle_block`` positions of that stream, so an epoch reads each
byte of its range once, whatever the block size. Its position is ``(epoch, offset)`` into its
range; restoring it opens the stream at the current block's start and drops the already-emitted
part, so a resumed stream is the identical sequence.
The stream never ends: after K positions a consumer moves to the next epoch, so a step-based
trainer always has a batch on every rank.

A shard that is missing or whose bytes fail the manifest's sha256 is an error by default, or
skipped and counted with ``on_corrupt_shard: skip`` (dynaip/train/shard_integrity.py). Other
damaged input is skipped and counted, never fatal: a shard that cannot be parsed or is
truncated (``tarfile.ReadError`` part-way) loses its remaining samples, and a sample whose
image does not decode is dropped. Those positions still count as consumed, so the skips are
part of the deterministic sequence.

A stage with weighted datasets (``StreamSpec.weights``) interleaves one such stream per dataset by
weight instead of concatenating them: ``dynaip.train.mixture``. The stage's ``pair`` selection and
quality ``filters`` (``rejected_by``) drop samples; dropped positions count as consumed, like skips.

With precomputed features (``ShardInfo.features``, attached by the trainer), the stream is the
very same sequence of samples and batches; a batch then carries the samples' stored T5 / pooled
CLIP embeddings and their VAE posteriors at the batch's bucket instead of the resized targets. A
feature that is missing or corrupt is an error naming its file, not a skip: it means the
feature set is broken, not the data.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import tarfile
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dynaip.dataset.manifest import open_dataset
from dynaip.dataset.reader import check_member, check_new_member, check_sample
from dynaip.geometry import pad_to_square_white
from .shard_integrity import ShardGuard, corrupt_count
from .stream import Decoded, ShardInfo, StreamSpec, WorkerPosition

if TYPE_CHECKING:
    from dynaip.features.store import FeatureReader

log = logging.getLogger(__name__)

MAX_EMPTY_EPOCHS = 50  # a consumer that finds no usable sample in this many epochs in a row raises


def read_manifests(dirs: Sequence[str]) -> list[ShardInfo]:
    """The shards of every ``DIR/manifest.json`` (local path or fsspec URL), in the given order; every
    entry checked by the one dataset reader (dynaip/dataset/reader.py: paths inside the root, types, hashes)."""
    shards: list[ShardInfo] = []
    for i, d in enumerate(dirs):
        for s in open_dataset(d).shards:
            if s.samples > 0:
                shards.append(ShardInfo(s.url, s.samples, dataset=i, sha256=s.sha256, bytes=s.bytes))
    if not shards:
        raise ValueError(f"datasets {list(dirs)} list no samples in their manifests; nothing to train on")
    return shards


# ----------------------------------------------------------------------------- epoch layout


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def epoch_order(spec: StreamSpec, epoch: int) -> tuple[list[ShardInfo], np.ndarray]:
    """Shards in this epoch's order and the stream position where each starts (len + 1)."""
    perm = _rng(spec.seed, epoch, 0x5A4D).permutation(len(spec.shards))
    shards = [spec.shards[i] for i in perm]
    starts = np.concatenate([[0], np.cumsum([s.samples for s in shards])])
    return shards, starts


def range_length(total: int, consumers: int) -> int:
    """K: positions per consumer per epoch."""
    return math.ceil(total / consumers)


def block_permutation(spec: StreamSpec, epoch: int, consumer: int, block: int, length: int) -> np.ndarray:
    return _rng(spec.seed, epoch, consumer, block, 0xB10C).permutation(length)


# ----------------------------------------------------------------------------- tar reading


def iter_tar(
    url: str,
    skip: int = 0,
    count: int | None = None,
    sha256: str | None = None,
    on_corrupt: str = "error",
    size: int | None = None,
) -> Iterator[dict[str, bytes] | None]:
    """Samples ``skip .. skip+count`` of one shard, in order; ``None`` for each one that is lost.

    Members of skipped samples are passed over with ``tarfile``'s seek, not read. When the tar
    cannot be opened or breaks part-way, every remaining requested sample comes out as ``None``.
    With ``sha256`` (and ``size``) the shard's bytes are checked against it while they are read
    (dynaip/train/shard_integrity.py); a mismatch or a missing shard follows ``on_corrupt``. A member
    that is not a regular file named like a shard member, or a sample without all its members or
    with a json that is not an object, is an error whatever ``on_corrupt`` says (such a shard was
    built that way; dynaip/dataset/reader.py).
    """
    want = count if count is not None else 1 << 62
    guard = ShardGuard(url, sha256, on_corrupt, size)
    where = f"shard {url}"
    held: list[dict[str, bytes]] = []  # samples of a shard whose hash is not yet known wait here
    produced = 0
    if guard.verdict is not False:  # a shard found corrupt before (skip policy) is not read again
        ok = False
        try:
            with guard.open() as f, tarfile.open(fileobj=f, mode="r:") as tf:  # type: ignore[arg-type]
                idx, key, cur = -1, None, {}
                for member in tf:
                    k, ext = check_member(member, where)
                    if k != key:
                        if cur and idx >= skip:
                            check_sample(str(key), cur, where)
                            held.append(cur)
                            produced += 1
                            if produced >= want:
                                break
                        idx, key, cur = idx + 1, k, {"__key__": k.encode()}
                    if idx >= skip:
                        check_new_member(cur, k, ext, where)
                        cur[ext] = tf.extractfile(member).read()  # type: ignore[union-attr]
                    if held and not guard.pending:  # verified before: stream as it comes
                        yield from held
                        held = []
                else:
                    if cur and idx >= skip and produced < want:
                        check_sample(str(key), cur, where)
                        held.append(cur)
                        produced += 1
        except (tarfile.TarError, OSError, EOFError) as e:
            log.warning(
                "shard %s unreadable after %d samples (%s: %s); skipping the rest",
                url,
                skip + produced,
                type(e).__name__,
                e,
            )
        finally:
            try:
                ok = guard.finish()  # reads the rest of a pending shard; raises under the error policy
            finally:
                guard.close()
        # a shard failing its hash loses every sample read from it (none of them was handed out)
        yield from (held if ok else [None] * len(held))
    while produced < want and count is not None:  # fewer samples than the manifest says
        yield None
        produced += 1


def shard_samples(
    shard: ShardInfo, skip: int, count: int, on_corrupt: str = "error"
) -> Iterator[dict[str, bytes] | None]:
    """Samples ``skip .. skip+count`` of one shard from one sequential open (``None`` for a lost one).

    This is where a shard is opened for training. A shard with a manifest hash that this process
    has not verified yet is verified first (one full read, ``verify_shard``): ``iter_tar`` would
    otherwise hold back every requested sample until the end of the shard, and a consumer asks for
    the rest of a shard at once (memory would grow to a whole shard)."""
    guard = ShardGuard(shard.url, shard.sha256, on_corrupt, shard.bytes)
    if guard.pending:
        verify_shard(guard)
    yield from iter_tar(shard.url, skip=skip, count=count, sha256=shard.sha256, on_corrupt=on_corrupt, size=shard.bytes)


def verify_shard(guard: ShardGuard) -> None:
    """Reads the whole shard through ``guard`` to settle its verdict (the policy applies as in ``iter_tar``)."""
    try:
        guard.open()
        guard.finish()
    except (OSError, EOFError):
        pass  # missing or unreadable: ``ShardGuard`` recorded it (or raised under the error policy)
    finally:
        guard.close()


def iter_positions(
    shards: list[ShardInfo], starts: np.ndarray, begin: int, end: int, on_corrupt: str = "error"
) -> Iterator[dict[str, bytes] | None]:
    """Raw samples of stream positions ``begin .. end`` (``end`` may pass N: wraps to 0), each shard
    read once, sequentially, however many of its samples the range takes."""
    total = int(starts[-1])
    pos = begin
    while pos < end:
        p = pos % total
        s = int(np.searchsorted(starts, p, side="right") - 1)
        n = min(int(starts[s + 1]) - p, end - pos)
        for raw in shard_samples(shards[s], p - int(starts[s]), n, on_corrupt):
            if raw is not None and shards[s].features is not None:
                raw["__features__"] = shards[s].features  # type: ignore[assignment]
            yield raw
        pos += n


# ----------------------------------------------------------------------------- decoding


def resize_center_crop(img: Image.Image, h: int, w: int) -> Image.Image:
    """Scales so the image covers (h, w), then crops the centre."""
    iw, ih = img.size
    scale = max(w / iw, h / ih)
    nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - w) // 2, (nh - h) // 2
    return img.crop((left, top, left + w, top + h))


def to_chw_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


def decode_sample(raw: dict[str, bytes], ref_size: int) -> Decoded:
    """Raises on any missing member or undecodable image (the caller counts it as skipped)."""
    meta = json.loads(raw["json"])
    with Image.open(io.BytesIO(raw["ref.png"])) as im:
        ref = pad_to_square_white(im.convert("RGB")).resize((ref_size, ref_size), Image.BICUBIC)
    with Image.open(io.BytesIO(raw["tgt.jpg"])) as im:
        tgt = im.convert("RGB")
    return Decoded(
        key=raw["__key__"].decode().rsplit("/", 1)[-1],
        ref=to_chw_uint8(ref),
        tgt=tgt,
        txt=raw.get("txt", b"").decode("utf-8"),
        pair=str(meta.get("pair", "")),
        features=raw.get("__features__"),
    )  # type: ignore[arg-type]


def nearest_bucket(buckets: list[tuple[int, int]], w: int, h: int) -> tuple[int, int]:
    ar = math.log(w / h)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ar))


def collate(
    samples: list[Decoded], buckets: list[tuple[int, int]], features: FeatureReader | None = None
) -> dict[str, Any]:
    """Batch dict: ``ref`` (B, 3, S, S) uint8, ``tgt`` (B, 3, H, W) uint8, ``txt``/``pair``/``key`` lists.

    Samples with precomputed features get, instead of ``tgt``, their stored ``t5``, ``pooled``,
    ``posterior_mean`` and ``posterior_logvar`` at the bucket (read through ``features``).
    """
    h, w = nearest_bucket(buckets, *samples[0].tgt.size)
    batch: dict[str, Any] = {"ref": torch.stack([s.ref for s in samples])}
    with_features = [s.features is not None for s in samples]
    if any(with_features):
        if features is None or not all(with_features):
            raise ValueError(
                "a batch mixes samples with and without precomputed features; a stage uses "
                "features for all of its datasets or for none"
            )
        batch.update(features.batch([(s.features, s.key) for s in samples], (h, w)))  # type: ignore[misc]
    else:
        batch["tgt"] = torch.stack([to_chw_uint8(resize_center_crop(s.tgt, h, w)) for s in samples])
    batch.update(txt=[s.txt for s in samples], pair=[s.pair for s in samples], key=[s.key for s in samples])
    return batch


# ----------------------------------------------------------------------------- one consumer


def consumer_batches(
    spec: StreamSpec, consumer: int, consumers: int, start: WorkerPosition
) -> Iterator[tuple[dict[str, Any], WorkerPosition]]:
    """Infinite batches of one consumer, each with the position *after* it."""
    features = None
    if any(s.features is not None for s in spec.shards):
        from dynaip.features.store import FeatureReader

        features = FeatureReader()  # this consumer's open feature shards
    try:
        pos = WorkerPosition(**asdict(start))
        if spec.weights is not None:
            from .mixture import mixture_samples

            samples = mixture_samples(spec, consumer, consumers, pos, consumer_samples)
        else:
            samples = consumer_samples(spec, consumer, consumers, pos)
        pending: list[Decoded] = []
        for sample in samples:
            pending.append(sample)
            if len(pending) == spec.batch_size:
                yield collate(pending, spec.buckets, features), WorkerPosition(**asdict(pos))
                pending = []
    finally:
        if features is not None:
            features.close()


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def rejected_by(meta: dict[str, Any], spec: StreamSpec) -> str | None:
    """Why the stage's selection drops a sample with this json (``pair`` or ``min_<score>``), or None to keep it."""
    if spec.pair is not None and meta.get("pair") != spec.pair:
        return "pair"
    quality = meta.get("quality") or {}
    for name, minimum in spec.filters.items():
        value = quality.get(name)
        if not isinstance(value, (int, float)) or value < minimum:  # no score: cannot pass (docs/data_mixtures.md)
            return f"min_{name}"
    return None


def consumer_samples(spec: StreamSpec, consumer: int, consumers: int, pos: WorkerPosition) -> Iterator[Decoded]:
    """Infinite usable samples of one consumer's ranges (module docstring), advancing ``pos`` in place.

    When a sample is yielded, ``pos`` already counts it, so a copy taken then resumes just after it.
    """
    k = range_length(spec.total, consumers)
    selecting = spec.pair is not None or bool(spec.filters)
    empty_epochs = 0
    while True:
        shards, starts = epoch_order(spec, pos.epoch)
        good_this_epoch = 0
        stream: Iterator[dict[str, bytes] | None] | None = None
        while pos.offset < k:
            block = pos.offset // spec.shuffle_block
            b0 = block * spec.shuffle_block
            blen = min(spec.shuffle_block, k - b0)
            first = consumer * k + b0
            if stream is None:  # one sequential read of the rest of the range (a resume starts at its block)
                stream = iter_positions(shards, starts, first, consumer * k + k, spec.on_corrupt_shard)
            seen = corrupt_count()
            raws = list(itertools.islice(stream, blen))  # the shuffle buffer: the next blen positions
            pos.corrupt_shards += corrupt_count() - seen
            perm = block_permutation(spec, pos.epoch, consumer, block, blen)
            for j in range(pos.offset - b0, blen):
                raw = raws[perm[j]]
                pos.offset += 1
                if raw is None:
                    pos.skipped += 1
                    continue
                try:
                    reason = rejected_by(json.loads(raw["json"]), spec) if selecting else None
                    if reason is not None:
                        pos.filtered += 1
                        _count(pos.dropped, reason)
                        continue
                    sample = decode_sample(raw, spec.ref_size)
                except Exception as e:  # any decode failure is data damage, not a trainer bug
                    log.warning(
                        "skipping undecodable sample at epoch %d position %d: %s: %s",
                        pos.epoch,
                        first + perm[j],
                        type(e).__name__,
                        e,
                    )
                    pos.skipped += 1
                    continue
                good_this_epoch += 1
                _count(pos.seen, str(_dataset_at(shards, starts, first + perm[j])))
                yield sample
        empty_epochs = 0 if good_this_epoch else empty_epochs + 1
        if empty_epochs >= MAX_EMPTY_EPOCHS:
            raise RuntimeError(
                f"consumer {consumer} found no usable sample in {MAX_EMPTY_EPOCHS} epochs "
                f"(pair={spec.pair!r}, filters={spec.filters}, {spec.total} samples in {len(spec.shards)} shards); "
                "check that the stage's datasets hold that pair type, pass its filters and are readable"
            )
        pos.epoch, pos.offset = pos.epoch + 1, 0


def _dataset_at(shards: list[ShardInfo], starts: np.ndarray, position: int) -> int:
    """Dataset index of the shard holding stream position ``position`` (which may wrap past N)."""
    p = position % int(starts[-1])
    return shards[int(np.searchsorted(starts, p, side="right") - 1)].dataset


# ----------------------------------------------------------------------------- DataLoader glue


class _ShardDataset(IterableDataset):
    """One rank's stream; DataLoader worker slot ``i`` plays logical worker ``(i + rotation) % W``.

    The rotation exists because a DataLoader always starts its round-robin at worker 0: after
    S consumed batches the next batch must come from logical worker S mod W.
    """

    def __init__(
        self, spec: StreamSpec, rank: int, world_size: int, workers: int, positions: list[WorkerPosition], rotation: int
    ):
        self.spec, self.rank, self.world_size, self.workers = spec, rank, world_size, workers
        self.positions, self.rotation = positions, rotation

    def __iter__(self):
        info = get_worker_info()
        slot = info.id if info is not None else 0
        lw = (slot + self.rotation) % self.workers
        consumer = self.rank * self.workers + lw
        for batch, pos in consumer_batches(self.spec, consumer, self.world_size * self.workers, self.positions[lw]):
            batch["_worker"] = lw
            batch["_position"] = asdict(pos)
            yield batch


class StreamingLoader:
    """The rank's batch iterator with a saveable position.

    ``state_dict()`` describes exactly the batches already handed out by ``__iter__`` (not the
    ones prefetched by workers), so ``load_state_dict`` + a new ``__iter__`` continues with the
    very next batch. ``workers`` (DataLoader processes; 0 = in this process) and
    ``world_size`` shape the partition, so a resume must keep both.
    """

    def __init__(
        self,
        spec: StreamSpec,
        rank: int,
        world_size: int,
        workers: int = 2,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        mp_context: str | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.workers = workers
        self.logical = max(1, workers)
        self.prefetch_factor, self.pin_memory, self.mp_context = prefetch_factor, pin_memory, mp_context
        self.batches = 0
        self.positions = [WorkerPosition() for _ in range(self.logical)]

    @property
    def skipped(self) -> int:
        return sum(p.skipped for p in self.positions)

    @property
    def filtered(self) -> int:
        return sum(p.filtered for p in self.positions)

    def _summed(self, name: str) -> dict[str, int]:
        total: dict[str, int] = {}
        for p in self.positions:
            for k, v in getattr(p, name).items():
                total[k] = total.get(k, 0) + v
        return total

    @property
    def seen(self) -> dict[int, int]:
        """Samples handed out in batches so far, per dataset index (``ShardInfo.dataset``)."""
        return {int(k): v for k, v in self._summed("seen").items()}

    @property
    def dropped(self) -> dict[str, int]:
        """Filtered samples so far by reason (``pair``, ``min_aesthetic``, ...)."""
        return self._summed("dropped")

    @property
    def corrupt_shards(self) -> int:
        return sum(p.corrupt_shards for p in self.positions)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "workers": self.logical,
            "batches": self.batches,
            "positions": [asdict(p) for p in self.positions],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["world_size"], state["workers"]) != (self.world_size, self.logical):
            raise ValueError(
                f"data position was saved with world_size={state['world_size']} and {state['workers']} "
                f"loader workers per rank, this run has {self.world_size} and {self.logical}; the shard "
                "partition depends on both, so resume with the same --workers and data_workers"
            )
        self.batches = int(state["batches"])
        self.positions = [WorkerPosition(**p) for p in state["positions"]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = _ShardDataset(
            self.spec,
            self.rank,
            self.world_size,
            self.logical,
            [WorkerPosition(**asdict(p)) for p in self.positions],
            self.batches % self.logical,
        )
        kwargs: dict[str, Any] = {}
        if self.workers > 0:
            kwargs = dict(prefetch_factor=self.prefetch_factor, multiprocessing_context=self.mp_context)
        # own generator: DataLoader draws a base seed when iterated; it must not consume the
        # training RNG, or a resumed run would diverge from an uninterrupted one
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )
        for batch in loader:
            lw = batch.pop("_worker")
            self.positions[lw] = WorkerPosition(**batch.pop("_position"))
            self.batches += 1
            yield batch
