"""Fault injection for training: kill -9 a two-worker run at random points, resume, compare bitwise.

    python benchmarks/faults_train.py [--kills 20] [--steps KILLS+4] [--seed 0] [--json OUT.json]

Two training processes on the CPU with torch.distributed over gloo (no Ray: this script is the
launcher, ``--worker`` is one rank; ``dynaip.train.worker.train_worker`` is the very function Ray
Train runs). The tiny checkpoints and a small dataset are written to a temporary directory.

1. reference: the run from step 0 to ``--steps`` uninterrupted;
2. faulted: the same run started, then its whole process group (both ranks and their children)
   killed with SIGKILL at a random point (``wait_for_kill_point``: during start-up, or a random time
   after the next step logged), then resumed with ``--resume``, again and again until ``--kills``
   kills were injected; then resumed to the end without a kill. A checkpoint is written every step
   (``keep_checkpoints: 2``), so kills land while weights, optimizer, RNG or state are being written
   and fsynced, while old checkpoints are pruned, while models load, and mid-step.
3. per kill: *survived* when the next start resumed from a checkpoint no older than the newest one
   complete before the kill (``lost`` otherwise: a checkpoint vanished or could not be resumed);
   at the end the faulted run's final adapter weights and every logged loss must equal the
   reference's bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_main(spec_path: str) -> None:
    """One rank: join the gloo group the launcher described in the environment, then train."""
    import torch.distributed as dist

    from dynaip.train.worker import train_worker

    dist.init_process_group("gloo")
    try:
        train_worker(json.loads(Path(spec_path).read_text()))
    finally:
        dist.destroy_process_group()


def setup(root: Path, steps: int) -> tuple[dict, Path]:
    """The run's spec (without out/resume) and the config; data and tiny checkpoints under ``root``."""
    import yaml

    from dynaip.models.tiny import write_tiny_checkpoints
    from dynaip.train.config import TrainConfig, set_keys
    from dynaip.train.trainer import RunSpec
    from train_fixtures import write_dataset

    models = write_tiny_checkpoints(root / "ckpt")
    intra = write_dataset(root / "intra", [3, 2], size=64)
    cross = write_dataset(root / "cross", [2, 3], pair="cross", start=50, size=64)
    cfg = yaml.safe_load((REPO / "jobs" / "configs" / "tiny.yaml").read_text())
    half = steps // 2
    cfg = set_keys(
        cfg,
        stages=[
            {"name": "intra", "steps": half, "pair": "intra", "data": [str(intra)]},
            {"name": "cross", "steps": steps - half, "pair": "cross", "data": [str(cross)]},
        ],
        lr=1e-2,
        checkpoint_every=1,
        keep_checkpoints=2,
        eval_every=0,
        sample_every=0,
        data_workers=0,
        log_every=1,
    )
    spec = RunSpec(config=TrainConfig.from_dict(cfg).to_dict(), data=[], out="", models=str(models), run_id="")
    return asdict(spec), models


def launch(spec: dict, out: Path, resume: bool, log) -> subprocess.Popen:
    """Both ranks under one launcher process in a session of its own (so one killpg ends them all)."""
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / ".spec.json"
    spec_path.write_text(json.dumps({**spec, "out": str(out), "resume": resume}))
    code = (
        "import os, subprocess, sys\n"
        "env = dict(os.environ, MASTER_ADDR='127.0.0.1', MASTER_PORT=sys.argv[2], WORLD_SIZE='2')\n"
        "ps = [subprocess.Popen([sys.executable, sys.argv[1], '--worker', sys.argv[3]],"
        " env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(2)]\n"
        "sys.exit(max(p.wait() for p in ps))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(Path(__file__).resolve()), str(_free_port()), str(spec_path)],
        start_new_session=True,
        stdout=log,
        stderr=log,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )


def newest_step(out: Path) -> int:
    from dynaip.train.checkpoints import latest_checkpoint

    c = latest_checkpoint(out)
    return int(c.name.split("-")[1]) if c is not None else 0


def starts(out: Path) -> list[int]:
    """The step every start so far began at (the ``start`` records of metrics.jsonl)."""
    path = out / "metrics.jsonl"
    rows = path.read_text().splitlines() if path.exists() else []
    return [json.loads(x)["step"] for x in rows if '"event": "start"' in x]


def metric_lines(out: Path) -> list[str]:
    path = out / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def logged_steps(out: Path, since: int = 0) -> list[int]:
    """Steps that logged a loss in metrics.jsonl after its first ``since`` lines (this segment's)."""
    return [json.loads(x)["step"] for x in metric_lines(out)[since:] if '"loss"' in x]


def wait_for_kill_point(
    p: subprocess.Popen, out: Path, rng: random.Random, startup_s: float, step_s: float
) -> dict | None:
    """Waits for a random kill point; None when the run ended first.

    15 % of kills land during start-up (models loading, checkpoint recovery, resume); the rest right
    after step ``newest + 1`` logged its loss, plus U(0, step time): that is while its checkpoint is
    being written (a checkpoint every step) or while the next step computes.
    """
    t0 = time.monotonic()
    since = len(metric_lines(out))  # only this segment's lines count (a killed one may have logged past its checkpoint)
    if rng.random() < 0.15:
        point = {"phase": "startup", "delay_s": round(rng.uniform(0.1, 0.9) * startup_s, 2)}
        deadline = t0 + point["delay_s"]
        # the reference's start-up time is only an estimate (a loaded machine): a start that is quicker
        # and already logs a step is killed then, so the kill is not lost to a run that ends first
        while p.poll() is None and time.monotonic() < deadline and not logged_steps(out, since):
            time.sleep(0.02)
        deadline = time.monotonic()
    else:
        target = newest_step(out) + 1
        point = {"phase": "after_step", "step": target, "extra_s": round(rng.uniform(0, step_s), 2)}
        deadline = None
        while p.poll() is None:
            if target in logged_steps(out, since):
                deadline = time.monotonic() + point["extra_s"]
                break
            time.sleep(0.05)
    while p.poll() is None and deadline is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    return point if p.poll() is None else None


def run_faulted(
    spec: dict,
    out: Path,
    kills: int,
    rng: random.Random,
    startup_s: float,
    step_s: float,
    log,
    progress: Path | None = None,
) -> dict:
    """Kill/resume cycles; a kill *survived* when the next start that got going resumed at a step no older
    than the newest checkpoint complete just before the kill."""
    events: list[dict] = []
    pending: list[dict] = []  # kills whose outcome the next start decides
    resume, seen = False, 0
    while True:
        p = launch(spec, out, resume, log)
        resume = True
        point = wait_for_kill_point(p, out, rng, startup_s, step_s) if len(events) < kills else None
        if point is not None:
            newest = newest_step(out)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = None
        else:
            rc = p.wait()
        begun = starts(out)
        if len(begun) > seen:  # this segment got going: it decides the pending kills
            for e in pending:
                e.update(resumed_at=begun[seen], survived=begun[seen] >= e["newest_before"])
            pending, seen = [], len(begun)
        if point is not None:
            events.append({"kill": len(events) + 1, **point, "newest_before": newest})
            pending.append(events[-1])
            if progress is not None:
                progress.write_text(json.dumps(events, indent=1))
            continue
        for e in pending:  # a start that failed: those kills lost something
            e.update(survived=False, exit_status=rc)
        survived = sum(bool(e.get("survived")) for e in events)
        return {
            "injected": len(events),
            "survived": survived,
            "lost": len(events) - survived,
            "completed": rc == 0,
            "events": events,
        }


def compare(ref: Path, got: Path, steps: int) -> dict:
    from safetensors.torch import load_file
    import torch

    a = load_file(str(ref / "checkpoints" / f"step-{steps:06d}" / "adapter.safetensors"))
    b = load_file(str(got / "checkpoints" / f"step-{steps:06d}" / "adapter.safetensors"))

    def losses(run: Path) -> dict[int, float]:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}  # a redone step logs the same loss again

    return {
        "weights_bitwise_equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
        "losses_equal": losses(ref) == losses(got),
        "tensors": len(a),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (default: kills + 4; a kill after start-up advances the run by one step at least)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return {}
    args.steps = args.steps or args.kills + 4
    root = Path(args.root or tempfile.mkdtemp(prefix="faults-train-"))
    spec, _ = setup(root, args.steps)
    with open(root / "log.txt", "ab") as log:
        t0 = time.time()
        p = launch(spec, root / "reference", False, log)
        if p.wait() != 0:
            raise RuntimeError(f"the reference run failed; see {root / 'log.txt'}")
        t1 = time.time()
        rows = [json.loads(x) for x in (root / "reference" / "metrics.jsonl").read_text().splitlines()]
        startup = next(r["time"] for r in rows if r.get("event") == "start") - t0
        step_s = (t1 - t0 - startup) / args.steps
        result = run_faulted(
            spec,
            root / "faulted",
            args.kills,
            random.Random(args.seed),
            startup,
            step_s,
            log,
            progress=root / "progress.json",
        )
    ref_s = t1 - t0
    result.update(
        compare(root / "reference", root / "faulted", args.steps),
        reference_s=round(ref_s, 1),
        startup_s=round(startup, 1),
        step_s=round(step_s, 2),
        steps=args.steps,
        root=str(root),
    )
    print(json.dumps({k: v for k, v in result.items() if k != "events"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
