"""OpenS2V-5M as the release is laid out today, through the shipped recipe (manifests/opens2v.yaml).

The fixture (tests/fixtures_sources.py, ``build_opens2v(subsets=True)``) follows the Hugging Face file tree
of BestWishYsh/OpenS2V-5M (``Jsons/``: ``mask_and_bbox/`` with some parts as ``total_partN.json.zip``,
``mask_and_bbox_High-Quality/``, ``cross_video_pairs/`` published as ``cross_video_pairs.tar``,
``gpt_video_pairs/`` and the per-part metadata files ``Jsons/total_partN.json``; ``Videos/total_partN/`` as
``*.tar.split.NNN`` pieces) and the dataset card's usage notes; docs/sources.md ("OpenS2V-5M") describes it.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

import tests.fixtures_sources as fx
from pipeline.recipe import Recipe
from pipeline.records import Reject, SourceRecord
from pipeline.sources import get_reader, opens2v
from pipeline.sources.common import SourceError

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "manifests" / "opens2v.yaml"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("opens2v-release")
    return root, fx.build_opens2v(root, subsets=True)


def read_recipe(root: Path, **options) -> tuple[list[SourceRecord], dict[str, Reject]]:
    recipe = Recipe.from_yaml(RECIPE, source_root=str(root))
    recipe.source.options.update(options)
    out = list(get_reader("opens2v")(recipe.source))
    return [r for r in out if isinstance(r, SourceRecord)], {r.id: r for r in out if isinstance(r, Reject)}


def test_shipped_recipe_finds_every_published_subset(release):
    """The shipped default reads both annotation folders (a zipped part in place); a clip published in both
    is one input (the second copy a reject saying where it was read); the metadata-only Jsons/total_partN.json
    and gpt_video_pairs/ are not read."""
    root, truth = release
    records, rejects = read_recipe(root)
    assert [r.id for r in records if r.pair == "intra"] == truth["intra"]
    assert [r.id for r in records if r.pair == "cross"] == truth["cross"]
    assert set(rejects) == set(truth["rejects"])
    for rid, word in truth["rejects"].items():
        assert word in rejects[rid].reason and "\n" not in rejects[rid].reason, (rid, rejects[rid].reason)
    dup = rejects[next(r for r in rejects if r.endswith("@mask_and_bbox_High-Quality"))]
    assert "read from there" in dup.reason and "mask_and_bbox_High-Quality" in dup.reason
    part2 = [r for r in records if r.id.startswith("total_part2/")]
    assert part2 and all(r.image.member for r in part2), "part 2's clips come from the zipped annotation file"


def test_recipe_option_subset_picks_one(release):
    root, truth = release
    records, rejects = read_recipe(root, subset="mask_and_bbox_High-Quality", cross=False)
    assert [r.id for r in records] == truth["hq"] and len(truth["hq"]) >= 2
    assert not any("@" in rid for rid in rejects)
    records, _ = read_recipe(root, subset="mask_and_bbox", cross=False)
    assert [r.id for r in records] == truth["intra"]


def test_unknown_subset_or_both_selectors_is_one_line(release):
    root, _ = release
    with pytest.raises(SourceError) as e:
        opens2v.read({"root": str(root), "subset": "mask_and_bbox_HQ"})
    msg = str(e.value)
    assert "\n" not in msg and "'mask_and_bbox_HQ'" in msg
    assert "mask_and_bbox, mask_and_bbox_High-Quality" in msg  # the folders that are subsets, named
    with pytest.raises(ValueError, match="not both"):
        opens2v.read({"root": str(root), "subset": "mask_and_bbox", "clips": "Jsons/*/total_part*.json"})


def test_no_subset_downloaded_names_what_to_get(tmp_path):
    (tmp_path / "Jsons" / "cross_video_pairs").mkdir(parents=True)
    (tmp_path / "Videos").mkdir()
    (tmp_path / "Jsons" / "total_part1.json").write_text("{}")  # metadata only: not an annotation subset
    with pytest.raises(SourceError, match=r"no annotation subset under .*Jsons/mask_and_bbox/") as e:
        opens2v.read({"root": str(tmp_path)})
    assert "\n" not in str(e.value)


def test_pair_tar_as_published_says_to_extract_it(release, tmp_path):
    """The release publishes the pair files as cross_video_pairs.tar: the shipped recipe says to extract it."""
    root, _ = release
    alt = tmp_path / "root"
    alt.mkdir()
    for name in ("Videos",):
        (alt / name).symlink_to(root / name)
    (alt / "Jsons" / "cross_video_pairs").mkdir(parents=True)
    (alt / "Jsons" / "mask_and_bbox").symlink_to(root / "Jsons" / "mask_and_bbox")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w"):
        pass
    (alt / "Jsons" / "cross_video_pairs" / "cross_video_pairs.tar").write_bytes(buf.getvalue())
    with pytest.raises(
        SourceError, match=r"holds cross_video_pairs.tar as published .*\(tar -xf cross_video_pairs.tar\)"
    ):
        read_recipe(alt)


def test_shipped_recipe_curates_the_release_shrunk(release, tiny_models, tmp_path):
    """The shipped recipe, shards shrunk and on CPU with the tiny checkpoints, curates the release layout:
    every input is a sample or a reject, and the duplicate copies are read rejects in the manifest."""
    from pipeline.executor_local import run_local

    root, truth = release
    recipe = Recipe.from_yaml(RECIPE, source_root=str(root))
    recipe.source.options.update(subset="mask_and_bbox_High-Quality", cross=False)
    recipe.shards.inputs_per_shard = 4
    recipe.filters.min_image_side = 32  # the fixture's frames are 80×56, its subjects about 40×35
    recipe.filters.min_reference_side = 16
    recipe.executor.device = "cpu"
    out = tmp_path / "ds"
    m = run_local(recipe, out, tiny_models, progress=False)
    t = m["totals"]
    read_rejects = 4  # catvid seg 0: o1 duplicate, o3 tiny, o4 background; cupvid seg 0: o2 aes_score
    assert t["inputs"] == t["accepted"] + t["rejected"] == len(truth["hq"]) + read_rejects
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sum(r["stage"] == "read" for r in rejects) == read_rejects
    assert t["accepted"] == t["samples"] == len(truth["hq"]), t["rejected_by_reason"]
