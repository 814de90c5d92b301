"""``dynaip train``: the command-line face of the trainer (also what ``jobs/train.py`` runs)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

log = logging.getLogger(__name__)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config YAML (jobs/configs/tiny.yaml, paper.yaml)")
    p.add_argument(
        "--data",
        default="",
        help="dataset directories (local or fsspec URLs), comma-separated; stages without their own 'data' read these",
    )
    p.add_argument("--out", required=True, help="run directory: checkpoints/, samples/, metrics.jsonl")
    p.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint in OUT")
    p.add_argument(
        "--allow-data-change",
        action="store_true",
        help="with --resume: continue although the "
        "checkpoint was trained on other datasets (their manifests differ); refused otherwise",
    )
    p.add_argument("--max-steps", type=int, default=None, help="stop after step N and write a checkpoint there")
    p.add_argument(
        "--models",
        default=None,
        help="models.yaml with the local checkpoint paths "
        "(required; `dynaip tiny-checkpoints --out DIR` writes DIR/models.yaml for the tiny set)",
    )
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: embedded local Ray)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (overrides the config)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (overrides the config)")
    p.add_argument("--local", action="store_true", help="one process without Ray (debugging)")


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="streaming distributed training of the adapter (Ray Train)",
        description="Trains the DynaIP adapter on frozen FLUX.1-dev, streaming the "
        "WebDataset shards listed in the datasets' manifests. Resumable with --resume.",
    )
    add_train_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .trainer import RunSpec, run_training

    cfg = TrainConfig.from_yaml(args.config)
    if args.workers is not None:
        cfg = replace(cfg, parallel=replace(cfg.parallel, workers=args.workers))
        if cfg.data.global_batch_size % cfg.parallel.workers:
            raise ValueError(
                f"--workers {cfg.parallel.workers} does not divide global_batch_size={cfg.data.global_batch_size}"
            )
    if args.use_gpu:
        cfg = replace(cfg, parallel=replace(cfg.parallel, use_gpu=True))
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.models is None:
        raise ValueError(
            "--models M.yaml is required: the local paths of FLUX.1-dev and the CLIP vision weights "
            "(`dynaip tiny-checkpoints --out DIR` writes DIR/models.yaml for the tiny set)"
        )
    data = [d for d in args.data.split(",") if d]
    if not data and any(not s.data for s in cfg.stages):
        raise ValueError("no --data given and some stages name no datasets; pass --data DIR[,DIR]")
    data = [d if "://" in d else str(Path(d).resolve()) for d in data]
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; the run directory must be a directory (or not exist yet)")
    spec = RunSpec(
        config=cfg.to_dict(),
        data=data,
        out=str(Path(args.out).resolve()),
        models=str(Path(args.models).resolve()),
        resume=args.resume,
        max_steps=args.max_steps,
        allow_data_change=args.allow_data_change,
    )
    if args.local:
        cfg = replace(cfg, parallel=replace(cfg.parallel, workers=1))
        spec.config = cfg.to_dict()
    from .checkpoint_files import recover
    from .preflight import preflight

    recover(Path(args.out) / "checkpoints")  # what a crash mid-save left, before a checkpoint is read
    # user errors first, before anything is logged (run_training checks again for library callers)
    preflight(cfg, data, args.models, args.out, args.resume, args.allow_data_change)
    _check_features(cfg, data, args.models)
    run_training(cfg, spec, ray_address=args.ray_address, local=args.local)
    log.info("training finished; checkpoints in %s/checkpoints", spec.out)
    return 0


def _check_features(cfg, data: list[str], models_yaml: str) -> None:
    """Resolves ``features`` here, before any worker starts: a missing or stale feature set (or
    ``features: required`` without one) is a one-line error instead of a failed worker group."""
    from dynaip.models import ModelsConfig

    from .features import resolve_run

    for line in resolve_run(cfg, data, ModelsConfig.from_yaml(models_yaml).flux).notes:
        log.info("%s", line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train", description=__doc__)
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)
