"""The whole local curation chain with the tiny checkpoints, on real sample photos plus corrupt files.

One curation run (module fixture) is shared by the checks; the demo recipe is used as shipped (its
``cross_pairs: subfolders`` turns the two motorcycle views into two extra cross-pair inputs)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.recipe import Recipe
from pipeline.records import ImageRef, SourceRecord
from pipeline.sample import sample_key

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "manifests" / "demo.yaml"
PHOTOS = ["astronaut", "chelsea", "logo", "motorcycle"]  # motorcycle → motorcycle/left.png + motorcycle/right.png
CORRUPT = {"truncated.jpg": "decode", "zero.jpg": "decode", "text.jpg": "decode", "bomb.png": "decode"}


def bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from pipeline.demo_photos import write_sample_photos

    root = tmp_path_factory.mktemp("photos")
    write_sample_photos(root, faces=0, names=PHOTOS)
    jpg = (root / "astronaut.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image at all\n" * 20)
    (root / "bomb.png").write_bytes(bomb_png(60_000, 60_000))
    return root


@pytest.fixture(scope="module")
def recipe(photos) -> Recipe:
    r = Recipe.from_yaml(DEMO, source_root=str(photos))
    r.shards.inputs_per_shard = 2  # the demo's settings otherwise; small chunks cross many shard boundaries
    return r


@pytest.fixture(scope="module")
def stages(recipe, tiny_models):
    from pipeline.stages import build_stages

    return build_stages(recipe, tiny_models)  # models load once for every run in this module


@pytest.fixture(scope="module")
def built(tmp_path_factory, recipe, tiny_models, stages):
    from pipeline.executor_local import run_local

    out = tmp_path_factory.mktemp("ds") / "demo"
    manifest = run_local(recipe, out, tiny_models, progress=False, stages=stages)
    return out, manifest


def test_every_input_is_accounted_for(built, photos):
    out, m = built
    t = m["totals"]
    n_files = len([p for p in photos.rglob("*") if p.suffix in (".jpg", ".png")])
    assert n_files == 9
    assert t["inputs"] == n_files + 2 == 11  # + one cross record per motorcycle view
    assert t["inputs"] == t["accepted"] + t["rejected"]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == t["rejected"] and sum(t["rejected_by_reason"].values()) == t["rejected"]
    by_id = {r["id"]: r for r in rejects}
    for name, stage in CORRUPT.items():
        assert by_id[Path(name).stem]["stage"] == stage
    assert by_id["zero"]["reason"] == "empty file (0 bytes)"
    assert "not a readable image" in by_id["text"]["reason"]
    assert "corrupt or truncated" in by_id["truncated"]["reason"]
    assert "declared size" in by_id["bomb"]["reason"]
    assert m["format"] == "dynaip-dataset/1" and len(m["recipe_hash"]) == 16
    assert m["models"]["sam"]["checkpoint_sha256"] and m["models"]["grounding_dino"]["checkpoint_sha256"]


def test_demo_recipe_accepts_real_photos_through_detection(built):
    """Pins that detect → segment → compose → caption yields samples with the tiny models."""
    _, m = built
    assert m["totals"]["accepted"] == 7  # astronaut, chelsea, logo, motorcycle/{left,right} intra + cross
    assert m["totals"]["samples"] == m["totals"]["accepted"]
    # 11 inputs, 2 per chunk (intra records in sorted order, then the cross records): chunk 0 = astronaut +
    # bomb, 1 = chelsea + logo, 2 = motorcycle/left + right, 3 = text + truncated (no shard),
    # 4 = zero + motorcycle/left~cross, 5 = motorcycle/right~cross
    assert [(s["path"], s["samples"]) for s in m["shards"]] == [
        ("shards/000000.tar", 1),
        ("shards/000001.tar", 2),
        ("shards/000002.tar", 2),
        ("shards/000004.tar", 1),
        ("shards/000005.tar", 1),
    ]


def _samples(out: Path) -> list[dict]:
    from dynaip.dataset.inspect import iter_samples

    return list(iter_samples(out))


def test_shards_read_back_with_tarfile_and_refs_are_white_outside_the_subject(built):
    out, m = built
    samples = _samples(out)
    assert len(samples) == m["totals"]["samples"]
    white_somewhere = False
    for s in samples:
        assert set(s) == {"key", "ref.png", "tgt.jpg", "mask.png", "txt", "json"}
        assert all(ch.isalnum() or ch in "_-" for ch in s["key"])
        meta = json.loads(s["json"])
        for field in (
            "source",
            "source_id",
            "pair",
            "phrase",
            "box",
            "det_score",
            "mask_area",
            "width",
            "height",
            "recipe",
            "caption_source",
        ):
            assert field in meta, field
        assert s["key"] == sample_key("folder", meta["source_id"])
        assert meta["pair"] == ("cross" if meta["source_id"].endswith("~cross") else "intra")
        ref = np.asarray(Image.open(io.BytesIO(s["ref.png"])))
        tgt = Image.open(io.BytesIO(s["tgt.jpg"]))
        mask_im = Image.open(io.BytesIO(s["mask.png"]))
        assert ref.ndim == 3 and tgt.mode == "RGB" and mask_im.mode == "L"
        assert tgt.size == mask_im.size == (meta["width"], meta["height"])
        mask = np.asarray(mask_im) > 127
        assert int(mask.sum()) == meta["mask_area"] > 0
        x0, y0, x1, y1 = meta["ref_box"]
        assert ref.shape[:2] == (y1 - y0, x1 - x0)
        if meta["pair"] == "intra":  # a cross reference is cut from the other image, whose mask is not stored
            sub = mask[y0:y1, x0:x1]
            assert (ref[~sub] == 255).all(), f"{s['key']}: reference not pure white outside the subject"
            white_somewhere = white_somewhere or bool((~sub).any())
        assert s["txt"].decode() == meta["caption"] and meta["caption_source"] in ("provided", "model", "template")
        if meta["caption_source"] == "model":  # the tiny BLIP named in the tiny models.yaml, with the demo's prompt
            assert meta["caption_model"] == "captioner" and meta["caption_prompt"] == "a photo of"
            assert meta["caption"].startswith("a photo of")
        q = meta["quality"]
        assert isinstance(q["aesthetic"], float) and isinstance(q["sharpness"], float) and q["sharpness"] >= 0
        assert 0 < q["subject_pixels"] <= meta["mask_area"] or meta["pair"] == "cross"
        assert q["det_score"] == meta["det_score"]
    assert white_somewhere, "tiny SAM masks are cut to the box, so some reference shows white background"
    sources = {json.loads(s["json"])["source_id"]: json.loads(s["json"])["caption_source"] for s in samples}
    if "chelsea" in sources:
        assert sources["chelsea"] == "provided"
    assert "model" in sources.values(), "photos without a .txt get the tiny BLIP's caption"


def test_subfolder_views_become_cross_pairs_cut_from_the_other_view(built, photos):
    """``cross_pairs: subfolders``: each motorcycle view is the target of a cross sample whose reference
    was detected + segmented in the other view (no mask or box given by the source)."""
    out, _ = built
    cross = {}
    for s in _samples(out):
        meta = json.loads(s["json"])
        if meta["pair"] == "cross":
            cross[meta["source_id"]] = (s, meta)
    assert sorted(cross) == ["motorcycle/left~cross", "motorcycle/right~cross"]
    views = {v: np.asarray(Image.open(photos / "motorcycle" / f"{v}.png").convert("RGB")) for v in ("left", "right")}
    for target, other in (("left", "right"), ("right", "left")):
        s, meta = cross[f"motorcycle/{target}~cross"]
        assert meta["group"] == "motorcycle" and meta["ref_from"] == "reference"
        assert s["txt"].decode() == (photos / "motorcycle" / f"{target}.txt").read_text().strip()
        assert meta["caption_source"] == "provided"
        tgt = np.asarray(Image.open(io.BytesIO(s["tgt.jpg"])))
        assert tgt.shape == views[target].shape
        ref = np.asarray(Image.open(io.BytesIO(s["ref.png"])))
        x0, y0, x1, y1 = meta["ref_box"]
        kept = (ref != 255).any(axis=2)
        assert kept.any()
        assert (ref[kept] == views[other][y0:y1, x0:x1][kept]).all(), "reference pixels come from the other view"
        assert not (ref[kept] == views[target][y0:y1, x0:x1][kept]).all()


def test_shards_read_back_with_webdataset(built):
    import webdataset as wds

    out, m = built
    urls = [str(out / s["path"]) for s in m["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(got) == m["totals"]["samples"]
    assert {"ref.png", "tgt.jpg", "mask.png", "txt", "json"} <= set(got[0])


def test_verify_passes_then_catches_one_changed_byte(built, tmp_path):
    from pipeline.cli import main

    out, m = built
    from dynaip.dataset.inspect import verify

    assert verify(out) == []
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = copy / m["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify(copy)
    assert len(problems) == 1 and "sha256" in problems[0] and m["shards"][0]["path"] in problems[0]
    assert main(["manifest", "verify", str(copy)]) == 1
    assert main(["manifest", "verify", str(out)]) == 0


def test_rerun_is_a_byte_identical_no_op_and_a_lost_chunk_is_rebuilt_identically(built, recipe, tiny_models, stages):
    from pipeline.executor_local import run_local

    out, m = built
    before = tree_bytes(out)
    assert run_local(recipe, out, tiny_models, progress=False, stages=stages) == m
    assert tree_bytes(out) == before
    # lose chunk 1 (its shard and its marker): only it is recomputed, with the same bytes
    (out / "shards" / "000001.tar").unlink()
    (out / ".progress" / "000001.json").unlink()
    run_local(recipe, out, tiny_models, progress=False, stages=stages)
    after = tree_bytes(out)
    assert {k: hashlib.sha256(v).hexdigest() for k, v in after.items() if not k.startswith(".progress/")} == {
        k: hashlib.sha256(v).hexdigest() for k, v in before.items() if not k.startswith(".progress/")
    }


def test_other_recipe_into_the_same_dir_is_refused(built, recipe, photos):
    from pipeline.executor_local import run_local
    from pipeline.writer import OutputDirError

    out, _ = built
    other = Recipe.from_yaml(DEMO, source_root=str(photos))
    other.seed = 7
    with pytest.raises(
        OutputDirError, match=f"recipe hash {recipe.recipe_hash}, but this recipe's hash is {other.recipe_hash}"
    ):
        run_local(other, out, None, progress=False)


def test_dataset_card_is_a_hub_dataset_card_that_datasets_loads(built, tmp_path, monkeypatch):
    """``README.md`` parses as a Hugging Face dataset card and states the manifest's numbers; ``datasets``
    reads the shards with its WebDataset builder, by the card's ``configs`` and ``features`` and by
    ``data_files`` alone, with one column per shard member."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets
    from huggingface_hub import DatasetCard

    from dynaip.dataset.card import MEMBER_FEATURES, PREVIEW_SAMPLES
    from dynaip.dataset.format import MEMBER_ORDER

    out, m = built
    t = m["totals"]
    card = DatasetCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "unknown" and meta["source_datasets"] == ["a local image folder"]  # folder source
    assert meta["size_categories"] == ["n<1K"] and meta["task_categories"] == ["text-to-image", "image-to-image"]
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.tar"}]}]
    assert list(MEMBER_FEATURES) == list(MEMBER_ORDER)
    assert [f["name"] for f in meta["dataset_info"]["features"]] == [*MEMBER_ORDER, "__key__", "__url__"]
    assert meta["dataset_info"]["splits"] == [{"name": "train", "num_bytes": t["bytes"], "num_examples": t["samples"]}]
    text = card.text
    assert f"| {t['inputs']} | {t['accepted']} | {t['rejected']} | {t['samples']} | {len(m['shards'])} |" in text
    for reason, n in t["rejected_by_reason"].items():
        assert f"| {reason} | {n} |" in text
    assert "| folder | sharpness |" in text and "![preview](preview.png)" in text
    rows = min(PREVIEW_SAMPLES, t["samples"])
    assert Image.open(out / "preview.png").size == (3 * 160, rows * (160 + 28))

    before = tree_bytes(out)
    shards = [str(out / s["path"]) for s in m["shards"]]
    plain = datasets.load_dataset(
        "webdataset", data_files={"train": shards}, split="train", cache_dir=str(tmp_path / "a")
    )
    assert plain.num_rows == t["samples"] and set(MEMBER_ORDER) <= set(plain.column_names)
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "b"))  # the card's configs/features
    assert ds.column_names == [*MEMBER_ORDER, "__key__", "__url__"]
    ours = _samples(out)
    assert ds["__key__"] == [s["key"] for s in ours] == plain["__key__"]
    assert ds["txt"] == [s["txt"].decode() for s in ours]
    first = json.loads(ours[0]["json"])
    assert {k: ds[0]["json"][k] for k in ("source_id", "pair", "mask_area", "width")} == {
        k: first[k] for k in ("source_id", "pair", "mask_area", "width")
    }
    assert ds[0]["json"]["quality"]["sharpness"] == pytest.approx(first["quality"]["sharpness"])
    assert np.array_equal(np.asarray(ds[0]["ref.png"]), np.asarray(Image.open(io.BytesIO(ours[0]["ref.png"]))))
    assert tree_bytes(out) == before  # datasets wrote its cache elsewhere: the dataset is untouched


def test_dataset_card_states_the_source_license(tmp_path):
    """Terms without a license id (``other``) get the hub's ``license_name`` / ``license_link``; a source
    on the hub is named by its repo id in ``source_datasets``."""
    from huggingface_hub import DatasetCard

    from dynaip.dataset.card import card_text, size_category
    from pipeline.sources import get_license

    m = {
        "format": "dynaip-dataset/1",
        "shards": [],
        "totals": {"inputs": 0, "accepted": 0, "rejected": 0, "samples": 0, "bytes": 0, "rejected_by_reason": {}},
    }
    (tmp_path / "README.md").write_text(card_text(m, [get_license("synth").to_dict()], {}, 0, False))
    meta = DatasetCard.load(tmp_path / "README.md").data.to_dict()
    assert (meta["license"], meta["license_name"]) == ("other", "flux-1-dev-non-commercial-license")
    assert meta["license_link"].startswith("https://huggingface.co/black-forest-labs/FLUX.1-dev")
    (tmp_path / "README.md").write_text(card_text(m, [get_license("subjects200k").to_dict()], {}, 0, False))
    meta = DatasetCard.load(tmp_path / "README.md").data.to_dict()
    assert (meta["license"], meta["source_datasets"]) == ("apache-2.0", ["Yuanshi/Subjects200K"])
    assert "license_name" not in meta
    assert [size_category(n) for n in (0, 999, 1000, 250_000, 5 * 10**9)] == [
        "n<1K",
        "n<1K",
        "1K<n<10K",
        "100K<n<1M",
        "1B<n<10B",
    ]


def test_show_and_grid(built, tmp_path):
    from dynaip.dataset.inspect import show
    from pipeline.cli import main

    out, m = built
    text = show(out)
    assert f"inputs   {m['totals']['inputs']}" in text and "decode: empty file" in text
    assert main(["manifest", "grid", str(out), "--out", str(tmp_path / "g.png"), "--n", "2"]) == 0
    assert Image.open(tmp_path / "g.png").size[1] > 0


def test_provided_boxes_skip_detection_and_reach_sam(photos, tiny_models, stages, tmp_path):
    """Records with provided boxes (OpenS2V/SA-1B style) and a cross pair with a mask image go through
    segment → compose → pair without the detector."""
    from pipeline.executor_local import process_chunk
    from pipeline.stages import build_stages

    r = Recipe.from_yaml(DEMO, source_root=str(photos))
    mask = np.zeros((300, 451), np.uint8)
    mask[50:250, 100:350] = 255
    Image.fromarray(mask).save(tmp_path / "chelsea_mask.png")
    Image.open(photos / "astronaut.jpg").crop((0, 0, 451, 300)).save(tmp_path / "target.jpg")
    recs = [
        SourceRecord(
            source="opens2v",
            id="clip/o1",
            image=ImageRef(path=str(photos / "astronaut.jpg")),
            phrase="person",
            boxes=[(120.0, 40.0, 400.0, 500.0)],
            caption="an astronaut",
        ),
        SourceRecord(
            source="vitonhd",
            id="00001_00",
            image=ImageRef(path=str(tmp_path / "target.jpg")),
            phrase="cup",
            boxes=[(150.0, 20.0, 400.0, 290.0)],
            reference=ImageRef(path=str(photos / "chelsea.jpg")),
            reference_mask=ImageRef(path=str(tmp_path / "chelsea_mask.png")),
            group="g1",
        ),
    ]
    r.human.face_prob = 0.0
    own = build_stages(r, tiny_models)
    by_name = {s.name: s for s in own}
    by_name["detect"]._detector = "must not be used"  # detection is skipped for provided boxes
    by_name["segment"]._segmenter = next(s for s in stages if s.name == "segment").segmenter  # the loaded tiny SAM
    encoded, rejects, _ = process_chunk(recs, 0, own, batch_size=2)
    assert rejects == [] and len(encoded) == 2
    metas = [json.loads(next(d for n, d in e if n.endswith(".json"))) for e in encoded]
    assert metas[0]["box"] == [120.0, 40.0, 400.0, 500.0] and metas[0]["det_score"] == 1.0
    assert metas[1]["pair"] == "cross" and metas[1]["ref_from"] == "reference" and metas[1]["group"] == "g1"
    ref = np.asarray(Image.open(io.BytesIO(next(d for n, d in encoded[1] if n.endswith("ref.png")))))
    x0, y0, x1, y1 = metas[1]["ref_box"]
    sub = mask[y0:y1, x0:x1] > 127
    assert (ref[~sub] == 255).all() and (~sub).any()


FOLDER = REPO / "manifests" / "folder.yaml"


def test_folder_recipe_holds_production_values_and_curates_a_folder_with_thresholds_lowered(
    tiny_models, tmp_path_factory
):
    """Issue #35: ``manifests/folder.yaml`` (a folder of one's own photos) keeps the production settings —
    every section equals the recipe defaults — and, copied with the keys ``demo.yaml`` lowers for random
    weights lowered the same way and its ``cross_pairs: subfolders`` option on, curates a folder."""
    import yaml

    from pipeline.demo_photos import write_sample_photos
    from pipeline.executor_local import run_local

    shipped = Recipe.from_yaml(FOLDER)
    defaults = Recipe(source=shipped.source)
    for section in (
        "detection",
        "segmentation",
        "filters",
        "human",
        "reference",
        "pairing",
        "captioning",
        "dedup",
        "shards",
        "executor",
    ):
        assert getattr(shipped, section) == getattr(defaults, section), section
    assert shipped.source.kind == "folder" and shipped.source.options["cross_pairs"] == "none"

    root = tmp_path_factory.mktemp("my-photos")
    write_sample_photos(root, faces=0, names=["motorcycle"])  # motorcycle/left.png + right.png: one subject
    (root / "notes.pdf").write_bytes(b"%PDF-1.4")
    raw = yaml.safe_load(FOLDER.read_text())
    demo = yaml.safe_load(DEMO.read_text())
    for section in ("detection", "filters"):
        raw[section].update(demo[section])
    raw["captioning"]["max_new_tokens"] = demo["captioning"]["max_new_tokens"]
    raw["source"]["cross_pairs"] = "subfolders"
    raw["executor"]["device"] = "cpu"
    copy = tmp_path_factory.mktemp("recipe") / "folder-lowered.yaml"
    copy.write_text(yaml.safe_dump(raw))
    out = tmp_path_factory.mktemp("ds") / "mine"
    m = run_local(Recipe.from_yaml(copy, source_root=str(root)), out, tiny_models, progress=False)
    t = m["totals"]
    assert t["inputs"] == 2 + 2 + 1 == t["accepted"] + t["rejected"]  # 2 photos, 2 cross views, the pdf
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert any(r["id"] == "notes.pdf" and r["reason"].startswith("not an image") for r in rejects)
    pairs = sorted(json.loads(s["json"])["pair"] for s in _samples(out))
    assert len(pairs) == t["accepted"] >= 1 and "cross" in pairs


def test_prefetching_worker_writes_the_same_bytes_as_the_plain_one(photos, tiny_models, stages, tmp_path):
    """``executor.prefetch`` (the default 1 built ``built``; here 2 and 0) with one-input batches,
    so inputs are read and decoded ahead of the batch in the models: the shards are byte-identical. The
    first two inputs: a photo and the decompression bomb (a decode reject, prepared while the photo is in
    the models)."""
    from pipeline.executor_local import run_local

    trees = {}
    for prefetch in (2, 0):
        r = Recipe.from_yaml(DEMO, source_root=str(photos))
        r.shards.inputs_per_shard, r.executor.batch_size, r.executor.prefetch = 2, 1, prefetch
        m = run_local(r, tmp_path / str(prefetch), tiny_models, limit=2, progress=False, stages=stages)
        assert m["totals"]["accepted"] == 1 and m["totals"]["rejected"] == 1 and m["precision"] == "fp32"
        trees[prefetch] = {k: v for k, v in tree_bytes(tmp_path / str(prefetch)).items() if k.startswith("shards/")}
    assert trees[2] == trees[0] and len(trees[0]) == 1 and trees[0]["shards/000000.tar"]
