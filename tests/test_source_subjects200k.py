"""Subjects200K-style diptych releases: the reader on a fixture in the published Parquet layout, and the
split → detect → segment → consistency → both-directions path with the tiny checkpoints.

The fixture follows the dataset cards' ``dataset_info`` of Hugging Face ``Yuanshi/Subjects200K`` and
``Yuanshi/Subjects200K_collection3`` (https://huggingface.co/datasets/Yuanshi/Subjects200K/blob/main/README.md):
``image`` (HF Image: struct{bytes: binary, path: string}), ``collection`` (string),
``quality_assessment`` (struct of int64 compositeStructure, objectConsistency, imageQuality; null for some
rows), ``description`` (struct{item, description_0, description_1, category: string, description_valid:
bool}), files ``data/train-NNNNN-of-MMMMM.parquet`` with several row groups. Panels carry the border
OminiControl's loader crops (``src/train/data.py`` of github.com/Yuanshi9815/OminiControl, padding 8 at
512²; here 4 at 64² so the CPU run stays short).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.recipe import Recipe
from pipeline.records import Reject, SourceRecord
from pipeline.sources import subjects200k

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "manifests" / "subjects200k.yaml"
PANEL, PAD = 64, 4
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
QA = pa.struct([("compositeStructure", pa.int64()), ("objectConsistency", pa.int64()), ("imageQuality", pa.int64())])
DESC = pa.struct(
    [
        ("item", pa.string()),
        ("description_0", pa.string()),
        ("description_1", pa.string()),
        ("category", pa.string()),
        ("description_valid", pa.bool_()),
    ]
)


def photo(name: str, index: int = 0, mirror: bool = False) -> Image.Image:
    import skimage.data

    a = getattr(skimage.data, name)()
    a = a[index] if isinstance(a, tuple) else a
    im = Image.fromarray(np.asarray(a)).convert("RGB").resize((PANEL, PANEL), Image.BICUBIC)
    return im.transpose(Image.FLIP_LEFT_RIGHT) if mirror else im


def diptych(left: Image.Image, right: Image.Image, width: int | None = None) -> bytes:
    """Two panels on a white canvas 2·H wide, placed as OminiControl crops them."""
    h = PANEL + 2 * PAD
    canvas = Image.new("RGB", (width or 2 * h, h), (255, 255, 255))
    canvas.paste(left, (PAD, PAD))
    canvas.paste(right, (PANEL + 2 * PAD, PAD))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def qa(a: int = 5, b: int = 5, c: int = 5) -> dict:
    return {"compositeStructure": a, "objectConsistency": b, "imageQuality": c}


def desc(item: str) -> dict:
    return {
        "item": item,
        "description_0": f"the {item}, left scene",
        "description_1": f"the {item}, right scene",
        "category": "Things",
        "description_valid": True,
    }


def build(root: Path) -> dict[str, str]:
    """Writes data/train-00000-of-00003 (8 rows, row groups of 3; the last repeats row 1), -00001 (an
    ``image`` column of the wrong type, 2 rows), -00002 (not Parquet) and train-00003-of-00004 (string
    columns where structs belong). Returns row id → what becomes of it."""
    data = root / "data"
    data.mkdir(parents=True)
    astro, moto_l, moto_r = photo("astronaut"), photo("stereo_motorcycle", 0), photo("stereo_motorcycle", 1)
    rows = [  # (image cell, collection, quality_assessment, description, expected)
        (
            {"bytes": diptych(astro, photo("astronaut", mirror=True)), "path": None},
            "collection_2",
            qa(),
            desc("astronaut"),
            "pair",
        ),
        ({"bytes": diptych(moto_l, moto_r), "path": None}, "collection_2", qa(), desc("motorcycle"), "pair"),
        (
            {"bytes": diptych(photo("chelsea"), photo("coffee")), "path": None},
            "collection_2",
            qa(5, 2, 5),
            desc("cat"),
            "quality below source.min_quality=5: objectConsistency 2",
        ),
        (
            {"bytes": diptych(astro, astro), "path": None},
            "collection_2",
            None,
            desc("astronaut"),
            "no quality_assessment",
        ),
        ({"bytes": None, "path": "img.png"}, "collection_2", qa(), desc("ghost"), "no image bytes (only a path"),
        (
            {"bytes": diptych(astro, astro, width=100), "path": None},
            "collection_2",
            qa(),
            desc("astronaut"),
            "not a diptych: the image is 100x72, but two square panels side by side are 144x72",
        ),
        ({"bytes": diptych(moto_r, moto_l), "path": None}, "collection_1", qa(), desc("motorcycle"), "pair"),
        ({"bytes": diptych(moto_l, moto_r), "path": None}, "collection_2", qa(), desc("motorcycle"), "copy of r1"),
    ]
    table = pa.table(
        {
            "image": pa.array([r[0] for r in rows], IMAGE),
            "collection": pa.array([r[1] for r in rows], pa.string()),
            "quality_assessment": pa.array([r[2] for r in rows], QA),
            "description": pa.array([r[3] for r in rows], DESC),
        }
    )
    pq.write_table(table, data / "train-00000-of-00003.parquet", row_group_size=3)
    wrong = pa.table(
        {
            "image": pa.array(["x.png", "y.png"], pa.string()),
            "collection": pa.array(["collection_2"] * 2),
            "quality_assessment": pa.array([qa()] * 2, QA),
            "description": pa.array([desc("a"), desc("b")], DESC),
        }
    )
    pq.write_table(wrong, data / "train-00001-of-00003.parquet")
    strings = pa.table(
        {
            "image": pa.array([{"bytes": diptych(astro, astro), "path": None}] * 2, IMAGE),
            "collection": pa.array(["collection_2"] * 2),
            "quality_assessment": pa.array(["5,5,5", None]),
            "description": pa.array(["an astronaut", "an astronaut"]),
        }
    )
    pq.write_table(strings, data / "train-00003-of-00004.parquet")
    (data / "train-00002-of-00003.parquet").write_bytes(b"not parquet at all")
    out = {f"train-00000-of-00003-r{i:06d}": r[4] for i, r in enumerate(rows)}
    out.update({f"train-00001-of-00003-r{i:06d}": "column 'image' is string, not image bytes" for i in range(2)})
    out["train-00002-of-00003"] = "is not a readable Parquet file"
    out["train-00003-of-00004-r000000"] = "quality_assessment is str, not a struct of the three scores"
    out["train-00003-of-00004-r000001"] = "description is str, not a struct (item, category, description_0/1)"
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("subjects200k")
    return root, build(root)


def split(items):
    recs = {r.id: r for r in items if isinstance(r, SourceRecord)}
    rejs = {r.id: r for r in items if isinstance(r, Reject)}
    return recs, rejs


def test_reader_rows_become_diptych_records_or_rejects(release):
    root, truth = release
    items = list(subjects200k.read({"root": str(root)}))
    recs, rejs = split(items)
    assert len(items) == len(truth) == 13  # every row (and the unreadable file) is one input
    assert sorted(recs) == [
        "train-00000-of-00003-r000000",
        "train-00000-of-00003-r000001",
        "train-00000-of-00003-r000004",
        "train-00000-of-00003-r000005",
        "train-00000-of-00003-r000006",
        "train-00000-of-00003-r000007",
    ]  # r4/r5: by decode
    for rid, r in rejs.items():
        assert truth[rid] in r.reason and r.stage == "read" and "\n" not in r.reason
    r = recs["train-00000-of-00003-r000001"]
    assert r.pair == "cross" and r.phrase == "motorcycle" and r.reference is None
    assert (r.image.column, r.image.row) == ("image", 1) and r.image.path.endswith("train-00000-of-00003.parquet")
    assert r.diptych.padding == 8 and r.diptych.captions == (
        "the motorcycle, left scene",
        "the motorcycle, right scene",
    )
    assert r.extra == {
        "collection": "collection_2",
        "item": "motorcycle",
        "category": "Things",
        "quality_assessment": qa(),
    }


def test_reader_options(release):
    root, _ = release
    recs, rejs = split(
        subjects200k.read(
            {
                "root": str(root),
                "min_quality": None,
                "collections": ["collection_2"],
                "padding": PAD,
                "phrase": "category",
            }
        )
    )
    assert "train-00000-of-00003-r000006" not in recs and "train-00000-of-00003-r000006" not in rejs  # not an input
    assert {"train-00000-of-00003-r000002", "train-00000-of-00003-r000003"} <= set(recs)  # no quality filter
    assert all(r.phrase == "Things" and r.diptych.padding == PAD for r in recs.values())
    only = list(subjects200k.read({"root": str(root), "files": "data/train-00000-*.parquet"}))
    assert len(only) == 8
    with pytest.raises(ValueError, match="unknown key 'source.min_qualty'; did you mean 'min_quality'"):
        subjects200k.read({"root": str(root), "min_qualty": 4})
    with pytest.raises(ValueError, match="'source.padding' = 'eight': expected an integer"):
        subjects200k.read({"root": str(root), "padding": "eight"})
    with pytest.raises(FileNotFoundError, match="no Parquet files match"):
        subjects200k.read({"root": str(root), "files": "nothing/*.parquet"})


def tiny_recipe(root: Path, **consistency) -> Recipe:
    """The shipped recipe with the loosened detector/filter settings of manifests/demo.yaml (tiny random
    models give random boxes) and the fixture's 64² panels."""
    r = Recipe.from_yaml(MANIFEST, source_root=str(root))
    r.source.options["padding"] = PAD
    d, f = r.detection, r.filters
    d.box_threshold = d.text_threshold = 0.05
    d.image_size, d.max_size = 64, 128
    f.min_image_side, f.min_box_area, f.max_box_area = 32, 0.0, 1.0
    f.max_comparable_subjects, f.max_mask_components, f.min_largest_component = 100, 1000, 0.0
    f.min_mask_area, f.min_reference_side = 0.0005, 4
    r.consistency.min_score = consistency.get("min_score")
    r.shards.inputs_per_shard = 4
    r.executor.batch_size, r.executor.device = 4, "cpu"
    r.validate()
    return r


@pytest.fixture(scope="module")
def stages(release, tiny_models):
    from pipeline.stages import build_stages

    return build_stages(tiny_recipe(release[0]), tiny_models)


def test_diptychs_become_cross_samples_in_both_directions(release, tiny_models, stages, tmp_path):
    from dynaip.dataset.inspect import iter_samples
    from pipeline.executor_local import run_local

    root, truth = release
    recipe = tiny_recipe(root)
    m = run_local(recipe, tmp_path / "ds", tiny_models, progress=False, stages=stages)
    t = m["totals"]
    assert t["inputs"] == 13 and t["inputs"] == t["accepted"] + t["rejected"]
    from dynaip.dataset.inspect import verify

    assert verify(tmp_path / "ds") == []
    rejects = {r["id"]: r for r in map(json.loads, (tmp_path / "ds" / "rejects.jsonl").read_text().splitlines())}
    assert rejects["train-00000-of-00003-r000004"]["stage"] == "decode"
    assert truth["train-00000-of-00003-r000005"] in rejects["train-00000-of-00003-r000005"]["reason"]
    original, copy = "train-00000-of-00003-r000001", "train-00000-of-00003-r000007"
    if original in rejects:  # the same pixels meet the same fate
        assert rejects[copy]["reason"] == rejects[original]["reason"]
    else:  # de-duplication removes the copy: the input is one reject, and both of its samples are gone
        assert rejects[copy] == {
            "id": copy,
            "source": "subjects200k",
            "stage": "dedup",
            "reason": f"duplicate of subjects200k-{original}-0",
        }
    for rid, why in truth.items():
        if why not in ("pair", "copy of r1"):
            assert why in rejects[rid]["reason"]
    accepted = [rid for rid, why in truth.items() if why == "pair" and rid not in rejects]
    assert len(accepted) == t["accepted"] >= 2  # the tiny models keep at least two of the three pairs
    assert t["samples"] == 2 * t["accepted"] and t["pairs"] == {"cross": 2 * t["accepted"]}
    by_key = {
        s["key"]: {"json": json.loads(s["json"]), "txt": s["txt"].decode(), "tgt": Image.open(io.BytesIO(s["tgt.jpg"]))}
        for s in iter_samples(tmp_path / "ds")
    }
    assert len(by_key) == t["samples"] and not any(copy in k for k in by_key)
    for rid in accepted:
        a, b = by_key[f"subjects200k-{rid}-0"], by_key[f"subjects200k-{rid}-1"]
        assert a["json"]["diptych"]["target_panel"] == "left" and b["json"]["diptych"]["target_panel"] == "right"
        assert a["json"]["diptych"]["consistency"] == b["json"]["diptych"]["consistency"]
        assert a["json"]["pair"] == "cross" and a["json"]["ref_from"] == "reference"
        assert a["txt"].endswith("left scene") and b["txt"].endswith("right scene")
        assert a["tgt"].size == b["tgt"].size == (PANEL, PANEL)
    # the astronaut's right panel is the left one mirrored: each sample's target is its own panel
    astro = by_key.get("subjects200k-train-00000-of-00003-r000000-0")
    if astro is not None:
        left = np.asarray(astro["tgt"], dtype=np.int16)
        right = np.asarray(by_key["subjects200k-train-00000-of-00003-r000000-1"]["tgt"], dtype=np.int16)
        assert np.abs(left - right[:, ::-1]).mean() < 8  # JPEG noise only


def test_consistency_threshold_rejects_with_the_score(release, tiny_models, stages, tmp_path):
    from pipeline.executor_local import run_local

    root, _ = release
    recipe = tiny_recipe(root, min_score=1.0)
    for s in stages:
        s.recipe = recipe
    try:
        m = run_local(recipe, tmp_path / "ds", tiny_models, progress=False, stages=stages)
    finally:
        base = tiny_recipe(root)
        for s in stages:
            s.recipe = base
    rejects = [json.loads(x) for x in (tmp_path / "ds" / "rejects.jsonl").read_text().splitlines()]
    cons = [r for r in rejects if r["stage"] == "consistency"]
    assert m["totals"]["accepted"] == 0 and len(cons) >= 2
    assert all(
        "consistency.min_score=1" in r["reason"] and "subjects differ: consistency 0." in r["reason"] for r in cons
    )


def test_identical_cutouts_score_one(tiny_models):
    """The score is a cosine of the two cut-outs: the same pixels on both sides give 1."""
    from pipeline.stages.consistency import ConsistencyStage, cosine

    from pipeline.sample import Item
    from pipeline.records import Diptych, ImageRef

    rec = SourceRecord(source="t", id="x", image=ImageRef(path="x.png"), diptych=Diptych())
    cut = np.asarray(photo("astronaut"))[:40]
    other = np.asarray(photo("chelsea"))
    stage = ConsistencyStage(
        Recipe.from_dict({"source": {"kind": "folder"}, "consistency": {"min_score": 0.9999}}), tiny_models
    )
    same, diff = Item(record=rec, panel=0), Item(record=rec, panel=0)
    same.ref_image, diff.ref_image = cut, cut
    same.twin = Item(record=rec, panel=1)
    diff.twin = Item(record=rec, panel=1)
    same.twin.ref_image, diff.twin.ref_image = cut.copy(), other
    stage([same, diff])
    assert same.consistency == 1.0 and same.ok
    assert diff.consistency < 1.0 and not diff.ok and diff.reject.stage == "consistency"
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == 0.0


def test_recipe_loads_with_its_documented_defaults():
    r = Recipe.from_yaml(MANIFEST)
    assert r.source.kind == "subjects200k" and r.pairing.kinds == ["cross"]
    assert r.consistency.min_score == 0.75 and r.source.options["min_quality"] == 5
    assert r.source.options["padding"] == 8
    h = r.recipe_hash
    r.consistency.min_score = 0.5
    assert r.recipe_hash != h  # the threshold decides which diptychs are kept
    demo = Recipe.from_yaml(REPO / "manifests" / "demo.yaml")
    h = demo.recipe_hash
    demo.consistency.min_score = 0.5
    assert demo.recipe_hash == h  # no diptychs: older datasets keep their hash
    with pytest.raises(ValueError, match="consistency.min_score"):
        Recipe.from_dict({"source": {"kind": "subjects200k"}, "consistency": {"min_score": 2}})
