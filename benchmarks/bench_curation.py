"""Throughput of the local curation pipeline on the CPU with the tiny checkpoints.

    python benchmarks/bench_curation.py [--copies N] [--json OUT.json]

Curates the bundled sample photos (``copies`` times each) with ``manifests/demo.yaml`` and reports
samples/s of the whole chain (model loading excluded: one warm-up chunk runs first) and each stage's
share of wall time. Tiny random models: this measures the pipeline's plumbing and the CPU cost of the
tiny networks, not real-model throughput.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=2, help="copies of each sample photo")
    ap.add_argument("--models", default=None, help="models.yaml (default: write the tiny set)")
    ap.add_argument("--json", default=None, help="write results as JSON here")
    args = ap.parse_args()

    from dynaip.models import ModelsConfig
    from pipeline.executor_local import run_local
    from pipeline.recipe import Recipe
    from pipeline.demo_photos import write_sample_photos
    from pipeline.stages import build_stages

    work = Path(tempfile.mkdtemp(prefix="bench_curation_"))
    try:
        if args.models is None:
            from dynaip.models.tiny import write_tiny_checkpoints

            args.models = write_tiny_checkpoints(work / "tiny")
        models = ModelsConfig.from_yaml(args.models)
        photos = work / "photos"
        base = write_sample_photos(work / "base")
        photos.mkdir()
        for c in range(args.copies):
            for p in base:
                shutil.copy(p, photos / f"{p.stem}_{c}{p.suffix}")
                if p.with_suffix(".txt").exists():
                    shutil.copy(p.with_suffix(".txt"), photos / f"{p.stem}_{c}.txt")
        recipe = Recipe.from_yaml(REPO / "manifests" / "demo.yaml", source_root=str(photos))
        stages = build_stages(recipe, models)
        t0 = time.perf_counter()
        run_local(recipe, work / "warm", models, limit=1, progress=False, stages=stages)  # loads the models
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        manifest = run_local(recipe, work / "ds", models, progress=False, stages=stages)
        wall = time.perf_counter() - t0
        seconds: dict[str, float] = {}
        for marker in sorted((work / "ds" / ".progress").glob("0*.json")):
            for k, v in json.loads(marker.read_text()).get("seconds", {}).items():  # ledgers match the glob too
                seconds[k] = seconds.get(k, 0.0) + v
        t = manifest["totals"]
        result = {
            "inputs": t["inputs"],
            "accepted": t["accepted"],
            "samples": t["samples"],
            "bytes": t["bytes"],
            "wall_s": round(wall, 2),
            "model_load_s": round(load_s, 2),
            "inputs_per_s": round(t["inputs"] / wall, 3),
            "samples_per_s": round(t["samples"] / wall, 3),
            "stage_share": {k: round(v / wall, 3) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])},
            "writer_and_reader_share": round(1 - sum(seconds.values()) / wall, 3),
            "recipe": "manifests/demo.yaml",
            "device": "cpu",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
