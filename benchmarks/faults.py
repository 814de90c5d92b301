"""Fault injection for curation: SIGKILL the executor at random points, resume, compare (#19).

    python benchmarks/faults.py [--kills 20] [--executor local|ray] [--stages fake|tiny] [--seed 0] [--json OUT]

1. An uninterrupted run builds the reference dataset.
2. Rounds: into a fresh directory the same run is started in a subprocess and killed with SIGKILL
   after a random delay, drawn uniformly over the reference run's duration (timed from the moment
   the child has imported everything, so the kills land in the run, not in Python's start-up).
   Each restart resumes; the round ends when a run completes before its kill. Rounds repeat until
   ``--kills`` kills have hit a live run.
3. Each round's dataset is compared with the reference: every shard byte-identical, rejects.jsonl
   identical, manifest.json equal (as JSON). "bytes lost" counts bytes of shards and rejects that
   differ from or are missing against the reference (0 = nothing lost); the temporary files the
   kills left behind (removed by the next start) are reported separately.

``--stages fake`` (default) runs the real reader, decode stage, de-duplication, writer and executor
with a model-free stage that turns each decoded image into one sample: the crash-safety of the
run does not depend on what the models compute, and a run takes about a second. ``--stages tiny``
runs every real stage with the tiny random checkpoints (slower: models load on every restart).
With ``--executor ray`` the child runs the Ray executor (embedded local Ray); the kill hits the
driver, and the worker actors die with their Ray instance.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class OneSample:
    """Model-free last stage: every decoded image becomes one intra sample."""

    name = "pair"

    def __call__(self, items):
        import numpy as np

        from pipeline.sample import Sample, sample_key

        for it in items:
            if it.ok:
                img = it.target.image
                it.samples = [
                    Sample(
                        key=sample_key(it.record.source, it.record.id),
                        ref=img,
                        tgt=img,
                        mask=np.ones(img.shape[:2], bool),
                        caption="x",
                        meta={"pair": "intra", "source_id": it.record.id},
                    )
                ]
        return items


def make_source(root: Path, n: int) -> None:
    """``n`` small random photos, every fifth one also copied (de-duplication has work), plus two
    undecodable files (rejects)."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        img[8:40, 16:48] = rng.integers(0, 255, 3)  # a flat "subject" patch
        Image.fromarray(img).save(root / f"p{i:03d}.png")
        if i % 5 == 0:
            Image.fromarray(img).save(root / f"p{i:03d}_copy.png")
    (root / "zero.png").write_bytes(b"")
    (root / "junk.png").write_bytes(b"not a picture")


def recipe_dict(root: Path, stages: str) -> dict:
    if stages == "tiny":
        import yaml

        raw = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
        raw["source"] = {"kind": "folder", "root": str(root)}
        raw.setdefault("filters", {})["min_image_side"] = 8
        raw["shards"] = {**raw.get("shards", {}), "inputs_per_shard": 3}
        return raw
    return {
        "source": {"kind": "folder", "root": str(root)},
        "filters": {"min_image_side": 8},
        "dedup": {"max_distance": 4, "hash_size": 8},
        "shards": {"inputs_per_shard": 3},
    }


def child(args: argparse.Namespace) -> int:
    """One run (what gets killed): imports first, says READY, then curates."""
    from pipeline.executor_local import run_local
    from pipeline.recipe import Recipe

    recipe = Recipe.from_dict(json.loads(Path(args.recipe).read_text()))
    models, stages = None, None
    if args.stages == "fake":
        from pipeline.stages import DecodeStage

        stages = [DecodeStage(recipe), OneSample()]
    else:
        from dynaip.models import ModelsConfig

        models = ModelsConfig.from_yaml(args.models)
    if args.executor == "ray":
        from dynaip.cluster import connect
        from pipeline.executor_ray import run_ray

        connect(None, num_cpus=2)
        print("READY", flush=True)
        if stages is None:
            run_ray(recipe, args.out, models, progress=False)
        else:  # run_ray's pool, with the fake stage list handed to each actor (pickled by value)
            from collections import deque

            import ray

            from pipeline.executor_local import run_info
            from pipeline.executor_ray import RayPool, pool_size, worker_options
            from pipeline.orchestrate import ChunkWorker, curate

            opts = worker_options(recipe)
            pool = RayPool.__new__(RayPool)
            pool.size = pool_size(recipe, opts)
            cls = ray.remote(ChunkWorker).options(**opts)
            pool.actors = [cls.remote(recipe, None, args.out, stages, 1) for _ in range(pool.size)]
            pool.busy, pool.inflight, pool.order = [0] * pool.size, {}, deque()
            curate(recipe, args.out, pool, run_info(recipe, None))
    else:
        print("READY", flush=True)
        run_local(recipe, args.out, models, progress=False, stages=stages)
    return 0


def start(args: argparse.Namespace, recipe: Path, out: Path, models: str | None) -> subprocess.Popen:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--recipe",
        str(recipe),
        "--out",
        str(out),
        "--stages",
        args.stages,
        "--executor",
        args.executor,
    ]
    if models:
        cmd += ["--models", models]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    # a session of its own: SIGKILL to the group takes the child's helpers (Ray's processes) with it
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )


STARTS = {"failed": 0}


def launch(args: argparse.Namespace, recipe: Path, out: Path, models: str | None) -> subprocess.Popen:
    """A child that reached READY. A child that fails before it (an embedded Ray timing out at
    start-up on an overloaded machine) never touched the dataset: counted, and started again."""
    for _ in range(5):
        p = start(args, recipe, out, models)
        line = p.stdout.readline()
        if line.strip() == "READY":
            return p
        _, err = p.communicate()
        STARTS["failed"] += 1
        last = f"{line}{err[-2000:]}"
    raise RuntimeError(f"child did not start five times: {last}")


def finish(p: subprocess.Popen) -> None:
    _, err = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"run failed (rc {p.returncode}): {err[-3000:]}")


def files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).as_posix().startswith(".progress/")
    }


def temp_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.tmp") if p.is_file())


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="faults_"))
    try:
        src = work / "src"
        make_source(src, args.inputs)
        recipe = work / "recipe.json"
        recipe.write_text(json.dumps(recipe_dict(src, args.stages)))
        models = None
        if args.stages == "tiny":
            from dynaip.models.tiny import write_tiny_checkpoints

            models = str(write_tiny_checkpoints(work / "ckpt"))
        ref = work / "ref"
        p = launch(args, recipe, ref, models)
        t0 = time.perf_counter()
        finish(p)
        duration = time.perf_counter() - t0
        a = files(ref)
        injected = restarts = rounds = survived = lost = leftovers = 0
        extra: list[str] = []
        manifests_equal = shards_identical = True
        while injected < args.kills:
            # one round: a fresh directory, killed and resumed until a run completes, then compared
            rounds += 1
            out = work / f"out{rounds}"
            while True:
                p = launch(args, recipe, out, models)
                restarts += 1
                time.sleep(rng.uniform(0, duration))
                if p.poll() is not None:
                    finish(p)  # this (resumed) run completed before its kill: the round is over
                    break
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                injected += 1
                leftovers += temp_bytes(out)
            b = files(out)
            round_lost = sum(len(v) for k, v in a.items() if b.get(k) != v)
            round_extra = sorted(set(b) - set(a))
            m_eq = json.loads(a["manifest.json"]) == json.loads(b["manifest.json"])
            s_eq = all(b.get(k) == v for k, v in a.items() if k.startswith("shards/")) and not round_extra
            lost += round_lost
            extra += round_extra
            manifests_equal &= m_eq
            shards_identical &= s_eq
            survived += int(m_eq and s_eq and round_lost == 0)
            shutil.rmtree(out, ignore_errors=True)
        return {
            "executor": args.executor,
            "stages": args.stages,
            "inputs": args.inputs,
            "reference_run_s": round(duration, 2),
            "kills_injected": injected,
            "rounds": rounds,
            "rounds_survived": survived,
            "restarts": restarts,
            "survived": bool(survived == rounds and lost == 0),
            "shards_identical": shards_identical,
            "manifest_equal": manifests_equal,
            "bytes_lost": lost,
            "unexpected_files": extra,
            "temp_bytes_left_by_kills": leftovers,
            "child_start_failures_retried": STARTS["failed"],
            "shards": sum(1 for k in a if k.startswith("shards/")),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="kills that must hit a live run")
    ap.add_argument("--inputs", type=int, default=30, help="source photos (plus copies and two broken files)")
    ap.add_argument("--executor", choices=("local", "ray"), default="local")
    ap.add_argument("--stages", choices=("fake", "tiny"), default="fake")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the result here too")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--models", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    result = run(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if result["survived"] else 1


if __name__ == "__main__":
    sys.exit(main())
