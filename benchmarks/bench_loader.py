"""Trainer input benchmark: streaming loader throughput vs pure decode, and data-wait share of a step.

    python benchmarks/bench_loader.py [--samples 256] [--size 512] [--workers 1] [--json]
        [--models M.yaml]   # tiny checkpoints for the step measurement (written to a temp dir if omitted)

1. pure decode: one process reads every shard front to back and does exactly the loader's
   per-sample work (tar read, PNG/JPEG decode, reference pad+resize, target resize+crop, collate);
   samples/s on one core.
2. loader: ``StreamingLoader`` with N DataLoader worker processes over the same shards, one epoch,
   timed from the first batch (worker start-up excluded); samples/s, and per worker process (core).
   Goal: loader per core / pure decode >= 0.9.
3. step: the tiny-model trainer (one process, no Ray) on these shards; the share of step time spent
   waiting for the next batch (``data_wait`` in metrics.jsonl), steps 2.. (step 1 includes start-up).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def make_data(root: Path, samples: int, size: int, per_shard: int) -> Path:
    from train_fixtures import write_dataset

    sizes = [per_shard] * (samples // per_shard) + ([samples % per_shard] if samples % per_shard else [])
    return write_dataset(root / "data", sizes, size=size)


def pure_decode(spec) -> float:
    from dynaip.train.data import collate, decode_sample, iter_tar

    t = time.perf_counter()
    n, pending = 0, []
    for shard in spec.shards:
        for raw in iter_tar(shard.url, count=shard.samples):
            pending.append(decode_sample(raw, spec.ref_size))
            n += 1
            if len(pending) == spec.batch_size:
                collate(pending, spec.buckets)
                pending = []
    return n / (time.perf_counter() - t)


def loader_rate(spec, workers: int) -> float:
    from dynaip.train.data import StreamingLoader

    it = iter(StreamingLoader(spec, 0, 1, workers=workers, prefetch_factor=4))
    next(it)  # start-up: fork, first block read
    n_batches = spec.total // spec.batch_size - 1
    t = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * spec.batch_size / (time.perf_counter() - t)


def step_data_wait(data: Path, models: Path, out: Path, steps: int, workers: int) -> dict[str, float]:
    from dynaip.train.config import TrainConfig
    from dynaip.train.trainer import RunSpec, run_training

    cfg = TrainConfig.from_yaml(REPO / "jobs/configs/tiny.yaml")
    cfg.stages = cfg.stages[:1]
    cfg.stages[0].steps, cfg.stages[0].pair = steps, None
    cfg.parallel.workers, cfg.data.global_batch_size, cfg.data.data_workers = 1, 4, workers
    cfg.logging.eval_every = cfg.logging.sample_every = 0
    spec = RunSpec(config=cfg.to_dict(), data=[str(data)], out=str(out), models=str(models), extra={"no_save": True})
    run_training(cfg, spec, local=True)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "data_wait" in r and r["step"] > 1]
    return {
        "data_wait_share": sum(r["data_wait"] for r in rows) / len(rows),
        "step_samples_per_s": sum(r["samples_per_s"] for r in rows) / len(rows),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--size", type=int, default=512, help="side of the stored target/reference photos")
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--bucket", type=int, default=256, help="target side after resize+crop")
    p.add_argument("--ref-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="DataLoader processes for the loader measurement")
    p.add_argument("--steps", type=int, default=12, help="tiny-model steps for the data-wait measurement (0 = skip)")
    p.add_argument("--models", default=None, help="tiny models.yaml (written to a temp dir if omitted)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    from dynaip.train.data import StreamSpec, read_manifests

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_data(root, args.samples, args.size, args.per_shard)
        spec = StreamSpec(
            shards=read_manifests([str(data)]),
            batch_size=args.batch,
            ref_size=args.ref_size,
            buckets=[(args.bucket, args.bucket)],
            shuffle_block=64,
        )
        decode = pure_decode(spec)
        loader = loader_rate(spec, args.workers)
        result = {
            "samples": args.samples,
            "stored_px": args.size,
            "bucket_px": args.bucket,
            "batch": args.batch,
            "loader_workers": args.workers,
            "pure_decode_samples_per_s": round(decode, 1),
            "loader_samples_per_s": round(loader, 1),
            "loader_samples_per_s_per_core": round(loader / max(1, args.workers), 1),
            "ratio_per_core": round(loader / max(1, args.workers) / decode, 3),
        }
        if args.steps:
            models = Path(args.models) if args.models else None
            if models is None:
                from dynaip.models.tiny import write_tiny_checkpoints

                models = write_tiny_checkpoints(root / "tiny")
            small = make_data(root / "small", 64, 64, 16)
            step = step_data_wait(small, models, root / "run", args.steps, workers=1)
            result.update({k: round(v, 3) for k, v in step.items()})
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
