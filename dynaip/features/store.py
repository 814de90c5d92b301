"""Reading feature sets for training: finding the one that serves a run, and per-sample reads in the loader.

``find_features`` looks under ``DATASET/features/*/`` for a set whose spec serves the run (same
encoder fingerprint and max_sequence_length, every training bucket stored) and that was computed
from the dataset's current manifest; it checks that every listed file exists with its recorded
size. ``FeatureReader`` is what one loader consumer uses to read a batch's tensors: shards stay
open (a few, least recently used closed first), headers are checked against the manifest when
opened and tensors against their digests when read (``dynaip.features.format``).

Missing, corrupt or stale features are ``FeatureError``s naming the path — never a silent
fallback to on-the-fly encoding. Only a dataset without any feature set falls back (``features:
auto``; see ``dynaip.train.config.TrainConfig.data.features``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .format import FeatureError, ShardReader
from .layout import (
    FeatureSpec,
    dataset_identity,
    join,
    list_feature_sets,
    load_manifest,
    logvar_name,
    mean_name,
    pooled_name,
    t5_name,
)


@dataclass(frozen=True)
class FeatureShardRef:
    """Where a data shard's features are and what the manifest says about the file (picklable)."""

    url: str
    bytes: int
    header_sha256: str


@dataclass
class DatasetFeatures:
    """A dataset's feature set that serves this run."""

    dataset: str
    root: str
    manifest: dict[str, Any]
    spec: FeatureSpec

    def shard_refs(self) -> dict[str, FeatureShardRef]:
        """Data shard URL (as ``read_manifests`` spells it) → its feature shard."""
        return {
            join(self.dataset, s["data"]): FeatureShardRef(
                join(self.root, s["path"]), int(s["bytes"]), s["header_sha256"]
            )
            for s in self.manifest["shards"]
        }

    def empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored empty prompt: T5 (1, L, D) and pooled CLIP (1, D)."""
        e = self.manifest["empty_prompt"]
        with ShardReader(join(self.root, e["path"]), size=int(e["bytes"]), header_sha256=e["header_sha256"]) as r:
            return r.get("t5"), r.get("pooled")


def _check_files(root: str, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists with its recorded size (one stat each; contents are checked on read)."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(root)
    for entry in [manifest["empty_prompt"], *manifest["shards"]]:
        path = f"{base.rstrip('/')}/{entry['path']}"
        url = join(root, entry["path"])
        try:
            size = fs.size(path)
        except FileNotFoundError:
            raise FeatureError(
                f"feature shard {url} is missing (listed in {join(root, 'manifest.json')}); "
                "re-run `dynaip precompute` for its dataset"
            ) from None
        if size != int(entry["bytes"]):
            raise FeatureError(
                f"feature shard {url} is corrupt ({size} bytes, the manifest says {entry['bytes']}); "
                "delete it and re-run `dynaip precompute` for its dataset"
            )


def find_features(
    dataset: str, *, fingerprint: str, max_sequence_length: int, buckets: Sequence[Sequence[int]]
) -> DatasetFeatures | None:
    """The dataset's feature set that serves the run; None when it has none at all.

    Raises ``FeatureError`` when feature sets exist but none serves the run (each named, with why),
    or when the serving set's files are missing or have other sizes than its manifest says.
    """
    roots = list_feature_sets(dataset)
    if not roots:
        return None
    _, identity = dataset_identity(dataset)
    reasons = []
    for root in roots:
        manifest = load_manifest(root)
        spec = FeatureSpec.from_json(manifest["spec"])
        why = spec.serves(fingerprint, max_sequence_length, buckets)
        if why is None and manifest["dataset"]["manifest_sha256"] != identity:
            why = "computed from another version of the dataset (its manifest.json changed since)"
        if why is None:
            _check_files(root, manifest)
            return DatasetFeatures(dataset=dataset, root=root, manifest=manifest, spec=spec)
        reasons.append(f"{root}: {why}")
    raise FeatureError(
        f"dataset {dataset} has precomputed features, but none serves this run — {'; '.join(reasons)}. "
        "Re-run `dynaip precompute` with this training config and models.yaml, or set features: off"
    )


@dataclass
class StageFeatures:
    """The feature sets of one stage's datasets (all of them have one)."""

    sets: list[DatasetFeatures]

    def refs(self) -> dict[str, FeatureShardRef]:
        out: dict[str, FeatureShardRef] = {}
        for s in self.sets:
            out.update(s.shard_refs())
        return out

    def empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first set's (sets that serve the same run hold the same empty prompt, up to their dtype)."""
        return self.sets[0].empty_prompt()

    def describe(self) -> str:
        return ", ".join(s.root for s in self.sets)


def resolve_stage(
    name: str,
    datasets: Sequence[str],
    mode: str,
    *,
    fingerprint: str,
    max_sequence_length: int,
    buckets: Sequence[Sequence[int]],
) -> StageFeatures | None:
    """The stage's features per ``mode`` (auto | required | off); None = encode on the fly."""
    if mode == "off":
        return None
    found = [
        find_features(d, fingerprint=fingerprint, max_sequence_length=max_sequence_length, buckets=buckets)
        for d in datasets
    ]
    absent = [d for d, f in zip(datasets, found) if f is None]
    if not absent:
        return StageFeatures([f for f in found if f is not None])
    if mode == "required":
        raise FeatureError(
            f"features: required, but stage '{name}' has datasets without precomputed features: "
            f"{absent}; run `dynaip precompute --data DATASET --models M.yaml --config TRAIN.yaml` "
            "first, or set features: auto"
        )
    return None


# ----------------------------------------------------------------------------- loader side


class FeatureReader:
    """The feature shards one loader consumer reads; at most ``max_open`` stay open."""

    def __init__(self, max_open: int = 4):
        self.max_open = max_open
        self._open: OrderedDict[str, ShardReader] = OrderedDict()

    def _shard(self, ref: FeatureShardRef) -> ShardReader:
        reader = self._open.pop(ref.url, None)
        if reader is None:
            reader = ShardReader(ref.url, size=ref.bytes, header_sha256=ref.header_sha256)
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].close()
        self._open[ref.url] = reader
        return reader

    def batch(self, samples: Sequence[tuple[FeatureShardRef, str]], bucket: Sequence[int]) -> dict[str, torch.Tensor]:
        """(ref, key) per sample → ``t5`` (B, L, D), ``pooled`` (B, D), ``posterior_mean``/``posterior_logvar``
        (B, C, H/8, W/8) at ``bucket``."""
        names = {
            "t5": t5_name,
            "pooled": pooled_name,
            "posterior_mean": lambda k: mean_name(k, bucket),
            "posterior_logvar": lambda k: logvar_name(k, bucket),
        }
        out: dict[str, list[torch.Tensor]] = {k: [] for k in names}
        for ref, key in samples:
            shard = self._shard(ref)
            for field, name in names.items():
                out[field].append(shard.get(name(key)))
        return {k: torch.stack(v) for k, v in out.items()}

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()
