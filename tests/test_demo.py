"""`dynaip demo --small`: the whole chain end to end (tiny checkpoints, local Ray, training, generation)."""

from __future__ import annotations

import json

from PIL import Image


def test_demo_small_builds_every_artefact(tmp_path, tiny_models_yaml):
    from dynaip.cli import main
    from pipeline.dataset import verify

    out = tmp_path / "demo"
    # reuse the session's tiny checkpoints (the same files `demo` would write) to save a few seconds
    assert main(["demo", "--out", str(out), "--small", "--size", "64", "--models", str(tiny_models_yaml)]) == 0
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
