"""Which data a run trains on, recorded in every checkpoint so ``--resume`` cannot switch it silently.

A dataset's identity is the sha256 of its ``manifest.json`` bytes: the manifest lists every shard
with its own sha256 (checked while streaming, dynaip/train/shard_integrity.py), so equal manifests
mean equal data, and a dataset moved to another path keeps its identity. The identity of a run is,
per stage, the identities of its datasets in order (the order shapes the stream).
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import fsspec

from dynaip.dataset.manifest import manifest_url

from .config import TrainConfig


def manifest_digest(directory: str) -> str:
    with fsspec.open(manifest_url(directory), "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()


def run_datasets(cfg: TrainConfig, data: Sequence[str]) -> list[dict[str, Any]]:
    """Per stage: its name, dataset directories and their manifest digests (stored in state.json)."""
    cache: dict[str, str] = {}
    out = []
    for stage in cfg.stages:
        dirs = list(stage.paths or data)
        for d in dirs:
            if d not in cache:
                cache[d] = manifest_digest(d)
        out.append({"stage": stage.name, "dirs": dirs, "manifests": [cache[d] for d in dirs]})
    return out


def data_change(saved: list[dict[str, Any]] | None, current: list[dict[str, Any]]) -> str | None:
    """None when ``current`` trains on the data ``saved`` recorded; else what differs, in words."""
    if saved is None:
        return None  # a checkpoint from before identities were recorded: nothing to compare
    if [s["stage"] for s in saved] != [c["stage"] for c in current]:
        return f"stages {[s['stage'] for s in saved]} then, {[c['stage'] for c in current]} now"
    for s, c in zip(saved, current):
        if s["manifests"] != c["manifests"]:
            return (
                f"stage '{c['stage']}' trained on {s['dirs']} (manifests {[m[7:19] for m in s['manifests']]}), "
                f"now on {c['dirs']} (manifests {[m[7:19] for m in c['manifests']]})"
            )
    return None
