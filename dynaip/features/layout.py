"""Where feature sets live, what they were computed with, and how their manifest reads.

Layout (next to the curated dataset)::

    DATASET/features/NAME/manifest.json            written last, atomically (format dynaip-features/1)
    DATASET/features/NAME/empty.safetensors        the empty prompt, once: t5 (1, L, 4096), pooled (1, 768)
    DATASET/features/NAME/shards/000000.safetensors one per data shard (same stem), tensors per sample key:
                                                   KEY.t5 (L, 4096), KEY.pooled (768),
                                                   KEY.mean.HxW / KEY.logvar.HxW (16, H/8, W/8) per bucket
    DATASET/features/NAME/.progress/               resume state: spec.json + one marker per finished shard

A feature set is defined by its ``FeatureSpec`` (encoder fingerprint, max_sequence_length,
dtype, buckets); NAME defaults to a readable digest of it, so differently computed sets sit side
by side and the trainer picks the one that matches its models and config.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from dynaip.dataset.manifest import manifest_url, parse_manifest

from .format import FeatureError

FORMAT = "dynaip-features/1"
FEATURES_DIR = "features"
MANIFEST = "manifest.json"
EMPTY = "empty.safetensors"
PROGRESS = ".progress"
ENCODER_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
"""The parts of the FLUX directory whose outputs are stored (the fingerprint covers exactly these)."""
SMALL_FILE = 1 << 20
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def encoders_fingerprint(flux_dir: str | Path) -> str:
    """sha256 over the FLUX text encoders', tokenizers' and VAE's files: each file's relative path and
    size, and the contents of files under 1 MiB (configs, tokenizer files, weight indexes).

    Weight files count by name and size only: hashing ~10 GB of T5 at every training start would
    cost minutes per rank. A different release, dtype or architecture changes the fingerprint; a
    same-size rewrite of a weight file does not (re-run ``dynaip precompute`` after such an edit).
    """
    root = Path(flux_dir)
    h = hashlib.sha256()
    for part in ENCODER_PARTS:
        base = root / part
        if not base.is_dir():
            raise FileNotFoundError(
                f"{base} does not exist: models.yaml's flux entry must be a diffusers "
                "FLUX.1-dev directory with text_encoder/, text_encoder_2/, tokenizer(_2)/ and vae/"
            )
        for p in sorted(q for q in base.rglob("*") if q.is_file()):
            size = p.stat().st_size
            h.update(f"{p.relative_to(root).as_posix()}\0{size}\0".encode())
            if size < SMALL_FILE:
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


@dataclass(frozen=True, kw_only=True)
class FeatureSpec:
    """What a feature set was computed with; a set serves a training run whose spec it matches."""

    fingerprint: str
    """``encoders_fingerprint`` of the FLUX directory."""
    max_sequence_length: int
    """T5 tokens per prompt (every prompt is padded to it, as FluxPipeline does)."""
    dtype: str
    """``fp32`` or ``bf16``: the encoders' dtype, and so the stored tensors'."""
    buckets: tuple[tuple[int, int], ...]
    """Target sizes (H, W) whose VAE posteriors are stored."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {sorted(DTYPE_NAMES)}")
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length={self.max_sequence_length}: must be >= 1")
        bad = [b for b in self.buckets if len(b) != 2 or b[0] % 16 or b[1] % 16]
        if bad or not self.buckets:
            raise ValueError(f"buckets {bad or list(self.buckets)}: need (H, W) pairs, multiples of 16")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPE_NAMES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "max_sequence_length": self.max_sequence_length,
            "dtype": self.dtype,
            "buckets": [list(b) for b in self.buckets],
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "FeatureSpec":
        return cls(
            fingerprint=raw["fingerprint"],
            max_sequence_length=int(raw["max_sequence_length"]),
            dtype=raw["dtype"],
            buckets=tuple((int(h), int(w)) for h, w in raw["buckets"]),
        )

    def default_name(self) -> str:
        """``L512-bf16-1a2b3c4d``: sequence length and dtype readable, the rest as a digest."""
        d = hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:8]
        return f"L{self.max_sequence_length}-{self.dtype}-{d}"

    def serves(self, fingerprint: str, max_sequence_length: int, buckets: Sequence[Sequence[int]]) -> str | None:
        """None when this set serves a run with these encoders, sequence length and buckets, else why not."""
        if fingerprint != self.fingerprint:
            return "computed with other text encoders / VAE (encoder fingerprint differs)"
        if max_sequence_length != self.max_sequence_length:
            return f"max_sequence_length {self.max_sequence_length}, the run uses {max_sequence_length}"
        missing = [list(b) for b in buckets if tuple(b) not in self.buckets]
        if missing:
            return f"no posteriors for buckets {missing} (has {[list(b) for b in self.buckets]})"
        return None


# ----------------------------------------------------------------------------- names inside a shard


def t5_name(key: str) -> str:
    return f"{key}.t5"


def pooled_name(key: str) -> str:
    return f"{key}.pooled"


def mean_name(key: str, bucket: Sequence[int]) -> str:
    return f"{key}.mean.{bucket[0]}x{bucket[1]}"


def logvar_name(key: str, bucket: Sequence[int]) -> str:
    return f"{key}.logvar.{bucket[0]}x{bucket[1]}"


def feature_shard_path(data_path: str) -> str:
    """``shards/000000.tar`` → ``shards/000000.safetensors`` (the data shard's stem, relative to NAME/)."""
    stem = data_path.rsplit("/", 1)[-1].split(".", 1)[0]
    return f"shards/{stem}.safetensors"


# ----------------------------------------------------------------------------- urls and manifests


def join(base: str, rel: str) -> str:
    """``base/rel`` for local paths and fsspec URLs alike."""
    if "://" in rel or rel.startswith("/"):
        return rel
    return base.rstrip("/") + "/" + rel


def features_root(dataset: str, name: str) -> str:
    return join(dataset, f"{FEATURES_DIR}/{name}")


def read_bytes(url: str) -> bytes:
    import fsspec

    with fsspec.open(url, "rb") as f:
        return f.read()


def dataset_identity(dataset: str) -> tuple[dict[str, Any], str]:
    """The dataset's manifest and the sha256 of its bytes (what a feature set records it was computed from)."""
    url = manifest_url(dataset)
    try:
        raw = read_bytes(url)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"dataset '{dataset}' has no manifest.json; pass a directory written by `dynaip curate`"
        ) from e
    return parse_manifest(raw, url), hashlib.sha256(raw).hexdigest()


def load_manifest(root: str) -> dict[str, Any]:
    """``root/manifest.json`` of a feature set (``FeatureError`` naming the path when unreadable)."""
    url = join(root, MANIFEST)
    try:
        manifest = json.loads(read_bytes(url))
    except FileNotFoundError as e:
        raise FeatureError(f"{url} does not exist: the feature set is unfinished; re-run `dynaip precompute`") from e
    except ValueError as e:
        raise FeatureError(f"{url} is not valid JSON ({e}); re-run `dynaip precompute`") from e
    if manifest.get("format") != FORMAT:
        raise FeatureError(f"{url} has format {manifest.get('format')!r}; this version reads {FORMAT!r}")
    return manifest


def list_feature_sets(dataset: str) -> list[str]:
    """Roots ``DATASET/features/NAME`` that hold a manifest, sorted by NAME."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(join(dataset, FEATURES_DIR))
    if not fs.isdir(path):
        return []
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return [features_root(dataset, n) for n in names if fs.isfile(f"{path.rstrip('/')}/{n}/{MANIFEST}")]
