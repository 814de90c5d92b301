"""Benchmark construction: DreamBench++ (1,350 cases) and DynaIP-Bench (642 + 246 = 888) from fixture pools."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from dynaip.eval.bench_multi import COMBINATIONS, SUBJECT_TYPES, MultiBenchConfig, build_multi_cases, read_pool
from dynaip.eval.bench_single import SingleBenchConfig, build_single_cases, prompt_type, read_single_pool
from dynaip.eval.cases import read_cases, write_cases

PER_CATEGORY = {"animal": 45, "human": 20, "object": 65, "style": 20}  # 150 subjects
PUBLISHED_DIR = {"animal": "live_subject/animal", "human": "live_subject/human", "object": "object", "style": "style"}


def _img(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def make_dreambench(root: Path, *, flat: bool = False) -> Path:
    """DreamBench++ as published: ``images/live_subject/{animal,human}/NN.jpg``, ``images/{object,style}/NN.jpg``
    and ``captions/`` mirroring it with ``NN.txt`` (line 0 the subject name, then exactly 9 prompt lines).

    Follows yuangpeng/dreambench_plus: ``dreambench_plus/dreambench_plus_dataset.py`` (images and captions found
    recursively under ``images/`` and ``captions/`` with mirrored relative paths, the category being the parent
    directory and ``live_subject_`` prefixed to animal/human collection ids, line 0 the subject, the other lines
    the prompts), ``dreambench_plus/eval_prompt_following.py`` and ``eval_concept_preservation.py`` (9 prompts per
    subject asserted), ``README.md`` (150 images, 9 prompts each, sample directories named like
    ``live_subject_animal_00_kitten``). ``flat=True`` writes the older flat layout ``images/<category>/NN.jpg``.
    """
    for cat, n in PER_CATEGORY.items():
        rel = cat if flat else PUBLISHED_DIR[cat]
        for i in range(n):
            _img(root / "images" / rel / f"{i:02d}.jpg", (i, 10, 20))
            cap = root / "captions" / rel / f"{i:02d}.txt"
            cap.parent.mkdir(parents=True, exist_ok=True)
            cap.write_text(f"{cat} thing {i}\n" + "".join(f"prompt {j} of {cat} {i}\n" for j in range(9)))
    return root


def make_typed_pool(root: Path, per_type: int = 3) -> Path:
    for t in SUBJECT_TYPES:
        for i in range(per_type):
            _img(root / t / f"{t}_item_{i}.png", (i * 40, 0, 0))
    (root / "character" / "character_item_0.txt").write_text("Mario\n")
    return root


@pytest.fixture(scope="module")
def dreambench(tmp_path_factory) -> Path:
    return make_dreambench(tmp_path_factory.mktemp("dbpp"))


def test_single_published_layout_strict_counts_and_roundtrip(dreambench, tmp_path):
    pool = read_single_pool(SingleBenchConfig(pool=str(dreambench), strict=True))
    cases = pool.cases
    assert len(cases) == 1350 and pool.layout == "published" and pool.problems == []
    assert pool.subjects == PER_CATEGORY
    assert Counter(c.category for c in cases) == {k: 9 * v for k, v in PER_CATEGORY.items()}
    assert [c.category for c in cases[::9]][:3] == ["animal"] * 3 and cases[-1].category == "style"  # release order
    subjects = Counter(c.subjects[0].path for c in cases)
    assert len(subjects) == 150 and set(subjects.values()) == {9}
    assert len({c.id for c in cases}) == 1350
    c = next(c for c in cases if c.id == "dbpp-object-12-p4")
    assert (c.prompt, c.subjects[0].name, c.subjects[0].type, c.variation, c.layout) == (
        "prompt 4 of object 12",
        "object thing 12",
        "object",
        4,
        None,
    )
    assert c.subjects[0].path.endswith("/images/object/12.jpg") and Path(c.subjects[0].path).is_absolute()
    a = next(c for c in cases if c.id == "dbpp-human-07-p8")
    assert a.subjects[0].path.endswith("/images/live_subject/human/07.jpg")
    assert a.extra == {"collection_id": "live_subject_human_07_human_thing_7"} and a.prompt == "prompt 8 of human 7"
    assert [prompt_type(i) for i in range(10)] == ["photorealistic"] * 4 + ["style transfer"] * 3 + [
        "imaginative"
    ] * 2 + [None]
    again = build_single_cases(SingleBenchConfig(pool=str(dreambench), strict=True))
    assert [x.seed for x in again] == [x.seed for x in cases]
    other = build_single_cases(SingleBenchConfig(pool=str(dreambench), seed=1))
    assert [x.seed for x in other] != [x.seed for x in cases]
    assert write_cases(tmp_path / "c.jsonl", cases) == 1350
    assert read_cases(tmp_path / "c.jsonl") == cases


def test_single_flat_layout_still_read(tmp_path):
    root = make_dreambench(tmp_path / "flat", flat=True)
    pool = read_single_pool(SingleBenchConfig(pool=str(root)))
    assert len(pool.cases) == 1350 and pool.layout == "flat" and pool.subjects == PER_CATEGORY
    assert next(c for c in pool.cases if c.id == "dbpp-animal-03-p2").subjects[0].path.endswith("/images/animal/03.jpg")
    with pytest.raises(ValueError, match=r"not the release as published: flat layout .*drop --strict"):
        read_single_pool(SingleBenchConfig(pool=str(root), strict=True))


def test_single_partial_pool_fails_by_default(tmp_path, caplog):
    root = make_dreambench(tmp_path / "p")
    for tree in ("images", "captions"):  # what a reader blind to live_subject/ sees: 85 subjects, 765 cases
        shutil.rmtree(root / tree / "live_subject")
    with pytest.raises(
        ValueError,
        match=r"not the full release \(765 cases from 85 subjects \(object 65, style 20\), "
        r"published layout\): 85 subjects, expected 150; 765 cases, expected 1350; "
        r"categories \['animal', 'human'\] are missing\. .*--allow-partial",
    ):
        read_single_pool(SingleBenchConfig(pool=str(root)))
    with caplog.at_level(logging.WARNING):
        pool = read_single_pool(SingleBenchConfig(pool=str(root), allow_partial=True))
    assert len(pool.cases) == 765 and pool.subjects == {"object": 65, "style": 20}
    assert "is partial (765 cases from 85 subjects" in caplog.text
    with pytest.raises(ValueError, match="85 subjects, expected 150"):
        read_single_pool(SingleBenchConfig(pool=str(root), strict=True))
    with pytest.raises(ValueError, match="contradict"):
        SingleBenchConfig(pool=str(root), strict=True, allow_partial=True)


def test_single_missing_caption_and_image_are_errors(tmp_path):
    root = make_dreambench(tmp_path / "p")
    (root / "captions" / "live_subject" / "animal" / "03.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing captions/live_subject/animal/03\.txt"):
        build_single_cases(SingleBenchConfig(pool=str(root), allow_partial=True))
    _img(root / "images" / "live_subject" / "animal" / "03.jpg", (0, 0, 0))
    (root / "captions" / "live_subject" / "animal" / "03.txt").write_text("x\n" + "p\n" * 9)
    (root / "images" / "live_subject" / "human" / "07.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"images/live_subject/human/07\.jpg"):
        build_single_cases(SingleBenchConfig(pool=str(root)))
    _img(root / "images" / "live_subject" / "human" / "07.jpg", (0, 0, 0))
    _img(root / "images" / "live_subject" / "human" / "07.png", (0, 0, 0))
    with pytest.raises(ValueError, match=r"holds \['07\.jpg', '07\.png'\] for one subject '07'"):
        build_single_cases(SingleBenchConfig(pool=str(root)))
    (root / "images" / "live_subject" / "human" / "07.png").unlink()
    shutil.copytree(root / "captions" / "live_subject" / "human", root / "captions" / "human")
    with pytest.raises(ValueError, match=r"category human is at both human/ and live_subject/human/"):
        build_single_cases(SingleBenchConfig(pool=str(root)))
    with pytest.raises(FileNotFoundError, match="has no 'images/' directory"):
        build_single_cases(SingleBenchConfig(pool=str(tmp_path / "nothing")))


def test_single_wrong_prompt_counts_and_strict_shape(tmp_path, caplog):
    root = make_dreambench(tmp_path / "p")
    (root / "captions" / "style" / "00.txt").write_text("style thing\n" + "p\n" * 8)
    with pytest.raises(
        ValueError, match=r"1349 cases, expected 1350; captions/style/00\.txt has 8 prompts, expected 9"
    ):
        build_single_cases(SingleBenchConfig(pool=str(root)))
    assert len(build_single_cases(SingleBenchConfig(pool=str(root), allow_partial=True))) == 1349
    (root / "captions" / "style" / "00.txt").write_text("style thing\n\n" + "p\n" * 9 + "\n")  # blank lines
    (root / "images" / "object" / "05.jpg").rename(root / "images" / "object" / "05.png")
    (root / "images" / "notes.md").write_text("x")
    with caplog.at_level(logging.WARNING):
        assert len(build_single_cases(SingleBenchConfig(pool=str(root)))) == 1350  # readable, not the exact shape
    assert "ignoring files that are not part of the release: images/notes.md" in caplog.text
    with pytest.raises(
        ValueError,
        match=r"images/object/05\.png is not named NN\.jpg.*captions/style/00\.txt has "
        r"blank lines.*not part of the release: images/notes\.md",
    ):
        build_single_cases(SingleBenchConfig(pool=str(root), strict=True))
    (root / "images" / "animals").mkdir()
    with pytest.raises(ValueError, match=r"images/animals/ is not a DreamBench\+\+ category directory"):
        build_single_cases(SingleBenchConfig(pool=str(root)))


def test_multi_exact_counts_and_structure(tmp_path):
    pool = make_typed_pool(tmp_path / "pool")
    cases = build_multi_cases(MultiBenchConfig(pool=str(pool), seed=7))
    assert len(cases) == 888
    assert sum(len(c.subjects) == 2 for c in cases) == 642
    assert sum(len(c.subjects) == 3 for c in cases) == 246
    by_combo = Counter(c.category for c in cases)
    assert len(by_combo) == 14 and by_combo == {k.name: k.cases for k in COMBINATIONS}
    for combo in COMBINATIONS:
        mine = [c for c in cases if c.category == combo.name]
        variations = Counter(c.variation for c in mine)
        assert variations == {v: combo.cases // 6 for v in range(6)}, combo.name
        assert len({c.extra["template"] for c in mine}) == 6
        for c in mine:
            assert tuple(s.type for s in c.subjects) == combo.types
            assert len({s.path for s in c.subjects}) == len(c.subjects)  # no subject twice in a case
            assert c.layout == list(combo.layout)
            assert all(s.name in c.prompt for s in c.subjects) and "{" not in c.prompt
    assert len({c.id for c in cases}) == 888
    # every pool subject is used, about equally within its type
    uses = Counter(s.path for c in cases for s in c.subjects)
    assert len(uses) == 3 * len(SUBJECT_TYPES)
    for t in SUBJECT_TYPES:
        counts = [n for p, n in uses.items() if f"/{t}/" in p]
        assert max(counts) - min(counts) <= 2, (t, counts)
    same = build_multi_cases(MultiBenchConfig(pool=str(pool), seed=7))
    assert [c.to_json() for c in same] == [c.to_json() for c in cases]
    other = build_multi_cases(MultiBenchConfig(pool=str(pool), seed=8))
    assert [[s.path for s in c.subjects] for c in other] != [[s.path for s in c.subjects] for c in cases]


def test_multi_names_and_small_pool(tmp_path):
    pool = make_typed_pool(tmp_path / "pool")
    subjects = read_pool(pool)
    names = {Path(s.path).stem: s.name for t in subjects.values() for s in t}
    assert names["character_item_0"] == "Mario"  # .txt verbatim
    assert names["object_item_1"] == "an object item 1" and names["human_item_2"] == "a human item 2"
    for p in list((pool / "human").glob("human_item_[12].png")):
        p.unlink()
    with pytest.raises(ValueError, match=r"human: has 1, needs 2"):
        build_multi_cases(MultiBenchConfig(pool=str(pool)))
    for p in (pool / "downwearing").glob("*"):
        p.unlink()
    with pytest.raises(ValueError, match=r"downwearing: has 0, needs 1; human: has 1, needs 2"):
        build_multi_cases(MultiBenchConfig(pool=str(pool)))


def test_cli_builds_both_benchmarks(dreambench, tmp_path, capsys):
    import argparse

    from dynaip.eval.cli import add_eval_parser

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    pool = make_typed_pool(tmp_path / "pool")
    for argv in (
        ["eval", "bench-single", "--pool", str(dreambench), "--out", str(tmp_path / "s.jsonl"), "--strict"],
        ["eval", "bench-multi", "--pool", str(pool), "--out", str(tmp_path / "m.jsonl")],
    ):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    out = capsys.readouterr().out
    assert (
        "1350 DreamBench++ cases" in out
        and "(animal: 405, human: 180, object: 585, style: 180; published layout)" in out
    )
    assert "888 DynaIP-Bench cases" in out and "642 two-subject, 246 three" in out
    assert len(read_cases(tmp_path / "m.jsonl")) == 888
    with pytest.raises(SystemExit):  # argparse refuses the pair
        parser.parse_args(["eval", "bench-single", "--pool", "x", "--out", "y", "--strict", "--allow-partial"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_partial_pool_is_a_one_line_error_unless_allowed(tmp_path, capsys, caplog):
    from dynaip.cli import main

    root = make_dreambench(tmp_path / "p")
    for tree in ("images", "captions"):
        shutil.rmtree(root / tree / "style")
    out = tmp_path / "s.jsonl"
    with caplog.at_level(logging.ERROR):
        assert main(["eval", "bench-single", "--pool", str(root), "--out", str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and "130 subjects, expected 150" in errors[0]
    assert not out.exists()
    assert main(["eval", "bench-single", "--pool", str(root), "--out", str(out), "--allow-partial"]) == 0
    printed = capsys.readouterr().out
    assert "1170 DreamBench++ cases written" in printed
    assert (
        "partial pool (1170 cases from 130 subjects (animal 45, human 20, object 65), published layout): "
        "130 subjects, expected 150; 1170 cases, expected 1350; categories ['style'] are missing" in printed
    )
    assert len(read_cases(out)) == 1170
