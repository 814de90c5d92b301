"""The dataset format lives in one package (dynaip/dataset/: format.py, manifest.py; docs/ARCHITECTURE.md,
"Dataset directory"): the writer, `dynaip manifest`, the trainer's reader, the feature precompute and
the dataset browser read the same names and refuse a manifest of another format with the same line."""

from __future__ import annotations

import json

import pytest

from dynaip.dataset import format as fmt
from dynaip.dataset import manifest as man
from dynaip.dataset import reader
from train_fixtures import write_dataset


def test_one_definition_of_the_format_and_its_members():
    from dynaip.serve import datasets
    from pipeline import writer

    assert writer.FORMAT is fmt.FORMAT and writer.MEMBER_ORDER is fmt.MEMBER_ORDER
    assert writer.shard_name is fmt.shard_name and not hasattr(writer, "read_manifest")  # the writer reads through man
    assert reader.shard_path is fmt.shard_path and man.open_dataset is datasets.open_dataset  # one shard-path rule
    assert set(fmt.IMAGE_MEMBERS) <= set(fmt.MEMBER_ORDER)
    assert [fmt.shard_name(3, 0), fmt.shard_name(3, 2), fmt.shard_name(123456, 11)] == [
        "shards/000003.tar",
        "shards/000003_02.tar",
        "shards/123456_11.tar",
    ]


def test_every_reader_refuses_another_format_in_one_line(tmp_path):
    from dynaip.features.layout import dataset_identity
    from dynaip.serve.datasets import DatasetView
    from dynaip.train.data import read_manifests

    root = write_dataset(tmp_path / "d", [2], size=32)
    assert [s.samples for s in read_manifests([str(root)])] == [2]
    m = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**m, "format": "dynaip-dataset/0"}))
    readers = (
        lambda: read_manifests([str(root)]),
        lambda: man.load_manifest(root),
        lambda: DatasetView.open(root),
        lambda: dataset_identity(str(root)),
    )
    for read in readers:
        with pytest.raises(ValueError, match=r"has format 'dynaip-dataset/0'; this tool reads 'dynaip-dataset/1'"):
            read()
    (root / "manifest.json").write_text("[1, 2]")
    for read in readers:
        with pytest.raises(ValueError, match="holds a list, not a JSON object"):
            read()
    (root / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        man.read_manifest(str(root))


def test_the_writer_reads_its_own_manifest_without_the_format_check(tmp_path):
    """Resuming over an earlier manifest reads it as a JSON object only (the caller decides on the format)."""
    from dynaip.dataset.manifest import read_store_manifest as read_manifest
    from dynaip.dataset.store import Store

    (tmp_path / "manifest.json").write_text(json.dumps({"format": "older/0", "shards": []}))
    assert read_manifest(Store(tmp_path))["format"] == "older/0"
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match=r"manifest\.json is not valid JSON .*rebuild it with `dynaip curate`"):
        read_manifest(Store(tmp_path))
