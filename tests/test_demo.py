"""`dynaip demo --small`: the whole chain end to end (tiny checkpoints, local Ray, training, generation),
run as a user runs it (its own process), with the console it prints at the default verbosity."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# what the quiet console must not show (issue #17 item 7)
NOISE = {
    "a Python warning": re.compile(r"\w*Warning: |warnings\.warn\("),
    "a third-party source line": re.compile(r"site-packages/"),
    "a Ray Python log line": re.compile(r"^\S+ \S+\s+(INFO|WARNING|DEBUG) \S+\.py:\d+ -- ", re.M),
    "a Ray C++ log line": re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+ [IWEF] \d+ \d+\] \S+\.cc:\d+"),
    "a Ray worker's forwarded output": re.compile(r"\(\w+(\(.*\))? pid=\d+"),
    "a traceback": re.compile(r"Traceback \(most recent call last\)"),
    # issue #35: diffusers' / transformers' loading bars and a library's INFO (matplotlib's font cache)
    "a third-party progress bar": re.compile(r"Loading pipeline components|Loading checkpoint shards|\d+it/s\]|s/it\]"),
    "a library's INFO line": re.compile(r"^\S+ INFO (?!dynaip|pipeline)\S+: ", re.M),
}


@pytest.mark.slow  # the whole chain as a user runs it, in its own process: Ray start, curate, Ray Train, generate
def test_demo_small_builds_every_artefact_with_a_quiet_console(tmp_path, tiny_models_yaml):
    from dynaip.dataset.inspect import verify

    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # reuse the session's tiny checkpoints (the same files `demo` would write) to save a few seconds
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dynaip.cli",
            "demo",
            "--out",
            str(out),
            "--small",
            "--size",
            "64",
            "--models",
            str(tiny_models_yaml),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    for what, pattern in NOISE.items():
        hit = pattern.search(console)
        assert hit is None, (
            f"the default console shows {what}: {console[max(0, hit.start() - 200) : hit.end() + 200]!r}"
        )
    for n in range(1, 7):  # one line per stage, and the counts
        assert f"[{n}/6]" in proc.stdout
    assert re.search(r"inputs\s+\d+\s+accepted \d+\s+rejected \d+", proc.stdout)
    assert "reported through Ray Train" in proc.stdout

    assert verify(out / "dataset") == []
    manifest = json.loads((out / "dataset" / "manifest.json").read_text())
    t = manifest["totals"]
    assert t["inputs"] == t["accepted"] + t["rejected"] and t["samples"] > 0
    ckpts = sorted((out / "run" / "checkpoints").glob("step-*"))
    assert ckpts and (ckpts[-1] / "adapter.safetensors").is_file() and (ckpts[-1] / "config.json").is_file()
    from dynaip.adapter import DynaIPAdapter

    DynaIPAdapter.from_pretrained(ckpts[-1])
    for name in ("single.png", "two_subjects.png"):
        img = Image.open(out / "generated" / name)
        assert img.size == (64, 64)
        assert json.loads((out / "generated" / name.replace(".png", ".json")).read_text())["num_references"] >= 1
    assert Image.open(out / "dataset_grid.png").size[0] > 0
    assert (out / "run" / "metrics.jsonl").read_text().strip()
    assert list((out / "run" / "tb").glob("events.out.tfevents.*"))


def _policy(verbose: bool) -> subprocess.CompletedProcess:
    code = (
        "import warnings, json\n"
        "from dynaip.console import configure, ray_init_kwargs\n"
        f"configure({verbose})\n"
        "warnings.warn_explicit('third-party deprecation', FutureWarning, 'timm/layers.py', 1, module='timm.layers')\n"
        "warnings.warn_explicit('third-party notice', UserWarning, 'torch/functional.py', 1, module='torch.functional')\n"
        "warnings.warn_explicit('reference 1 looks odd', UserWarning, 'dynaip/x.py', 1, module='dynaip.x')\n"
        "import logging\n"  # issue #35: a library's INFO line (matplotlib builds its font cache on first import)
        "logging.getLogger('matplotlib.font_manager').info('generated new fontManager')\n"
        "logging.getLogger('matplotlib.font_manager').warning('font family not found')\n"
        "logging.getLogger('dynaip.train.cli').info('training finished')\n"
        "kw = ray_init_kwargs()\n"
        "print(json.dumps({'log_to_driver': kw.get('log_to_driver', True), 'env': kw['runtime_env']['env_vars'],\n"
        "                  'hook': kw['runtime_env']['worker_process_setup_hook']}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DYNAIP_VERBOSE", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_console_policy_quiet_by_default_everything_with_verbose():
    quiet, loud = _policy(False), _policy(True)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert "third-party" not in quiet.stderr and "reference 1 looks odd" in quiet.stderr  # own warnings stay
    assert "third-party deprecation" in loud.stderr and "third-party notice" in loud.stderr
    assert "generated new fontManager" not in quiet.stderr and "generated new fontManager" in loud.stderr
    assert "font family not found" in quiet.stderr  # a library's warnings still pass
    assert "INFO dynaip.train.cli: training finished" in quiet.stderr  # and the project's own INFO lines
    q, v = json.loads(quiet.stdout), json.loads(loud.stdout)
    assert q["log_to_driver"] is False and v["log_to_driver"] is True
    assert q["env"]["DYNAIP_VERBOSE"] == "0" and v["env"]["DYNAIP_VERBOSE"] == "1"  # workers inherit the policy
    assert q["hook"] == v["hook"] == "dynaip.console.worker_setup"
    from dynaip.cli import build_parser

    assert build_parser().parse_args(["-v", "tiny-checkpoints", "--out", "x"]).verbose
    assert build_parser().parse_args(["--verbose", "tiny-checkpoints", "--out", "x"]).verbose
