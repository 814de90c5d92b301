"""Runs curation on Ray: the local executor's run (``pipeline.orchestrate.curate``) with a pool of
chunk-worker actors instead of one in-process worker.

    driver: reader → chunk records ──► worker actor (×N, anywhere in the cluster)
                                          every stage over the chunk's model batches (models
                                          loaded once per actor), then ledger → shard(s) →
                                          marker written where it runs (POSIX temp + rename,
                                          or object then marker on an object store)
            ◄── slim result (counts, shard sizes + sha256; no rejects, no sample bytes)
    driver: de-duplication reducers and rewrites on the same actors, manifest last

A chunk is built start to finish by one actor, so no decoded pixels or encoded samples ever cross
process boundaries: the only traffic is the chunk's records in and a few hundred bytes out. Each
actor reserves ``executor.cpus_per_worker`` CPUs (its torch uses as many threads), one GPU share
(``gpus_per_actor``) when the cluster has GPUs, and ``executor.resources`` (custom resources that
pin the workers to chosen nodes). The driver keeps at most two chunks queued per actor, so an actor
never waits for work and the driver's memory stays flat. An actor that dies is restarted and its
chunk retried (chunks are idempotent: a chunk without its marker is simply built again).
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Any, Iterator

from dynaip.cluster import connect
from pipeline.orchestrate import ChunkWorker, Progress, check_out, check_source, curate
from pipeline.recipe import Recipe

log = logging.getLogger(__name__)

INFLIGHT_PER_WORKER = 2


def worker_options(recipe: Recipe) -> dict[str, Any]:
    """Ray actor options of one chunk worker."""
    import ray

    ex = recipe.executor
    opts: dict[str, Any] = {"num_cpus": ex.cpus_per_worker, "max_restarts": 2, "max_task_retries": 2}
    if ex.gpus_per_actor and ray.cluster_resources().get("GPU", 0) > 0:
        opts["num_gpus"] = ex.gpus_per_actor
    if ex.resources:
        opts["resources"] = dict(ex.resources)
    return opts


def pool_size(recipe: Recipe, opts: dict[str, Any]) -> int:
    """``executor.workers``, or as many workers as the cluster's resources fit (at least one)."""
    import ray

    if recipe.executor.workers is not None:
        return recipe.executor.workers
    total = ray.cluster_resources()
    need = {
        "CPU": opts["num_cpus"],
        **({"GPU": opts["num_gpus"]} if "num_gpus" in opts else {}),
        **opts.get("resources", {}),
    }
    fits = [int(total.get(name, 0) // amount) for name, amount in need.items() if amount > 0]
    n = min(fits) if fits else 1
    if n < 1:
        missing = [name for name, amount in need.items() if total.get(name, 0) < amount]
        raise ValueError(
            f"no node of the Ray cluster offers what one curation worker needs ({need}); missing: "
            f"{', '.join(missing)} — start nodes with those resources or change executor.* in the recipe"
        )
    return n


class RayPool:
    """``size`` chunk-worker actors; ``submit`` queues a call on the least busy one (blocking while
    every actor has ``INFLIGHT_PER_WORKER`` calls queued) and returns the calls finished so far."""

    def __init__(self, recipe: Recipe, models: Any, out: str):
        import ray

        opts = worker_options(recipe)
        self.size = pool_size(recipe, opts)
        threads = max(1, int(recipe.executor.cpus_per_worker))
        cls = ray.remote(ChunkWorker).options(**opts)
        self.actors = [cls.remote(recipe, models, out, None, threads) for _ in range(self.size)]
        self.busy = [0] * self.size
        self.inflight: dict[Any, int] = {}
        self.order: deque = deque()

    def _finished(self, block: bool) -> list[Any]:
        import ray

        if not self.inflight:
            return []
        refs = list(self.inflight)
        ready, _ = ray.wait(refs, num_returns=1 if block else len(refs), timeout=None if block else 0)
        if block:  # take whatever else is done too
            more, _ = ray.wait([r for r in refs if r not in ready], num_returns=len(refs) - len(ready), timeout=0)
            ready = ready + more
        out = []
        for ref in ready:
            self.busy[self.inflight.pop(ref)] -= 1
            out.append(ray.get(ref))
        return out

    def submit(self, method: str, *args: Any) -> list[Any]:
        done = self._finished(block=False)
        while min(self.busy) >= INFLIGHT_PER_WORKER:
            done += self._finished(block=True)
        i = self.busy.index(min(self.busy))
        ref = getattr(self.actors[i], method).remote(*args)
        self.inflight[ref] = i
        self.busy[i] += 1
        return done

    def drain(self) -> Iterator[Any]:
        while self.inflight:
            yield from self._finished(block=True)

    def precisions(self) -> list[str]:
        import ray

        return ray.get([a.precision.remote() for a in self.actors])

    def nodes(self) -> list[str | None]:
        import ray

        return ray.get([a.ping.remote() for a in self.actors])

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def run_ray(
    recipe: Recipe,
    out: str | Path,
    models: Any = None,
    *,
    limit: int | None = None,
    address: str | None = None,
    progress: bool = True,
    num_cpus: int | None = None,
    progress_every: float = 5.0,
) -> dict[str, Any]:
    """Builds (or resumes) the dataset in ``out`` (a path or fsspec URL) on Ray; returns the manifest
    dict (the same bytes as ``run_local``)."""
    from pipeline.executor_local import run_info

    check_source(recipe)  # before Ray starts and the worker actors load their models
    check_out(str(out))
    connect(address, num_cpus=num_cpus)
    out = str(out) if "://" in str(out) else str(Path(out).absolute())
    pool = RayPool(recipe, models, out)
    try:
        prog = Progress(recipe, limit, enabled=progress, every=progress_every, desc="curate (ray)")
        return curate(recipe, out, pool, run_info(recipe, models), limit=limit, progress=prog)
    finally:
        pool.close()
