"""Benchmark construction: DreamBench++ (1,350 cases) and DynaIP-Bench (642 + 246 = 888) from fixture pools."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from dynaip.eval.bench_multi import COMBINATIONS, SUBJECT_TYPES, MultiBenchConfig, build_multi_cases, read_pool
from dynaip.eval.bench_single import SingleBenchConfig, build_single_cases
from dynaip.eval.cases import read_cases, write_cases

PER_CATEGORY = {"animal": 40, "human": 40, "object": 50, "style": 20}  # 150 subjects


def _img(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def make_dreambench(root: Path) -> Path:
    for cat, n in PER_CATEGORY.items():
        for i in range(n):
            _img(root / "images" / cat / f"{i}.jpg", (i, 10, 20))
            cap = root / "captions" / cat / f"{i}.txt"
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


def test_single_exact_counts_and_roundtrip(dreambench, tmp_path):
    cases = build_single_cases(SingleBenchConfig(pool=str(dreambench), strict=True))
    assert len(cases) == 1350
    assert Counter(c.category for c in cases) == {k: 9 * v for k, v in PER_CATEGORY.items()}
    subjects = Counter(c.subjects[0].path for c in cases)
    assert len(subjects) == 150 and set(subjects.values()) == {9}
    assert len({c.id for c in cases}) == 1350
    c = next(c for c in cases if c.id == "dbpp-object-12-p4")
    assert (c.prompt, c.subjects[0].name, c.subjects[0].type, c.variation, c.layout) == \
           ("prompt 4 of object 12", "object thing 12", "object", 4, None)
    assert Path(c.subjects[0].path).is_absolute()
    again = build_single_cases(SingleBenchConfig(pool=str(dreambench), strict=True))
    assert [x.seed for x in again] == [x.seed for x in cases]
    other = build_single_cases(SingleBenchConfig(pool=str(dreambench), seed=1))
    assert [x.seed for x in other] != [x.seed for x in cases]
    assert write_cases(tmp_path / "c.jsonl", cases) == 1350
    assert read_cases(tmp_path / "c.jsonl") == cases


def test_single_missing_caption_and_image_are_errors(tmp_path):
    root = make_dreambench(tmp_path / "p")
    (root / "captions" / "animal" / "3.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing captions/animal/3\.txt"):
        build_single_cases(SingleBenchConfig(pool=str(root)))
    _img(root / "images" / "animal" / "3.jpg", (0, 0, 0))
    (root / "captions" / "animal" / "3.txt").write_text("x\n" + "p\n" * 9)
    (root / "images" / "human" / "7.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"images/human/7\.jpg"):
        build_single_cases(SingleBenchConfig(pool=str(root)))
    with pytest.raises(FileNotFoundError, match="has no 'images/' directory"):
        build_single_cases(SingleBenchConfig(pool=str(tmp_path / "nothing")))


def test_single_wrong_counts_warn_and_strict_fails(tmp_path, caplog):
    root = make_dreambench(tmp_path / "p")
    (root / "captions" / "style" / "0.txt").write_text("style thing\n" + "p\n" * 8)
    for f in ("images", "captions"):
        for p in (root / f / "object").glob("49.*"):
            p.unlink()
    with caplog.at_level(logging.WARNING):
        cases = build_single_cases(SingleBenchConfig(pool=str(root)))
    assert len(cases) == 1350 - 1 - 9
    assert "has 8 prompts, expected 9" in caplog.text and "149 subjects, expected 150" in caplog.text
    with pytest.raises(ValueError, match=r"149 subjects, expected 150.*1340 cases, expected 1350.*drop --strict"):
        build_single_cases(SingleBenchConfig(pool=str(root), strict=True))


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
    for argv in (["eval", "bench-single", "--pool", str(dreambench), "--out", str(tmp_path / "s.jsonl"), "--strict"],
                 ["eval", "bench-multi", "--pool", str(pool), "--out", str(tmp_path / "m.jsonl")]):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "1350 DreamBench++ cases" in out and "888 DynaIP-Bench cases" in out and "642 two-subject, 246 three" in out
    assert len(read_cases(tmp_path / "m.jsonl")) == 888
