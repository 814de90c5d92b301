"""Runs that cannot start fail once, with one line, before Ray and before any model loads."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from train_fixtures import write_dataset

CONFIGS = Path(__file__).resolve().parent.parent / "jobs" / "configs"


def _train(args: list[str], caplog) -> tuple[int, list[str]]:
    from dynaip.cli import main

    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code = main(["train", *args])
    return code, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_two_stage_config_without_cross_pairs_fails_naming_stage_datasets_and_counts(
    tmp_path, tiny_models_yaml, caplog
):
    import ray

    intra = write_dataset(tmp_path / "intra", [3, 2], size=64)
    ray_before = ray.is_initialized()
    code, errors = _train(
        [
            "--config",
            str(CONFIGS / "tiny.yaml"),
            "--data",
            str(intra),
            "--out",
            str(tmp_path / "run"),
            "--models",
            str(tiny_models_yaml),
        ],
        caplog,
    )
    assert code == 2 and len(errors) == 1 and "\n" not in errors[0]
    assert "stage 'cross' trains on cross pairs but its datasets hold none" in errors[0]
    assert f"{intra}: 5 intra" in errors[0]
    assert ray.is_initialized() == ray_before and not (tmp_path / "run").exists()  # nothing started or written


def test_missing_models_and_data_fail_in_one_line(tmp_path, tiny_models_yaml, caplog):
    intra = write_dataset(tmp_path / "intra", [2], size=64)
    code, errors = _train(
        [
            "--config",
            str(CONFIGS / "tiny.yaml"),
            "--data",
            str(intra),
            "--out",
            str(tmp_path / "run"),
            "--models",
            str(tmp_path / "nope.yaml"),
        ],
        caplog,
    )
    assert code == 2 and len(errors) == 1 and "nope.yaml" in errors[0]
    code, errors = _train(
        [
            "--config",
            str(CONFIGS / "tiny.yaml"),
            "--data",
            str(tmp_path / "absent"),
            "--out",
            str(tmp_path / "run"),
            "--models",
            str(tiny_models_yaml),
        ],
        caplog,
    )
    assert code == 2 and len(errors) == 1 and "has no manifest.json" in errors[0]


def test_resume_with_other_workers_or_layout_fails_before_ray(tmp_path, tiny_models_yaml, caplog):
    intra = write_dataset(tmp_path / "intra", [2], size=64)
    cross = write_dataset(tmp_path / "cross", [2], pair="cross", start=10, size=64)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    (ckpt / "resume").mkdir(parents=True)
    (ckpt / "resume" / "state.json").write_text(json.dumps({"world_size": 4, "config": {"strategy": "ddp"}}))
    args = [
        "--config",
        str(CONFIGS / "tiny.yaml"),
        "--data",
        f"{intra},{cross}",
        "--out",
        str(tmp_path / "run"),
        "--models",
        str(tiny_models_yaml),
        "--resume",
    ]
    code, errors = _train(args, caplog)
    assert code == 2 and len(errors) == 1 and "written by 4 workers, this run has 2" in errors[0]

    (ckpt / "resume" / "state.json").write_text(json.dumps({"world_size": 2, "config": {"strategy": "fsdp2_adapter"}}))
    code, errors = _train(args, caplog)
    assert code == 2 and "strategy=fsdp2_adapter, this run uses strategy=ddp" in errors[0]


def test_stage_with_its_own_data_is_checked_too(tmp_path):
    from dynaip.train.config import TrainConfig
    from dynaip.train.preflight import PreflightError, check_stages

    intra = write_dataset(tmp_path / "intra", [2], size=64)
    cross = write_dataset(tmp_path / "cross", [3], pair="cross", start=10, size=64)
    cfg = TrainConfig(
        stages=[
            {"name": "a", "steps": 1, "pair": "intra", "data": [str(intra)]},
            {"name": "b", "steps": 1, "pair": "cross", "data": [str(cross)]},
        ]
    )
    report = check_stages(cfg, [])
    assert report == {"a": {str(intra): {"intra": 2}}, "b": {str(cross): {"cross": 3}}}
    cfg = TrainConfig(stages=[{"name": "b", "steps": 1, "pair": "cross", "data": [str(intra)]}])
    with pytest.raises(PreflightError, match=r"stage 'b' trains on cross pairs .*: 2 intra"):
        check_stages(cfg, [])
    # a manifest written before pair counts existed cannot be checked ahead: the stage's loader filters
    old = write_dataset(tmp_path / "old", [2], size=64)
    manifest = json.loads((old / "manifest.json").read_text())
    for s in manifest["shards"]:
        del s["pairs"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert check_stages(TrainConfig(stages=[{"name": "b", "steps": 1, "pair": "cross", "data": [str(old)]}]), []) == {
        "b": {str(old): None}
    }


def test_resume_on_other_data_is_refused_unless_allowed(tmp_path, tiny_models_yaml, caplog):
    import torch
    from safetensors.torch import save_file

    from dynaip.train.config import TrainConfig
    from dynaip.train.dataset_identity import run_datasets
    from dynaip.train.preflight import check_resume

    intra = write_dataset(tmp_path / "intra", [2], size=64)
    cross = write_dataset(tmp_path / "cross", [2], pair="cross", start=10, size=64)
    other = write_dataset(tmp_path / "other", [3], pair="cross", start=20, size=64)
    cfg = TrainConfig.from_yaml(CONFIGS / "tiny.yaml")
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    (ckpt / "resume").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(ckpt / "adapter.safetensors"))
    (ckpt / "resume" / "state.json").write_text(
        json.dumps(
            {"world_size": 2, "config": {"strategy": "ddp"}, "datasets": run_datasets(cfg, [str(intra), str(cross)])}
        )
    )
    args = [
        "--config",
        str(CONFIGS / "tiny.yaml"),
        "--out",
        str(tmp_path / "run"),
        "--models",
        str(tiny_models_yaml),
        "--resume",
    ]
    code, errors = _train([*args, "--data", f"{intra},{other}"], caplog)
    assert code == 2 and len(errors) == 1 and "\n" not in errors[0]
    assert "was trained on other data: stage 'intra'" in errors[0] and "--allow-data-change" in errors[0]
    check_resume(cfg, str(tmp_path / "run"), True, [str(intra), str(other)], allow_data_change=True)
    # the same data under another path is the same data (identity = the manifest's hash)
    moved = tmp_path / "moved"
    shutil.copytree(cross, moved)
    check_resume(cfg, str(tmp_path / "run"), True, [str(intra), str(moved)])
