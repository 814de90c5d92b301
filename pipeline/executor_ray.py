"""Runs the curation stages on Ray Data — the same stage objects as the local executor, composed
as a streaming Ray Data pipeline:

    model batches (one row each)
      → decode                       CPU tasks
      → detect                       actor pool (Grounding DINO; GPUs per actor from the recipe)
      → select                       CPU tasks
      → segment                      actor pool (SAM)
      → compose → caption → pair     CPU tasks (an actor pool when captioning uses a model)
      → encode                       CPU tasks (tar members or rejects)
      → driver: chunk complete → shard + marker (atomic), manifest last

A row is one *model batch* exactly as the local executor forms it (``pipeline.chunking``), so
both executors run the models on identical batches and write byte-identical shards. Finished
chunks (markers) are skipped before anything is scheduled: a crashed or stopped job that is
submitted again resumes. Per-record failures are rejects inside the stages; a failure of a whole
row (a bug) rejects that row's records with the stage name instead of failing the job.

Shards are written by the driver as chunks complete: simple and ordered, at the cost of encoded
samples crossing the network once; at very large scale, run several jobs over disjoint source
parts (one per output directory) rather than one huge driver.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pipeline.chunking import assemble, batch_outcome, plan_chunk
from pipeline.executor_local import chunked, input_fingerprint, run_info
from pipeline.recipe import Recipe
from pipeline.sources import get_reader
from pipeline.stages import (CaptionStage, ComposeStage, DecodeStage, DetectStage, PairStage, SegmentStage,
                             SelectStage, run_stages)
from pipeline.writer import ChunkResult, DatasetWriter

log = logging.getLogger(__name__)


def connect(address: str | None, *, num_cpus: int | None = None) -> None:
    """Joins a cluster (``auto`` or ``host:port``) or starts an embedded local Ray.

    The embedded Ray keeps token authentication on (Ray's default) and its dashboard on loopback.
    """
    import ray

    if ray.is_initialized():
        return
    from dynaip.console import quiet_ray_data, ray_init_kwargs

    if address:
        ray.init(address=address, **{"log_to_driver": True, **ray_init_kwargs()})
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1",
                 **ray_init_kwargs({"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}))
    quiet_ray_data()


def _run_rows(batch: dict[str, np.ndarray], stages: list, jpeg_quality: int | None) -> dict[str, np.ndarray]:
    """Applies ``stages`` to every row's item batch; with ``jpeg_quality`` also encodes the outcome."""
    payloads, timings = [], []
    for payload, timing in zip(batch["payload"], batch["timings"]):
        positions, items = pickle.loads(payload)
        t: dict[str, float] = json.loads(timing)
        items = run_stages(items, stages, t)
        if jpeg_quality is not None:
            payloads.append(pickle.dumps((positions, batch_outcome(items, positions, jpeg_quality))))
        else:
            payloads.append(pickle.dumps((positions, items)))
        timings.append(json.dumps(t))
    return {"chunk": batch["chunk"], "batch": batch["batch"], "payload": np.array(payloads, dtype=object),
            "timings": np.array(timings, dtype=object)}


def run_cpu_stages(batch: dict[str, np.ndarray], stages: list, jpeg_quality: int | None = None) -> dict[str, np.ndarray]:
    """Ray task form (stateless CPU stages)."""
    return _run_rows(batch, stages, jpeg_quality)


class ModelStageActor:
    """Ray actor form: the stage (and its model) lives as long as the actor."""

    def __init__(self, stages: list):
        self.stages = stages

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _run_rows(batch, self.stages, None)


def build_ray_pipeline(rows: list[dict[str, Any]], recipe: Recipe, models: Any):
    """The Ray Data dataset of processed rows (lazy; streams when iterated)."""
    import ray

    ex = recipe.executor
    gpus = ex.gpus_per_actor if _cluster_has_gpus() else 0
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    cpu = dict(batch_size=1, batch_format="numpy", num_cpus=1)
    ds = ds.map_batches(run_cpu_stages, fn_kwargs={"stages": [DecodeStage(recipe)]}, **cpu)
    pool = ray.data.ActorPoolStrategy
    ds = ds.map_batches(ModelStageActor, fn_constructor_args=([DetectStage(recipe, models)],),
                        compute=pool(size=ex.detect_actors), num_gpus=gpus, batch_size=1, batch_format="numpy")
    ds = ds.map_batches(run_cpu_stages, fn_kwargs={"stages": [SelectStage(recipe)]}, **cpu)
    ds = ds.map_batches(ModelStageActor, fn_constructor_args=([SegmentStage(recipe, models)],),
                        compute=pool(size=ex.segment_actors), num_gpus=gpus, batch_size=1, batch_format="numpy")
    tail = [ComposeStage(recipe), CaptionStage(recipe, models), PairStage(recipe)]
    if recipe.captioning.model:  # a captioning model should load once per actor, not once per task
        ds = ds.map_batches(ModelStageActor, fn_constructor_args=(tail,), compute=pool(size=ex.detect_actors),
                            num_gpus=gpus, batch_size=1, batch_format="numpy")
        ds = ds.map_batches(run_cpu_stages, fn_kwargs={"stages": [], "jpeg_quality": recipe.shards.jpeg_quality}, **cpu)
    else:
        ds = ds.map_batches(run_cpu_stages, fn_kwargs={"stages": tail, "jpeg_quality": recipe.shards.jpeg_quality}, **cpu)
    return ds


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def run_ray(recipe: Recipe, out: str | Path, models: Any = None, *, limit: int | None = None,
            address: str | None = None, progress: bool = True, num_cpus: int | None = None) -> dict[str, Any]:
    """Builds (or resumes) the dataset in ``out`` on Ray; returns the manifest dict (same as ``run_local``)."""
    import ray
    from tqdm import tqdm

    # The reader checks its source first (SourceError before Ray starts or any model loads).
    records: Iterable = get_reader(recipe.source.kind)(recipe.source)
    connect(address, num_cpus=num_cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours shows accepted/rejected
    writer = DatasetWriter(out, recipe.recipe_hash, jpeg_quality=recipe.shards.jpeg_quality,
                           max_bytes=recipe.shards.max_bytes)
    writer.prepare(recipe.to_dict())
    if limit is not None:
        records = itertools.islice(records, limit)
    k = recipe.shards.inputs_per_shard
    results: dict[int, ChunkResult] = {}
    pending: dict[int, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for chunk, part in chunked(records, k):
        fp = input_fingerprint(part)
        done = writer.done(chunk, fp)
        if done is not None:
            results[chunk] = done
            continue
        reader_rejects, tasks = plan_chunk(chunk, part, chunk * k, recipe.executor.batch_size)
        pending[chunk] = {"part": part, "fp": fp, "outcome": list(reader_rejects), "left": len(tasks), "timings": {}}
        for t in tasks:
            rows.append({"chunk": chunk, "batch": t.batch, "payload": pickle.dumps((t.positions, t.items)),
                         "timings": "{}"})
    if results:  # printed, not logged: Ray reconfigures logging in the driver of a job
        print(f"resuming: {len(results)} finished chunk(s) kept, {len(pending)} to build", file=sys.stderr, flush=True)
    bar = tqdm(total=sum(len(p["part"]) for p in pending.values()), unit="input", desc="curate (ray)",
               disable=not progress)
    accepted = sum(r.accepted for r in results.values())
    rejected = sum(r.rejected for r in results.values())

    def finish(chunk: int) -> None:
        nonlocal accepted, rejected
        p = pending.pop(chunk)
        encoded, rejects = assemble(p["part"], p["outcome"])
        res = writer.write_chunk(chunk, p["fp"], len(p["part"]), encoded, rejects, p["timings"])
        results[chunk] = res
        accepted, rejected = accepted + res.accepted, rejected + res.rejected
        bar.update(len(p["part"]))
        bar.set_postfix(accepted=accepted, rejected=rejected)

    for chunk in [c for c, p in pending.items() if p["left"] == 0]:  # only reader rejects
        finish(chunk)
    if rows:
        ds = build_ray_pipeline(rows, recipe, models)
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
            for chunk, payload, timing in zip(batch["chunk"], batch["payload"], batch["timings"]):
                chunk = int(chunk)
                _, outcome = pickle.loads(payload)
                p = pending[chunk]
                p["outcome"].extend(outcome)
                for name, sec in json.loads(timing).items():
                    p["timings"][name] = p["timings"].get(name, 0.0) + sec
                p["left"] -= 1
                if p["left"] == 0:
                    finish(chunk)
    bar.close()
    if pending:
        raise RuntimeError(f"Ray returned no result for chunks {sorted(pending)}; re-run to resume")
    return writer.finalize([results[c] for c in sorted(results)], run_info(recipe, models))


def ray_address_from_env(cli_value: str | None) -> str | None:
    """``--ray-address`` wins; inside ``ray job submit`` Ray sets RAY_ADDRESS, so the job joins its cluster."""
    return cli_value or os.environ.get("RAY_ADDRESS") or None
