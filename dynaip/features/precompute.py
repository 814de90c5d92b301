"""Building feature sets: plan (driver), one job per data shard (any process), manifest last (driver).

``plan_dataset`` reads a curated dataset's manifest, prepares ``DATASET/features/NAME`` and lists
the jobs still to do; ``run_job`` computes one of them with a ``FeatureEncoder`` and writes its
file and its progress marker (a feature shard for a data shard, or the empty prompt's file);
``finalize`` writes ``manifest.json`` last, atomically. ``run_local`` is all of it in one process;
``dynaip.features.ray_exec`` runs the jobs on Ray actors. Both call the same ``run_job`` on the same
batches, so their outputs are byte-identical.

Resuming: a job counts as done when its marker holds this spec, the same data shard sha256 and its
file still has the recorded size; so a stopped run resumes shard by shard, and a dataset that
grew (curation resumed) only gets its new shards computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from dynaip.atomic import atomic_write_bytes
from dynaip.dataset.manifest import open_dataset
from dynaip.run_lock import LOCK_NAME

from .format import FeatureError, ShardWriter, write_tensors
from .layout import (
    EMPTY,
    FORMAT,
    MANIFEST,
    PROGRESS,
    FeatureSpec,
    dataset_identity,
    feature_shard_path,
    features_root,
    logvar_name,
    mean_name,
    pooled_name,
    t5_name,
)

log = logging.getLogger(__name__)

DECODE_REF_SIZE = 8
"""Precompute decodes samples with the loader's ``decode_sample`` so that exactly the samples the
loader would skip get no features; the reference image is not stored, so it is resized to a token size."""


def dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode()


def spec_hash(spec: FeatureSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class ShardJob:
    """Features of one data shard → ``root/shards/STEM.safetensors``."""

    root: str
    """The feature set's directory (local)."""
    data_url: str
    """The data shard to read."""
    data_path: str
    """Its path as the dataset manifest lists it (relative to the dataset)."""
    data_sha256: str
    samples: int
    """Sample count from the dataset manifest."""
    spec: FeatureSpec
    data_bytes: int | None = None
    """The data shard's size from the dataset manifest (checked with its sha256 while it is read)."""

    @property
    def path(self) -> str:
        return feature_shard_path(self.data_path)

    @property
    def marker(self) -> Path:
        return Path(self.root) / PROGRESS / (self.path.rsplit("/", 1)[-1].split(".", 1)[0] + ".json")


@dataclass(frozen=True, kw_only=True)
class EmptyJob:
    """The empty prompt's T5 and pooled CLIP embeddings → ``root/empty.safetensors`` (text CFG dropout)."""

    root: str
    spec: FeatureSpec
    data_sha256: str = ""

    @property
    def path(self) -> str:
        return EMPTY

    @property
    def marker(self) -> Path:
        return Path(self.root) / PROGRESS / "empty.json"


Job = ShardJob | EmptyJob


@dataclass(kw_only=True)
class DatasetPlan:
    """One dataset's feature set: what is done, what is left."""

    dataset: str
    root: str
    name: str
    spec: FeatureSpec
    manifest_sha256: str
    data_shards: list[dict[str, Any]]
    """The dataset manifest's shards that hold samples, in its order."""
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Feature file path (relative to root) → its manifest entry, for finished jobs."""
    jobs: list[Job] = field(default_factory=list)


# ----------------------------------------------------------------------------- planning (driver)


def _local_dir(dataset: str) -> Path:
    if "://" in dataset and not dataset.startswith("file://"):
        raise ValueError(
            f"dataset {dataset}: precompute writes its features next to the dataset, so it needs a "
            "local or shared-filesystem path (copy the features to object storage afterwards)"
        )
    return Path(dataset.removeprefix("file://"))


def _done(job: Job) -> dict[str, Any] | None:
    """The entry of a finished job (marker matches, file has the recorded size), else None."""
    try:
        marker = json.loads(job.marker.read_text())
    except (OSError, ValueError):
        return None
    entry = marker.get("entry") or {}
    if marker.get("spec_hash") != spec_hash(job.spec) or marker.get("data_sha256") != job.data_sha256:
        return None
    p = Path(job.root) / job.path
    if not p.is_file() or p.stat().st_size != entry.get("bytes"):
        return None
    return entry


@contextmanager
def hold_feature_sets(datasets: Sequence[str], spec: FeatureSpec, name: str | None = None) -> Iterator[None]:
    """Holds each dataset's ``DATASET/features/NAME`` for the block (``dynaip.run_lock.RunLock``): a
    second precompute of the same feature set is refused in one line instead of writing the same
    files beside the first. A dataset without a manifest is left to ``plan_dataset``'s error (no
    directory is made inside it)."""
    from contextlib import ExitStack

    from dynaip.dataset.store import Store
    from dynaip.run_lock import RunLock

    with ExitStack() as stack:
        for d in datasets:
            base = _local_dir(d)
            if (base / "manifest.json").is_file():
                root = features_root(str(base), name or spec.default_name())
                stack.enter_context(RunLock(Store(root), what="feature precompute", error=FeatureError))
        yield


def plan_dataset(dataset: str, spec: FeatureSpec, name: str | None = None) -> DatasetPlan:
    """Prepares ``DATASET/features/NAME`` (checking an existing one was built with ``spec``) and lists its jobs."""
    base = _local_dir(dataset)
    manifest, sha = dataset_identity(str(base))
    # the one strict reader, before anything is written: paths inside the dataset, sizes and hashes present
    refs = [r for r in open_dataset(str(base)).shards if r.samples > 0]
    name = name or spec.default_name()
    root = Path(features_root(str(base), name))
    state = root / PROGRESS / "spec.json"
    if state.is_file():
        found, want = json.loads(state.read_text()), spec.to_json()
        if found != want:
            diff = ", ".join(f"{k} {found.get(k)} (this run: {want[k]})" for k in want if found.get(k) != want[k])
            raise FeatureError(
                f"{root} holds features computed with other settings — {diff}; "
                "pass another --name (or delete that directory)"
            )
    elif root.exists() and any(p.name != LOCK_NAME for p in root.iterdir()):
        raise FeatureError(f"{root} exists but is not a feature set of this tool; pass another --name or delete it")
    (root / PROGRESS).mkdir(parents=True, exist_ok=True)
    if not state.is_file():
        atomic_write_bytes(state, dump_json(spec.to_json()))
    shards = [s for s in manifest.get("shards", []) if int(s.get("samples", 0)) > 0]
    plan = DatasetPlan(dataset=str(base), root=str(root), name=name, spec=spec, manifest_sha256=sha, data_shards=shards)
    jobs: list[Job] = [EmptyJob(root=str(root), spec=spec)]
    paths = set()
    for r in refs:
        jobs.append(
            ShardJob(
                root=str(root),
                data_url=r.url,
                data_path=r.path,
                data_sha256=r.sha256,
                samples=r.samples,
                spec=spec,
                data_bytes=r.bytes,
            )
        )
        if jobs[-1].path in paths:
            raise FeatureError(f"{base}/manifest.json lists two shards with the stem of {r.path}")
        paths.add(jobs[-1].path)
    for job in jobs:
        entry = _done(job)
        if entry is not None:
            plan.done[job.path] = entry
        else:
            plan.jobs.append(job)
    if plan.jobs:  # the old manifest would describe a set that is about to change
        (root / MANIFEST).unlink(missing_ok=True)
    return plan


# ----------------------------------------------------------------------------- one job (any process)


def _decoded(job: ShardJob) -> Iterator[Any]:
    """The shard's samples that the training loader would decode (the others are skipped, as there).
    The shard's size and sha256 are checked as it is read; its samples come only after that check."""
    from dynaip.train.data import decode_sample, iter_tar

    for raw in iter_tar(job.data_url, sha256=job.data_sha256, size=job.data_bytes):
        if raw is None:
            continue
        try:
            yield decode_sample(raw, DECODE_REF_SIZE)
        except Exception as e:  # the loader skips the same samples
            log.warning(
                "%s: skipping undecodable sample %s (%s: %s)",
                job.data_url,
                raw.get("__key__", b"?").decode(errors="replace"),
                type(e).__name__,
                e,
            )


def _batches(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_batch(writer: ShardWriter, encoder: Any, batch: list[Any], buckets: Sequence[tuple[int, int]]) -> None:
    from dynaip.train.data import resize_center_crop, to_chw_uint8

    t5, pooled = encoder.text([s.txt for s in batch])
    posteriors = []
    for h, w in buckets:  # the loader's resize, then the VAE, per bucket
        tgt = torch.stack([to_chw_uint8(resize_center_crop(s.tgt, h, w)) for s in batch])
        posteriors.append(encoder.posterior(tgt))
    for i, s in enumerate(batch):
        writer.add(t5_name(s.key), t5[i])
        writer.add(pooled_name(s.key), pooled[i])
        for bucket, (mean, logvar) in zip(buckets, posteriors):
            writer.add(mean_name(s.key, bucket), mean[i])
            writer.add(logvar_name(s.key, bucket), logvar[i])


def _shard(job: ShardJob, encoder: Any, batch_size: int) -> dict[str, Any]:
    out = Path(job.root) / job.path
    writer = ShardWriter(out)
    keys: list[str] = []
    seen: set[str] = set()
    try:
        for batch in _batches(_decoded(job), batch_size):
            for s in batch:
                if s.key in seen:
                    raise FeatureError(
                        f"{job.data_url}: sample key {s.key!r} occurs twice; features are keyed by "
                        "sample key, so keys must be unique within a shard"
                    )
                seen.add(s.key)
                keys.append(s.key)
            _write_batch(writer, encoder, batch, job.spec.buckets)
    except BaseException:
        writer.abort()
        raise
    res = writer.finish({"format": FORMAT, "data": job.data_path, "keys": json.dumps(keys, separators=(",", ":"))})
    return {
        "data": job.data_path,
        "data_sha256": job.data_sha256,
        "path": job.path,
        "samples": len(keys),
        "skipped": max(0, job.samples - len(keys)),
        "bytes": res.bytes,
        "sha256": res.sha256,
        "header_sha256": res.header_sha256,
    }


def _empty(job: EmptyJob, encoder: Any) -> dict[str, Any]:
    t5, pooled = encoder.text([""])
    res = write_tensors(Path(job.root) / EMPTY, {"t5": t5, "pooled": pooled}, {"format": FORMAT})
    return {"path": EMPTY, "bytes": res.bytes, "sha256": res.sha256, "header_sha256": res.header_sha256}


def run_job(job: Job, encoder: Any, batch_size: int) -> dict[str, Any]:
    """Computes ``job``, writes its file and then its marker; returns its manifest entry."""
    entry = _shard(job, encoder, batch_size) if isinstance(job, ShardJob) else _empty(job, encoder)
    marker = {"spec_hash": spec_hash(job.spec), "data_sha256": job.data_sha256, "entry": entry}
    atomic_write_bytes(job.marker, dump_json(marker))
    return entry


# ----------------------------------------------------------------------------- manifest (driver)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("dynaip", "torch", "diffusers", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def finalize(plan: DatasetPlan, flux_dir: str) -> dict[str, Any]:
    """Writes ``manifest.json`` (last, atomically) once every job of ``plan`` is in ``plan.done``."""
    missing = [j.path for j in plan.jobs if j.path not in plan.done]
    if missing:
        raise RuntimeError(f"{plan.root}: jobs {missing[:3]} did not finish; re-run to resume")
    shards = [plan.done[feature_shard_path(s["path"])] for s in plan.data_shards]
    samples = sum(s["samples"] for s in shards)
    total = sum(s["bytes"] for s in shards)
    manifest = {
        "format": FORMAT,
        "name": plan.name,
        "spec": plan.spec.to_json(),
        "dataset": {"manifest_sha256": plan.manifest_sha256, "shards": len(plan.data_shards)},
        "models": {"flux": str(flux_dir)},
        "empty_prompt": plan.done[EMPTY],
        "shards": shards,
        "totals": {
            "samples": samples,
            "skipped": sum(s["skipped"] for s in shards),
            "bytes": total,
            "bytes_per_sample": round(total / samples) if samples else 0,
        },
        "versions": _versions(),
    }
    atomic_write_bytes(Path(plan.root) / MANIFEST, dump_json(manifest))
    return manifest


def summary(root: str, manifest: dict[str, Any]) -> str:
    """One line per feature set: samples, skipped, shards, bytes."""
    t = manifest["totals"]
    return (
        f"{root}: {t['samples']} samples ({t['skipped']} skipped) in {len(manifest['shards'])} shards, "
        f"{t['bytes']:,} bytes ({t['bytes_per_sample']:,} per sample)"
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_local(
    datasets: Sequence[str],
    models: Any,
    spec: FeatureSpec,
    *,
    name: str | None = None,
    device: torch.device = torch.device("cpu"),
    batch_size: int = 8,
    threads: int = 1,
    progress: bool = True,
) -> list[tuple[str, dict[str, Any]]]:
    """Computes (or resumes) the feature set of every dataset in this process; returns (root, manifest) each.

    ``threads``: CPU threads of the encoders (restored afterwards); the same count as a Ray run's
    gives byte-identical files.
    """
    from tqdm import tqdm

    from .encode import FeatureEncoder

    plans = [plan_dataset(d, spec, name) for d in datasets]
    todo = [(p, j) for p in plans for j in p.jobs]
    kept = sum(len(p.done) for p in plans)
    if kept:
        print(f"resuming: {kept} finished file(s) kept, {len(todo)} to compute", file=sys.stderr, flush=True)
    before = torch.get_num_threads()
    try:
        encoder = FeatureEncoder(models, device, spec, threads) if todo else None
        bar = tqdm(total=len(todo), unit="shard", desc="precompute", disable=not progress)
        for plan, job in todo:
            plan.done[job.path] = run_job(job, encoder, batch_size)
            bar.update(1)
        bar.close()
    finally:
        torch.set_num_threads(before)
    return [(p.root, finalize(p, models.flux)) for p in plans]
