"""benchmarks/memory_plan.py: the per-rank memory plan (meta-device builds only, no GPU, no download)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
GB80 = 80e9 / 2**30  # "80 GB" read strictly as 80·10⁹ bytes, in GiB


def _load_script():
    spec = importlib.util.spec_from_file_location("memory_plan", ROOT / "benchmarks" / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_plan"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """Runs the script's main once, as a user would; returns (module, report, written Markdown)."""
    mp = _load_script()
    out = tmp_path_factory.mktemp("plan")
    assert mp.main(["--json", str(out / "plan.json"), "--markdown", str(out / "memory.md")]) == 0
    return mp, json.loads((out / "plan.json").read_text()), (out / "memory.md").read_text()


def _row(report: dict, strategy: str, features: bool) -> dict:
    return next(r for r in report["rows"] if r["strategy"] == strategy and r["features"] == features)


def test_rows_cover_every_strategy_with_and_without_features(plan):
    _, report, _ = plan
    got = sorted((r["strategy"], r["features"]) for r in report["rows"])
    want = sorted((s, f) for s in ("ddp", "fsdp2", "fsdp2_adapter", "fsdp2_full") for f in (True, False))
    assert got == want
    assert all(r["world"] == 8 and r["keep"] == 0 for r in report["rows"])
    assert report["batch_per_rank"] == 2


def test_recommendation_fits_under_80_gb_by_the_scripts_own_count(plan):
    mp, report, _ = plan
    rec = report["recommendation"]
    assert rec["total_gib_features"] <= report["budget_gib"] < GB80
    assert rec["total_gib_no_features"] < GB80
    # recomputed from the script's functions, not only read back from its summary
    z = mp.ModuleSizes(**report["module_sizes"])
    p = mp.make_plan(z, mp.paper_shape(), rec["strategy"], True, 8, rec["checkpoint_keep_blocks"])
    assert p.total / 2**30 == pytest.approx(rec["total_gib_features"])
    assert p.total / 2**30 < GB80


def test_ddp_without_features_needs_more_than_sharded_with_features(plan):
    _, report, _ = plan
    ddp = _row(report, "ddp", False)["total_gib"]
    assert ddp > _row(report, "fsdp2_full", True)["total_gib"]
    assert ddp > _row(report, "fsdp2_adapter", True)["total_gib"]
    # and without any checkpointing DDP does not fit at all
    no_ckpt = next(k for k in report["largest_keep"] if k["strategy"] == "ddp" and not k["features"])
    assert no_ckpt["no_checkpointing_gib"] > report["card_gib"]


def test_world_size_1_prediction_is_close_to_the_h100_measurements(plan):
    _, report, _ = plan
    assert len(report["world1"]) == 5
    for w in report["world1"]:
        assert abs(w["predicted_gib"] - w["measured_gib"]) < 2.0, w


def test_paper_yaml_follows_the_recommendation(plan):
    _, report, _ = plan
    rec = report["recommendation"]
    raw = yaml.safe_load((ROOT / "jobs" / "configs" / "paper.yaml").read_text())
    cfg, data = raw["parallel"], raw["data"]
    assert cfg["strategy"] == rec["strategy"]
    assert cfg["gradient_checkpointing"] == rec["gradient_checkpointing"]
    assert cfg["checkpoint_keep_blocks"] == rec["checkpoint_keep_blocks"]
    assert cfg["workers"] == report["world"] and data["global_batch_size"] // cfg["workers"] == report["batch_per_rank"]


def test_docs_memory_md_is_what_the_script_writes(plan):
    _, _, markdown = plan
    assert (ROOT / "docs" / "memory.md").read_text() == markdown, (
        "docs/memory.md is stale: python benchmarks/memory_plan.py --markdown docs/memory.md"
    )
