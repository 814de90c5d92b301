"""The AnyInsertion reader (pipeline/sources/anyinsertion.py) on Parquet files written here in the published
layout, and the shipped recipe curated end to end with the tiny checkpoints.

Fixture layout, as the release publishes it (docs/sources.md, "AnyInsertion"): the dataset viewer of
https://huggingface.co/datasets/WensongSong/AnyInsertion lists the columns ``id`` (string,
``train/object/3458``), ``split`` (string), ``category`` (string), ``main_label`` (string) and the four
``Image`` columns ``ref_image``, ``ref_mask``, ``tar_image``, ``tar_mask``. A Hugging Face ``Image`` column
is the Arrow struct ``{bytes: binary, path: string}`` with the feature recorded in the schema's
``huggingface`` metadata, which is how ``datasets`` writes it; upstream's converter
(song-wensong/insert-anything ``parquet_to_image.py``) reads ``row[col]["bytes"]``, and its loader
(``src/data/all_data.py``) takes mask pixels above 128 as the subject (white-on-black masks).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.records import ImageRef, Reject, SourceRecord
from pipeline.sources import anyinsertion
from pipeline.sources.common import SourceError

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "manifests" / "anyinsertion.yaml"
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("category", pa.string()),
        ("main_label", pa.string()),
        ("ref_image", IMAGE),
        ("ref_mask", IMAGE),
        ("tar_image", IMAGE),
        ("tar_mask", IMAGE),
    ]
)
HF_FEATURES = {
    "info": {
        "features": {
            **{c: {"dtype": "string", "_type": "Value"} for c in ("id", "split", "category", "main_label")},
            **{c: {"_type": "Image"} for c in ("ref_image", "ref_mask", "tar_image", "tar_mask")},
        }
    }
}

TAR_SIZE, REF_SIZE = (320, 256), (288, 256)  # (W, H): the shipped recipe's min_image_side is 256
TAR_BOX, REF_BOX = (60, 40, 230, 200), (50, 30, 230, 220)  # the subject (XYXY) in each


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def scene(seed: int, size: tuple[int, int], box: tuple[int, int, int, int]) -> tuple[bytes, bytes]:
    """(image, mask) PNG bytes: a textured background (distinct per seed, so de-duplication keeps every
    row) with a flat-coloured subject in ``box``; the mask is white on black over the subject (L mode)."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = rng.integers(30, 220, 3, dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return png(img), png(mask)


def cell(data: bytes | None, path: str | None = None) -> dict:
    return {"bytes": data, "path": path}


def row(rid: str, label: str, seed: int, **override) -> dict:
    split, category, _ = rid.split("/")
    tar, tar_mask = scene(seed, TAR_SIZE, TAR_BOX)
    ref, ref_mask = scene(seed + 1000, REF_SIZE, REF_BOX)
    r = {
        "id": rid,
        "split": split,
        "category": category,
        "main_label": label,
        "ref_image": cell(ref),
        "ref_mask": cell(ref_mask),
        "tar_image": cell(tar),
        "tar_mask": cell(tar_mask),
    }
    r.update(override)
    return r


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 2, schema: pa.Schema = SCHEMA) -> Path:
    """A Parquet file as ``datasets`` writes an AnyInsertion split: the columns above, the HF features
    in the schema metadata, ``row_group_size`` rows per row group."""
    schema = schema.with_metadata({"huggingface": json.dumps(HF_FEATURES)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


GOOD = [
    ("train/object/3458", "Book"),
    ("train/accessory/8724", "Hat"),
    ("test/object/9857", "Tomato"),
    ("train/object/2418", "Banana"),
    ("train/accessory/4033", "Dress"),
]


def write_release(root: Path, person: bool = True) -> Path:
    """A folder of two Parquet files, several row groups each (sorted order: train-00000, then train-00001)."""
    rows = [row(rid, label, i) for i, (rid, label) in enumerate(GOOD)]
    write_parquet(root / "data" / "train-00000-of-00002.parquet", rows[:3])  # row groups of 2 + 1
    write_parquet(
        root / "data" / "train-00001-of-00002.parquet",
        rows[3:] + ([row("train/person/6563", "person", 7)] if person else []),
    )
    return root


@pytest.fixture
def release(tmp_path) -> Path:
    return write_release(tmp_path / "AnyInsertion")


def records(cfg) -> tuple[list[SourceRecord], list[Reject]]:
    out = list(anyinsertion.read(cfg))
    return [r for r in out if isinstance(r, SourceRecord)], [r for r in out if isinstance(r, Reject)]


# ------------------------------------------------------------------------------------------- reader


def test_rows_become_cross_records_in_file_and_row_order(release):
    recs, rejects = records({"root": str(release), "split": None})
    assert not rejects
    assert [r.id for r in recs] == [rid for rid, _ in GOOD] + ["train/person/6563"]
    first = recs[0]
    path = str(release / "data" / "train-00000-of-00002.parquet")
    assert first.pair == "cross" and first.source == "anyinsertion"
    assert first.image == ImageRef(path=path, column="tar_image", row=0)
    assert first.image_mask == ImageRef(path=path, column="tar_mask", row=0)
    assert first.reference == ImageRef(path=path, column="ref_image", row=0)
    assert first.reference_mask == ImageRef(path=path, column="ref_mask", row=0)
    assert first.phrase == "Book" and first.caption is None and first.group == "anyinsertion-train/object/3458"
    assert first.extra == {
        "split": "train",
        "category": "object",
        "main_label": "Book",
        "file": "data/train-00000-of-00002.parquet",
        "row": 0,
    }
    assert recs[3].image.row == 0 and recs[3].image.path.endswith("train-00001-of-00002.parquet")
    assert recs[2].image.row == 2  # the second row group of the first file: rows count from the file's start


def test_split_and_category_selection(release):
    recs, _ = records({"root": str(release)})  # default split: train
    assert "test/object/9857" not in [r.id for r in recs] and len(recs) == 5
    recs, _ = records({"root": str(release), "categories": ["accessory"]})
    assert [r.id for r in recs] == ["train/accessory/8724", "train/accessory/4033"]
    recs, _ = records({"root": str(release), "split": "test", "categories": ["object"]})
    assert [r.id for r in recs] == ["test/object/9857"]
    with pytest.raises(SourceError, match=r"no row has split 'val' .*splits present: test, train"):
        anyinsertion.read({"root": str(release), "split": "val"})
    with pytest.raises(
        SourceError,
        match=r"'garment' is not a category of the AnyInsertion release \(its "
        r"categories: accessory, object, person\)",
    ):
        anyinsertion.read({"root": str(release), "split": "test", "categories": ["garment"]})


def test_partial_download_warns_for_an_absent_category_and_says_what_it_selected(release, caplog):
    """A release category no file holds (part of the release downloaded) is one warning; the run goes on
    with the others. A selection that matches no row at all is still a one-line error."""
    with caplog.at_level(logging.WARNING, logger="pipeline.sources.anyinsertion"):
        it = anyinsertion.read({"root": str(release), "split": "test", "categories": ["accessory", "object"]})
    assert [r.id for r in it] == ["test/object/9857"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    want = (
        f"anyinsertion: no row has category 'accessory' in split 'test' under {release} (part of the release "
        "downloaded?); reading the 1 row(s) of object"
    )
    assert warnings == [want]
    assert it.selection == {
        "split": "test",
        "categories": ["accessory", "object"],
        "found": {"object": 1},
        "absent": ["accessory"],
        "rows_selected": 1,
        "files": ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"],
    }
    with pytest.raises(
        SourceError,
        match=r"no row has category 'person' in split 'test' .*\(categories present: "
        r"object\); fix source.categories",
    ):
        anyinsertion.read({"root": str(release), "split": "test", "categories": ["person"]})


def test_one_file_and_a_url_root_read_the_same_rows(release):
    import fsspec

    one = release / "data" / "train-00001-of-00002.parquet"
    recs, _ = records({"root": str(one), "split": None})
    assert [r.id for r in recs] == ["train/object/2418", "train/accessory/4033", "train/person/6563"]
    assert recs[0].extra["file"] == one.name
    only, _ = records({"root": str(release), "split": None, "files": "data/*-00001-*.parquet"})
    assert [r.id for r in only] == [r.id for r in recs] and only[0].extra["file"] == f"data/{one.name}"
    with pytest.raises(SourceError, match=r"no Parquet files match 'train/\*\.parquet' .*it holds: data\)"):
        anyinsertion.read({"root": str(release), "files": "train/*.parquet"})

    fs = fsspec.filesystem("memory")
    for p in sorted(release.rglob("*.parquet")):
        fs.pipe(f"/anyins/{p.relative_to(release).as_posix()}", p.read_bytes())
    try:
        url_recs, _ = records({"root": "memory://anyins", "split": None})
        local, _ = records({"root": str(release), "split": None})
        assert [r.id for r in url_recs] == [r.id for r in local]
        assert url_recs[0].image.path.startswith("memory://") and url_recs[0].extra == local[0].extra
        from pipeline.stages.decode import ByteReader

        data = ByteReader().read(url_recs[4].reference_mask)  # a cell read through fsspec
        assert Image.open(io.BytesIO(data)).size == REF_SIZE
    finally:
        fs.rm("/anyins", recursive=True)


def test_reader_reads_only_the_text_columns_one_row_group_at_a_time(release, monkeypatch):
    calls: list[list[str]] = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        calls.append(list(columns or []))
        return real(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    it = anyinsertion.read({"root": str(release), "split": None})
    assert calls == []  # read() looked at the files' footers only
    first = next(it)
    assert first.id == "train/object/3458" and len(calls) == 1  # yielded before the rest is read
    rest = list(it)
    assert len(rest) == 5 and len(calls) == 4  # 2 + 2 row groups, each read once
    assert all(c == ["id", "split", "category", "main_label"] for c in calls)
    calls.clear()
    list(anyinsertion.read({"root": str(release), "split": "train"}))  # the selection check: two columns
    assert calls[:4] == [["split", "category"]] * 4 and all(not set(c) & set(anyinsertion.IMAGE_COLUMNS) for c in calls)


def test_upstream_label_column_name_is_read(tmp_path):
    schema = pa.schema([f if f.name != "main_label" else pa.field("label", pa.string()) for f in SCHEMA])
    r = row("train/object/1", "Apple", 1)
    r["label"] = r.pop("main_label")
    path = write_parquet(tmp_path / "a.parquet", [r], schema=schema)
    (rec,), _ = records({"root": str(path)})
    assert rec.phrase == "Apple" and rec.extra["main_label"] == "Apple"


def test_bad_files_stop_the_run_with_one_line(tmp_path, release):
    no_mask = pa.schema([f for f in SCHEMA if f.name != "tar_mask"])
    r = row("train/object/1", "Apple", 1)
    del r["tar_mask"]
    bad = write_parquet(tmp_path / "nomask" / "a.parquet", [r], schema=no_mask)
    with pytest.raises(SourceError) as e:
        anyinsertion.read({"root": str(bad)})
    assert (
        "has no column tar_mask" in str(e.value)
        and "its columns: id, split, category, main_label, ref_image" in str(e.value)
        and "\n" not in str(e.value)
    )
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match="is not a readable Parquet file"):
        anyinsertion.read({"root": str(tmp_path / "junk")})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("x")
    with pytest.raises(SourceError, match=r"no Parquet files match '\*\*/\*.parquet' .*it holds: README.md"):
        anyinsertion.read({"root": str(tmp_path / "empty")})
    with pytest.raises(SourceError, match="neither a Parquet file nor a folder"):
        anyinsertion.read({"root": str(tmp_path / "nothing-here")})
    with pytest.raises(SourceError, match="source.root is not set"):
        anyinsertion.read({"split": "train"})
    with pytest.raises(ValueError, match="unknown key 'source.categorie'; did you mean 'categories'"):
        anyinsertion.read({"root": str(release), "categorie": ["object"]})
    with pytest.raises(ValueError, match="'source.categories' = 5: expected a list"):
        anyinsertion.read({"root": str(release), "categories": 5})


def bad_rows_file(root: Path) -> None:
    """Rows the reader or the decode stage must reject, each for one reason (ids name the reason)."""
    tar, _ = scene(50, TAR_SIZE, TAR_BOX)
    small_mask = png(np.full((100, 100), 255, np.uint8))
    rows = [
        row("train/object/nobytes", "Cup", 51, tar_image=cell(None, "tar/123.png")),  # only a path stored
        row("train/object/nullcell", "Cup", 52, ref_image=None),
        row("train/object/garbage", "Cup", 53, tar_image=cell(b"\x89PNG but not really")),
        row("train/person/masksize", "person", 54, tar_mask=cell(small_mask)),
        row("train/object/refmasksize", "Cup", 55, ref_mask=cell(small_mask)),
        row("train/object/emptymask", "Cup", 56, tar_mask=cell(png(np.zeros(TAR_SIZE[::-1], np.uint8)))),
        row("train/object/1", "Cup", 57, id=None),  # no id
        row("train/object/3458", "Cup", 58),  # repeats the first file's id
        row("train/accessory/nolabel", "", 59),  # no label: the category is the phrase
    ]
    write_parquet(root / "data" / "train-00002-of-00002.parquet", rows, row_group_size=4)
    wrong = pa.schema([f if f.name != "tar_mask" else pa.field("tar_mask", pa.string()) for f in SCHEMA])
    write_parquet(
        root / "extra" / "wrongtype.parquet",
        [row("train/object/wrongtype", "Cup", 60, tar_mask="mask.png")],
        schema=wrong,
    )
    del tar


READ_REJECTS = {
    "data/train-00002-of-00002-row6": "no id: data/train-00002-of-00002.parquet row 6",
    "data/train-00002-of-00002-row7": "repeated id: data/train-00002-of-00002.parquet row 7 repeats "
    "'train/object/3458' (first at data/train-00000-of-00002.parquet row 0)",
    "train/object/wrongtype": "image column of another type: tar_mask is string in extra/wrongtype.parquet, "
    "expected image bytes",
}
DECODE_REJECTS = {
    "train/object/nobytes": "no image bytes (only a path, 'tar/123.png', is stored)",
    "train/object/nullcell": "no image bytes (the cell is null)",
    "train/object/garbage": "not a readable image",
    "train/person/masksize": "target mask is 100x100 but the target is 320x256",
    "train/object/refmasksize": "reference mask is 100x100 but the reference is 288x256",
    "train/object/emptymask": "target mask is empty",
}


def test_bad_rows_are_read_rejects_with_reasons(release):
    bad_rows_file(release)
    recs, rejects = records({"root": str(release)})
    by_id = {r.id: r for r in rejects}
    assert set(by_id) == set(READ_REJECTS)
    for rid, words in READ_REJECTS.items():
        assert words in by_id[rid].reason and by_id[rid].stage == "read" and "\n" not in by_id[rid].reason
    nolabel = next(r for r in recs if r.id == "train/accessory/nolabel")
    assert nolabel.phrase == "accessory" and nolabel.extra["main_label"] == ""


def test_target_mask_is_the_target_subject_and_can_be_ignored(release):
    from pipeline.recipe import Recipe
    from pipeline.sample import make_items
    from pipeline.stages.decode import DecodeStage

    (rec, *_), _ = records({"root": str(release)})
    recipe = Recipe.from_yaml(RECIPE, source_root=str(release))
    (item,) = DecodeStage(recipe)(make_items([rec]))
    t = item.target
    assert item.ok and t.searched and t.given_mask.shape == TAR_SIZE[::-1]
    assert [c.box for c in t.candidates] == [tuple(float(v) for v in TAR_BOX)]
    assert item.reference.given_mask.sum() == (REF_BOX[2] - REF_BOX[0]) * (REF_BOX[3] - REF_BOX[1])
    recipe.segmentation.use_provided_masks = False  # then the target's subject is detected
    (item,) = DecodeStage(recipe)(make_items([rec]))
    assert item.ok and not item.target.searched and item.target.given_mask is None


def test_decode_reads_each_column_of_a_row_group_once(release, monkeypatch):
    """A record's four cells are four columns of one row, and the next records are the next rows: the
    decode stage's Parquet reader keeps one row group of every column it read, so a row group's
    column is read once, not once per cell."""
    from pipeline.recipe import Recipe
    from pipeline.sample import make_items
    from pipeline.stages.decode import DecodeStage

    recs, _ = records({"root": str(release), "split": None})
    calls: list[tuple[int, tuple[str, ...]]] = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        calls.append((i, tuple(columns or ())))
        return real(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    items = DecodeStage(Recipe.from_yaml(RECIPE, source_root=str(release)))(make_items(recs))
    assert all(it.ok for it in items)
    # 2 files × 2 row groups × 4 image columns (one read per cell would be 6 rows × 4 = 24)
    assert len(calls) == 2 * 2 * 4 and {c for _, c in calls} == {(c,) for c in anyinsertion.IMAGE_COLUMNS}


def test_without_a_captioner_the_caption_is_the_label(release):
    """captioning.order [model, template]: no captioner in models.yaml → the template over main_label."""
    from pipeline.recipe import Recipe
    from pipeline.sample import make_items
    from pipeline.stages.caption import CaptionStage
    from pipeline.stages.decode import DecodeStage

    (rec, *_), _ = records({"root": str(release)})
    recipe = Recipe.from_yaml(RECIPE, source_root=str(release))
    items = CaptionStage(recipe, None)(DecodeStage(recipe)(make_items([rec])))
    assert (items[0].caption, items[0].caption_source) == ("a photo of a Book", "template")


# ------------------------------------------------------------------------------------- the recipe


def test_recipe_loads_and_its_source_section_drives_the_reader(release):
    from pipeline.recipe import Recipe
    from pipeline.sources import get_reader

    recipe = Recipe.from_yaml(RECIPE, source_root=str(release))
    assert recipe.source.kind == "anyinsertion" and recipe.pairing.kinds == ["cross"]
    assert recipe.source.options["split"] == "train"
    assert recipe.source.options["categories"] == ["accessory", "object", "person"]
    via_recipe = list(get_reader("anyinsertion")(recipe.source))
    via_mapping = list(anyinsertion.read(recipe.source.to_dict()))
    assert via_recipe == via_mapping and len(via_recipe) == 5


def test_shipped_recipe_on_a_partial_download(tmp_path, caplog):
    """Part of the release (one Parquet file, no person rows) through the shipped recipe: one warning for
    the absent category, every selected row read, and the manifest says what was selected and found."""
    from pipeline.executor_local import run_local
    from pipeline.recipe import Recipe

    release = tmp_path / "AnyInsertion"
    rows = [row(rid, label, i) for i, (rid, label) in enumerate(GOOD)]
    write_parquet(release / "data" / "train-00000-of-00002.parquet", rows)  # the other file not downloaded
    recipe = Recipe.from_yaml(RECIPE, source_root=str(release))
    with caplog.at_level(logging.WARNING, logger="pipeline.sources.anyinsertion"):
        m = run_local(recipe, tmp_path / "ds", stages=[], progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no row has category 'person' in split 'train'" in warnings[0]
    assert m["totals"]["inputs"] == 4  # the train rows: 2 accessory + 2 object
    assert m["source_selection"] == {
        "split": "train",
        "categories": ["accessory", "object", "person"],
        "found": {"accessory": 2, "object": 2},
        "absent": ["person"],
        "rows_selected": 4,
        "files": ["data/train-00000-of-00002.parquet"],
    }
    on_disk = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert on_disk["source_selection"] == m["source_selection"]


def test_recipe_curates_cross_samples_with_white_references(tiny_models, tmp_path):
    """The shipped recipe with only its shard size shrunk, on the tiny checkpoints: good rows become
    cross samples (target = tar_image, mask = tar_mask, reference = ref_image's subject on white),
    bad rows become rejects with their reasons, and every input is accounted for. (The well-formed
    person row is left out: face mode would run the tiny detector, 40 s on CPU, for nothing tested here;
    the recipe's person category is still present through a bad row.)"""
    from dynaip.dataset.inspect import iter_samples
    from pipeline.executor_local import run_local
    from pipeline.recipe import Recipe

    release = write_release(tmp_path / "AnyInsertion", person=False)
    bad_rows_file(release)
    recipe = Recipe.from_yaml(RECIPE, source_root=str(release))
    recipe.shards.inputs_per_shard = 4
    recipe.executor.device = "cpu"
    out = tmp_path / "ds"
    m = run_local(recipe, out, tiny_models, progress=False)
    t = m["totals"]
    assert t["inputs"] == 4 + 9 + 1 == t["accepted"] + t["rejected"]  # train rows + 9 bad rows + the wrong-type file
    assert t["accepted"] == t["samples"] == t["pairs"]["cross"] == 5  # the 4 good train rows + the label-less one
    assert t["rejected_by_reason"]["read: no id"] == 1 and t["rejected_by_reason"]["decode: no image bytes"] == 2
    rejects = {r["id"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    for rid, words in {**READ_REJECTS, **DECODE_REJECTS}.items():
        assert words in rejects[rid]["reason"], (rid, rejects[rid])
        assert rejects[rid]["stage"] == ("read" if rid in READ_REJECTS else "decode")
    samples = {json.loads(s["json"])["source_id"]: s for s in iter_samples(out)}
    assert {
        "train/object/3458",
        "train/accessory/8724",
        "train/object/2418",
        "train/accessory/4033",
        "train/accessory/nolabel",
    } <= set(samples)
    rows = {rid: i for i, (rid, _) in enumerate(GOOD)}
    for rid in ("train/object/3458", "train/accessory/4033"):
        s = samples[rid]
        meta = json.loads(s["json"])
        assert meta["pair"] == "cross" and meta["ref_from"] == "reference"
        assert meta["box"] == list(map(float, TAR_BOX)) and meta["phrase"] == dict(GOOD)[rid]
        mask = np.asarray(Image.open(io.BytesIO(s["mask.png"]))) > 127
        want = np.zeros(TAR_SIZE[::-1], bool)
        want[TAR_BOX[1] : TAR_BOX[3], TAR_BOX[0] : TAR_BOX[2]] = True
        assert (mask == want).all(), "the sample's mask is tar_mask"
        tgt = np.asarray(Image.open(io.BytesIO(s["tgt.jpg"])))
        assert tgt.shape == (*TAR_SIZE[::-1], 3)
        ref = np.asarray(Image.open(io.BytesIO(s["ref.png"])))
        src = np.asarray(Image.open(io.BytesIO(scene(rows[rid] + 1000, REF_SIZE, REF_BOX)[0])))
        x0, y0, x1, y1 = meta["ref_box"]
        assert (x0, y0) < REF_BOX[:2] and (x1, y1) > REF_BOX[2:]  # the mask's box grown by the margin
        inside = np.zeros(src.shape[:2], bool)
        inside[REF_BOX[1] : REF_BOX[3], REF_BOX[0] : REF_BOX[2]] = True
        crop, keep = src[y0:y1, x0:x1], inside[y0:y1, x0:x1]
        assert (ref[keep] == crop[keep]).all() and (ref[~keep] == 255).all(), "subject on pure white"
        assert meta["caption_source"] == "model" and s["txt"].decode() == meta["caption"]
        assert meta["extra"]["main_label"] == dict(GOOD)[rid]
