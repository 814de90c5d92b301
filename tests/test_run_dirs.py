"""Run directories (#33): one run per directory for training, feature precompute and eval generation
(curation's own lock is tested in tests/test_curation_reliability.py); a training ``--out`` holding
checkpoints is refused without ``--resume``; a killed run's lock never blocks the ``--resume`` after it."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from train_fixtures import write_dataset

from dynaip.train.config import set_keys

ROOT = Path(__file__).resolve().parent.parent


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def errors_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models_yaml):
    """Two one-step stages, a checkpoint every step: the shortest run that writes and resumes checkpoints."""
    root = tmp_path_factory.mktemp("rundirs")
    intra = write_dataset(root / "intra", [2], size=64)
    cross = write_dataset(root / "cross", [2], pair="cross", start=10, size=64)
    cfg = set_keys(
        yaml.safe_load((ROOT / "jobs" / "configs" / "tiny.yaml").read_text()),
        stages=[
            {"name": "intra", "steps": 1, "pair": "intra", "data": [str(intra)]},
            {"name": "cross", "steps": 1, "pair": "cross"},
        ],
        checkpoint_every=1,
        eval_every=0,
        sample_every=0,
    )
    config = root / "tiny2.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return root, ["train", "--config", str(config), "--data", str(cross), "--models", str(tiny_models_yaml), "--local"]


def test_train_over_checkpoints_without_resume_is_refused_and_changes_nothing(setup, caplog):
    from dynaip.cli import main

    root, argv = setup
    run = root / "first"
    assert main([*argv, "--out", str(run)]) == 0
    before = tree(run)
    assert "checkpoints/step-000002/adapter.safetensors" in before and ".dynaip.lock" not in {
        Path(p).name for p in before
    }
    caplog.clear()
    assert main([*argv, "--out", str(run)]) == 2
    assert errors_of(caplog) == [
        (
            f"--out {run} already holds the checkpoints of a training run (step-000001, "
            "step-000002); pass --resume to continue it or choose another directory"
        )
    ]
    assert tree(run) == before  # byte for byte, and no lock file left behind
    caplog.clear()
    assert main([*argv, "--out", str(root / "never"), "--data", str(root / "nodata")]) == 2  # refused by its preflight
    assert "nodata" in errors_of(caplog)[0] and not (root / "never").exists()  # no empty directory left behind


def test_a_live_run_refuses_another_and_a_killed_one_leaves_a_resumable_directory(setup, caplog):
    from dynaip.cli import main

    root, argv = setup
    run = root / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    live = subprocess.Popen(
        [sys.executable, "-m", "dynaip.cli", *argv, "--out", str(run)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        lock = run / ".dynaip.lock"
        deadline = time.monotonic() + 300
        while not (lock.is_file() and f'"pid": {live.pid}' in lock.read_text()):
            assert live.poll() is None and time.monotonic() < deadline, "the training process never took its lock"
            time.sleep(0.05)
        for extra in (["--resume"], []):
            caplog.clear()
            assert main([*argv, "--out", str(run), *extra]) == 2
            (line,) = errors_of(caplog)
            assert line.startswith(f"output directory {run} is in use by another training run (pid {live.pid} on host ")
            assert line.endswith("wait for it to finish or stop it, or pass another --out")
        while not (run / "checkpoints" / "step-000001").is_dir() and live.poll() is None:
            time.sleep(0.05)  # kill it once it has a checkpoint (or, on a fast machine, after it ended)
    finally:
        kill_group(live)  # no release, no clean-up: the kernel drops the lock
    caplog.clear()
    assert main([*argv, "--out", str(run), "--resume"]) == 0, errors_of(caplog)
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert steps[-1] == 2 and (run / "checkpoints" / "step-000002").is_dir()
    assert not (run / ".dynaip.lock").exists()


def test_the_lock_is_not_held_by_a_forked_child_of_a_dead_run(tmp_path):
    """A DataLoader worker forked by the run closes its copy of the lock file at once."""
    script = (
        "import os, sys, time\n"
        "from dynaip.dataset.store import Store\n"
        "from dynaip.run_lock import RunLock\n"
        f"RunLock(Store({str(tmp_path)!r}), what='training run').acquire()\n"
        "if os.fork() == 0:\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    from dynaip.dataset.store import Store
    from dynaip.run_lock import RunDirError, RunLock

    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match="in use by another training run"):
            RunLock(Store(str(tmp_path)), what="training run").acquire()
        os.kill(p.pid, signal.SIGKILL)  # the parent dies; its forked child lives on
        p.wait()
        assert subprocess.run(["pgrep", "-s", str(p.pid)], capture_output=True, check=False).stdout.strip()  # the child
        with RunLock(Store(str(tmp_path)), what="training run") as taken:
            assert taken.info["pid"] == os.getpid()
    finally:
        kill_group(p)


def test_a_feature_set_being_precomputed_is_refused_to_a_second_precompute(setup, caplog, tiny_models_yaml):
    from dynaip.cli import main
    from dynaip.dataset.store import Store
    from dynaip.run_lock import RunLock

    root, _ = setup
    data = root / "intra"
    argv = [
        "precompute",
        "--data",
        str(data),
        "--models",
        str(tiny_models_yaml),
        "--no-progress",
        "--name",
        "held",
        "--config",
        str(root / "tiny2.yaml"),
        "--executor",
        "local",
    ]
    with RunLock(Store(str(data / "features" / "held")), what="feature precompute"):  # the live first run
        caplog.clear()
        assert main(argv) == 2
        (line,) = errors_of(caplog)
        assert line.startswith(f"output directory {data}/features/held is in use by another feature precompute (pid ")
    caplog.clear()
    assert main([*argv[:2], str(root / "nodata"), *argv[3:]]) == 2  # no dataset: nothing made inside it
    assert not (root / "nodata").exists()


def test_an_eval_generation_into_a_directory_in_use_is_refused(tmp_path):
    from PIL import Image

    from dynaip.dataset.store import Store
    from dynaip.eval.cases import Case, Subject
    from dynaip.eval.generate import GenerateSettings, is_done, run_generation
    from dynaip.run_lock import RunDirError, RunLock

    ref = tmp_path / "ref.png"
    Image.new("RGB", (20, 30), (10, 200, 30)).save(ref)
    cases = [
        Case(
            id="c0",
            benchmark="dreambench++",
            category="animal",
            prompt="p",
            seed=1,
            subjects=[Subject(path=str(ref), type="animal", name="a dog")],
        )
    ]
    out = tmp_path / "gen"
    kw = {
        "settings": GenerateSettings(steps=1, height=16, width=16),
        "pipe_factory": lambda: "pipe",
        "generate_fn": lambda pipe, case, s: Image.new("RGB", (s.width, s.height)),
    }
    with (
        RunLock(Store(str(out)), what="eval generation"),
        pytest.raises(RunDirError, match=f"output directory {out} is in use by another eval generation"),
    ):
        run_generation(cases, out, **kw)
    assert not is_done(out, "c0")
    assert run_generation(cases, out, **kw).generated == 1 and not (out / ".dynaip.lock").exists()
