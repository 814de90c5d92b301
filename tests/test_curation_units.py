"""Curation stages on synthetic arrays: no models, fast."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynaip.geometry import clean_mask, cut_to_box, mask_box
from pipeline.recipe import FilterConfig, Recipe
from pipeline.records import Reject, SourceRecord, ImageRef
from pipeline.sample import Candidate, Item, Sample, sample_key
from pipeline.stages.compose import compose_reference
from pipeline.stages.decode import DecodeError, DecodeStage, decode_image
from pipeline.stages.select import check_mask, select_primary
from pipeline.writer import DatasetWriter, OutputDirError, encode_sample, write_tar


def recipe(**over) -> Recipe:
    raw = {"source": {"kind": "folder", "root": "/nonexistent"}}
    raw.update(over)
    return Recipe.from_dict(raw)


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` × ``height`` but carries no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# ---- recipe ----------------------------------------------------------------------------------


def test_recipe_defaults_are_the_production_thresholds():
    r = recipe()
    assert (r.detection.box_threshold, r.detection.text_threshold) == (0.35, 0.25)
    assert (r.detection.image_size, r.detection.max_size) == (800, 1333)


def test_recipe_errors_name_the_field():
    with pytest.raises(ValueError, match=r"unknown key 'detection\.box_thresh'; did you mean 'box_threshold'?"):
        recipe(detection={"box_thresh": 0.3})
    with pytest.raises(ValueError, match=r"'detection\.box_threshold' = 1\.5: must be in \[0, 1\]"):
        recipe(detection={"box_threshold": 1.5})
    with pytest.raises(ValueError, match=r"'source\.kind' is 'coco'"):
        Recipe.from_dict({"source": {"kind": "coco", "root": "x"}})
    with pytest.raises(ValueError, match=r"'shards\.inputs_per_shard' = 'many': expected an integer"):
        recipe(shards={"inputs_per_shard": "many"})
    with pytest.raises(ValueError, match=r"'pairing\.kinds\[0\]' = 'both'"):
        recipe(pairing={"kinds": ["both"]})


@pytest.mark.parametrize(
    "over, message",
    [
        ({"reference": {"margin": 1e9}}, r"'reference\.margin' = 1000000000\.0: must be in \[0, 2\.0\]"),
        ({"human": {"face_margin": -0.1}}, r"'human\.face_margin' = -0\.1: must be in \[0, 2\.0\]"),
        ({"segmentation": {"box_margin": 50}}, r"'segmentation\.box_margin' = 50\.0: must be in \[0, 2\.0\]"),
        (
            {"detection": {"image_size": 100000, "max_size": 200000}},
            r"'detection\.image_size' = 100000: must be in 32\.\.4096",
        ),
        (
            {"detection": {"max_size": 10**6}},
            r"'detection\.max_size' = 1000000: must be in detection\.image_size\.\.4096",
        ),
        ({"filters": {"min_image_side": 70000}}, r"'filters\.min_image_side' = 70000: must be in 1\.\.65535"),
        (
            {"filters": {"min_image_side": 10000}},
            r"'filters\.min_image_side' = 10000: squared exceeds filters\.max_image_pixels",
        ),
        (
            {"filters": {"max_comparable_subjects": 5000}},
            r"'filters\.max_comparable_subjects' = 5000: must be in 1\.\.900",
        ),
        ({"filters": {"max_mask_components": 0}}, r"'filters\.max_mask_components' = 0: must be in 1\.\.1000000"),
        ({"filters": {"min_reference_side": 10**6}}, r"'filters\.min_reference_side' = 1000000: must be in 0\.\.65535"),
        ({"shards": {"inputs_per_shard": 10**9}}, r"'shards\.inputs_per_shard' = 1000000000: must be in 1\.\.1000000"),
        ({"captioning": {"max_new_tokens": 10**5}}, r"'captioning\.max_new_tokens' = 100000: must be in 1\.\.512"),
        ({"executor": {"batch_size": 10**6}}, r"'executor\.batch_size' = 1000000: must be in 1\.\.4096"),
    ],
)
def test_a_physically_meaningless_number_is_a_one_line_error_with_the_range(over, message):
    """Issue #35: a margin of 1e9 (or a size, count or length past any image or model) used to pass."""
    from dynaip.configs import ConfigError

    with pytest.raises(ConfigError, match=message) as e:
        Recipe.from_dict({"source": {"kind": "folder", "root": "/x"}, **over})
    assert "\n" not in str(e.value)


def test_recipe_hash_ignores_executor_and_root_but_not_thresholds():
    base = recipe().recipe_hash
    assert recipe(executor={"batch_size": 32}).recipe_hash == base
    assert Recipe.from_dict({"source": {"kind": "folder", "root": "/elsewhere"}}).recipe_hash == base
    assert recipe(detection={"box_threshold": 0.3}).recipe_hash != base
    assert recipe(seed=1).recipe_hash != base


def test_source_options_reach_the_reader(tmp_path):
    r = Recipe.from_dict(
        {"source": {"kind": "folder", "root": str(tmp_path), "recursive": False}}, source_root=str(tmp_path / "other")
    )
    assert r.source.root == str(tmp_path / "other")
    assert r.source.get("recursive") is False and r.source.recursive is False and r.source.missing is None


# ---- decode ----------------------------------------------------------------------------------


def test_decode_rejects_bad_bytes_with_reasons():
    good = np.zeros((40, 50, 3), np.uint8)
    jpg = io.BytesIO()
    Image.fromarray(good).save(jpg, format="JPEG")
    with pytest.raises(DecodeError, match="empty file"):
        decode_image(b"")
    with pytest.raises(DecodeError, match="not a readable image"):
        decode_image(b"this is a text file, not a jpeg" * 10)
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(big, format="JPEG")
    with pytest.raises(DecodeError, match="corrupt or truncated"):
        decode_image(big.getvalue()[: len(big.getvalue()) // 2])
    with pytest.raises(DecodeError, match="declared size"):
        decode_image(png_header_only(100_000, 100_000))
    with pytest.raises(
        DecodeError, match=r"declared size 10000x10000 = 100000000 pixels exceeds filters.max_image_pixels"
    ):
        decode_image(png_header_only(10_000, 10_000))
    with pytest.raises(DecodeError, match=r"declared size 300x300 = 90000 pixels exceeds"):
        decode_image(big.getvalue(), max_pixels=300 * 299)
    with pytest.raises(DecodeError, match="image too small: 50x40"):
        decode_image(jpg.getvalue(), min_side=64)
    assert decode_image(jpg.getvalue()).shape == (40, 50, 3)


def test_decode_modes_become_rgb_with_alpha_on_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half transparent
    out = decode_image(png_bytes(rgba, "RGBA"))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    assert (out[:4] == [200, 0, 0]).all() and (out[4:] == 255).all()
    pal = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P")
    pal.info["transparency"] = 0
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    out = decode_image(buf.getvalue())
    assert out.shape == (8, 8, 3) and (out[0, 0] == 255).all()
    gray = decode_image(png_bytes(np.full((8, 8), 77, np.uint8)))
    assert (gray == 77).all()


def test_decode_applies_exif_orientation():
    im = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue()).shape == (30, 10, 3)


def test_decode_stage_reads_tar_members_and_rejects_without_raising(tmp_path):
    arr = np.full((300, 300, 3), 9, np.uint8)
    data = png_bytes(arr)
    tar = tmp_path / "a.tar"
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo("x.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    recs = [
        SourceRecord(source="t", id="ok", image=ImageRef(path=str(tar), member="x.png")),
        SourceRecord(source="t", id="gone", image=ImageRef(path=str(tar), member="y.png")),
        SourceRecord(source="t", id="nofile", image=ImageRef(path=str(tmp_path / "none.jpg"))),
    ]
    items = DecodeStage(recipe())([Item(record=r) for r in recs])
    assert items[0].ok and (items[0].target.image == 9).all()
    assert items[1].reject.stage == "decode" and "no member 'y.png'" in items[1].reject.reason
    assert items[2].reject.stage == "decode" and "cannot read" in items[2].reject.reason


def test_decode_stage_uses_provided_boxes_and_face_box(tmp_path):
    p = tmp_path / "im.png"
    p.write_bytes(png_bytes(np.zeros((300, 400, 3), np.uint8)))
    subj = SourceRecord(source="t", id="a", image=ImageRef(path=str(p)), boxes=[(10, 10, 500, 200)], phrase="dog")
    face = SourceRecord(
        source="t",
        id="b",
        image=ImageRef(path=str(p)),
        boxes=[(5, 5, 50, 50)],
        phrase="person",
        extra={"face_box": [5, 5, 50, 50]},
    )
    a, b = DecodeStage(recipe())([Item(record=subj), Item(record=face)])
    assert a.target.searched and a.target.candidates[0].box == (10.0, 10.0, 400.0, 200.0)  # clipped to the image
    assert not b.target.searched and b.target.face_box == (5.0, 5.0, 50.0, 50.0)  # face box is not the subject


# ---- masks, filters, compose -------------------------------------------------------------------


def test_clean_mask_removes_islands_and_fills_holes():
    m = np.zeros((100, 100), bool)
    m[20:80, 20:80] = True
    m[50, 50] = False  # small hole
    m[2:4, 2:4] = True  # small island
    m[90:99, 90:99] = True  # island of 81 px = 2.2% of the mask: kept at 1%, removed at 5%
    out = clean_mask(m, island_frac=0.05, hole_frac=0.05)
    assert out[50, 50] and not out[2:4, 2:4].any() and not out[90:99, 90:99].any()
    assert out[20:80, 20:80].all()
    assert clean_mask(m, island_frac=0.01, hole_frac=0.0)[90:99, 90:99].all()
    assert not clean_mask(m, island_frac=0.01, hole_frac=0.0)[50, 50]
    ring = np.zeros((50, 50), bool)
    ring[10:40, 10:40] = True
    ring[15:35, 15:35] = False  # hole of 400 px vs mask 500 px: too big to fill
    assert not clean_mask(ring, 0.05, 0.05)[20, 20]


def test_cut_to_box_drops_leaks_outside_the_grown_box():
    m = np.ones((100, 100), bool)
    out = cut_to_box(m, (40, 40, 60, 60), 0.1)
    assert mask_box(out) == (38.0, 38.0, 62.0, 62.0)


def test_primary_subject_filter_reasons():
    f = FilterConfig()
    c = lambda box, s: Candidate(box, s, "dog")  # noqa: E731
    assert select_primary([], 100, 100, f) == (None, "no subject detected")
    _, why = select_primary([c((0, 0, 50, 50), 0.9), c((50, 50, 100, 100), 0.85)], 100, 100, f)
    assert why.startswith("several comparable subjects: 2 distinct boxes")
    p, why = select_primary([c((0, 0, 50, 50), 0.9), c((50, 50, 100, 100), 0.5)], 100, 100, f)
    assert why is None and p.box == (0, 0, 50, 50)
    p, why = select_primary([c((0, 0, 50, 50), 0.9), c((2, 2, 50, 50), 0.89)], 100, 100, f)  # same subject
    assert why is None
    assert select_primary([c((0, 0, 5, 5), 0.9)], 100, 100, f)[1].startswith("subject box too small: 0.003")
    assert select_primary([c((0, 0, 100, 99), 0.9)], 100, 100, f)[1].startswith("subject box too large: 0.990")


def test_mask_filter_reasons():
    f = FilterConfig()
    m = np.zeros((100, 100), bool)
    assert check_mask(m, f) == "empty subject mask"
    for i in range(5):
        m[i * 20 : i * 20 + 10, 0:40] = True
    assert check_mask(m, f).startswith("fragmented mask: 5 parts > filters.max_mask_components=3")
    m2 = np.zeros((100, 100), bool)
    m2[0:30, 0:30] = True
    m2[50:80, 50:80] = True
    assert check_mask(m2, f).startswith("fragmented mask: largest part holds 0.50")
    m3 = np.zeros((100, 100), bool)
    m3[0:10, 0:10] = True
    assert check_mask(m3, f).startswith("subject mask too small: 0.0100")
    m3[0:30, 0:30] = True
    assert check_mask(m3, f) is None


def test_compose_puts_the_subject_on_pure_white_cropped_with_margin():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (100, 120, 3), dtype=np.uint8)
    mask = np.zeros((100, 120), bool)
    mask[30:60, 40:80] = True
    mask[30:35, 40:45] = False
    ref, box = compose_reference(image, mask, margin=0.1)
    assert box == (36, 26, 84, 64)  # mask box (40, 30, 80, 60) grown by 0.1 * 40 = 4 px
    sub = mask[26:64, 36:84]
    assert ref.shape == (38, 48, 3) and ref.dtype == np.uint8
    assert (ref[~sub] == 255).all()
    assert (ref[sub] == image[26:64, 36:84][sub]).all()
    face, fbox = compose_reference(image, mask, margin=0.0, crop_box=(50, 35, 60, 45))
    assert fbox == (50, 35, 60, 45) and face.shape == (10, 10, 3)
    with pytest.raises(ValueError, match="holds none of the subject"):
        compose_reference(image, mask, margin=0.0, crop_box=(0, 0, 10, 10))


# ---- keys and shards -------------------------------------------------------------------------


def test_sample_keys_are_webdataset_safe_and_distinct():
    assert sample_key("ffhq", "00012_face0") == "ffhq-00012_face0-0"
    k1, k2 = sample_key("folder", "a/b.c"), sample_key("folder", "a_b_c")
    assert k1 != k2 and k2 == "folder-a_b_c-0"
    assert all(ch.isalnum() or ch in "_-" for ch in k1) and "." not in k1


def _sample(key: str, seed: int) -> Sample:
    rng = np.random.default_rng(seed)
    m = np.zeros((20, 30), bool)
    m[5:15, 5:20] = True
    return Sample(
        key=key,
        ref=rng.integers(0, 255, (10, 15, 3), dtype=np.uint8),
        tgt=rng.integers(0, 255, (20, 30, 3), dtype=np.uint8),
        mask=m,
        caption="a dog",
        meta={"source": "t", "source_id": key, "z": 1, "a": [1.5, 2]},
    )


def test_shard_writer_is_deterministic_and_ordered(tmp_path):
    members = [m for i in range(3) for m in encode_sample(_sample(f"t-{i}-0", i))]
    a = write_tar(tmp_path / "a.tar", members)
    b = write_tar(tmp_path / "b.tar", members)
    assert a == b and (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tf:
        infos = tf.getmembers()
    assert [i.name for i in infos[:5]] == [
        "t-0-0.ref.png",
        "t-0-0.tgt.jpg",
        "t-0-0.mask.png",
        "t-0-0.txt",
        "t-0-0.json",
    ]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.mode) for i in infos} == {(0, 0, 0, "", 0o644)}
    assert not list(tmp_path.glob(".*tmp*"))  # temp files renamed away
    with pytest.raises(ValueError, match="outside"):
        encode_sample(_sample("bad.key", 0))


def test_writer_splits_by_bytes_and_resumes_by_marker(tmp_path):
    enc = [encode_sample(_sample(f"t-{i}-0", i)) for i in range(4)]
    one = sum(512 + (len(d) + 511) // 512 * 512 for _, d in enc[0])
    w = DatasetWriter(tmp_path / "ds", "h1", max_bytes=int(one * 2.5))
    w.prepare({"x": 1})
    res = w.write_chunk(3, "fp", 5, enc, [Reject(source="t", id="x", stage="decode", reason="empty file (0 bytes)")])
    assert [s["path"] for s in res.shards] == ["shards/000003.tar", "shards/000003_01.tar"]
    assert [s["samples"] for s in res.shards] == [2, 2] and res.accepted == 4
    assert [s["pairs"] for s in res.shards] == [{"unknown": 2}, {"unknown": 2}]  # these samples name no pair type
    assert w.done(3, "fp") is not None and w.done(3, "other-inputs") is None
    (tmp_path / "ds" / "shards" / "000003_01.tar").write_bytes(b"x")
    assert w.done(3, "fp") is None  # a damaged shard means the chunk is redone
    res = w.write_chunk(3, "fp", 5, enc, [Reject(source="t", id="x", stage="decode", reason="empty file (0 bytes)")])
    man = w.finalize([res], {})  # reads the first shards for the dataset card: they must be whole
    assert (tmp_path / "ds" / "README.md").is_file() and (tmp_path / "ds" / "preview.png").is_file()
    assert man["totals"] == {
        "inputs": 5,
        "accepted": 4,
        "rejected": 1,
        "samples": 4,
        "bytes": man["totals"]["bytes"],
        "pairs": {"unknown": 4},
        "rejected_by_reason": {"decode: empty file": 1},
    }
    with pytest.raises(OutputDirError, match="recipe hash h1, but this recipe's hash is h2"):
        DatasetWriter(tmp_path / "ds", "h2").prepare({})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "f").write_text("x")
    with pytest.raises(OutputDirError, match="not a dataset of this tool"):
        DatasetWriter(tmp_path / "junk", "h1").prepare({})


def test_folder_reader_is_sorted_with_captions(tmp_path):
    from pipeline.sources import get_reader

    for name in ("b.jpg", "a.png", "sub/c.jpeg", "notes.md", ".hidden.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a.txt").write_text("  a caption \n")
    recs = list(get_reader("folder")(recipe(source={"kind": "folder", "root": str(tmp_path)}).source))
    assert [r.id for r in recs] == ["a", "b", "sub/c", "notes.md"]  # images, then the files that are none
    assert recs[0].caption == "a caption" and recs[1].caption is None
    assert recs[3].reason.startswith("not an image: notes.md (the folder source reads .avif, .bmp")
    with pytest.raises(ValueError, match="unknown source kind 'coco'"):
        get_reader("coco")


def _folder_tree(root, names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_folder_reader_has_no_cross_records_without_the_option(tmp_path):
    from pipeline.sources import get_reader

    _folder_tree(tmp_path, ("a.png", "s/x.jpg", "s/y.jpg"))
    for src in ({}, {"cross_pairs": "none"}):
        recs = list(get_reader("folder")(recipe(source={"kind": "folder", "root": str(tmp_path), **src}).source))
        assert [r.id for r in recs] == ["a", "s/x", "s/y"] and {r.pair for r in recs} == {"intra"}
    with pytest.raises(ValueError, match="cross_pairs must be one of none, subfolders"):
        list(
            get_reader("folder")(recipe(source={"kind": "folder", "root": str(tmp_path), "cross_pairs": "all"}).source)
        )


def test_folder_reader_cross_pairs_from_subfolders(tmp_path):
    """Intra records first (sorted), then one cross record per image of a subfolder holding >= 2 images
    (sorted by target), reference = the next image of that subfolder, cyclic."""
    from pipeline.sources import get_reader

    _folder_tree(
        tmp_path,
        (
            "top.jpg",
            "top2.jpg",
            "cat/b.png",
            "cat/a.jpg",
            "cat/c.jpg",
            "lone/only.jpg",
            "dog/x~cross.jpg",
            "dog/x.jpg",
            "deep/er/p.png",
            "deep/er/q.png",
            "deep/r.png",
        ),
    )
    (tmp_path / "cat" / "b.txt").write_text("the cat, side view\n")
    r = recipe(source={"kind": "folder", "root": str(tmp_path), "cross_pairs": "subfolders", "phrase": "cat"})
    assert r.source.get("cross_pairs") == "subfolders"
    recs = list(get_reader("folder")(r.source))
    ids = [x.id for x in recs]
    intra = [
        "cat/a",
        "cat/b",
        "cat/c",
        "deep/er/p",
        "deep/er/q",
        "deep/r",
        "dog/x",
        "dog/x~cross",
        "lone/only",
        "top",
        "top2",
    ]
    cross = [
        "cat/a~cross",
        "cat/b~cross",
        "cat/c~cross",
        "deep/er/p~cross",
        "deep/er/q~cross",
        "dog/x~cross2",
        "dog/x~cross~cross",
    ]
    assert ids == intra + cross and len(set(ids)) == len(ids)
    by_id = {x.id: x for x in recs}
    assert all(by_id[i].pair == "intra" and by_id[i].reference is None and by_id[i].group is None for i in intra)
    ref = {i: Path(by_id[i].reference.path).relative_to(tmp_path).as_posix() for i in cross}
    assert ref == {
        "cat/a~cross": "cat/b.png",
        "cat/b~cross": "cat/c.jpg",
        "cat/c~cross": "cat/a.jpg",
        "deep/er/p~cross": "deep/er/q.png",
        "deep/er/q~cross": "deep/er/p.png",
        "dog/x~cross2": "dog/x~cross.jpg",
        "dog/x~cross~cross": "dog/x.jpg",
    }
    for i in cross:
        x = by_id[i]
        assert x.pair == "cross" and x.source == "folder" and x.phrase == "cat"
        assert x.reference_mask is None and x.reference_box is None and x.boxes == [] and x.masks == []
        assert x.group == i.rsplit("/", 1)[0]
    assert by_id["deep/er/p~cross"].group == "deep/er"
    assert Path(by_id["cat/b~cross"].image.path) == tmp_path / "cat" / "b.png"
    assert by_id["cat/b~cross"].caption == by_id["cat/b"].caption == "the cat, side view"
    assert by_id["cat/a~cross"].caption is None
    keys = {sample_key("folder", i) for i in ids}
    assert len(keys) == len(ids) and all(k.replace("-", "").replace("_", "").isalnum() for k in keys)
    assert [x.id for x in get_reader("folder")(r.source)] == ids  # deterministic
    flat = recipe(source={"kind": "folder", "root": str(tmp_path), "cross_pairs": "subfolders", "recursive": False})
    assert [x.id for x in get_reader("folder")(flat.source)] == ["top", "top2"]  # root images form no group


def test_sample_photos_write_the_motorcycle_views_only_when_asked(tmp_path):
    from pipeline.demo_photos import write_sample_photos

    got = write_sample_photos(tmp_path / "a", faces=0, names=["logo", "motorcycle"])
    assert [p.relative_to(tmp_path / "a").as_posix() for p in got] == [
        "logo.png",
        "motorcycle/left.png",
        "motorcycle/right.png",
    ]
    assert (tmp_path / "a" / "motorcycle" / "left.txt").read_text().strip()
    left, right = (np.asarray(Image.open(p)) for p in got[1:])
    assert left.shape == right.shape and not np.array_equal(left, right)
    flat = write_sample_photos(tmp_path / "b", faces=0, names=["motorcycle"], subject_views=False)
    assert [p.name for p in flat] == ["motorcycle.png"]
    assert np.array_equal(np.asarray(Image.open(flat[0])), left)
    five = write_sample_photos(tmp_path / "c", faces=1, names=["astronaut", "chelsea", "coffee", "rocket", "camera"])
    assert len(five) == 6 and not (tmp_path / "c" / "motorcycle").exists()  # the Ray test's input set is unchanged


def test_ray_worker_pool_is_sized_from_the_recipe_and_the_cluster(monkeypatch):
    import ray

    from pipeline.executor_ray import pool_size, worker_options

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "curate": 3.0})
    r = recipe(executor={"cpus_per_worker": 2})
    opts = worker_options(r)
    assert opts["num_cpus"] == 2 and "num_gpus" not in opts and "resources" not in opts  # no GPU in this cluster
    assert pool_size(r, opts) == 4
    r = recipe(executor={"resources": {"curate": 1}})
    assert pool_size(r, worker_options(r)) == 3  # the custom resource is the limit
    r = recipe(executor={"workers": 5})
    assert pool_size(r, worker_options(r)) == 5
    r = recipe(executor={"resources": {"gpu_node": 1}})
    with pytest.raises(ValueError, match="missing: gpu_node"):
        pool_size(r, worker_options(r))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    r = recipe(executor={"gpus_per_actor": 0.5})
    opts = worker_options(r)
    assert opts["num_gpus"] == 0.5 and pool_size(r, opts) == 4
    for bad in ({"workers": 0}, {"cpus_per_worker": 0}, {"resources": {"curate": -1}}):
        with pytest.raises(ValueError, match="executor"):
            recipe(executor=bad)


def test_a_dataset_without_samples_gets_a_card_without_a_preview(tmp_path):
    """Every input rejected: the card still states the totals and the rejects; no preview.png (one an
    earlier run left is removed)."""
    from huggingface_hub import DatasetCard

    w = DatasetWriter(tmp_path / "ds", "h1")
    w.prepare({"x": 1})
    (tmp_path / "ds" / "preview.png").write_bytes(b"stale")
    res = w.write_chunk(0, "fp", 1, [], [Reject(source="t", id="x", stage="decode", reason="empty file (0 bytes)")])
    w.finalize([res], {"recipe": {"name": "empty"}}, [{"name": "mine", "license": "unknown"}])
    card = DatasetCard.load(tmp_path / "ds" / "README.md")
    assert card.data.pretty_name == "empty" and card.data.license == "unknown"
    assert card.data.dataset_info["splits"] == [{"name": "train", "num_bytes": 0, "num_examples": 0}]
    assert "| 1 | 0 | 1 | 0 | 0 | 0 |" in card.text and "| decode: empty file | 1 |" in card.text
    assert "No quality scores" in card.text and "preview" not in card.text
    assert not (tmp_path / "ds" / "preview.png").exists()
