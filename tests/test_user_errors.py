"""Issue #35: errors a new user meets in the first hour, each one line naming the thing that is wrong (the
path, the models.yaml key, the manifest field, the shard member) and what to do. No model runs here; the
tiny checkpoints are read only where the failing load needs a neighbour that loads."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest

from train_fixtures import write_dataset


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _cli(caplog, *argv: str) -> str:
    """Runs ``dynaip ARGV`` in this process; it must fail with exit status 2 and one one-line error."""
    from dynaip.cli import main

    caplog.clear()
    assert main(list(argv)) == 2
    errors = _errors(caplog)
    assert len(errors) == 1 and "\n" not in errors[0] and "Traceback" not in errors[0], errors
    return errors[0]


def test_generate_with_a_folder_as_reference_says_it_is_a_directory_before_any_model_loads(caplog, tmp_path):
    folder = tmp_path / "my-dog"
    folder.mkdir()
    line = _cli(
        caplog,
        "generate",
        "--models",
        str(tmp_path / "models.yaml"),
        "--adapter",
        str(tmp_path),
        "--prompt",
        "a dog",
        "--ref",
        str(folder),
        "--out",
        str(tmp_path / "x.png"),
    )
    assert f"reference 1 (--ref) '{folder}' is a directory, not an image file" in line
    assert not (tmp_path / "x.png").exists()


def test_a_sam_checkpoint_path_that_is_a_directory_is_named_as_one(tmp_path):
    from dynaip.models import SamPaths
    from dynaip.models.errors import CheckpointError
    from dynaip.models.sam import load_sam

    (tmp_path / "sam").mkdir()
    with pytest.raises(
        CheckpointError,
        match=r"SAM \(vit_b\): cannot load '.*sam'.*It is a directory, not a file: "
        r"name the checkpoint file inside it",
    ) as e:
        load_sam(SamPaths(checkpoint=str(tmp_path / "sam"), variant="vit_b"))
    assert "\n" not in str(e.value)


def test_a_missing_clip_vision_path_is_named_by_its_models_yaml_key_not_by_the_aesthetic_scorer(tiny_models):
    """The aesthetic head reads ``clip_vision`` when it names no CLIP of its own: the line names that key."""
    from pipeline.recipe import Recipe
    from pipeline.stages.common import SetupError
    from pipeline.stages.quality import QualityStage

    assert tiny_models.aesthetic is not None and tiny_models.aesthetic.clip is None
    models = dataclasses.replace(
        tiny_models, clip_vision=dataclasses.replace(tiny_models.clip_vision, path="/nonexistent")
    )
    stage = QualityStage(Recipe.from_dict({"source": {"kind": "folder", "root": "/x"}}), models)
    with pytest.raises(SetupError) as e:
        stage.scorer
    line = str(e.value)
    assert (
        line.startswith(
            "models.yaml key 'clip_vision.path' (the aesthetic head reads it: 'aesthetic.clip' is not set): "
        )
        and "'/nonexistent'" in line
        and "\n" not in line
    ), line


# ------------------------------------------------------------------------------------ damaged datasets


def _rewrite_shard(root: Path, change) -> None:
    """Applies ``change(index, TarInfo, data) -> (TarInfo, data)`` to every member of shard 0 and updates the
    manifest's size and hash, so only the change itself is wrong (as in a dataset edited by hand)."""
    shard = root / "shards" / "000000.tar"
    with tarfile.open(shard) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (m, data) in enumerate(members):
            m, data = change(i, m, data)
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry.update(bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "ds", [2], size=32)


def test_a_string_in_the_manifest_totals_is_named_with_its_key(dataset, caplog):
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["totals"]["bytes"] = "12k"
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    for command in ("show", "verify"):
        line = _cli(caplog, "manifest", command, str(dataset))
        assert f"{dataset}/manifest.json: totals.bytes is '12k', not a whole number >= 0" in line


def test_a_broken_sample_json_is_named_by_shard_member_line_and_column(dataset, caplog):
    _rewrite_shard(dataset, lambda i, m, data: (m, b'{"source": "x",\n "pair": intra}') if i == 4 else (m, data))
    line = _cli(caplog, "manifest", "show", str(dataset))
    assert f"shard {dataset}/shards/000000.tar: test-000000-0.json is not valid JSON" in line
    assert "line 2 column 10" in line


def test_a_shard_member_without_a_dot_is_named(dataset, caplog):
    def undot(i, m, data):
        if i == 0:
            m.name = m.name.split(".")[0]
        return m, data

    _rewrite_shard(dataset, undot)
    line = _cli(caplog, "manifest", "show", str(dataset))
    assert f"shard {dataset}/shards/000000.tar: member 'test-000000-0' is not named KEY.EXT with EXT one of" in line


def test_a_mistyped_adapter_step_says_it_does_not_exist_and_names_the_steps_there(tmp_path):
    """Found from a fresh clone (issue #35): a step directory that is not there was called "not a DynaIP adapter
    checkpoint: missing adapter.safetensors, config.json"."""
    from dynaip.adapter import DynaIPAdapter

    ckpts = tmp_path / "run" / "checkpoints"
    for step in ("step-000004", "step-000008"):
        (ckpts / step).mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as e:
        DynaIPAdapter.from_pretrained(ckpts / "step-100000")
    assert (
        str(e.value)
        == f"adapter checkpoint {ckpts / 'step-100000'} does not exist; {ckpts} holds step-000004, step-000008"
    )
