"""Ray executor vs local executor on the same fixture, same machine, same recipe.

Curates the bundled sample photos (× ``--copies``) with ``manifests/demo.yaml`` and the tiny
checkpoints, once with ``run_local`` and once with ``run_ray`` on an embedded local Ray
(``--cpus`` CPUs, one detect and one segment actor), ``--repeats`` times in alternating order,
each into a fresh directory. Model loading is included in both (the local executor loads each
model once; each Ray actor loads its own), as a user sees it; Ray's own start-up is reported
separately and excluded. Reports medians, the Ray/local throughput ratio and Ray's overhead per
image ((ray − local) / inputs), and checks that both outputs are byte-identical.

    .venv/bin/python benchmarks/bench_curation_ray.py [--copies 2] [--repeats 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".progress" not in p.parts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import ray

    from dynaip.models import ModelsConfig
    from dynaip.models.tiny import write_tiny_checkpoints
    from pipeline.executor_local import run_local
    from pipeline.executor_ray import connect, run_ray
    from pipeline.recipe import Recipe
    from pipeline.samples import write_sample_photos

    tmp = tempfile.mkdtemp(prefix="benchray")
    root = Path(tmp)
    try:
        models = ModelsConfig.from_yaml(write_tiny_checkpoints(root / "tiny"))
        photos = root / "photos"
        for c in range(args.copies):
            write_sample_photos(photos / f"copy{c}")
        recipe = Recipe.from_yaml(Path(__file__).resolve().parents[1] / "manifests" / "demo.yaml",
                                  source_root=str(photos))
        t0 = time.perf_counter()
        connect(None, num_cpus=args.cpus)
        ray_start = time.perf_counter() - t0
        times: dict[str, list[float]] = {"local": [], "ray": []}
        inputs = 0
        identical = True
        for r in range(args.repeats):
            outs = {}
            for kind in (("local", "ray") if r % 2 == 0 else ("ray", "local")):
                out = root / f"{kind}{r}"
                t0 = time.perf_counter()
                if kind == "local":
                    m = run_local(recipe, out, models, progress=False)
                else:
                    m = run_ray(recipe, out, models, progress=False)
                times[kind].append(time.perf_counter() - t0)
                inputs = m["totals"]["inputs"]
                outs[kind] = out
            identical &= tree(outs["local"]) == tree(outs["ray"])
            for out in outs.values():
                shutil.rmtree(out)
        local, ray_t = statistics.median(times["local"]), statistics.median(times["ray"])
        result = {
            "inputs": inputs, "repeats": args.repeats, "cpus": args.cpus,
            "local_seconds": local, "ray_seconds": ray_t, "ray_startup_seconds": ray_start,
            "local_images_per_s": inputs / local, "ray_images_per_s": inputs / ray_t,
            "ray_over_local_throughput": local / ray_t,
            "ray_overhead_seconds_per_image": (ray_t - local) / inputs,
            "outputs_byte_identical": identical,
        }
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
