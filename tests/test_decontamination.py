"""Decontamination against benchmark images: the curation stage, the manifest's record, resume identity,
the trust rules for benchmark roots and ``dynaip manifest contamination`` — model-free stages (the subject
is the whole image, as in test_curation_dedup.py) with the local executor, so these run in seconds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.recipe import Recipe
from test_curation_dedup import model_free_stages, recipe_for
from test_eval_bench import make_dreambench, make_typed_pool

COPY = "images/live_subject/animal/00.jpg"
"""Where the benchmark fixture holds its copy of an input (the first animal subject)."""


def _stages(recipe: Recipe, models=None) -> list:
    from pipeline.stages import DecontaminationStage

    s = model_free_stages(recipe)
    return s[:3] + [DecontaminationStage(recipe, models)] + s[3:]  # after compose, before caption: STAGE_ORDER's place


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """``(photos, contaminated benchmark, clean benchmark)``. The photos are four of the bundled sample
    inputs (the two motorcycle views make cross pairs);
    the benchmarks are DreamBench++ as published (``make_dreambench``, which follows yuangpeng/dreambench_plus
    ``dreambench_plus/dreambench_plus_dataset.py``: the benchmark images are ``images/**/*.jpg``, animals and
    humans under ``images/live_subject/``, mirrored by ``captions/**/*.txt``). In the contaminated one the
    first animal subject, ``images/live_subject/animal/00.jpg``, is the input ``chelsea.jpg`` resized to
    2/3 and re-encoded as JPEG at quality 70."""
    from pipeline.demo_photos import write_sample_photos

    base = tmp_path_factory.mktemp("decon")
    photos = base / "photos"
    write_sample_photos(photos, faces=0, names=["astronaut", "chelsea", "coffee", "motorcycle"])
    dirty, clean = make_dreambench(base / "dbpp"), make_dreambench(base / "dbpp_clean")
    im = Image.open(photos / "chelsea.jpg").convert("RGB")
    im.resize((im.width * 2 // 3, im.height * 2 // 3), Image.BICUBIC).save(dirty / COPY, quality=70)
    return photos, dirty, clean


@pytest.fixture(scope="module")
def plain(inputs, tmp_path_factory) -> tuple[Path, dict]:
    """``(dataset, manifest)`` of the photos curated without decontamination (off by default)."""
    from pipeline.executor_local import run_local

    recipe = recipe_for(inputs[0])
    assert recipe.decontamination.against == []
    out = tmp_path_factory.mktemp("plain") / "ds"
    return out, run_local(recipe, out, None, progress=False, stages=_stages(recipe))


def _rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def test_a_resized_reencoded_copy_in_dreambench_is_rejected_naming_the_image(inputs, tmp_path):
    from pipeline.decontam import list_benchmark
    from pipeline.executor_local import run_local

    photos, dirty, clean = inputs
    recipe = recipe_for(photos, decontamination={"against": [str(dirty)], "min_similarity": None})
    out = tmp_path / "ds"
    m = run_local(recipe, out, None, progress=False, stages=_stages(recipe))
    rejects = _rejects(out)
    assert [r["id"] for r in rejects] == ["chelsea"]
    r = rejects[0]
    assert r["stage"] == "decontamination"
    assert r["reason"].startswith(
        f"contaminated: target matches benchmark image {COPY} of {os.path.realpath(dirty)} (pHash distance "
    )
    t = m["totals"]
    assert t["rejected_by_reason"] == {"decontamination: contaminated": 1} and t["accepted"] == t["inputs"] - 1 == 6
    entry = m["decontamination"]
    assert entry["benchmarks"] == [
        {
            "path": os.path.realpath(dirty),
            "layout": "dreambench++",
            "files": 150,
            "sha256": list_benchmark(dirty).sha256,
            "removed": 1,
        }
    ]
    assert entry["checks"] == {"max_distance": 12, "hash_size": 16, "max_thumb_diff": 10.0, "min_similarity": None}
    assert m["recipe"]["decontamination"]["against"] == [str(dirty)]
    from dynaip.dataset.inspect import show

    assert (
        f"  {os.path.realpath(dirty)}  (dreambench++, 150 images, sha256 {entry['benchmarks'][0]['sha256'][:16]}): "
        "1 inputs removed" in show(out).splitlines()
    )

    # resume identity: where the benchmark lies is not part of the recipe hash, its content is part of every
    # chunk's fingerprint — resumed against the clean benchmark, every chunk is rebuilt and chelsea is kept
    other = recipe_for(photos, decontamination={"against": [str(clean)], "min_similarity": None})
    assert other.recipe_hash == recipe.recipe_hash != recipe_for(photos).recipe_hash
    m2 = run_local(other, out, None, progress=False, stages=_stages(other))
    assert m2["totals"]["rejected"] == 0 and m2["decontamination"]["benchmarks"][0]["removed"] == 0
    assert m2["decontamination"]["benchmarks"][0]["sha256"] != entry["benchmarks"][0]["sha256"]


def test_contamination_command_finds_the_same_in_a_dataset_curated_without_it(inputs, plain, tmp_path, capsys):
    from dynaip.cli import main

    photos, dirty, clean = inputs
    out, manifest = plain
    totals = manifest["totals"]
    assert totals["rejected"] == 0 and "decontamination" not in manifest
    from dynaip.dataset.inspect import show

    assert "decontamination: none (no benchmark was checked; see `dynaip manifest contamination`)" in show(out)
    capsys.readouterr()
    assert main(["manifest", "contamination", str(out), "--against", str(dirty), "--against", str(clean)]) == 1
    lines = capsys.readouterr().out.splitlines()
    hits = [ln for ln in lines if ln.startswith("CONTAMINATED")]
    assert hits and all(ln.startswith("CONTAMINATED folder-chelsea-0 ") for ln in hits)
    assert (
        f"CONTAMINATED folder-chelsea-0 tgt.jpg (source id chelsea): {COPY} of {os.path.realpath(dirty)} (pHash "
        "distance" in "\n".join(hits)
    )
    assert lines[-1].startswith(
        f"{out}: 1 of {totals['samples']} samples match benchmark images ({os.path.realpath(dirty)}: 1, "
        f"{os.path.realpath(clean)}: 0); 300 benchmark images of 2 benchmark(s)"
    )
    # --recipe: the thresholds of its decontamination section (an exact-copy pHash finds no resized copy): exit 0
    strict = tmp_path / "strict.yaml"
    strict.write_text(
        json.dumps(
            {
                "source": {"kind": "folder", "root": str(photos)},
                "decontamination": {"max_distance": 0, "min_similarity": None},
            }
        )
    )
    assert main(["manifest", "contamination", str(out), "--against", str(dirty), "--recipe", str(strict)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: 0 of {totals['samples']} samples match")


def test_embedding_check_finds_a_crop_that_phash_misses(inputs, plain, tmp_path, tiny_models, tiny_models_yaml, capsys):
    """A 3 %-border crop of an input (re-encoded) is 38 pHash bits away; the image embedding still finds it.
    The threshold is fitted to the tiny random-weight OpenCLIP tower: the crop scores 0.998 with its original
    and at most 0.975 with the other inputs (two distinct inputs reach 0.993 with each other); the shipped
    default 0.95 is for real weights."""
    from dynaip.cli import main
    from pipeline.decontam import BenchmarkIndex, list_benchmarks
    from pipeline.executor_local import run_local

    photos, _, _ = inputs
    bench = tmp_path / "crops"
    bench.mkdir()
    im = Image.open(photos / "chelsea.jpg").convert("RGB")
    im.crop((10, 8, im.width - 10, im.height - 8)).save(bench / "cat.jpg", quality=85)
    recipe = recipe_for(photos, decontamination={"against": [str(bench)], "min_similarity": 0.99})
    out = tmp_path / "ds"
    m = run_local(recipe, out, tiny_models, progress=False, stages=_stages(recipe, tiny_models))
    assert [(r["id"], r["stage"]) for r in _rejects(out)] == [("chelsea", "decontamination")]
    assert (
        "matches benchmark image cat.jpg of " in _rejects(out)[0]["reason"]
        and "(embedding cosine 0.99" in _rejects(out)[0]["reason"]
    )
    assert m["decontamination"]["benchmarks"][0]["layout"] == "folder"
    # without the embedding the crop is no copy
    phash_only = BenchmarkIndex.build(
        list_benchmarks([str(bench)]), max_distance=12, hash_size=16, max_thumb_diff=10.0, min_similarity=None
    )
    assert phash_only.match([np.asarray(im)]) == [None]
    # the report with --models (and the recipe's threshold)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(
        json.dumps({"source": {"kind": "folder", "root": str(photos)}, "decontamination": {"min_similarity": 0.99}})
    )
    capsys.readouterr()
    assert (
        main(
            [
                "manifest",
                "contamination",
                str(plain[0]),
                "--against",
                str(bench),
                "--recipe",
                str(cfg),
                "--models",
                str(tiny_models_yaml),
            ]
        )
        == 1
    )
    hits = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("CONTAMINATED")]
    assert hits and {ln.split()[1] for ln in hits} == {"folder-chelsea-0"} and "embedding cosine" in hits[0]


def test_benchmark_layouts_list_what_the_eval_readers_read(inputs, tmp_path):
    from dynaip.eval.bench_multi import read_pool
    from dynaip.eval.bench_single import SingleBenchConfig, read_single_pool
    from pipeline.decontam import list_benchmark

    _, dirty, _ = inputs
    b = list_benchmark(dirty)
    pool = read_single_pool(SingleBenchConfig(pool=str(dirty), strict=True))
    assert b.layout == "dreambench++"
    assert [f.rel for f in b.files] == sorted(
        {Path(c.subjects[0].path).resolve().relative_to(dirty.resolve()).as_posix() for c in pool.cases}
    )
    typed = make_typed_pool(tmp_path / "pool")
    p = list_benchmark(typed)
    assert p.layout == "dynaip-bench"
    assert [f.rel for f in p.files] == sorted(
        Path(s.path).relative_to(typed.resolve()).as_posix() for subjects in read_pool(typed).values() for s in subjects
    )


def test_benchmark_roots_are_read_only_inside_and_bad_sections_fail_in_one_line(inputs, tmp_path, capsys):
    from dynaip.cli import main
    from dynaip.configs import ConfigError
    from pipeline.decontam import list_benchmark

    photos, _, _ = inputs
    root = tmp_path / "bench"
    root.mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "a.png")
    (root / "notes.txt").write_text("not an image: ignored")
    assert [f.rel for f in list_benchmark(root).files] == ["a.png"]
    (root / "out.jpg").symlink_to(photos / "chelsea.jpg")
    with pytest.raises(ConfigError, match=r"out.jpg is a link to .*outside the benchmark root"):
        list_benchmark(root)
    (root / "out.jpg").unlink()
    (root / "sub").symlink_to(photos, target_is_directory=True)
    with pytest.raises(ConfigError, match="sub is a link to a folder"):
        list_benchmark(root)
    (root / "sub").unlink()
    (root / "inside.png").symlink_to(root / "a.png")  # a link that stays inside is read
    assert [f.rel for f in list_benchmark(root).files] == ["a.png", "inside.png"]
    (root / "bad.jpg").write_bytes(b"not a jpeg")
    from pipeline.decontam import BenchmarkIndex

    with pytest.raises(ConfigError, match="bad.jpg is not a readable image"):
        BenchmarkIndex.build(
            [list_benchmark(root)], max_distance=12, hash_size=16, max_thumb_diff=None, min_similarity=None
        )
    with pytest.raises(ConfigError, match="holds no image file"):
        list_benchmark(_empty(tmp_path))
    with pytest.raises(ConfigError, match="unknown key 'decontamination.againts'"):
        recipe_for(photos, decontamination={"againts": [str(root)]})
    with pytest.raises(ConfigError, match="nothing would be checked"):
        recipe_for(photos, decontamination={"against": [str(root)], "max_distance": None, "min_similarity": None})
    # a benchmark that is not there: one line, exit 2, and no output folder left behind
    rec = tmp_path / "r.yaml"
    rec.write_text(
        json.dumps(
            {"source": {"kind": "folder", "root": str(photos)}, "decontamination": {"against": ["missing_benchmark"]}}
        )
    )
    capsys.readouterr()
    assert (
        main(["curate", "--recipe", str(rec), "--out", str(tmp_path / "o"), "--executor", "local", "--no-progress"])
        == 2
    )
    assert not (tmp_path / "o").exists()
    # the stage needs clip_vision for the embedding check and says so
    from pipeline.stages import DecontaminationStage
    from pipeline.stages.common import SetupError

    with pytest.raises(SetupError, match="decontamination.min_similarity needs models.yaml 'clip_vision'"):
        DecontaminationStage(recipe_for(photos, decontamination={"against": [str(root)]}), None).embedder()


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    (d / "readme.txt").write_text("no images")
    return d


def test_the_commented_example_in_the_sa1b_recipe_loads(tmp_path):
    """manifests/sa1b.yaml ships decontamination commented out (the benchmark path is the user's); uncommented,
    it is a valid section with the defaults' values."""
    from pipeline.recipe import DecontaminationConfig

    path = Path(__file__).resolve().parents[1] / "manifests" / "sa1b.yaml"
    lines = path.read_text().splitlines()
    start = lines.index("# decontamination:")
    block = [lines[start]] + [ln for ln in lines[start + 1 :] if ln.startswith("#   ")][:5]
    text = "\n".join(lines[:start] + [ln[2:] for ln in block] + lines[start + len(block) :])
    (tmp_path / "sa1b.yaml").write_text(text)
    recipe = Recipe.from_yaml(tmp_path / "sa1b.yaml")
    dc = recipe.decontamination
    assert dc.against == ["/data/dreambench_plus"]
    assert DecontaminationConfig(against=dc.against) == dc
    assert recipe.recipe_hash != Recipe.from_yaml(path).recipe_hash


def test_matcher_settings(inputs):
    """The copy check without the thumbnail step, and with a coarser hash; an exact-copy distance misses
    a resized copy."""
    from pipeline.decontam import BenchmarkIndex, list_benchmarks

    photos, dirty, _ = inputs
    bench = list_benchmarks([str(dirty)])
    cat = np.asarray(Image.open(photos / "chelsea.jpg").convert("RGB"))
    coffee = np.asarray(Image.open(photos / "coffee.jpg").convert("RGB"))
    no_thumb = BenchmarkIndex.build(bench, max_distance=12, hash_size=16, max_thumb_diff=None, min_similarity=None)
    hit, miss = no_thumb.match([cat, coffee])
    assert miss is None and hit.rel == COPY and hit.how.startswith("pHash distance ") and "thumbnail" not in hit.how
    coarse = BenchmarkIndex.build(bench, max_distance=4, hash_size=8, max_thumb_diff=10, min_similarity=None)
    assert [m and m.rel for m in coarse.match([cat, coffee])] == [COPY, None]
    exact = BenchmarkIndex.build(bench, max_distance=0, hash_size=16, max_thumb_diff=10, min_similarity=None)
    assert exact.match([cat]) == [None]


def test_dedup_reducer_takes_map_parts_of_different_widths():
    """Found while checking decontamination on Ray: a map task whose chunks hold only intra pairs (one hash
    a row) writes narrower arrays than one with cross pairs (two); the reducer pads them, and finds what one
    map task over every row finds."""
    from pipeline import dedup

    rng = np.random.default_rng(0)
    base = [int.from_bytes(rng.bytes(32), "big") for _ in range(4)]
    thumb = [rng.bytes(192).hex() for _ in range(6)]
    intra = [
        (0, "a-0", "intra", [base[0]], [thumb[0]]),
        (1, "b-0", "intra", [base[0] ^ 1], [thumb[0]]),
        (2, "c-0", "intra", [base[1]], [thumb[1]]),
    ]
    cross = [
        (3, "d-0", "cross", [base[2], base[3]], thumb[2:4]),
        (4, "e-0", "cross", [base[2] ^ 2, base[3]], thumb[2:4]),
    ]
    parts = [dedup.partition(dedup.entries_from(rows, 16, True), 12, 16, 1)[0] for rows in (intra, cross)]
    assert parts[0]["words"].shape[1] != parts[1]["words"].shape[1]
    got = dedup.reduce_parts(parts, 12, 16, 10.0)
    assert got == dedup.dedup_arrays(dedup.entries_from(intra + cross, 16, True), 12, 16, 1, 10.0)
    assert {j: v[1] for j, v in got.items()} == {1: "a-0", 4: "d-0"}
