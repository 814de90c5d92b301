"""Does the trained adapter use its references? Held-out loss with own vs. permuted vs. no references.

    python benchmarks/bench_reference_gap.py [--seeds 0,1,2,3,4] [--steps 1500] [--eval-at 300,600]
        [--json OUT] [--models M.yaml]   # tiny checkpoints (written to a temp dir if omitted)
        [--control shuffled-refs|no-refs]   # runs that must NOT show the gap (see below)

Method:

1. Data (tests/train_fixtures.py, in the dataset layout pipeline/writer.py writes): every
   sample's target is a 64×64 crop of one of six bundled photos, and its reference is the
   target's own centre half cut out onto white, so the reference tells about the target (as in
   curation's intra pairs). Training samples are indices 0..N-1; held-out samples are indices
   from 1000 on: other crops, never trained on.
2. Training: the real trainer (``run_training``, one process) on the tiny checkpoints with the
   trainer's defaults for everything not set here (logit-normal t with the resolution shift,
   CFG dropout 5/5/5 %, expert dropout, AdamW, grad clipping); one seed = one run (adapter init,
   data order, noise), ``--steps`` optimizer steps at a constant learning rate after a short
   warmup, so the checkpoint at step k of a longer run is the end of a k-step run (the test's).
3. Measurement (``dynaip.train.probe.reference_loss_gap``): the checkpoints at ``--eval-at`` and
   the final one, in eval mode, on one batch of all held-out samples; the flow-matching loss
   averaged over ``--draws`` draws of VAE posterior sample, noise and t, each draw shared by three
   conditions: each sample's own reference; the references rolled by one along the batch (everyone
   gets another sample's); no reference (C = 0, the same as λ = 0: bare FLUX). The same is measured
   on the untrained adapter, where all three must agree exactly (zero-initialised V: an exact no-op).

Controls (``--control``), to check that the measurement can fail:

* ``shuffled-refs``: every training sample's reference is cut from an unrelated photo crop (a
  random other sample), so the reference tells nothing about the target; held-out samples keep
  their own references. The adapter can still learn a reference-independent correction
  (off / own > 1) but has nothing to learn about *which* reference it gets: permuted / own ≈ 1.
* ``no-refs``: image CFG dropout 1.0 (text and both-dropout 0): the adapter never sees a reference
  in training, as training at λ = 0; it stays the zero-initialised no-op, own = permuted = off.

Reported per seed and over seeds (mean, std, min, max): ``permuted / own`` (> 1: the adapter
uses *which* reference it gets) and ``off / own`` (> 1: the adapter with the own reference beats
bare FLUX). tests/test_reference_gap.py runs ``measure`` for one seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

SIZE = 64
"""Target side in pixels (one 64×64 bucket: 16 packed latent tokens)."""
HELD_OUT_START = 1000
"""First held-out sample index; training uses 0..train_samples-1."""


@dataclass(kw_only=True)
class GapSettings:
    """One measurement; defaults are the benchmark's (BENCHMARKS.md)."""

    steps: int = 1500
    eval_at: tuple[int, ...] = (300, 600, 900, 1200)
    """Also measure the checkpoints at these steps (multiples of their greatest common divisor)."""
    lr: float = 1e-2
    batch: int = 4
    train_samples: int = 48
    held_out: int = 12
    draws: int = 16
    max_sequence_length: int = 16
    """T5 tokens: the captions ("a photo of sample N") take 14."""
    control: str = "none"
    """``none``, ``shuffled-refs`` or ``no-refs`` (module docstring)."""


CONTROLS = ("none", "shuffled-refs", "no-refs")


def _unrelated(i: int) -> int:
    """An index whose photo crop has nothing to do with sample ``i``'s (fixed per ``i``)."""
    import random

    return 10_000 + random.Random(i).randrange(10_000)


def write_data(root: Path, s: GapSettings) -> tuple[Path, Path]:
    """(training set, held-out set) directories."""
    from train_fixtures import write_dataset

    ref_index = _unrelated if s.control == "shuffled-refs" else None
    train = write_dataset(root / "train", [s.train_samples], size=SIZE, ref_index=ref_index)
    held = write_dataset(root / "held", [s.held_out], start=HELD_OUT_START, size=SIZE)
    return train, held


def train_config(seed: int, s: GapSettings) -> Any:
    import math

    from dynaip.train.config import TrainConfig, set_keys

    every = math.gcd(*s.eval_at) if s.eval_at else 0
    if s.control not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, not {s.control!r}")
    # no-refs: every sample's reference dropped, so nothing ever reaches the cross-attention
    drops = dict(drop_text=0.0, drop_image=1.0, drop_both=0.0) if s.control == "no-refs" else {}
    return TrainConfig.from_dict(
        set_keys(
            {},
            adapter_preset="tiny",
            stages=[{"name": "intra", "steps": s.steps, "pair": "intra"}],
            global_batch_size=s.batch,
            workers=1,
            data_workers=0,
            shuffle_block=16,
            buckets=[[SIZE, SIZE]],
            lr=s.lr,
            warmup_steps=10,
            schedule="constant",
            max_sequence_length=s.max_sequence_length,
            checkpoint_every=every,
            log_every=max(1, s.steps // 10),
            eval_every=0,
            sample_every=0,
            seed=seed,
            **drops,
        )
    )


def held_out_batch(held: Path, frozen: Any, s: GapSettings) -> dict[str, Any]:
    """All held-out samples in one batch, in stored order."""
    from dynaip.train.data import StreamingLoader, StreamSpec, read_manifests

    spec = StreamSpec(
        shards=read_manifests([str(held)]),
        batch_size=s.held_out,
        ref_size=frozen.clip.image_size,
        buckets=[(SIZE, SIZE)],
        shuffle_block=1,
    )
    return next(iter(StreamingLoader(spec, 0, 1, workers=0)))


def measure(seed: int, models: Path, train: Path, held: Path, out: Path, s: GapSettings) -> dict[str, Any]:
    """Trains one run; returns the held-out losses (``ReferenceLosses.to_dict``) of the untrained adapter
    (``untrained``), of the final one (``trained``) and of the checkpoints at ``s.eval_at`` (``at``)."""
    import torch

    from dynaip import DynaIPAdapter, DynaIPConfig
    from dynaip.models import ModelsConfig
    from dynaip.train.checkpoints import latest_checkpoint
    from dynaip.train.probe import reference_loss_gap
    from dynaip.train.step import load_frozen
    from dynaip.train.trainer import RunSpec, run_training

    cfg = train_config(seed, s)
    t0 = time.perf_counter()
    run_training(cfg, RunSpec(config=cfg.to_dict(), data=[str(train)], out=str(out), models=str(models)), local=True)
    train_s = time.perf_counter() - t0

    frozen = load_frozen(ModelsConfig.from_yaml(models), torch.device("cpu"), torch.float32)
    batch = held_out_batch(held, frozen, s)
    settings = cfg.loss
    draws = range(s.draws)

    def losses(adapter: DynaIPAdapter) -> dict[str, float]:
        adapter.attach(frozen.transformer)
        try:
            return reference_loss_gap(frozen, adapter, batch, settings, seeds=draws).to_dict()
        finally:
            adapter.detach(frozen.transformer)

    return {
        "seed": seed,
        "train_s": round(train_s, 1),
        "untrained": losses(DynaIPAdapter(DynaIPConfig.tiny())),
        "trained": losses(DynaIPAdapter.from_pretrained(latest_checkpoint(out))),
        "at": {
            k: losses(DynaIPAdapter.from_pretrained(out / "checkpoints" / f"step-{k:06d}"))
            for k in s.eval_at
            if k < s.steps
        },
    }


def summarise(losses: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, std, min, max over seeds of the ratios and differences (one ``losses`` entry per seed)."""
    rows = {
        "permuted_over_own": [x["permuted_over_own"] for x in losses],
        "off_over_own": [x["off_over_own"] for x in losses],
        "permuted_minus_own": [x["permuted"] - x["own"] for x in losses],
        "off_minus_own": [x["off"] - x["own"] for x in losses],
    }
    return {
        k: {
            "mean": statistics.fmean(v),
            "std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "min": min(v),
            "max": max(v),
        }
        for k, v in rows.items()
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = GapSettings()
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument(
        "--eval-at",
        default=",".join(map(str, d.eval_at)),
        help="also measure the checkpoints at these steps (comma-separated; empty = final only)",
    )
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--train-samples", type=int, default=d.train_samples)
    p.add_argument("--held-out", type=int, default=d.held_out)
    p.add_argument("--draws", type=int, default=d.draws, help="noise/t draws per held-out evaluation")
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    p.add_argument("--control", default="none", choices=CONTROLS, help="a run that must not show the gap")
    p.add_argument("--models", default=None, help="tiny models.yaml (written to a temp dir if omitted)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()

    import logging

    import torch

    logging.disable(logging.INFO)
    torch.set_num_threads(args.threads)
    s = GapSettings(
        steps=args.steps,
        eval_at=tuple(int(x) for x in args.eval_at.split(",") if x),
        lr=args.lr,
        batch=args.batch,
        train_samples=args.train_samples,
        held_out=args.held_out,
        draws=args.draws,
        control=args.control,
    )
    seeds = [int(x) for x in args.seeds.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = Path(args.models) if args.models else None
        if models is None:
            from dynaip.models.tiny import write_tiny_checkpoints

            models = write_tiny_checkpoints(root / "tiny")
        train, held = write_data(root, s)
        for seed in seeds:
            r = measure(seed, models, train, held, root / f"run-{seed}", s)
            runs.append(r)
            u = r["untrained"]
            print(
                f"seed {seed}: train {r['train_s']} s; untrained own/permuted/off "
                f"{u['own']:.4f} {u['permuted']:.4f} {u['off']:.4f}",
                flush=True,
            )
            for step, t in [*r["at"].items(), (s.steps, r["trained"])]:
                print(
                    f"  step {step:5d}: own {t['own']:.4f}  permuted {t['permuted']:.4f}  off {t['off']:.4f}  "
                    f"permuted/own {t['permuted_over_own']:.4f}  off/own {t['off_over_own']:.4f}",
                    flush=True,
                )
    steps = [*(k for k in s.eval_at if k < s.steps), s.steps]
    summary = {step: summarise([r["at"][step] if step < s.steps else r["trained"] for r in runs]) for step in steps}
    for step, rows in summary.items():
        print(f"over seeds {seeds}, step {step}:")
        for k, v in rows.items():
            print(f"  {k:20s} mean {v['mean']:.4f}  std {v['std']:.4f}  min {v['min']:.4f}  max {v['max']:.4f}")
    result = {
        "settings": vars(s),
        "seeds": seeds,
        "runs": runs,
        "summary": summary,
        "torch": torch.__version__,
        "threads": args.threads,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
