"""Ray executor vs local executor on the same fixture, same machine, same recipe.

Curates ``--inputs`` inputs — the bundled sample photos plus augmented copies of them (crop, flip,
small rotation, brightness, rescale; seeded, so the same call writes the same files) — with
``manifests/demo.yaml`` and the tiny checkpoints, once with the local executor and once on an
embedded local Ray of ``--cpus`` CPUs, ``--repeats`` times in alternating order, each run in a fresh
process and into a fresh directory. Model loading is inside both timings (the local executor loads
each model once; each Ray worker loads its own), as a user sees it; Ray's own start-up is reported
separately and excluded. Reports medians, the Ray/local throughput ratio, the peak RSS of each
run's driver process, and checks that both outputs are byte-identical.

    .venv/bin/python benchmarks/bench_curation_ray.py [--inputs 500] [--repeats 2] [--json OUT]
    .venv/bin/python benchmarks/bench_curation_ray.py --inputs 1000 --executors ray --repeats 1 --driver-only

``--driver-only`` measures the Ray driver alone: every input is rejected in the workers' decode
stage (``filters.min_image_side`` set above any photo), so the run costs seconds while the driver
still reads, schedules and collects every chunk, runs the de-duplication pass and writes the
manifest — its peak RSS at 100 vs 1,000 inputs shows whether driver memory grows with the inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".progress" not in p.parts
    }


def write_inputs(root: Path, n: int) -> Path:
    """The sample photos plus augmented copies: at least ``n`` folder-source inputs under ``root``."""
    import numpy as np
    from PIL import Image, ImageEnhance

    from pipeline.demo_photos import write_sample_photos

    base = write_sample_photos(root / "orig")
    per_copy = len(base) + 2  # + the two cross records of the motorcycle views
    copies = max(0, -(-(n - per_copy) // per_copy))
    for c in range(copies):
        rng = np.random.default_rng(c)
        for src in base:
            im = Image.open(src).convert("RGB")
            w, h = im.size
            fx, fy = rng.uniform(0.7, 0.95, size=2)
            x0, y0 = int(rng.uniform(0, 1 - fx) * w), int(rng.uniform(0, 1 - fy) * h)
            im = im.crop((x0, y0, x0 + int(fx * w), y0 + int(fy * h)))
            if rng.random() < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            im = im.rotate(float(rng.uniform(-10, 10)), resample=Image.BICUBIC, expand=False, fillcolor=(255, 255, 255))
            im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.8, 1.2)))
            scale = float(rng.uniform(256, 400)) / min(im.size)
            im = im.resize((max(64, round(im.width * scale)), max(64, round(im.height * scale))), Image.BICUBIC)
            dst = root / f"aug{c:03d}" / src.relative_to(root / "orig")
            dst.parent.mkdir(parents=True, exist_ok=True)
            im.save(dst.with_suffix(".jpg"), format="JPEG", quality=90)
            cap = src.with_suffix(".txt")
            if cap.is_file():
                shutil.copy(cap, dst.with_suffix(".txt"))
    return root


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: across fork + exec Linux carries the
    parent's high-water mark into the child, and the parent here has loaded torch."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """One run in this process; prints its JSON result."""
    from dynaip.models import ModelsConfig
    from pipeline.recipe import Recipe

    models = ModelsConfig.from_yaml(args.models)
    recipe = Recipe.from_yaml(REPO / "manifests" / "demo.yaml", source_root=args.photos)
    if args.driver_only:
        recipe.filters.min_image_side = 10**6
    start = 0.0
    if args.child == "ray":
        from dynaip.cluster import connect
        from pipeline.executor_ray import run_ray

        t0 = time.perf_counter()
        connect(None, num_cpus=args.cpus)
        start = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = run_ray(recipe, args.out, models, limit=args.inputs, progress=False)
    else:
        from pipeline.executor_local import run_local

        t0 = time.perf_counter()
        m = run_local(recipe, args.out, models, limit=args.inputs, progress=False)
    seconds = time.perf_counter() - t0
    rss = peak_rss_mib()
    print(
        "RESULT "
        + json.dumps(
            {
                "seconds": seconds,
                "ray_startup_seconds": start,
                "inputs": m["totals"]["inputs"],
                "accepted": m["totals"]["accepted"],
                "duplicates": m["totals"]["rejected_by_reason"].get("dedup: duplicate", 0),
                "driver_peak_rss_mib": rss,
            }
        ),
        flush=True,
    )


def run_child(kind: str, args: argparse.Namespace, photos: Path, models: Path, out: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--photos",
        str(photos),
        "--models",
        str(models),
        "--out",
        str(out),
        "--inputs",
        str(args.inputs),
        "--cpus",
        str(args.cpus),
    ]
    if args.driver_only:
        cmd.append("--driver-only")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{kind} run failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--executors", default="local,ray", help="comma-separated: local, ray")
    ap.add_argument("--json", default=None)
    ap.add_argument("--driver-only", action="store_true", help="every input rejected at decode: driver memory only")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--photos", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--models", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    from dynaip.models.tiny import write_tiny_checkpoints

    kinds = [k for k in args.executors.split(",") if k]
    root = Path(tempfile.mkdtemp(prefix="benchray"))
    try:
        models = write_tiny_checkpoints(root / "tiny")
        photos = write_inputs(root / "photos", args.inputs)
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        identical = True
        for r in range(args.repeats):
            outs = {}
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                out = root / f"{kind}{r}"
                runs[kind].append(run_child(kind, args, photos, models, out))
                print(kind, r, json.dumps(runs[kind][-1]), file=sys.stderr, flush=True)
                outs[kind] = out
            if len(outs) == 2:
                identical &= tree(outs["local"]) == tree(outs["ray"])
            for out in outs.values():
                shutil.rmtree(out)
        result: dict = {
            "inputs": runs[kinds[0]][0]["inputs"],
            "repeats": args.repeats,
            "cpus": args.cpus,
            "accepted": runs[kinds[0]][0]["accepted"],
            "duplicates": runs[kinds[0]][0]["duplicates"],
        }
        for kind in kinds:
            secs = statistics.median(x["seconds"] for x in runs[kind])
            result[f"{kind}_seconds"] = secs
            result[f"{kind}_seconds_all"] = [round(x["seconds"], 1) for x in runs[kind]]
            result[f"{kind}_images_per_s"] = result["inputs"] / secs
            result[f"{kind}_driver_peak_rss_mib"] = max(x["driver_peak_rss_mib"] for x in runs[kind])
        if "ray" in kinds:
            result["ray_startup_seconds"] = statistics.median(x["ray_startup_seconds"] for x in runs["ray"])
        if len(kinds) == 2:
            result["ray_over_local_throughput"] = result["local_seconds"] / result["ray_seconds"]
            result["ray_over_local_per_repeat"] = [
                round(a["seconds"] / b["seconds"], 3) for a, b in zip(runs["local"], runs["ray"])
            ]
            result["outputs_byte_identical"] = identical
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
