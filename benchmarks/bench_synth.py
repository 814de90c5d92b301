"""Diptych generation throughput (`dynaip synth`): diptychs per minute of the ``generate`` stage and of
the whole synth chain (generate → split → detect → segment → consistency → shards) in one process.

    python benchmarks/bench_synth.py --device cuda --models models.yaml [--n 8] [--json OUT.json]
    python benchmarks/bench_synth.py --device cpu [--n 4]            # tiny random checkpoints, 64 × 32

``--device cuda`` uses the full-size settings of manifests/synth.yaml (1056 × 528, 28 steps, guidance
3.5, bfloat16) with the checkpoints of ``--models``. ``--device cpu`` defaults to the tiny checkpoints
(written on the fly) at 64 × 32 and 2 steps: that measures the plumbing, not FLUX. One diptych is
generated first to load the models (its time is reported apart).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--models", default=None, help="models.yaml (default on the CPU: write the tiny set)")
    ap.add_argument("--n", type=int, default=4, help="diptychs timed (after one warm-up)")
    ap.add_argument("--width", type=int, default=None, help="default: 1056 on cuda, 64 on cpu")
    ap.add_argument("--height", type=int, default=None, help="default: 528 on cuda, 32 on cpu")
    ap.add_argument("--steps", type=int, default=None, help="default: 28 on cuda, 2 on cpu")
    ap.add_argument("--no-chain", action="store_true", help="time the generate stage only")
    ap.add_argument("--json", default=None, help="write results as JSON here")
    args = ap.parse_args()
    full = args.device == "cuda"
    width, height = args.width or (1056 if full else 64), args.height or (528 if full else 32)
    steps = args.steps or (28 if full else 2)

    import yaml

    from dynaip.models import ModelsConfig
    from pipeline.executor_local import run_local
    from pipeline.recipe import Recipe
    from pipeline.sample import make_items
    from pipeline.sources import synth
    from pipeline.stages import build_stages

    work = Path(tempfile.mkdtemp(prefix="bench_synth_"))
    if args.models is None:
        if full:
            raise SystemExit(
                "--device cuda needs --models models.yaml with the real FLUX.1-dev (no tiny numbers on a GPU)"
            )
        from dynaip.models.tiny import write_tiny_checkpoints

        args.models = write_tiny_checkpoints(work / "tiny")
    models = ModelsConfig.from_yaml(args.models)
    raw = yaml.safe_load((REPO / "manifests" / "synth.yaml").read_text())
    raw["source"].update(
        {"subjects": args.n + 1, "seeds_per_subject": 1, "width": width, "height": height, "steps": steps}
    )
    raw["executor"]["device"] = args.device
    if not full:  # the tiny detector's boxes are random: the demo's loosened filters (manifests/demo.yaml)
        demo = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
        raw["detection"].update({k: demo["detection"][k] for k in ("box_threshold", "text_threshold")})
        raw["detection"].update({"image_size": 64, "max_size": 128})
        raw["filters"].update({**demo["filters"], "min_image_side": 16, "min_reference_side": 2})
    recipe = Recipe.from_dict(raw)
    records = list(synth.read(recipe.source))
    stages = build_stages(recipe, models)
    gen = stages[0]

    t0 = time.perf_counter()
    gen(make_items(records[:1]))
    warm = time.perf_counter() - t0
    _sync(args.device)
    t0 = time.perf_counter()
    gen(make_items(records[1:]))
    _sync(args.device)
    gen_s = time.perf_counter() - t0
    out = {
        "device": _device_name(args.device),
        "width": width,
        "height": height,
        "steps": steps,
        "guidance": recipe.source.options["guidance"],
        "n": args.n,
        "warmup_s": round(warm, 2),
        "generate_s": round(gen_s, 2),
        "generate_diptychs_per_min": round(60 * args.n / gen_s, 2),
    }
    if not args.no_chain:
        recipe.shards.inputs_per_shard = max(1, args.n)
        t0 = time.perf_counter()
        m = run_local(recipe, work / "ds", models, limit=args.n + 1, progress=False, stages=stages)
        chain = time.perf_counter() - t0
        t = m["totals"]
        out.update(
            {
                "chain_s": round(chain, 2),
                "chain_diptychs_per_min": round(60 * t["inputs"] / chain, 2),
                "inputs": t["inputs"],
                "accepted": t["accepted"],
                "rejected": t["rejected"],
                "samples": t["samples"],
                "rejected_by_reason": t["rejected_by_reason"],
            }
        )
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    import platform

    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


if __name__ == "__main__":
    sys.exit(main())
