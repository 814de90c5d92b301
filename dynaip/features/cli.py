"""``dynaip precompute``: the command-line face of the feature precomputation (also what ``jobs/precompute.py`` runs)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_precompute_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="DATASET",
        help="curated dataset directory (repeatable, or comma-separated); default: every stage's 'data' in --config",
    )
    p.add_argument("--models", required=True, help="models.yaml (its flux entry: T5, CLIP text and VAE are used)")
    p.add_argument(
        "--config",
        required=True,
        help="training config YAML: its buckets and max_sequence_length decide what is stored",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the encoders run (auto: cuda when available)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bf16", "fp32"),
        help="encoder and storage dtype (auto: bf16 on cuda, fp32 on cpu — as training's precision: auto)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="samples per encoder call")
    p.add_argument(
        "--name",
        default=None,
        help="feature set name under DATASET/features/ (default: from the "
        "encoders' fingerprint, sequence length, dtype and buckets)",
    )
    p.add_argument(
        "--executor",
        choices=("ray", "local"),
        default="ray",
        help="ray (default: encoder actors, one job per data shard) or local (one process, no Ray)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (auto | host:port); default: an "
        "embedded local Ray (inside `ray job submit`, the job's cluster)",
    )
    p.add_argument("--actors", type=int, default=None, help="Ray encoder actors (default: one per GPU, 1 without GPUs)")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="default: 1 on cuda, 0 on cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of each encoder (the local process, or each Ray actor, which reserves as many "
        "CPUs); runs with the same count write byte-identical files",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_precompute_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "precompute",
        help="store T5/CLIP text embeddings and VAE posteriors next to datasets",
        description="Encodes every sample of curated datasets once — T5 tokens and pooled CLIP "
        "of the caption, VAE posterior mean and log-variance of the target at each training "
        "bucket — into DATASET/features/NAME/ with a manifest. Training then never loads T5, "
        "CLIP text or the VAE encoder (features: auto | required in the training config). "
        "Resumable: re-running keeps finished shards.",
    )
    add_precompute_arguments(p)
    p.set_defaults(func=run)
    return p


def _datasets(args: argparse.Namespace, cfg) -> list[str]:
    data = [d for arg in args.data for d in arg.split(",") if d]
    if not data:
        data = list(dict.fromkeys(d for s in cfg.stages for d in s.data))
    if not data:
        raise ValueError("no --data given and the config's stages name no datasets; pass --data DATASET")
    return [d if "://" in d else str(Path(d).resolve()) for d in data]


def run(args: argparse.Namespace) -> int:
    import torch

    from dynaip.models import ModelsConfig
    from dynaip.train.config import TrainConfig

    from .layout import FeatureSpec, encoders_fingerprint
    from .precompute import hold_feature_sets, resolve_device, run_local, summary

    if args.batch_size < 1 or args.threads < 1:
        raise ValueError(f"--batch-size {args.batch_size} and --threads {args.threads}: both must be >= 1")
    cfg = TrainConfig.from_yaml(args.config)
    models = ModelsConfig.from_yaml(args.models)
    datasets = _datasets(args, cfg)
    device = args.device
    if args.executor == "local":
        if args.ray_address:
            raise ValueError("--ray-address needs --executor ray")
        device = str(resolve_device(device))
    else:
        from dynaip.cluster import connect, ray_address_from_env

        from .ray_exec import cluster_gpus

        connect(ray_address_from_env(args.ray_address))
        if device == "auto":
            device = "cuda" if cluster_gpus() else "cpu"
    if device == "cuda" and args.executor == "local" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but this machine sees no CUDA device")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    spec = FeatureSpec(
        fingerprint=encoders_fingerprint(models.flux),
        max_sequence_length=cfg.loss.max_sequence_length,
        dtype=dtype,
        buckets=tuple((int(h), int(w)) for h, w in cfg.data.buckets),
    )
    log.info(
        "precompute: %d dataset(s), buckets %s, max_sequence_length %d, %s on %s",
        len(datasets),
        [list(b) for b in spec.buckets],
        spec.max_sequence_length,
        dtype,
        device,
    )
    progress = not args.no_progress
    with hold_feature_sets(datasets, spec, args.name):  # one precompute per feature set at a time
        if args.executor == "local":
            manifests = run_local(
                datasets,
                models,
                spec,
                name=args.name,
                device=torch.device(device),
                batch_size=args.batch_size,
                threads=args.threads,
                progress=progress,
            )
        else:
            from .ray_exec import run_ray

            manifests = run_ray(
                datasets,
                models,
                spec,
                name=args.name,
                device=device,
                batch_size=args.batch_size,
                actors=args.actors,
                gpus_per_actor=args.gpus_per_actor,
                threads=args.threads,
                progress=progress,
            )
    for root, manifest in manifests:
        print(summary(root, manifest))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``jobs/precompute.py``: the arguments of ``dynaip precompute``; user errors are one line, exit code 2."""
    from dynaip.models.errors import CheckpointError

    parser = argparse.ArgumentParser(
        prog="jobs/precompute.py",
        description="store text embeddings and VAE "
        "posteriors next to curated datasets (the arguments of `dynaip precompute`)",
    )
    add_precompute_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        log.error("%s", e)
        return 2
