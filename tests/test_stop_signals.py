"""Ctrl-C (SIGINT) and SIGTERM end a command with one line and the status a shell reports (130 / 143);
SIGTERM is raised like Ctrl-C, so the same cleanup runs (the run lock released, temporary files removed,
an embedded Ray shut down at exit) and the same command resumes (dynaip/cli.py: ``stop_signals``).

The commands on Ray (curate, synth, precompute, train), each in its own process on a shared loopback Ray
head: tests/test_stop_signals_ray.py, and tests/test_synth.py for synth."""

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

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sig, status, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_a_signal_during_a_command_is_one_line_and_its_status(monkeypatch, caplog, capsys, tmp_path, sig, status, name):
    from dynaip.cli import main
    from dynaip.models import tiny

    cleaned = []

    def busy(*a, **k):
        try:
            os.kill(os.getpid(), sig)
            time.sleep(30)  # interrupted at once
        finally:
            cleaned.append(True)  # what a command's finally / context managers do (locks, temp files)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(tiny, "write_tiny_checkpoints", busy)
    caplog.set_level(logging.ERROR)
    t0 = time.monotonic()
    assert main(["tiny-checkpoints", "--out", str(tmp_path / "x")]) == status
    assert time.monotonic() - t0 < 10 and cleaned == [True]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"stopped by {name}") and "run the same command again" in errors[0]
    assert "Traceback" not in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the command's only


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and (p.parts[-2] == "shards" or p.name == "rejects.jsonl")
    }


def test_sigterm_stops_local_curation_which_resumes_to_the_same_bytes(tiny_models_yaml, tiny_models, tmp_path):
    """`dynaip curate --executor local` in its own process: SIGTERM once the first chunk is written ends it
    within 10 s, exit 143 and one line, the lock released and no temporary file left; the same command
    then finishes, and the dataset equals an uninterrupted run's."""
    from pipeline.demo_photos import write_sample_photos

    photos = tmp_path / "photos"
    write_sample_photos(photos, faces=1, names=["astronaut", "chelsea", "coffee"])
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(
        (REPO / "manifests" / "demo.yaml").read_text().replace("inputs_per_shard: 4", "inputs_per_shard: 1")
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}

    def curate(out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "dynaip.cli",
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
            "local",
            "--no-progress",
        ]

    from pipeline.executor_local import run_local
    from pipeline.recipe import Recipe

    clean = tmp_path / "clean"  # the reference, in this process (the command's bytes: test_stop_signals_ray.py)
    run_local(Recipe.from_yaml(recipe, source_root=str(photos)), clean, tiny_models, progress=False)
    out = tmp_path / "ds"
    proc = subprocess.Popen(curate(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list((out / ".progress").glob("[0-9]*.json")):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # by the process id we started
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 143 and took < 10, (proc.returncode, took, err[-2000:])
    assert lines[-1].endswith("stopped by SIGTERM: finished work is kept; run the same command again to resume")
    assert "Traceback" not in err and not (out / "manifest.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    done = subprocess.run(curate(out), env=env, capture_output=True, text=True, timeout=600, check=False)  # lock freed
    assert done.returncode == 0, done.stderr[-2000:]  # (finished chunks kept unless the stop came in de-dup)
    assert _tree(out) == _tree(clean) and _tree(out)
    assert json.loads((out / "manifest.json").read_text()) == json.loads((clean / "manifest.json").read_text())


def test_sigterm_during_local_training_keeps_the_last_checkpoint_and_resumes_bitwise(
    tmp_path, tiny_models_yaml, local_train_once, monkeypatch, caplog
):
    """`dynaip train --local`: SIGTERM at step 3 ends the run (143, one line) with the step-2 checkpoint and
    no partial one; `--resume` ends at the weights of an uninterrupted run."""
    from train_fixtures import local_train, same_adapter

    from dynaip.train import metrics

    config, once = local_train_once
    real_write = metrics.MetricsWriter.write

    def write(self, **row):
        real_write(self, **row)
        if row.get("step") == 3 and "loss" in row:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(metrics.MetricsWriter, "write", write)
    caplog.set_level(logging.ERROR)
    run = tmp_path / "run"
    t0 = time.monotonic()
    assert local_train(config, tiny_models_yaml, run) == 143
    assert time.monotonic() - t0 < 120  # the whole run, model loading included; the stop itself is immediate
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["stopped by SIGTERM: finished work is kept; run the same command again to resume"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    monkeypatch.undo()
    assert local_train(config, tiny_models_yaml, run, "--resume") == 0
    assert same_adapter(once / "checkpoints" / "step-000004", run / "checkpoints" / "step-000004")


def test_ray_init_does_not_take_sigterm_from_the_cli(monkeypatch):
    """ray.init installs its own SIGTERM handler (sys.exit(15): no one line, status 15); under the CLI's
    stop_signals dynaip.cluster.connect puts the CLI's back, elsewhere Ray's stays."""
    import ray

    from dynaip import cluster
    from dynaip.cli import stop_signals

    def ray_exit(signum, frame):
        raise SystemExit(signum)

    def fake_init(*a, **k):  # what ray.init does to the handler (ray/_private/worker.py, init)
        signal.signal(signal.SIGTERM, ray_exit)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr("dynaip.console.quiet_ray_data", lambda: None)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with stop_signals():
            ours = signal.getsignal(signal.SIGTERM)
            cluster.connect("auto")
            assert signal.getsignal(signal.SIGTERM) is ours
        cluster.connect("auto")
        assert signal.getsignal(signal.SIGTERM) is ray_exit
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_is_named_when_ray_turns_it_into_a_plain_keyboardinterrupt(monkeypatch, caplog, tmp_path):
    """Inside ray.get / ray.wait, Ray's core worker catches the handler's exception and raises a plain
    KeyboardInterrupt (measured on the Ray executor: the line said Ctrl-C, the status was 130)."""
    from dynaip.cli import main
    from dynaip.models import tiny

    def inside_ray_wait(*a, **k):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        except KeyboardInterrupt:
            raise KeyboardInterrupt from None  # what ray._raylet does with it

    monkeypatch.setattr(tiny, "write_tiny_checkpoints", inside_ray_wait)
    caplog.set_level(logging.ERROR)
    assert main(["tiny-checkpoints", "--out", str(tmp_path / "x")]) == 143
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("stopped by SIGTERM")
