"""Source readers on tiny fixture datasets in the real on-disk layouts (built by tests/fixtures_sources.py)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).parent))
import fixtures_sources as fx  # noqa: E402

from pipeline.records import Reject, SourceRecord  # noqa: E402
from pipeline.sources import ffhq, opens2v, sa1b, video, vitonhd  # noqa: E402
from pipeline.sources.common import RLEError, check_rle  # noqa: E402


def split(items):
    records = [r for r in items if isinstance(r, SourceRecord)]
    rejects = {r.id: r for r in items if isinstance(r, Reject)}
    return records, rejects


def decode_area(rle: dict) -> int:
    return int(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).sum())


def assert_rejects(rejects: dict[str, Reject], expected: dict[str, str], source: str) -> None:
    assert set(rejects) == set(expected)
    for rid, word in expected.items():
        assert rejects[rid].source == source and rejects[rid].stage == "read"
        assert word in rejects[rid].reason, (rid, rejects[rid].reason)


# --------------------------------------------------------------------------------------------- common


def test_check_rle_catches_corrupt_counts_pycocotools_accepts():
    m = fx.ellipse(20, 30, 10, 15, 6, 9)
    rle = fx.encode(m)
    assert check_rle(rle, 20, 30)[1] == int(m.sum())
    with pytest.raises(RLEError, match="cover"):
        check_rle({**rle, "counts": rle["counts"][:-2]}, 20, 30)
    with pytest.raises(RLEError, match=r"does not match the image's \[H, W\]=\[30, 20\]"):
        check_rle(rle, 30, 20)
    # Uncompressed run lists (column-major runs, background first) become the compressed string.
    flat = np.asfortranarray(m).reshape(-1, order="F")
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    runs = np.diff(np.concatenate([[0], edges])).tolist()
    assert check_rle({"size": [20, 30], "counts": runs}, 20, 30) == (rle, int(m.sum()))


# ---------------------------------------------------------------------------------------------- SA-1B

SA_CORRUPT = {"json", "missing_image", "bad_rle", "all_bad"}


@pytest.fixture(scope="module")
def sa1b_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("sa1b")
    truth = fx.build_sa1b(base / "folder", layout="folder", corrupt=SA_CORRUPT)
    fx.build_sa1b(base / "tar", layout="tar", corrupt=SA_CORRUPT)
    return base / "folder", base / "tar", truth


def test_sa1b_folder_records_boxes_and_masks(sa1b_dirs):
    folder, _, truth = sa1b_dirs
    records, rejects = split(list(sa1b.read({"root": str(folder)})))
    assert [r.id for r in records] == ["sa_1", "sa_2"]
    for r in records:
        anns = truth["images"][r.id]  # ranked best first by area * predicted_iou * stability_score
        assert r.source == "sa1b" and r.phrase is None and r.caption is None
        assert r.image.path.endswith(f"{r.id}.jpg") and r.image.member is None
        assert r.extra["mask_ids"] == [a["id"] for a in anns]
        assert r.boxes == [(x, y, x + w, y + h) for x, y, w, h in (a["bbox"] for a in anns)]
        assert [decode_area(m) for m in r.masks] == [a["area"] for a in anns]
        assert all(m["size"] == [72, 96] for m in r.masks)
    sa2 = records[1]
    assert sa2.extra["dropped_masks"] == 1 and len(sa2.masks) == 2  # its best mask had truncated counts
    assert_rejects(rejects, truth["rejects"], "sa1b")


def test_sa1b_tar_matches_folder(sa1b_dirs):
    folder, tar, _ = sa1b_dirs
    from_folder = list(sa1b.read({"root": str(folder)}))
    from_tar = list(sa1b.read(sa1b.SA1BSource(root=str(tar))))
    assert [type(r) for r in from_tar] == [type(r) for r in from_folder]
    for a, b in zip(from_folder, from_tar):
        assert a.id == b.id
        if isinstance(a, SourceRecord):
            assert b.image.path.endswith(".tar") and b.image.member == f"{b.id}.jpg"
            assert dataclasses.replace(a, image=b.image) == b


def test_sa1b_top_k_and_determinism(sa1b_dirs):
    folder, _, truth = sa1b_dirs
    first = list(sa1b.read({"root": str(folder), "top_k": 1}))
    again = list(sa1b.read({"root": str(folder), "top_k": 1}))
    assert first == again
    rec = next(r for r in first if isinstance(r, SourceRecord) and r.id == "sa_1")
    assert rec.extra["mask_ids"] == [truth["images"]["sa_1"][0]["id"]]
    with pytest.raises(ValueError, match="top_k=0"):
        list(sa1b.read({"root": str(folder), "top_k": 0}))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        list(sa1b.read({"root": str(folder / "nope")}))


# ----------------------------------------------------------------------------------------------- FFHQ


@pytest.fixture(scope="module")
def ffhq_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffhq")
    return root, fx.build_ffhq(root, corrupt={"missing_image", "no_geometry"})


def test_ffhq_records_one_per_face_with_face_box(ffhq_dir):
    root, truth = ffhq_dir
    records, rejects = split(list(ffhq.read({"root": str(root)})))
    assert [r.id for r in records] == list(truth["records"])
    for r in records:
        t = truth["records"][r.id]
        assert r.phrase == "person" and r.caption is None
        assert r.boxes == [t["face_box"]] and r.extra["face_box"] == t["face_box"]
        assert r.extra["ffhq_index"] == t["ffhq_index"] and r.extra["face_box_from"] == t["from"]
    two = [r for r in records if r.group == "ffhq-00001"]
    assert [r.id for r in two] == ["00001_face0", "00001_face1"]
    assert two[0].image == two[1].image  # one photo, read once per face
    assert two[0].extra["other_face_boxes"] == [two[1].extra["face_box"]] and two[0].extra["n_faces"] == 2
    assert_rejects(rejects, truth["rejects"], "ffhq")


def test_ffhq_category_filter_and_no_dedupe(ffhq_dir):
    root, _ = ffhq_dir
    val, _ = split(list(ffhq.read({"root": str(root), "category": "validation"})))
    assert [r.id for r in val] == ["00003_face0"]
    flat, _ = split(list(ffhq.read(ffhq.FFHQSource(root=str(root), dedupe=False, category=["training"]))))
    ids = [r.id for r in flat]
    assert "00001_face0" in ids and "00002_face0" in ids and "00003_face0" not in ids
    assert next(r for r in flat if r.id == "00002_face0").image.path.endswith("00002.png")


def test_ffhq_malformed_json_is_one_reject(tmp_path):
    fx.build_ffhq(tmp_path, corrupt={"json"})
    out = list(ffhq.read({"root": str(tmp_path)}))
    assert len(out) == 1 and isinstance(out[0], Reject)
    assert out[0].id == "ffhq-dataset-v2.json" and "cannot read" in out[0].reason


# -------------------------------------------------------------------------------------------- VITON-HD


def test_vitonhd_pairs_use_own_garment(tmp_path):
    truth = fx.build_vitonhd(tmp_path, corrupt={"missing_cloth", "bad_line"})
    records, rejects = split(list(vitonhd.read({"root": str(tmp_path), "phrase": "shirt"})))
    assert [r.id for r in records] == truth["ids"] == ["00000_00", "00002_00"]
    for r in records:
        name = f"{r.id}.jpg"
        assert r.pair == "cross" and r.phrase == "shirt"
        assert r.image.path == str(truth["split_dir"] / "image" / name)
        # The pairs list pairs 00000_00 with 00001_00's cloth; the reader uses the person's own garment.
        assert r.reference.path == str(truth["split_dir"] / "cloth" / name)
        assert r.reference_mask.path == str(truth["split_dir"] / "cloth-mask" / name)
        assert r.extra["parse"].endswith(f"{r.id}.png")
    assert_rejects(rejects, truth["rejects"], "vitonhd")


def test_vitonhd_split_folder_without_pairs_file(tmp_path):
    truth = fx.build_vitonhd(tmp_path, split="test")
    (tmp_path / "test_pairs.txt").unlink()
    records, rejects = split(list(vitonhd.read({"root": str(truth["split_dir"]), "split": "test"})))
    assert [r.id for r in records] == ["00000_00", "00001_00", "00002_00"] and not rejects
    with pytest.raises(FileNotFoundError, match="point source.root"):
        list(vitonhd.read({"root": str(tmp_path), "split": "train"}))


# --------------------------------------------------------------------------------------------- OpenS2V


@pytest.fixture(scope="module")
def opens2v_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("opens2v")
    return root, fx.build_opens2v(root)


def test_opens2v_intra_and_cross_records(opens2v_dir):
    root, truth = opens2v_dir
    out = list(opens2v.read({"root": str(root), "cross_pairs": "cross/*.json"}))
    records, rejects = split(out)
    intra = [r for r in records if r.pair == "intra"]
    cross = [r for r in records if r.pair == "cross"]
    assert [r.id for r in intra] == truth["intra"]
    assert [r.id for r in cross] == truth["cross"]  # the verbatim repeated pair yields once
    assert_rejects(rejects, truth["rejects"], "opens2v")

    cat = intra[0]
    x0, x1, y0, y1 = truth["crop"]
    assert cat.image.frame == truth["frame"] and cat.image.path.endswith("cat_a.mp4")
    assert cat.phrase == "cat" and cat.caption.startswith("A video of a cat")
    assert cat.extra["crop_xyxy"] == (x0, y0, x1, y1)
    assert cat.masks[0]["size"] == list(truth["frame_hw"]) and decode_area(cat.masks[0]) == truth["areas"]["big"]
    mask = mask_utils.decode({"size": cat.masks[0]["size"], "counts": cat.masks[0]["counts"].encode()})
    ys, xs = np.nonzero(mask)
    assert cat.boxes == [(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)]

    fwd = cross[0]
    assert fwd.image.path.endswith("cat_a.mp4") and fwd.reference.path.endswith("cat_b.mp4")
    assert fwd.group == "cat_cluster" and fwd.extra["image_similarity"] == 0.93
    assert decode_area(fwd.reference_mask) == truth["areas"]["cat_b"]
    assert decode_area(fwd.masks[0]) == truth["areas"]["big"]
    assert fwd.reference_box == cross[1].boxes[0]
    only_fwd = list(opens2v.read({"root": str(root), "cross_pairs": "cross/*.json", "intra": False,
                                   "cross_both_directions": False}))
    assert [r.id for r in only_fwd if isinstance(r, SourceRecord)] == truth["cross"][:1]


def test_opens2v_filters_can_be_disabled(opens2v_dir):
    root, _ = opens2v_dir
    cfg = {"root": str(root), "min_aesthetic": None, "min_mask_frac": None, "dedup_iou": None, "max_masks": None}
    records, rejects = split(list(opens2v.read(cfg)))
    assert not rejects
    assert len(records) == 3 + 1 + 1 + 1 + 7  # cat_a, cat_b, cup, dull, crowd objects
    # The dataclass carries OpenS2V's own thresholds as defaults.
    defaults = split(list(opens2v.read(opens2v.OpenS2VSource(root=str(root)))))[1]
    assert "total_part1/crowd" in defaults and "total_part1/dull" in defaults


def test_opens2v_corrupt_inputs_become_rejects(tmp_path):
    truth = fx.build_opens2v(tmp_path, corrupt={"bad_rle", "missing_video", "json", "unknown_pair"})
    records, rejects = split(list(opens2v.read({"root": str(tmp_path), "cross_pairs": "cross/*.json"})))
    assert [r.id for r in records] == truth["intra"] + truth["cross"]
    assert_rejects(rejects, truth["rejects"], "opens2v")


# ----------------------------------------------------------------------------------------------- video


def test_read_frame_returns_the_indexed_cropped_frame(opens2v_dir):
    root, truth = opens2v_dir
    path = root / "Videos" / "total_part1" / "cat_a.mp4"
    frames = truth["frames"]["cat_a"]
    for index in (0, 3, 5, 7):  # 5 sits after a keyframe at 4: exercises seek + decode forward
        got = video.read_frame(path, index)
        assert got.shape == (64, 96, 3) and got.dtype == np.uint8
        errors = [np.abs(got.astype(int) - f).mean() for f in frames]
        assert int(np.argmin(errors)) == index and errors[index] < 6
    x0, x1, y0, y1 = truth["crop"]
    rec = next(r for r in opens2v.read({"root": str(root)}) if isinstance(r, SourceRecord))
    cropped = video.read_frame(rec.image.path, rec.image.frame, crop=rec.extra["crop_xyxy"])
    assert cropped.shape[:2] == tuple(rec.masks[0]["size"]) == (y1 - y0, x1 - x0)
    full = video.read_frame(rec.image.path, rec.image.frame)
    assert np.array_equal(cropped, full[y0:y1, x0:x1])


def test_read_frame_errors(opens2v_dir, tmp_path):
    root, _ = opens2v_dir
    path = root / "Videos" / "total_part1" / "cat_a.mp4"
    with pytest.raises(video.VideoReadError, match="past the end"):
        video.read_frame(path, 8)
    with pytest.raises(video.VideoReadError, match="must be an integer >= 0"):
        video.read_frame(path, -1)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(video.VideoReadError, match="cannot open video"):
        video.read_frame(bad, 0)
    with pytest.raises(video.VideoReadError, match="leaves nothing"):
        video.read_frame(path, 0, crop=(50, 10, 40, 20))


# ------------------------------------------------------------------------------- recipes → readers

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"


@pytest.mark.parametrize("kind", ["sa1b", "ffhq", "vitonhd", "opens2v"])
def test_recipe_source_section_drives_the_reader(kind, tmp_path):
    """Each manifest loads as a Recipe, and its source section (a SourceConfig) feeds the reader
    through the registry with the same result as a plain mapping of the same options."""
    recipe_mod = pytest.importorskip("pipeline.recipe")
    registry = pytest.importorskip("pipeline.sources")
    build = {"sa1b": fx.build_sa1b, "ffhq": fx.build_ffhq, "vitonhd": fx.build_vitonhd, "opens2v": fx.build_opens2v}[kind]
    build(tmp_path)
    recipe = recipe_mod.Recipe.from_yaml(MANIFESTS / f"{kind}.yaml", source_root=str(tmp_path))
    assert recipe.source.kind == kind and recipe.seed == 0
    assert (recipe.detection.box_threshold, recipe.detection.text_threshold) == (0.35, 0.25)
    assert (recipe.detection.image_size, recipe.detection.max_size) == (800, 1333)
    via_recipe = list(registry.get_reader(kind)(recipe.source))
    via_mapping = list(getattr(sys.modules[f"pipeline.sources.{kind}"], "read")(recipe.source.to_dict()))
    assert via_recipe == via_mapping
    assert sum(isinstance(r, SourceRecord) for r in via_recipe) >= 2


def test_opens2v_filter_defaults_through_source_config(opens2v_dir):
    """SourceConfig answers None for absent options; absent filters must still default to OpenS2V's."""
    recipe_mod = pytest.importorskip("pipeline.recipe")
    root, truth = opens2v_dir
    cfg = recipe_mod.SourceConfig(kind="opens2v", root=str(root), options={})
    rejects = split(list(opens2v.read(cfg)))[1]
    assert {"total_part1/crowd", "total_part1/dull", "total_part1/cat_a/o2"} <= set(rejects)
    off = recipe_mod.SourceConfig(kind="opens2v", root=str(root), options={"max_masks": None})
    assert "total_part1/crowd" not in split(list(opens2v.read(off)))[1]


def test_opens2v_cross_target_frame_without_annotation(opens2v_dir):
    """A pair whose target frame is not annotated still yields a record; the stages detect the subject."""
    import json

    root, truth = opens2v_dir
    (root / "cross_other_frames").mkdir(exist_ok=True)
    pair = {"cur_id": "total_part1/cat_a", "aft_id": "total_part1/cat_b", "cur_class_name": "cat",
            "aft_class_name": "cat", "text_similarity": 1.0, "image_similarity": 0.9, "cur_frame_idx": 6}
    (root / "cross_other_frames" / "c.json").write_text(json.dumps([pair]))
    out = list(opens2v.read({"root": str(root), "intra": False, "cross_pairs": "cross_other_frames/*.json",
                             "cross_both_directions": False}))
    assert len(out) == 1 and isinstance(out[0], SourceRecord)
    rec = out[0]  # object ids resolved from class names; aft frame defaults to the clip's ann_frame_idx
    assert rec.id == "total_part1/cat_a/o1/f6>total_part1/cat_b/o1/f3"
    assert rec.image.frame == 6 and rec.masks == [] and rec.boxes == [] and rec.extra["mask_frac"] is None
    assert rec.reference.frame == truth["frame"] and decode_area(rec.reference_mask) == truth["areas"]["cat_b"]
