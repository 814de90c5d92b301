"""Checks a training run can start, before Ray, before any model loads, and before any retry.

Everything here is an error that no restart could fix — a bad config, a missing models file or
dataset, a stage whose datasets hold none of its pair type, a resume that cannot be exact — so
``run_training`` calls ``preflight`` on the driver and fails once with one line, instead of letting
each Ray Train worker load 12 B parameters and fail ``max_failures + 1`` times. Worker crashes
(lost node, OOM, a killed process) still go to Ray Train's failure policy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from dynaip.dataset.manifest import open_dataset

from .config import TrainConfig, saved_strategy


class PreflightError(ValueError):
    """A run that cannot start as configured; the message says what to change."""


def dataset_pairs(directory: str) -> dict[str, int] | None:
    """Samples per pair type of one dataset, from its manifest (no shard is opened).

    None when the manifest predates per-shard pair counts (then the type cannot be checked ahead).
    """
    try:
        manifest = open_dataset(directory).manifest  # the one strict reader (dynaip/dataset/reader.py)
    except (FileNotFoundError, ValueError) as e:
        raise PreflightError(str(e)) from e
    shards = [s for s in manifest.get("shards", []) if int(s.get("samples", 0)) > 0]
    if not shards:
        return {}
    if any("pairs" not in s for s in shards):
        return None
    counts: dict[str, int] = {}
    for s in shards:
        for kind, n in s["pairs"].items():
            counts[kind] = counts.get(kind, 0) + int(n)
    return counts


def _describe(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "pair counts not recorded"
    if not counts:
        return "no samples"
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))


def check_stages(cfg: TrainConfig, data: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Every stage has datasets with samples of its pair type. Returns per stage its datasets' counts."""
    report: dict[str, dict[str, Any]] = {}
    cache: dict[str, dict[str, int] | None] = {}
    for stage in cfg.stages:
        dirs = stage.paths or list(data)
        if not dirs:
            raise PreflightError(f"stage '{stage.name}' has no data: pass --data DIR[,DIR] or set the stage's 'data'")
        counts = {}
        for d in dirs:
            if d not in cache:
                cache[d] = dataset_pairs(d)
            counts[d] = cache[d]
        known = [c for c in counts.values() if c is not None]
        total = sum(sum(c.values()) for c in known)
        if len(known) == len(counts) and total == 0:
            raise PreflightError(f"stage '{stage.name}': its datasets list no samples ({', '.join(dirs)})")
        if stage.pair is not None and len(known) == len(counts):
            have = sum(c.get(stage.pair, 0) for c in known)
            if have == 0:
                detail = "; ".join(f"{d}: {_describe(c)}" for d, c in counts.items())
                raise PreflightError(
                    f"stage '{stage.name}' trains on {stage.pair} pairs but its datasets hold none ({detail}); "
                    f"give the stage datasets with {stage.pair} pairs (its 'data' list) or set its pair to null"
                )
        check_scores(stage.name, dirs, stage.filters.active())
        report[stage.name] = counts
    return report


def first_sample_meta(directory: str) -> dict[str, Any] | None:
    """The json of a dataset's first sample (first shard that lists samples), or None if it cannot be read."""
    from .data import iter_tar, read_manifests

    try:
        shard = read_manifests([directory])[0]
    except ValueError:  # no samples: check_stages judges the counts
        return None
    raw = next(iter_tar(shard.url, count=1, sha256=shard.sha256, size=shard.bytes), None)  # checked first
    return json.loads(raw["json"]) if raw is not None and "json" in raw else None


def check_scores(stage: str, dirs: Sequence[str], filters: dict[str, float]) -> None:
    """Every dataset of a filtered stage stores the scores its filters read (probed on its first sample).

    Why probe: a dataset curated before the scores existed has none, and the filter would silently drop
    all of it (a sample without the score fails the filter, dynaip.train.data.rejected_by).
    """
    if not filters:
        return
    for d in dirs:
        meta = first_sample_meta(d)
        if meta is None:
            continue  # unreadable first sample: the stream skips and counts it; nothing to judge here
        missing = [name for name in filters if not isinstance((meta.get("quality") or {}).get(name), (int, float))]
        if missing:
            raise PreflightError(
                f"stage '{stage}' filters on quality.{missing[0]} but dataset '{d}' stores no such "
                "score in its samples' json; re-curate it with quality scores or drop "
                f"min_{missing[0]} from the stage's filters"
            )


def check_models(models: str) -> None:
    from dynaip.models import ModelsConfig

    try:
        cfg = ModelsConfig.from_yaml(models)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise PreflightError(str(e)) from e
    for name, path in (("flux", cfg.flux), ("clip_vision", cfg.clip_vision.path)):
        if path is None or ("://" not in str(path) and not Path(path).exists()):
            raise PreflightError(f"{models}: {name} path '{path}' does not exist; fix models.yaml")


def check_resume(
    cfg: TrainConfig, out: str, resume: bool, data: Sequence[str] = (), allow_data_change: bool = False
) -> None:
    """A ``--resume`` continues exactly only with the world size, adapter layout and data it was saved with."""
    from .checkpoints import SHARDED_ADAPTER, latest_checkpoint
    from .dataset_identity import data_change, run_datasets

    if not resume:
        return
    ckpt = latest_checkpoint(Path(out))
    if ckpt is None:
        return  # the worker logs that it starts from step 0
    state_file = ckpt / "resume" / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PreflightError(
            f"{state_file} cannot be read ({type(e).__name__}: {e}); remove the damaged checkpoint {ckpt} and resume "
            "from the one before it"
        ) from e
    if state.get("world_size") != cfg.parallel.workers:
        raise PreflightError(
            f"{ckpt} was written by {state.get('world_size')} workers, this run has {cfg.parallel.workers}; "
            "exact resume needs the same --workers"
        )
    saved = saved_strategy(state.get("config", {}))
    if (saved in SHARDED_ADAPTER) != (cfg.parallel.strategy in SHARDED_ADAPTER):
        raise PreflightError(
            f"{ckpt} was written with strategy={saved}, this run uses strategy={cfg.parallel.strategy}; "
            "resume with the same strategy (its optimizer state is laid out for it)"
        )
    change = data_change(state.get("datasets"), run_datasets(cfg, data))
    if change is not None and not allow_data_change:
        raise PreflightError(
            f"{ckpt} was trained on other data: {change}; resume with the same --data, or pass "
            "--allow-data-change to continue on the new data on purpose"
        )
    from .checkpoint_files import unreadable_file

    damage = unreadable_file(ckpt)  # last: a checkpoint of another layout is refused for that first
    if damage is not None:
        raise PreflightError(f"{damage}; remove the damaged checkpoint {ckpt} and resume from the one before it")


def preflight(
    cfg: TrainConfig, data: Sequence[str], models: str, out: str, resume: bool, allow_data_change: bool = False
) -> dict[str, Any]:
    """All of the above; returns the per-stage dataset pair counts (logged by the caller)."""
    check_models(models)
    report = check_stages(cfg, data)
    check_resume(cfg, out, resume, data, allow_data_change)
    if cfg.fidelity.every:  # the benchmark cases and the eval config, before any worker loads a model
        from .fidelity import check_fidelity

        try:
            check_fidelity(cfg.fidelity)
        except (ValueError, FileNotFoundError) as e:
            raise PreflightError(str(e).splitlines()[0]) from e
    return report
