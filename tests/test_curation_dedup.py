"""Dataset-wide de-duplication, the minimum reference size and progress lines — with model-free
stages (the subject is the whole image), so these run in seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.recipe import Recipe
from pipeline.sample import Candidate, Item


class WholeImageSubject:
    """Stands in for detect + select + segment: the subject is the image minus a 4-pixel border."""

    name = "segment"

    def __call__(self, items: list[Item]) -> list[Item]:
        for item in items:
            if not item.ok:
                continue
            for view in item.views():
                h, w = view.shape
                view.primary = Candidate(box=(4.0, 4.0, w - 4.0, h - 4.0), score=1.0, phrase="object")
                view.mask = np.zeros((h, w), bool)
                view.mask[4 : h - 4, 4 : w - 4] = True
        return items


def model_free_stages(recipe: Recipe) -> list:
    from pipeline.stages import CaptionStage, ComposeStage, DecodeStage, PairStage

    return [
        DecodeStage(recipe),
        WholeImageSubject(),
        ComposeStage(recipe),
        CaptionStage(recipe, None),
        PairStage(recipe),
    ]


def recipe_for(root: Path, **over) -> Recipe:
    raw = {
        "name": "dedup-test",
        "source": {"kind": "folder", "root": str(root), "cross_pairs": "subfolders"},
        "filters": {"min_image_side": 32, "min_reference_side": 16},
        "captioning": {"order": ["provided", "template"]},
        "shards": {"inputs_per_shard": 3},
        "executor": {"batch_size": 2, "device": "cpu"},
    }
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return Recipe.from_dict(raw)


@pytest.fixture(scope="module")
def photos_with_copies(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Every bundled photo (motorcycle views, faces included) plus, sorted into later chunks, an exact
    byte copy, a re-encoded + resized copy and a re-encoded PNG→JPEG copy. Returns the root and
    ``{copy id: original id}``."""
    from pipeline.demo_photos import write_sample_photos

    root = tmp_path_factory.mktemp("dd") / "photos"
    write_sample_photos(root)
    shutil.copy(root / "astronaut.jpg", root / "zz_exact.jpg")
    im = Image.open(root / "chelsea.jpg")
    im.resize((im.width * 2 // 3, im.height * 2 // 3), Image.BICUBIC).save(root / "zz_smaller.jpg", quality=70)
    Image.open(root / "camera.png").convert("RGB").save(root / "zz_camera_reencoded.jpg", quality=80)
    return root, {"zz_exact": "astronaut", "zz_smaller": "chelsea", "zz_camera_reencoded": "camera"}


def _rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def test_copies_in_other_chunks_are_rejected_as_duplicates_and_distinct_photos_are_kept(photos_with_copies, tmp_path):
    from dynaip.dataset.inspect import iter_samples, verify
    from pipeline.executor_local import run_local
    from pipeline.sample import sample_key

    root, copies = photos_with_copies
    recipe = recipe_for(root)
    out = tmp_path / "ds"
    m = run_local(recipe, out, None, progress=False, stages=model_free_stages(recipe))
    dups = [r for r in _rejects(out) if r["stage"] == "dedup"]
    assert {r["id"]: r["reason"] for r in dups} == {
        c: f"duplicate of {sample_key('folder', o)}" for c, o in copies.items()
    }
    t = m["totals"]
    assert t["rejected_by_reason"] == {"dedup: duplicate": 3}
    assert t["inputs"] == t["accepted"] + t["rejected"] == 16 and t["samples"] == t["accepted"] == 13
    kept = {json.loads(s["json"])["source_id"] for s in iter_samples(out)}
    assert not kept & set(copies) and set(copies.values()) <= kept
    assert "motorcycle/left" in kept and "motorcycle/right" in kept  # two views of one subject are not copies
    assert verify(out) == []
    # inputs 11-13 (the copies) sit in chunks 3 and 4, their originals in chunk 0
    assert {c["chunk"]: c["rejected"] for c in m["chunks"]} == {0: 0, 1: 0, 2: 0, 3: 1, 4: 2, 5: 0}
    # a re-run is a byte-identical no-op
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and ".progress" not in p.parts}
    assert run_local(recipe, out, None, progress=False, stages=model_free_stages(recipe)) == m
    assert {p: p.read_bytes() for p in before} == before


def test_dedup_off_keeps_every_copy_and_a_coarser_hash_still_finds_exact_copies(photos_with_copies, tmp_path):
    from pipeline.executor_local import run_local

    root, _ = photos_with_copies
    off = recipe_for(root, dedup={"max_distance": None})
    m = run_local(off, tmp_path / "off", None, progress=False, stages=model_free_stages(off))
    assert m["totals"]["accepted"] == 16 and "dedup: duplicate" not in m["totals"]["rejected_by_reason"]
    assert not list((tmp_path / "off" / ".progress").glob("*.ledger.json")) or all(
        not acc[3]
        for p in (tmp_path / "off" / ".progress").glob("*.ledger.json")
        for acc in json.loads(p.read_text())["accepted"]
    )
    exact = recipe_for(root, dedup={"max_distance": 0, "hash_size": 8})
    m = run_local(exact, tmp_path / "exact", None, progress=False, stages=model_free_stages(exact))
    ids = {r["id"] for r in _rejects(tmp_path / "exact") if r["stage"] == "dedup"}
    assert "zz_exact" in ids and ids <= {"zz_exact", "zz_smaller", "zz_camera_reencoded"}
    assert m["totals"]["accepted"] == 16 - len(ids)


def test_dedup_reducers_agree_whatever_their_number():
    from pipeline import dedup

    rng = np.random.default_rng(0)
    base = [int(rng.integers(0, 2**62)) for _ in range(40)]
    entries = [(i, f"k{i}", "intra", [h]) for i, h in enumerate(base)]
    entries += [
        (100 + i, f"c{i}", "intra", [h ^ (1 << (i % 60)) ^ (1 << ((i + 7) % 60))]) for i, h in enumerate(base[:10])
    ]
    entries += [(200, "x", "cross", [base[0]])]  # another pair kind is never a duplicate of an intra input
    one = dedup.reduce_buckets(entries, 3, 8, 0, 1)
    assert {j: i for j, (i, _) in one.items()} == {100 + i: i for i in range(10)}
    for n in (2, 3, 7):
        merged: dict = {}
        for r in range(n):
            for j, v in dedup.reduce_buckets(entries, 3, 8, r, n).items():
                merged[j] = min(merged.get(j, v), v)
        assert merged == one


def test_a_reducer_joins_mappers_of_intra_only_chunks_and_of_chunks_with_cross_pairs():
    """Found from a fresh clone (issue #35): on Ray, one mapper's chunks held only intra pairs (one hash per
    row) and another's cross pairs too (two): the reducer failed to join their arrays. The widths differ;
    the result is the one pass over all rows."""
    from pipeline import dedup

    rng = np.random.default_rng(1)
    h = [int(rng.integers(0, 2**62)) for _ in range(4)]
    intra_only = [(0, "a", "intra", [h[0]]), (1, "b", "intra", [h[1]])]
    with_cross = [
        (10, "a2", "intra", [h[0] ^ 1]),
        (11, "c", "cross", [h[2], h[3]]),
        (12, "c2", "cross", [h[2], h[3] ^ 2]),
    ]
    parts = [
        dedup.partition(dedup.entries_from(((*r, None) for r in rows), 8, False), 3, 8, 1)[0]
        for rows in (intra_only, with_cross)
    ]
    assert parts[0]["words"].shape[1] != parts[1]["words"].shape[1]
    found = dedup.reduce_parts(parts, 3, 8)
    assert {j: i for j, (i, _, _) in found.items()} == {10: 0, 12: 11}
    assert found == dedup.reduce_parts(
        [dedup.partition(dedup.entries_from(((*r, None) for r in intra_only + with_cross), 8, False), 3, 8, 1)[0]], 3, 8
    )


def test_min_reference_side_rejects_small_references(tmp_path):
    from pipeline.stages import ComposeStage
    from pipeline.records import ImageRef, SourceRecord
    from pipeline.sample import View

    recipe = recipe_for(tmp_path, filters={"min_reference_side": 64})
    items = []
    for side in (40, 100):
        item = Item(record=SourceRecord(source="t", id=f"s{side}", image=ImageRef(path="x")))
        img = np.zeros((200, 200, 3), np.uint8)
        mask = np.zeros((200, 200), bool)
        mask[10 : 10 + side, 10 : 10 + side] = True
        item.target = View(ref=item.record.image, image=img, mask=mask)
        items.append(item)
    out = ComposeStage(recipe)(items)
    assert out[0].reject is not None and out[0].reject.reason.startswith(
        "reference too small: 44x44, shorter side below filters.min_reference_side=64"
    )
    assert out[1].ok and min(out[1].ref_image.shape[:2]) >= 64
    with pytest.raises(ValueError, match="filters.min_reference_side"):
        recipe_for(tmp_path, filters={"min_reference_side": -1})
    with pytest.raises(ValueError, match="dedup.max_distance"):
        recipe_for(tmp_path, dedup={"max_distance": 64, "hash_size": 8})


def test_progress_lines_name_chunks_rate_and_rejects(photos_with_copies, tmp_path, capsys):
    from pipeline.executor_local import run_local

    root, _ = photos_with_copies
    recipe = recipe_for(root)
    run_local(recipe, tmp_path / "ds", None, progress=True, progress_every=1e-6, stages=model_free_stages(recipe))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("curate: chunks")]
    assert lines, err
    assert lines[-1].startswith("curate: chunks 6/6 (100%), 16 inputs, ") and "images/s, 0 rejected so far" in lines[-2]
    assert lines[-1].endswith("; 3 duplicates removed")
    with pytest.raises(SystemExit, match="--progress-every"):
        from pipeline.cli import main

        main(["curate", "--recipe", "x.yaml", "--out", str(tmp_path / "o"), "--progress-every", "0"])


def test_credentials_in_a_url_are_redacted():
    from dynaip.dataset.store import redact_url

    assert redact_url("s3://AKIA:secret@bucket/photos") == "s3://bucket/photos"
    assert redact_url("/plain/path") == "/plain/path"
