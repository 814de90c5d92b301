"""User errors of `dynaip train` / `dynaip generate`: a non-zero exit, one line on stderr naming the thing
and the fix, no traceback. Each case runs the real command in a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from train_fixtures import write_dataset

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"


def dynaip(*args: str) -> tuple[int, list[str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(
        [sys.executable, "-m", "dynaip.cli", *args], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT
    )
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    return p.returncode, lines


def assert_one_line(rc: int, lines: list[str], *needles: str) -> str:
    assert rc != 0, lines
    assert not any("Traceback" in ln for ln in lines), "\n".join(lines)
    errors = [ln for ln in lines if " ERROR " in ln]
    assert len(errors) == 1 and len(lines) == 1, "\n".join(lines)  # nothing but the error line
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def resumable(tmp_path_factory, tiny_models_yaml):
    """A run directory whose newest checkpoint looks whole, with the data it names."""
    from dynaip.train.config import TrainConfig
    from dynaip.train.dataset_identity import run_datasets

    root = tmp_path_factory.mktemp("cli")
    intra = write_dataset(root / "intra", [2], size=64)
    cross = write_dataset(root / "cross", [2], pair="cross", start=10, size=64)
    data = [str(intra), str(cross)]

    def make(name: str) -> Path:
        ckpt = root / name / "checkpoints" / "step-000002"
        (ckpt / "resume").mkdir(parents=True)
        save_file({"w": torch.zeros(4)}, str(ckpt / "adapter.safetensors"))
        torch.save({"state": {}, "param_groups": []}, ckpt / "resume" / "optimizer.pt")
        torch.save([{}], ckpt / "resume" / "rng.pt")
        state = {
            "format": "dynaip-train-state/1",
            "step": 2,
            "world_size": 2,
            "config": {"strategy": "ddp"},
            "datasets": run_datasets(TrainConfig.from_yaml(TINY), data),
        }
        (ckpt / "resume" / "state.json").write_text(json.dumps(state))
        return root / name

    return root, make, ",".join(data), str(tiny_models_yaml)


def test_resume_with_a_truncated_optimizer_names_the_file(resumable):
    root, make, data, models = resumable
    run = make("truncated")
    opt = run / "checkpoints" / "step-000002" / "resume" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    rc, lines = dynaip(
        "train", "--config", str(TINY), "--data", data, "--out", str(run), "--models", models, "--resume"
    )
    assert_one_line(rc, lines, str(opt), "remove the damaged checkpoint")


def test_resume_with_a_corrupt_state_json_names_its_path(resumable):
    root, make, data, models = resumable
    run = make("badstate")
    state = run / "checkpoints" / "step-000002" / "resume" / "state.json"
    state.write_text('{"format": "dynaip-train-st')
    rc, lines = dynaip(
        "train", "--config", str(TINY), "--data", data, "--out", str(run), "--models", models, "--resume"
    )
    assert_one_line(rc, lines, str(state), "cannot be read", "resume from the one before it")


def test_missing_models_for_train_and_generate(resumable, tmp_path):
    root, make, data, models = resumable
    rc, lines = dynaip("train", "--config", str(TINY), "--data", data, "--out", str(tmp_path / "r"))
    assert_one_line(rc, lines, "--models M.yaml is required", "tiny-checkpoints")
    rc, lines = dynaip(
        "generate", "--adapter", str(tmp_path), "--prompt", "x", "--ref", "r.png", "--out", str(tmp_path / "o.png")
    )
    assert_one_line(rc, lines, "--models M.yaml is required")


def test_bad_config_out_and_output_name(resumable, tmp_path):
    root, make, data, models = resumable
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [ {name: a\n")
    rc, lines = dynaip("train", "--config", str(bad), "--data", data, "--out", str(tmp_path / "r"), "--models", models)
    assert_one_line(rc, lines, str(bad), "is not valid YAML")
    bad.write_text(yaml.safe_dump({"optim": {"lr": 1.0}}))
    rc, lines = dynaip("train", "--config", str(bad), "--data", data, "--out", str(tmp_path / "r"), "--models", models)
    assert_one_line(rc, lines, str(bad), "stages")
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, lines = dynaip("train", "--config", str(TINY), "--data", data, "--out", str(afile), "--models", models)
    assert_one_line(rc, lines, "is a file")
    rc, lines = dynaip(
        "generate",
        "--models",
        models,
        "--adapter",
        str(tmp_path),
        "--prompt",
        "x",
        "--ref",
        "r.png",
        "--out",
        str(tmp_path / "o.json"),
    )
    assert_one_line(rc, lines, "o.json", "not an image format")


def test_a_corrupt_shard_stops_local_training_in_one_line(resumable, tmp_path):
    root, make, data, models = resumable
    d = write_dataset(tmp_path / "d", [2, 2], size=64)
    cross = write_dataset(tmp_path / "c", [2], pair="cross", start=10, size=64)
    shard = d / "shards" / "000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 1
    shard.write_bytes(bytes(raw))
    rc, lines = dynaip(
        "train",
        "--config",
        str(TINY),
        "--data",
        f"{d},{cross}",
        "--out",
        str(tmp_path / "r"),
        "--models",
        models,
        "--local",
        "--max-steps",
        "3",
    )
    # training had started: its progress bars and log lines come before the error, which ends stderr
    assert lines[-1].split(" ", 2)[1] == "ERROR"
    progress = [ln for ln in lines if "%|" in ln or " INFO " in ln or " WARNING " in ln]
    line = assert_one_line(
        rc, [ln for ln in lines if ln not in progress], "000001.tar has sha256", "data.on_corrupt_shard: skip"
    )
    assert "\n" not in line
    events = [json.loads(r) for r in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [e for e in events if e.get("event") == "corrupt_shard"]  # counted in the metrics before stopping
