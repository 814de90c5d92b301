"""``dynaip precompute`` on Ray: encoder actors, one call per data shard, the manifest from the driver.

Each actor loads the encoders once (T5 + CLIP text + VAE; one GPU each on a GPU cluster) and
runs ``precompute.run_job`` for the shards it is handed: it reads the data shard itself and writes
the feature shard and its marker itself, so the driver never holds sample bytes — it plans, hands
out jobs, collects the small manifest entries and writes each ``manifest.json`` last. The dataset
directories must therefore be on a filesystem every actor can write (local disk for an embedded
Ray, a shared filesystem for a cluster). Same jobs, same batches, same code as ``run_local``:
byte-identical output.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch

from .layout import FeatureSpec
from .precompute import finalize, plan_dataset, run_job


class EncoderActor:
    """Ray actor body: one ``FeatureEncoder`` for its lifetime."""

    def __init__(self, models: Any, device: str, spec: FeatureSpec, batch_size: int, threads: int):
        from .encode import FeatureEncoder

        self.encoder = FeatureEncoder(models, torch.device(device), spec, threads)
        self.batch_size = batch_size

    def run(self, tag: int, job: Any) -> tuple[int, dict[str, Any]]:
        """``tag`` comes back with the entry, so the driver knows which job finished."""
        return tag, run_job(job, self.encoder, self.batch_size)


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def run_ray(
    datasets: Sequence[str],
    models: Any,
    spec: FeatureSpec,
    *,
    name: str | None = None,
    device: str = "auto",
    batch_size: int = 8,
    address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    threads: int = 1,
    progress: bool = True,
) -> list[tuple[str, dict[str, Any]]]:
    """Computes (or resumes) the feature sets on Ray; returns (root, manifest) each, as ``run_local``.

    ``device`` auto: cuda when the cluster has GPUs. ``actors`` default: one per GPU (one actor on a
    CPU-only cluster: every actor holds its own T5). Each actor reserves and uses ``threads`` CPUs.
    Without ``address`` (and outside a Ray job) an embedded local Ray is started.
    """
    import ray
    from ray.util import ActorPool

    from dynaip.progress import Progress

    from dynaip.cluster import connect

    connect(address)
    gpus = cluster_gpus()
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if gpus_per_actor is None:
        gpus_per_actor = 1 if device == "cuda" else 0
    if device == "cuda" and gpus_per_actor <= 0:
        raise ValueError("--device cuda on Ray needs --gpus-per-actor > 0")
    if actors is None:
        actors = max(1, int(gpus // gpus_per_actor)) if gpus_per_actor else 1
    plans = [plan_dataset(d, spec, name) for d in datasets]
    todo = [(p, j) for p in plans for j in p.jobs]
    kept = sum(len(p.done) for p in plans)
    if kept:  # printed, not logged: Ray reconfigures logging in the driver of a job
        print(f"resuming: {kept} finished file(s) kept, {len(todo)} to compute", file=sys.stderr, flush=True)
    if todo:
        remote = ray.remote(num_cpus=threads, num_gpus=gpus_per_actor)(EncoderActor)
        n = min(actors, len(todo))
        pool = ActorPool([remote.remote(models, device, spec, batch_size, threads) for _ in range(n)])
        # a bar on a terminal, else a line every 5 s with rate and ETA (a Ray job's log)
        bar = Progress(f"precompute (ray, {n} actors)", len(todo), "shard", enabled=progress)
        for i, (_, job) in enumerate(todo):
            pool.submit(lambda a, arg: a.run.remote(*arg), (i, job))
        for _ in todo:
            k, entry = pool.get_next_unordered()
            plan, job = todo[k]
            plan.done[job.path] = entry
            bar.update(advance=1)
        bar.close()
    return [(p.root, finalize(p, models.flux)) for p in plans]
