"""The dataset format lives in one module (dynaip/dataset_format.py; docs/ARCHITECTURE.md, "Dataset
directory"): the writer, `dynaip manifest`, the trainer's reader and the dataset browser read the
same names and refuse a manifest of another format with the same line."""

from __future__ import annotations

import json

import pytest

from dynaip import dataset_format as fmt
from train_fixtures import write_dataset


def test_one_definition_of_the_format_and_its_members():
    import dynaip.serve.datasets  # noqa: F401  (imports the format lazily; must not need pipeline.writer for it)
    from pipeline import dataset, writer

    assert writer.FORMAT is fmt.FORMAT and writer.MEMBER_ORDER is fmt.MEMBER_ORDER
    assert dataset.shard_path is fmt.shard_path
    assert set(fmt.IMAGE_MEMBERS) <= set(fmt.MEMBER_ORDER)


def test_every_reader_refuses_another_format_in_one_line(tmp_path):
    from dynaip.serve.datasets import DatasetView
    from dynaip.train.data import read_manifests
    from pipeline.dataset import load_manifest

    root = write_dataset(tmp_path / "d", [2], size=32)
    assert [s.samples for s in read_manifests([str(root)])] == [2]
    m = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**m, "format": "dynaip-dataset/0"}))
    for read in (lambda: read_manifests([str(root)]), lambda: load_manifest(root), lambda: DatasetView.open(root)):
        with pytest.raises(ValueError, match=r"has format 'dynaip-dataset/0'; this (tool|page) reads 'dynaip-dataset/1'"):
            read()
    (root / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a list, not a JSON object"):
        read_manifests([str(root)])
    (root / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        fmt.read_manifest(str(root))


def test_the_writer_reads_its_own_manifest_without_the_format_check(tmp_path):
    """Resuming over an earlier manifest reads it as a JSON object only (the caller decides on the format)."""
    from pipeline.store import Store
    from pipeline.writer import read_manifest

    (tmp_path / "manifest.json").write_text(json.dumps({"format": "older/0", "shards": []}))
    assert read_manifest(Store(tmp_path))["format"] == "older/0"
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match=r"manifest\.json is not valid JSON .*rebuild it with `dynaip curate`"):
        read_manifest(Store(tmp_path))
