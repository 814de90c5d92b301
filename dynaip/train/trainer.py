"""The streaming distributed trainer: Ray Train ``TorchTrainer`` around ``train_worker``.

This module is the driver (``run_training``); one worker process is ``worker.py`` (setup and the
loop), its checkpoint save / resume ``resume.py``, its metrics ``metrics.py``.

``run_training`` starts (or joins) Ray and runs ``train_worker`` on ``workers`` processes with
torch.distributed underneath (gloo on the CPU, nccl on GPUs). Each worker loads the frozen
FLUX + CLIP from local paths, builds the adapter, streams its share of the shards, and runs
``step.training_loss``. Rank 0 writes everything under RUN::

    RUN/metrics.jsonl                         one JSON object per log line / eval / stage switch
    RUN/checkpoints/step-NNNNNN/              adapter.safetensors + config.json (DynaIPAdapter.from_pretrained)
        resume/state.json                     step, stage, config, every rank's data position
        resume/optimizer.pt                   AdamW state (tensors and numbers; loads with weights_only=True)
        resume/rng.pt                         every rank's RNG states (uint8 tensors)
    RUN/samples/step-NNNNNN/NN.png            sample images with the fixed validation prompts/references
    RUN/tb/                                   TensorBoard events: the metrics.jsonl scalars, grad norm,
                                              per-stage progress, the sample grids (tensorboard --logdir RUN/tb)

Under Ray Train every worker also reports the logged metrics with ``ray.train.report``; Ray Train's
controller receives them and a controller callback appends rank 0's to RUN/ray/reported.jsonl
(``run_training`` returns the last ones). The driver follows that file and shows steps done / total,
steps/s, ETA and the last loss (``dynaip.progress``: a bar on a terminal, a line every 5 s otherwise).

RUN must be visible to every worker (local disk for one machine, a shared filesystem for a
cluster): rank 0 writes checkpoints, every rank reads them on ``--resume``.

Exactness: the adapter is initialised from ``seed`` on every rank (DDP also broadcasts rank
0's), every random draw of a step goes through per-rank generators or the global RNG whose
states are checkpointed, the data position is saved per rank and loader worker, and nothing
between steps (checkpoints, eval, samples) touches those RNGs. So a run stopped with
``--max-steps k`` and resumed reaches step n with bit-identical weights on the same hardware.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .metrics import report_log
from .worker import RunSpec, train_worker

log = logging.getLogger(__name__)


def run_training(
    cfg: TrainConfig, spec: RunSpec, ray_address: str | None = None, local: bool = False
) -> dict[str, Any] | None:
    """Runs the job: ``local`` = one process without Ray (debugging, benchmarks); else Ray Train.

    With no ``ray_address`` (and none in the config) and no Ray already initialised in this
    process, an embedded local Ray is started and shut down afterwards. The run directory is held
    for the whole run (``run_dir.hold``): another run on it, or a run without ``resume`` over its
    checkpoints, is refused in one line before anything in it changes.
    """
    from .run_dir import hold

    with hold(spec.out, spec.resume):
        return _run_training(cfg, spec, ray_address, local)


def _run_training(cfg: TrainConfig, spec: RunSpec, ray_address: str | None, local: bool) -> dict[str, Any] | None:
    from .checkpoint_files import recover
    from .preflight import preflight

    recover(Path(spec.out) / "checkpoints")  # before anything reads a checkpoint
    for stage, counts in preflight(cfg, spec.data, spec.models, spec.out, spec.resume, spec.allow_data_change).items():
        log.info("stage '%s' data: %s", stage, "; ".join(f"{d}: {c}" for d, c in counts.items()))
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    if not spec.run_id:
        import uuid

        spec.run_id = uuid.uuid4().hex
    if local:
        return train_worker(asdict(spec))

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dynaip.cluster import torch_config

    started = False
    if not ray.is_initialized():
        from dynaip.cluster import connect, ray_address_from_env

        # inside `ray job submit`, RAY_ADDRESS names the job's cluster
        connect(
            ray_address_from_env(ray_address or cfg.parallel.ray_address),
            num_cpus=max(os.cpu_count() or 1, cfg.parallel.workers * cfg.parallel.cpus_per_worker),
        )
        started = True
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if cfg.parallel.use_gpu else "gloo")
    resources = {"CPU": cfg.parallel.cpus_per_worker, **({"GPU": 1} if cfg.parallel.use_gpu else {})}
    spec.extra = {**spec.extra, "ray_report": True}
    reported = Path(spec.out).resolve() / "ray" / "reported.jsonl"
    reported.parent.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=asdict(spec),
        scaling_config=ScalingConfig(
            num_workers=cfg.parallel.workers, use_gpu=cfg.parallel.use_gpu, resources_per_worker=resources
        ),
        torch_config=torch_config(backend),  # on the embedded Ray: torch.distributed on loopback only
        run_config=RunConfig(
            name="dynaip-train",
            storage_path=str(Path(spec.out).resolve() / "ray"),
            failure_config=FailureConfig(max_failures=cfg.parallel.max_failures),
            callbacks=[report_log(reported)],
        ),
    )
    from .stopping import stops_through_ray_train

    try:
        with stops_through_ray_train(), _progress(cfg, spec, reported):  # a stop signal aborts controller + workers
            trainer.fit()
    except Exception as e:  # Ray wraps a worker's error; a corrupt shard is the user's to fix: say it in one line
        line = _integrity_line(e)
        if line is None:
            raise
        from .shard_integrity import ShardIntegrityError

        raise ShardIntegrityError(line) from None
    finally:
        if started:
            ray.shutdown()
    lines = reported.read_text().splitlines() if reported.is_file() else []
    return json.loads(lines[-1]) if lines else {}


@contextmanager
def _progress(cfg: TrainConfig, spec: RunSpec, reported: Path) -> Iterator[None]:
    """Steps done / total, steps/s, ETA and the last loss on the driver's console while Ray Train runs (a bar
    on a terminal, a line every few seconds otherwise), read from the rows rank 0 reports (``reported``);
    without it the console shows nothing between the set-up lines and the end of a run of hours."""
    from dynaip.progress import JsonlFollower, Progress

    bar = Progress("train", spec.max_steps or cfg.max_steps or cfg.total_steps, "step")
    first = True

    def on_row(row: dict[str, Any]) -> None:
        nonlocal first
        if not isinstance(row.get("step"), int):
            return
        if first:  # rate and ETA count from the first reported step (after start-up; a resumed run mid-way)
            bar.restart_rate(row["step"])
            first = False
        info = {"loss": row["loss"]} if isinstance(row.get("loss"), (int, float)) else {}
        bar.update(row["step"], **info)

    try:
        with JsonlFollower(reported, on_row, on_poll=bar.tick):  # lines while the workers start, too
            yield
    finally:
        bar.close()


def _integrity_line(e: BaseException) -> str | None:
    """The ``ShardIntegrityError`` (or dataset rule ``DatasetError``) message inside a Ray Train failure
    (its text or its causes), or None."""
    from .shard_integrity import ERROR_LINE

    seen = 0
    while e is not None and seen < 10:
        for ln in str(e).splitlines():
            if ERROR_LINE.match(ln):
                return ERROR_LINE.sub("", ln).strip()
        e, seen = e.__cause__ or e.__context__, seen + 1  # type: ignore[assignment]
    return None
