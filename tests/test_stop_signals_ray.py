"""Ctrl-C (SIGINT) and SIGTERM for the long commands on Ray, each `dynaip ...` in its own process attached
to one shared loopback Ray head (the module's ``ray_cluster``, given to the command as RAY_ADDRESS, as
`ray job submit` or a user's ``--ray-address`` would): the command ends within 10 s with one line and the
status a shell reports (130 / 143), its run lock is released, no actor or worker of its Ray job is left
alive (Ray's job table names the job by its driver's process id, the actor table its actors' processes),
and the same command, run again, ends in the bytes of an uninterrupted run.

Which signal where: SIGINT and SIGTERM take different paths only where a library installs its own SIGINT
handler — Ray Train does (it aborts its controller, then exits 0; SIGTERM is handed to it by
dynaip/train/stopping.py), so `train` on Ray gets both. Elsewhere
both reach the command as a KeyboardInterrupt (SIGTERM through ``dynaip.cli.stop_signals``; inside
``ray.wait`` Ray turns either into its own), so the signals alternate across commands: curate on Ray
SIGTERM, precompute on Ray SIGINT, synth on Ray SIGINT (tests/test_synth.py), curate local SIGTERM and
train --local SIGTERM (tests/test_stop_signals.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
STOPPED = {signal.SIGINT: ("stopped by Ctrl-C (SIGINT)", 130), signal.SIGTERM: ("stopped by SIGTERM", 143)}


def joining(ray) -> dict[str, str]:
    """The environment of a command that joins the head this process is connected to (the token: Ray's default
    file, which the head wrote)."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "RAY_AUTH_MODE": "token",
    }


@pytest.fixture(scope="module")
def head_env(ray_cluster) -> dict[str, str]:
    return joining(ray_cluster)


def dynaip(*args: str) -> list[str]:
    return [sys.executable, "-m", "dynaip.cli", *args]


def stop_when(cmd: list[str], env: dict[str, str], ready: Callable[[], bool], sig: int) -> tuple[int, float, str, int]:
    """Starts ``cmd``, sends ``sig`` (by the process id started here) once ``ready()``; returns its status,
    the seconds from the signal to its exit, its stderr and its pid. Every child process it had then is
    gone within 10 s of its exit (an embedded Ray of its own would be among them)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 400
        while not ready():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(sig)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], alive
    return proc.returncode, took, err, proc.pid


def assert_clean_stop(status: int, took: float, err: str, sig: int) -> None:
    line, code = STOPPED[sig]
    lines = [x for x in err.splitlines() if x.strip()]
    assert status == code and took < 10, (status, took, err[-3000:])
    assert lines[-1].endswith(f"{line}: finished work is kept; run the same command again to resume"), err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def assert_no_ray_processes_left(driver_pid: int) -> None:
    """The command's Ray job ended, and every actor it (or an actor of its) started is dead, its process gone."""
    from ray._private import state

    (job,) = [j for j in state.state.job_table() if j["DriverPid"] == driver_pid]
    deadline = time.time() + 10
    while True:
        actors = [a for a in state.actors().values() if a["JobID"] == job["JobID"] and not _cluster_service(a)]
        live = [a for a in actors if a["State"] != "DEAD"]
        if not live or time.time() > deadline:
            break
        time.sleep(0.2)
    assert actors and live == [], [(a["ActorClassName"], a["State"]) for a in live]
    _, alive = psutil.wait_procs([p for a in actors if (p := _process(a["Pid"]))], timeout=10)
    assert alive == [], alive
    assert [j for j in state.state.job_table() if j["JobID"] == job["JobID"]][0]["IsDead"]


def _cluster_service(actor: dict) -> bool:
    """Ray Data's ``AutoscalingCoordinator``: a detached, named actor that the first job needing it creates and
    every later job of the cluster shares (``get_if_exists``; ray/data/_internal/cluster_autoscaler): a part of
    the cluster, not of the command — an uninterrupted run leaves it as well, and it holds no CPU."""
    return actor["IsDetached"] and actor["Name"] == "AutoscalingCoordinator"


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid) if pid else None
    except psutil.NoSuchProcess:
        return None


def unlocked(out: Path) -> bool:
    return not (out / ".dynaip.lock").exists()


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if ".tmp" in p.name]


# ------------------------------------------------------------------------------------------- curate


def test_sigterm_stops_curation_on_ray_which_resumes_to_the_same_bytes(
    head_env, tiny_models_yaml, tiny_models, tmp_path
):
    """`dynaip curate` (the Ray executor) on the shared head: SIGTERM once the first chunk is written."""
    from pipeline.demo_photos import write_sample_photos
    from pipeline.executor_local import run_local
    from pipeline.recipe import Recipe

    from dynaip.cli import main

    photos = tmp_path / "photos"
    write_sample_photos(photos, faces=1, names=["astronaut", "chelsea", "coffee"])
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(
        (REPO / "manifests" / "demo.yaml")
        .read_text()
        .replace("inputs_per_shard: 4", "inputs_per_shard: 1")
        .replace("executor:\n", "executor:\n  workers: 1\n")
    )
    run_local(
        Recipe.from_yaml(recipe, source_root=str(photos)), tmp_path / "clean", tiny_models, progress=False
    )  # the reference (same bytes: test_synth.py)

    out = tmp_path / "ds"
    args = [
        "curate",
        "--recipe",
        str(recipe),
        "--out",
        str(out),
        "--source-root",
        str(photos),
        "--models",
        str(tiny_models_yaml),
        "--executor",
        "ray",
        "--no-progress",
    ]
    status, took, err, pid = stop_when(
        dynaip(*args), head_env, lambda: bool(list((out / ".progress").glob("[0-9]*[0-9].json"))), signal.SIGTERM
    )
    assert_clean_stop(status, took, err, signal.SIGTERM)
    assert_no_ray_processes_left(pid)
    assert unlocked(out) and no_temp_files(out) and not (out / "manifest.json").exists()
    assert main(args) == 0  # in this process, on the same head: the lock is free, finished chunks are kept
    assert _dataset(out) == _dataset(tmp_path / "clean")


def _dataset(root: Path) -> tuple[dict[str, bytes], dict]:
    files = {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and (p.parts[-2] == "shards" or p.name == "rejects.jsonl")
    }
    return files, json.loads((root / "manifest.json").read_text())


# --------------------------------------------------------------------------------------- precompute


def test_sigint_stops_precompute_on_ray_which_resumes_to_the_same_bytes(
    head_env, tiny_models_yaml, local_train_once, tmp_path
):
    """`dynaip precompute` (encoder actors) on the shared head: Ctrl-C once the first feature shard is done."""
    from train_fixtures import write_dataset

    from dynaip.cli import main

    config, _ = local_train_once
    data = write_dataset(tmp_path / "ds", [1] * 8, size=64)
    clean = tmp_path / "clean"
    shutil.copytree(data, clean)
    common = ["--models", str(tiny_models_yaml), "--config", str(config), "--no-progress", "--batch-size", "1"]
    assert main(["precompute", "--data", str(clean), "--executor", "local", *common]) == 0  # the reference

    args = ["precompute", "--data", str(data), "--executor", "ray", *common]
    status, took, err, pid = stop_when(
        dynaip(*args), head_env, lambda: bool(list(data.glob("features/*/.progress/0*.json"))), signal.SIGINT
    )
    assert_clean_stop(status, took, err, signal.SIGINT)
    assert_no_ray_processes_left(pid)
    (feat,) = (data / "features").iterdir()
    assert unlocked(feat) and no_temp_files(data) and not (feat / "manifest.json").exists()
    assert 1 <= len(list(feat.glob("shards/*.safetensors"))) < 8
    assert main(args) == 0
    (want,) = (clean / "features").iterdir()
    assert _files(feat) == _files(want)


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".progress" not in p.parts
    }


# -------------------------------------------------------------------------------------------- train


STEPS = 8  # enough steps after each stop that the run cannot finish before the signal lands


@pytest.fixture(scope="module")
def ray_train_once(head_env, tiny_models_yaml, local_train_once, tmp_path_factory) -> tuple[list[str], Path]:
    """The arguments of `dynaip train` with one Ray Train worker (local_train_once's config at 8 steps, a
    checkpoint every 2), less --out, and the run directory of one uninterrupted run of it with ``--local`` in
    this process, with one torch thread as a Ray worker has (Ray sets OMP_NUM_THREADS=1 for its workers):
    the same weights bit for bit as on Ray, without a Ray Train start (~25 s on the CI machine)."""
    import yaml

    from dynaip.cli import main
    from dynaip.train.config import set_keys

    config, _ = local_train_once
    root = tmp_path_factory.mktemp("ray-train")
    one = root / "one-worker.yaml"
    raw = set_keys(yaml.safe_load(config.read_text()), workers=1)
    raw["stages"][0]["steps"] = STEPS
    one.write_text(yaml.safe_dump(raw))
    args = ["train", "--config", str(one), "--models", str(tiny_models_yaml)]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--out", str(root / "once"), "--local"]) == 0
    finally:
        torch.set_num_threads(threads)
    return args, root / "once"


def test_ctrl_c_then_sigterm_stop_training_on_ray_which_resumes_bitwise(head_env, ray_train_once, tmp_path):
    """`dynaip train` on the shared head, stopped by Ctrl-C at step 3, then its `--resume` stopped by SIGTERM at
    the step after the checkpoint it resumed from: each time only whole checkpoints are left (a step that
    finished while Ray Train aborted may have written one), and the last `--resume` ends at the weights of
    the uninterrupted run. (The two signals take two paths into Ray Train's abort: its own handler, and
    dynaip/train/stopping.py's.)"""
    from train_fixtures import same_adapter

    from dynaip.cli import main

    args, once = ray_train_once
    run = tmp_path / "run"
    args = [*args, "--out", str(run)]

    def logged(step: int) -> int:
        try:
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.endswith("}")]
        except OSError:
            return 0
        return sum(1 for r in rows if r.get("step") == step and "loss" in r)

    def checkpoints() -> list[int]:
        names = sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else []
        assert all(n.startswith("step-") for n in names), names  # no partial (.tmp-step-N) directory
        return [int(n.split("-")[1]) for n in names]

    for sig, cmd in ((signal.SIGINT, args), (signal.SIGTERM, [*args, "--resume"])):
        kept = checkpoints()
        at = max(kept, default=2) + 1  # the first step after the checkpoint it resumes from (3 at first)
        before = logged(at)
        status, took, err, pid = stop_when(dynaip(*cmd), head_env, lambda: logged(at) > before, sig)
        assert_clean_stop(status, took, err, sig)
        assert_no_ray_processes_left(pid)
        now = checkpoints()
        assert unlocked(run) and now[: len(kept)] == kept and 2 <= max(now) < STEPS, (kept, now)
    assert main([*args, "--resume"]) == 0
    assert same_adapter(once / "checkpoints" / f"step-{STEPS:06d}", run / "checkpoints" / f"step-{STEPS:06d}")
