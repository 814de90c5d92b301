"""Source readers on tiny fixture datasets in the real on-disk layouts (built by tests/fixtures_sources.py)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).parent))
import fixtures_sources as fx  # noqa: E402

from pipeline.records import Reject, SourceRecord  # noqa: E402
from pipeline.sources import ffhq, opens2v, sa1b, video, vitonhd  # noqa: E402
from pipeline.sources.common import RLEError, SourceError, check_rle, glob_files, rle_bbox  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
PAIRS = "Jsons/cross_video_pairs/*.json"


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
        assert "\n" not in rejects[rid].reason


def sequential_frames(source) -> list[np.ndarray]:
    """Every frame of a video, decoded front to back (the reference for random access)."""
    import av

    with av.open(source, metadata_errors="replace") as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


# --------------------------------------------------------------------------------------------- common


def test_check_rle_catches_corrupt_counts_pycocotools_accepts():
    m = fx.ellipse(20, 30, 10, 15, 6, 9)
    rle = fx.encode(m)
    assert check_rle(rle, 20, 30)[1] == int(m.sum())
    with pytest.raises(RLEError, match="cover"):
        check_rle({**rle, "counts": rle["counts"][:-2]}, 20, 30)
    with pytest.raises(RLEError, match=r"does not match the image's \[H, W\]=\[30, 20\]"):
        check_rle(rle, 30, 20)
    with pytest.raises(RLEError, match="outside COCO's character range"):
        check_rle({**rle, "counts": rle["counts"] + "~"}, 20, 30)
    # Uncompressed run lists (column-major runs, background first) become the compressed string.
    flat = np.asfortranarray(m).reshape(-1, order="F")
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    runs = np.diff(np.concatenate([[0], edges])).tolist()
    assert check_rle({"size": [20, 30], "counts": runs}, 20, 30) == (rle, int(m.sum()))


def test_check_rle_agrees_with_pycocotools_on_random_masks():
    """The vectorised counts decoder gives pycocotools' area for masks of every kind of run pattern."""
    rng = np.random.default_rng(0)
    for i in range(60):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        m = rng.random((h, w)) < rng.random()
        if i % 3 == 0:
            m = fx.ellipse(h, w, h / 2, w / 2, h / 3 + 1, w / 3 + 1).astype(bool)
        rle = fx.encode(m)
        assert (
            check_rle(rle, h, w)[1] == int(mask_utils.area({**rle, "counts": rle["counts"].encode()})) == int(m.sum())
        )


def test_glob_files_names_pattern_root_and_contents_when_empty(tmp_path):
    (tmp_path / "Jsons" / "mask_and_bbox").mkdir(parents=True)
    (tmp_path / "Jsons" / "mask_and_bbox" / "total_part1.json").write_text("{}")
    assert glob_files(tmp_path, "Jsons/*/total_part*.json", "k", "files") == [
        tmp_path / "Jsons" / "mask_and_bbox" / "total_part1.json"
    ]
    with pytest.raises(SourceError, match=rf"k: no files match 'Jsons/\*.json' under {tmp_path} \(it holds: Jsons\)"):
        glob_files(tmp_path, "Jsons/*.json", "k", "files")


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
        assert [decode_area(m) for m in r.masks] == [a["area"] for a in anns]
        assert all(m["size"] == [72, 96] for m in r.masks)
        # SA-1B's bbox w = last - first pixel (SAM's batched_mask_to_box): the XYXY box is the mask's bounds.
        assert r.boxes == [a["box"] for a in anns] == [rle_bbox(m) for m in r.masks]
        assert r.boxes[0][2] == anns[0]["bbox"][0] + anns[0]["bbox"][2] + 1
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
        sa1b.read({"root": str(folder), "top_k": 0})


def test_sa1b_root_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(SourceError, match="not a directory"):
        sa1b.read({"root": str(tmp_path / "nope")})
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(SourceError, match=rf"no sa_\*.tar, \*.json or \*.jpg under {tmp_path}"):
        sa1b.read({"root": str(tmp_path)})
    with pytest.raises(SourceError, match="layout tar but no"):
        sa1b.read({"root": str(tmp_path), "layout": "tar"})


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


def test_ffhq_groups_reencoded_copies_by_pixel_md5(ffhq_dir, tmp_path):
    """The two entries of the two-face photo point at copies encoded differently (file_md5 differs);
    pixel_md5 makes them one photo. Without pixel_md5 they are two photos of one face each."""
    root, _ = ffhq_dir
    meta = json.loads((root / "ffhq-dataset-v2.json").read_text())
    w1, w2 = meta["1"]["in_the_wild"], meta["2"]["in_the_wild"]
    assert w1["file_md5"] != w2["file_md5"] and w1["pixel_md5"] == w2["pixel_md5"]
    for entry in meta.values():
        entry["in_the_wild"].pop("pixel_md5")
    (tmp_path / "ffhq-dataset-v2.json").write_text(json.dumps(meta))
    (tmp_path / "in-the-wild-images").symlink_to(root / "in-the-wild-images")
    records, _ = split(list(ffhq.read({"root": str(tmp_path)})))
    assert {r.id for r in records if r.extra["ffhq_index"] in ("1", "2")} == {"00001_face0", "00002_face0"}


def test_ffhq_category_filter_and_no_dedupe(ffhq_dir):
    root, _ = ffhq_dir
    val, _ = split(list(ffhq.read({"root": str(root), "category": "validation"})))
    assert [r.id for r in val] == ["00003_face0"]
    flat, _ = split(list(ffhq.read(ffhq.FFHQSource(root=str(root), dedupe=False, category=["training"]))))
    ids = [r.id for r in flat]
    assert "00001_face0" in ids and "00002_face0" in ids and "00003_face0" not in ids
    assert next(r for r in flat if r.id == "00002_face0").image.path.endswith("00002.png")
    with pytest.raises(
        SourceError, match=r"no entry of .* has category \['test'\] \(the file has: \['training', 'validation'\]\)"
    ):
        ffhq.read({"root": str(root), "category": "test"})


def test_ffhq_malformed_json_is_one_reject_and_missing_json_an_error(tmp_path):
    fx.build_ffhq(tmp_path, corrupt={"json"})
    out = list(ffhq.read({"root": str(tmp_path)}))
    assert len(out) == 1 and isinstance(out[0], Reject)
    assert out[0].id == "ffhq-dataset-v2.json" and "cannot read" in out[0].reason
    with pytest.raises(SourceError, match="metadata file .*other.json does not exist"):
        ffhq.read({"root": str(tmp_path), "json": "other.json"})


# -------------------------------------------------------------------------------------------- VITON-HD


def test_vitonhd_pairs_use_own_garment(tmp_path):
    truth = fx.build_vitonhd(tmp_path, corrupt={"missing_cloth", "bad_line", "repeat_line"})
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
    assert len(records) + len(rejects) == 5  # every line of the pairs file is accounted for


def test_vitonhd_test_only_root_and_split_folder(tmp_path):
    truth = fx.build_vitonhd(tmp_path, split="test")
    records, rejects = split(list(vitonhd.read({"root": str(tmp_path), "split": "test"})))
    assert [r.id for r in records] == ["00000_00", "00001_00", "00002_00"] and not rejects
    # A root holding only test/ (the test-only download), read with the default split: a clear error.
    with pytest.raises(
        SourceError,
        match=rf"split 'train' not found: {tmp_path} holds test/ but no train/image/; "
        "set source.split: test",
    ):
        vitonhd.read({"root": str(tmp_path)})
    (tmp_path / "test_pairs.txt").unlink()
    records, _ = split(list(vitonhd.read({"root": str(truth["split_dir"]), "split": "test"})))
    assert [r.id for r in records] == ["00000_00", "00001_00", "00002_00"]
    for p in (truth["split_dir"] / "image").iterdir():
        p.unlink()
    with pytest.raises(SourceError, match="lists no person image"):
        vitonhd.read({"root": str(truth["split_dir"]), "split": "test"})


# --------------------------------------------------------------------------------------------- OpenS2V


@pytest.fixture(scope="module")
def opens2v_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("opens2v")
    return root, fx.build_opens2v(root)


def test_opens2v_published_layout_yields_records(opens2v_dir):
    """The nested tree as published (Jsons/mask_and_bbox/total_partN.json, Videos/total_partN as split tar
    pieces, Jsons/cross_video_pairs/ with cluster_videos.json beside the pair files) read with the
    reader's defaults plus the pair glob: every record and reject as the fixture says."""
    root, truth = opens2v_dir
    records, rejects = split(list(opens2v.read({"root": str(root), "cross_pairs": PAIRS})))
    intra = [r.id for r in records if r.pair == "intra"]
    cross = [r.id for r in records if r.pair == "cross"]
    assert intra == truth["intra"] and cross == truth["cross"]
    assert_rejects(rejects, truth["rejects"], "opens2v")
    assert not any("cluster_videos" in rid for rid in rejects)  # the index is not read as pairs


def test_opens2v_record_content(opens2v_dir):
    root, truth = opens2v_dir
    ids = truth["ids"]
    by_id = {r.id: r for r in opens2v.read({"root": str(root), "cross_pairs": PAIRS}) if isinstance(r, SourceRecord)}
    x0, x1, y0, y1 = truth["crop"]
    cat = by_id[f"{ids['catvid0']}/o2"]
    assert (
        cat.image.frame == truth["frame"]
        and cat.image.member is None
        and cat.image.path.endswith("catvid_segment_0.mp4")
    )
    assert (
        cat.phrase == "cat" and cat.caption == "A cat looks around in a garden."
    )  # face_cap_qwen, as upstream's loader
    assert cat.extra["caption_key"] == "face_cap_qwen" and cat.extra["crop_xyxy"] == (x0, y0, x1, y1)
    assert cat.extra["mask_score"] == 0.90 and cat.extra["aes_score"] == 5.3  # score: [0.9] is read
    assert cat.masks[0]["size"] == list(truth["frame_hw"]) and decode_area(cat.masks[0]) == truth["areas"]["big"]
    assert cat.boxes == [rle_bbox(cat.masks[0])]
    dull = by_id[f"{ids['dullvid0']}/o1"]  # no face_cap_qwen: the older cap list
    assert dull.caption.startswith("Legacy caption") and dull.extra["caption_key"] == "cap"
    in_tar = by_id[f"{ids['catvid1']}/o1"]
    assert in_tar.image.path.endswith("Videos/total_part2/total_part2.tar.split.000")
    assert in_tar.image.member == "part_0002/catvid/catvid_segment_1.mp4"
    fwd = by_id[f"{ids['catvid0']}/o2/f3>{ids['catvid1']}/o1/f3"]
    assert fwd.image == cat.image and fwd.reference == in_tar.image and fwd.group == "catvid"
    assert fwd.extra["object_ids_from"] == "class_id" and fwd.extra["image_similarity"] == 0.93
    assert decode_area(fwd.reference_mask) == truth["areas"]["cat_c"] and fwd.masks == cat.masks
    back = by_id[f"{ids['catvid1']}/o1/f3>{ids['catvid0']}/o2/f3"]
    assert fwd.reference_box == back.boxes[0] and back.reference == cat.image
    only_fwd = list(
        opens2v.read({"root": str(root), "cross_pairs": PAIRS, "intra": False, "cross_both_directions": False})
    )
    assert [r.id for r in only_fwd if isinstance(r, SourceRecord)] == truth["cross"][::2]
    captions = list(opens2v.read({"root": str(root), "caption_keys": ["cap"], "intra": True}))
    assert next(r for r in captions if r.id == cat.id).caption == "Legacy caption: a cat in a short pan."


def test_opens2v_per_subject_filters(opens2v_dir):
    """Upstream's per-subject filters: the larger of two duplicate masks is kept, a background tag is not
    a subject, the aesthetic threshold applies to each subject's aes_score (a clip with a low clip
    aesthetic keeps its good subject), a crowded clip keeps its top subjects by aes_score."""
    root, truth = opens2v_dir
    ids = truth["ids"]
    records, rejects = split(list(opens2v.read({"root": str(root)})))
    kept = {r.id for r in records}
    assert f"{ids['catvid0']}/o2" in kept and "larger mask is kept" in rejects[f"{ids['catvid0']}/o1"].reason
    assert "word_tags.background" in rejects[f"{ids['catvid0']}/o4"].reason
    assert "aes_score 3.200 < min_subject_aesthetic 4.5" in rejects[f"{ids['cupvid0']}/o2"].reason
    assert f"{ids['dullvid0']}/o1" in kept  # clip aesthetic 3.0, subject 5.0
    crowd = sorted(int(r.rsplit("o", 1)[1]) for r in kept if r.startswith(ids["crowdvid0"]))
    assert crowd == [1, 2, 4, 5, 7, 8]  # aes 5.0 5.7 5.9 6.1 5.5 5.2 kept; 4.9 and 4.6 not
    strict = split(list(opens2v.read({"root": str(root), "min_clip_aesthetic": 4.5, "max_masks": 2})))
    assert "min_clip_aesthetic 4.5" in strict[1][ids["dullvid0"]].reason
    assert sorted(r.id for r in strict[0] if r.id.startswith(ids["crowdvid0"])) == [
        f"{ids['crowdvid0']}/o{o}" for o in (4, 5)
    ]
    with pytest.raises(ValueError, match="min_aesthetic is gone.*min_subject_aesthetic"):
        opens2v.read({"root": str(root), "min_aesthetic": 4.5})


def test_opens2v_filters_can_be_disabled(opens2v_dir):
    root, _ = opens2v_dir
    cfg = {
        "root": str(root),
        "min_subject_aesthetic": None,
        "min_mask_frac": None,
        "dedup_iou": None,
        "max_masks": None,
        "exclude_background": False,
    }
    records, rejects = split(list(opens2v.read(cfg)))
    assert not rejects
    assert len(records) == 4 + 1 + 2 + 8 + 1 + 1 + 1 + 2 + 1  # every object of the nine clips
    # The dataclass carries OpenS2V's own thresholds as defaults.
    defaults = split(list(opens2v.read(opens2v.OpenS2VSource(root=str(root)))))[1]
    assert len(defaults) == 6


def test_opens2v_mismatched_class_id_is_a_reject(opens2v_dir):
    """A pair whose cur_class_id names another class than cur_class_name ("cat" → object 4 = "grass",
    as in upstream's demo pairs against the current clip JSON) is rejected with that reason, both ways."""
    root, truth = opens2v_dir
    ids = truth["ids"]
    rejects = split(list(opens2v.read({"root": str(root), "cross_pairs": PAIRS, "intra": False})))[1]
    rid = f"{ids['catvid0']}>{ids['catvid2']}@Jsons/cross_video_pairs/catvid.json#1"
    assert rejects[rid].reason == (
        f"class id mismatch: cur_class_id 4 is 'grass' in {ids['catvid0']}, but the pair says cur_class_name 'cat'"
    )
    assert (
        "class id mismatch"
        in rejects[f"{ids['catvid2']}>{ids['catvid0']}@Jsons/cross_video_pairs/catvid.json#1"].reason
    )


def test_opens2v_legacy_pairs_placed_by_upstream_order(tmp_path):
    """Older pair files (no class ids, bare clip keys): records repeated verbatim are distinct object pairs
    (upstream's nested loop), placed by upstream's order; a record two objects could fill is a reject."""
    truth = fx.build_opens2v(tmp_path, pairs="legacy")
    cfg = {"root": str(tmp_path), "clips": "Jsons/total_part*.json", "cross_pairs": "step6/cross-frames-images/*.json"}
    records, rejects = split(list(opens2v.read(cfg)))
    assert [r.id for r in records if r.pair == "cross"] == truth["cross"]
    assert {r.extra["object_ids_from"] for r in records if r.pair == "cross"} == {"pair_order"}
    assert_rejects(rejects, truth["rejects"], "opens2v")


def test_opens2v_corrupt_inputs_become_rejects(tmp_path):
    truth = fx.build_opens2v(tmp_path, corrupt={"bad_rle", "missing_video", "json", "unknown_pair"})
    records, rejects = split(list(opens2v.read({"root": str(tmp_path), "cross_pairs": PAIRS})))
    assert [r.id for r in records] == truth["intra"] + truth["cross"]
    assert_rejects(rejects, truth["rejects"], "opens2v")


def test_opens2v_missing_tar_piece_rejects_its_clips(tmp_path):
    truth = fx.build_opens2v(tmp_path, corrupt={"missing_piece"})
    records, rejects = split(list(opens2v.read({"root": str(tmp_path), "cross_pairs": PAIRS})))
    assert [r.id for r in records] == truth["intra"] + truth["cross"]
    assert_rejects(rejects, truth["rejects"], "opens2v")
    assert "a piece is missing" in rejects[truth["ids"]["dogvid0"]].reason


def test_opens2v_every_input_is_accounted_for(tmp_path):
    """Reader outputs = one per object of each usable clip + one per unusable clip + one per unreadable
    file + one per pair record and direction, counted from the fixture's own files."""
    fx.build_opens2v(tmp_path, corrupt={"missing_video", "json", "unknown_pair"})
    expected = 1  # the unparsable total_part3.json
    for part in ("total_part1", "total_part2"):
        for key, clip in json.loads((tmp_path / "Jsons" / "mask_and_bbox" / f"{part}.json").read_text()).items():
            missing = not (tmp_path / "Videos" / part / clip["metadata"]["path"]).exists() and part == "total_part1"
            expected += 1 if missing else len(clip["annotation"]["mask_map"])
    for f in (tmp_path / "Jsons" / "cross_video_pairs").glob("*vid.json"):
        expected += 2 * len(json.loads(f.read_text()))
    out = list(opens2v.read({"root": str(tmp_path), "cross_pairs": PAIRS}))
    assert len(out) == expected == len({r.id for r in out})


def test_opens2v_cluster_index_is_not_read_as_pairs(opens2v_dir, tmp_path):
    """cluster_videos.json beside the pair files is skipped by name, and by its shape under another name."""
    root, truth = opens2v_dir
    base = split(list(opens2v.read({"root": str(root), "cross_pairs": PAIRS, "intra": False})))
    (tmp_path / "pairs").mkdir()
    for f in (root / "Jsons" / "cross_video_pairs").iterdir():
        name = "index.json" if f.name == "cluster_videos.json" else f.name
        (tmp_path / "pairs" / name).write_bytes(f.read_bytes())
    (tmp_path / "Videos").symlink_to(root / "Videos")
    (tmp_path / "Jsons").symlink_to(root / "Jsons")
    renamed = split(list(opens2v.read({"root": str(tmp_path), "cross_pairs": "pairs/*.json", "intra": False})))
    assert [r.id for r in renamed[0]] == [r.id for r in base[0]] == truth["cross"]
    assert len(renamed[1]) == len(base[1]) and not any("index" in rid for rid in renamed[1])
    with pytest.raises(SourceError, match="matches only the cluster index cluster_videos.json"):
        opens2v.read({"root": str(root), "cross_pairs": "Jsons/cross_video_pairs/cluster_*.json"})


def test_opens2v_layout_that_matches_nothing_is_an_error(opens2v_dir, tmp_path):
    root, _ = opens2v_dir
    # The flat glob of the older release finds nothing in the published nested tree.
    with pytest.raises(
        SourceError,
        match=rf"opens2v: no annotation files \(source.clips\) match 'Jsons/\*.json' "
        rf"under {root} \(it holds: Jsons, Videos\)",
    ):
        opens2v.read({"root": str(root), "clips": "Jsons/*.json"})
    with pytest.raises(SourceError, match="no cross-pair files"):
        opens2v.read({"root": str(root), "cross_pairs": "cross/*.json"})
    with pytest.raises(SourceError, match="videos folder .*Clips does not exist"):
        opens2v.read({"root": str(root), "videos": "Clips"})
    with pytest.raises(SourceError, match="not a directory"):
        opens2v.read({"root": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="nothing would be produced"):
        opens2v.read({"root": str(root), "intra": False})


def test_opens2v_streaming_keeps_memory_flat(tmp_path):
    """A generated ~24 MB annotation file (the benchmark's generator, docs/sources.md layout): the reader,
    in a child process, grows its peak RSS by far less than the file's size, while parsing the file whole
    grows it by more than the file. (A subject threshold of 5.5 rejects most subjects before their masks
    are parsed, to keep the test short; BENCHMARKS.md has the multi-GB run with the recipe's filters.)"""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_opens2v_reader", REPO / "benchmarks" / "bench_opens2v_reader.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    made = bench.make_dataset(tmp_path / "ds", 24_000_000, pair_every=25)
    whole = bench.measure_whole_file(tmp_path / "ds" / "Jsons" / "mask_and_bbox" / "total_part1.json")
    got = bench.measure_reader(tmp_path / "ds", min_subject_aesthetic=5.5)
    if not got["peak_reset_after_imports"]:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    file_mib = made["file_bytes"] / 2**20
    assert got["records"] > 0 and got["rejects"] > 0
    # a quarter: the baseline is the RSS after imports, which holds whatever compiling the reader's
    # modules left behind (a reader in one 970-line module left ~2 MiB that reading then reused; split
    # into small modules it leaves less, at the same peak); the reader's own growth is ~4 MiB here
    assert got["growth_mib"] < file_mib / 4, (got, made)
    assert whole["growth_mib"] > file_mib  # what parsing the file whole costs


# ----------------------------------------------------------------------------------------------- video


def test_read_frame_returns_the_indexed_cropped_frame(opens2v_dir):
    root, truth = opens2v_dir
    cid = truth["ids"]["catvid0"]
    path = root / "Videos" / "total_part1" / "part_0001" / "catvid" / "catvid_segment_0.mp4"
    frames = truth["frames"][cid]
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


def test_non_utf8_clip_decodes_to_the_sequential_frames(opens2v_dir):
    """The clip whose hdlr name is Windows-1251 bytes (as upstream's demo clip): a strict av.open fails;
    read_frame returns, at every index, exactly the frame a front-to-back decode gives."""
    import av

    root, truth = opens2v_dir
    path = root / "Videos" / "total_part1" / "part_0001" / "oddvid" / "oddvid_segment_0.mp4"
    assert fx.LEGACY_HANDLER in path.read_bytes()
    with pytest.raises(UnicodeDecodeError):
        av.open(str(path))
    reference = sequential_frames(str(path))
    assert len(reference) == 8
    for i, want in enumerate(reference):
        assert np.array_equal(video.read_frame(path, i), want), i
    with video.open_container(str(path)) as c:
        assert "Apple" in c.streams.video[0].metadata["handler_name"]


def test_frames_from_split_tar_pieces_without_extracting(opens2v_dir):
    """A clip inside the part's tar, published as pieces: read in place (no file appears on disk), frame by
    frame equal to a sequential decode of the member's bytes taken from the re-joined tar."""
    root, truth = opens2v_dir
    pieces = truth["pieces"]
    member = "part_0002/dogvid/dogvid_segment_1.mp4"  # its handler name is not UTF-8 either
    before = sorted(p.name for p in pieces[0].parent.iterdir())
    assert video.archive_pieces(pieces[2]) == [str(p) for p in pieces]
    joined = b"".join(p.read_bytes() for p in pieces)
    with tarfile.open(fileobj=io.BytesIO(joined)) as tar:
        blob = tar.extractfile(member).read()
    assert fx.LEGACY_HANDLER in blob
    reference = sequential_frames(io.BytesIO(blob))
    for i in (0, 3, 5, 7):
        assert np.array_equal(video.read_frame(pieces[0], i, member=member), reference[i]), i
    assert sorted(p.name for p in pieces[0].parent.iterdir()) == before
    with pytest.raises(video.VideoReadError, match="has no member 'nope.mp4'"):
        video.read_frame(pieces[0], 0, member="nope.mp4")


def test_decode_stage_reads_a_frame_from_the_split_tar(opens2v_dir):
    """The decode stage passes the record's member through: a part-2 record decodes to its cropped frame."""
    from pipeline.recipe import Recipe
    from pipeline.stages.decode import DecodeStage

    root, truth = opens2v_dir
    recipe = Recipe.from_yaml(MANIFESTS / "opens2v.yaml", source_root=str(root))
    recipe.filters.min_image_side = 8
    rec = next(r for r in opens2v.read({"root": str(root)}) if isinstance(r, SourceRecord) and r.image.member)
    img = DecodeStage(recipe).load(rec.image, rec.extra["crop_xyxy"])
    assert img.shape[:2] == tuple(rec.masks[0]["size"])


def test_read_frame_errors(opens2v_dir, tmp_path):
    root, _ = opens2v_dir
    path = root / "Videos" / "total_part1" / "part_0001" / "catvid" / "catvid_segment_0.mp4"
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


@pytest.mark.parametrize("kind", ["sa1b", "ffhq", "vitonhd", "opens2v"])
def test_recipe_source_section_drives_the_reader(kind, tmp_path):
    """Each manifest loads as a Recipe, and its source section (a SourceConfig) feeds the reader
    through the registry with the same result as a plain mapping of the same options."""
    recipe_mod = pytest.importorskip("pipeline.recipe")
    registry = pytest.importorskip("pipeline.sources")
    build = {"sa1b": fx.build_sa1b, "ffhq": fx.build_ffhq, "vitonhd": fx.build_vitonhd, "opens2v": fx.build_opens2v}[
        kind
    ]
    build(tmp_path)
    recipe = recipe_mod.Recipe.from_yaml(MANIFESTS / f"{kind}.yaml", source_root=str(tmp_path))
    assert recipe.source.kind == kind and recipe.seed == 0
    assert (recipe.detection.box_threshold, recipe.detection.text_threshold) == (0.35, 0.25)
    assert (recipe.detection.image_size, recipe.detection.max_size) == (800, 1333)
    via_recipe = list(registry.get_reader(kind)(recipe.source))
    via_mapping = list(getattr(sys.modules[f"pipeline.sources.{kind}"], "read")(recipe.source.to_dict()))
    assert via_recipe == via_mapping
    assert sum(isinstance(r, SourceRecord) for r in via_recipe) >= 2
    if kind == "opens2v":  # the shipped recipe reads the published tree, pairs included
        assert any(isinstance(r, SourceRecord) and r.pair == "cross" for r in via_recipe)


def test_opens2v_filter_defaults_through_source_config(opens2v_dir):
    """SourceConfig answers None for absent options; absent filters must still default to OpenS2V's."""
    recipe_mod = pytest.importorskip("pipeline.recipe")
    root, truth = opens2v_dir
    ids = truth["ids"]
    cfg = recipe_mod.SourceConfig(kind="opens2v", root=str(root), options={})
    rejects = split(list(opens2v.read(cfg)))[1]
    assert {f"{ids['crowdvid0']}/o3", f"{ids['cupvid0']}/o2", f"{ids['catvid0']}/o1"} <= set(rejects)
    off = recipe_mod.SourceConfig(kind="opens2v", root=str(root), options={"max_masks": None})
    assert f"{ids['crowdvid0']}/o3" not in split(list(opens2v.read(off)))[1]


def test_opens2v_cross_target_frame_without_annotation(opens2v_dir, tmp_path):
    """A pair whose target frame is not annotated still yields a record; the stages detect the subject."""
    root, truth = opens2v_dir
    ids = truth["ids"]
    (tmp_path / "pairs").mkdir()
    pair = {
        "cur_id": ids["catvid0"],
        "aft_id": ids["catvid2"],
        "cur_class_id": "2",
        "aft_class_id": "1",
        "cur_class_name": "cat",
        "aft_class_name": "cat",
        "text_similarity": 1.0,
        "image_similarity": 0.9,
        "cur_frame_idx": 6,
    }
    (tmp_path / "pairs" / "c.json").write_text(json.dumps([pair]))
    (tmp_path / "Videos").symlink_to(root / "Videos")
    (tmp_path / "Jsons").symlink_to(root / "Jsons")
    out = list(
        opens2v.read(
            {"root": str(tmp_path), "intra": False, "cross_pairs": "pairs/*.json", "cross_both_directions": False}
        )
    )
    assert len(out) == 1 and isinstance(out[0], SourceRecord)
    rec = out[0]  # aft frame defaults to the clip's ann_frame_idx
    assert rec.id == f"{ids['catvid0']}/o2/f6>{ids['catvid2']}/o1/f3"
    assert rec.image.frame == 6 and rec.masks == [] and rec.boxes == [] and rec.extra["mask_frac"] is None
    assert rec.reference.frame == truth["frame"]


# ------------------------------------------------------------------------ runs: errors and accounting


def test_empty_match_is_a_one_line_error_before_any_model(opens2v_dir, tmp_path, monkeypatch, caplog):
    """`dynaip curate` on a root whose layout does not match the recipe: exit 2, one error line naming
    the glob and the root, nothing written, no stage (model) built."""
    import pipeline.stages as stages_module
    from dynaip.cli import main

    root, _ = opens2v_dir
    recipe = tmp_path / "flat.yaml"
    shipped = (MANIFESTS / "opens2v.yaml").read_text()
    assert "\n  subset: null " in shipped
    recipe.write_text(shipped.replace("\n  subset: null ", '\n  clips: "Jsons/*.json" '))
    monkeypatch.setattr(stages_module, "build_stages", lambda *a, **k: pytest.fail("a stage was built"))
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        rc = main(
            [
                "curate",
                "--recipe",
                str(recipe),
                "--out",
                str(out),
                "--source-root",
                str(root),
                "--executor",
                "local",
                "--no-progress",
            ]
        )
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert rc == 2 and len(errors) == 1 and "\n" not in errors[0]
    assert "no annotation files (source.clips) match 'Jsons/*.json'" in errors[0] and str(root) in errors[0]
    assert not out.exists()


def test_manifest_counts_add_up_to_what_the_reader_saw(opens2v_dir, tmp_path):
    """A local run (stages stubbed out: nothing reaches a model) over the published tree: the manifest's
    inputs are the reader's outputs, and its read rejects are the reader's rejects."""
    from pipeline.executor_local import run_local
    from pipeline.recipe import Recipe

    root, truth = opens2v_dir
    recipe = Recipe.from_yaml(MANIFESTS / "opens2v.yaml", source_root=str(root))
    recipe.shards.inputs_per_shard = 7
    seen = list(opens2v.read(recipe.source))
    manifest = run_local(recipe, tmp_path / "out", stages=[], progress=False)
    lines = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    t = manifest["totals"]
    assert t["inputs"] == len(seen) == len(truth["intra"]) + len(truth["cross"]) + len(truth["rejects"])
    assert t["inputs"] == t["accepted"] + t["rejected"]
    assert sorted(r["id"] for r in lines if r["stage"] == "read") == sorted(truth["rejects"])
