"""``benchmarks/bench_scale.py`` as shipped, at sizes a test affords: every switch it takes, and the report
it writes (medians of ``--repeats`` runs, the growth from size to size, the reader's one read per shard)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_scale  # noqa: E402


def test_bench_scale_reports_medians_and_growth(tmp_path, monkeypatch):
    out = tmp_path / "scale.json"
    argv = ["bench_scale.py", "--out", str(out), "--sizes", "400", "800", "--kinds", "object_on_white"]
    monkeypatch.setattr(sys, "argv", [*argv, "--repeats", "3", "--reader", "48:16:old"])
    monkeypatch.setattr(bench_scale, "resized_copies", lambda rng: {"copies": 0})  # the JPEG round trips: slow
    assert bench_scale.main() == 0
    report = json.loads(out.read_text())
    runs = {r["inputs"]: r for r in report["dedup"]}
    assert sorted(runs) == [400, 800] and all(r["kind"] == "object_on_white" for r in runs.values())
    for r in runs.values():
        checked = r["checked"]
        assert len(checked["cpu_seconds_each"]) == 3
        assert sorted(checked["cpu_seconds_each"])[1] == checked["cpu_seconds"]  # the median of the three
        assert checked["exact_found"] == r["planted_exact"]  # every planted exact copy
        assert len(r["phash_only"]["cpu_seconds_each"]) == 1
        close = r["distinct_flagged_closeness"]  # objects have their images kept for this
        assert close["random_distinct_pairs"]["pairs"] == 1000
        assert close["flagged_vs_their_match"]["pairs"] == checked["distinct_flagged"]
    want = round(runs[800]["checked"]["cpu_seconds"] / max(runs[400]["checked"]["cpu_seconds"], 1e-9), 1)
    assert report["dedup_growth"] == {"object_on_white 400->800": want}
    (step, figures), *more = report["dedup_interleaved"].items()  # the step's two sizes timed alternately
    assert step == "object_on_white 400->800" and not more
    small, large = figures["cpu_seconds"]
    assert small > 0 and figures["growth"] == pytest.approx(large / small, rel=0.1)
    (reader,) = report["reader"]
    assert reader["samples"] == 48 and reader["block"] == 16
    assert reader["epoch"]["opens"] == 1 and reader["epoch"]["bytes_read"] == reader["sequential_pass"]["bytes_read"]
    assert reader["epoch_old_pattern"]["opens"] > 1


def test_closeness_tells_a_one_pixel_shift_from_another_shape():
    img = np.full((3, 64, 64, 3), 255, np.uint8)
    img[0, 20:40, 20:40] = 90  # a square
    img[1, 21:41, 20:40] = 92  # the same square one pixel lower, two levels lighter
    img[2, 10:50, 30:34] = 90  # another shape
    near, far = (bench_scale.closeness(img, np.array([p])) for p in ((0, 1), (0, 2)))
    assert near["pixels_apart_pct_median_max"] == [round(100 * 40 / 4096, 2)] * 2  # two 20-pixel rows
    assert far["pixels_apart_pct_median_max"][0] > 5 * near["pixels_apart_pct_median_max"][0]
    assert near["mean_abs_diff_median_max"][0] < far["mean_abs_diff_median_max"][0]
    assert bench_scale.closeness(img, np.zeros((0, 2), np.int64)) == {"pairs": 0}


def test_bench_scale_repeated_image_finds_every_copy_of_the_one_image(tmp_path, monkeypatch):
    out = tmp_path / "scale.json"
    argv = ["bench_scale.py", "--out", str(out), "--sizes", "400", "800", "--kinds", "repeated_image"]
    monkeypatch.setattr(sys, "argv", [*argv, "--repeats", "1", "--reader", "48:16"])
    monkeypatch.setattr(bench_scale, "resized_copies", lambda rng: {"copies": 0})
    assert bench_scale.main() == 0
    for r in json.loads(out.read_text())["dedup"]:
        n, checked = r["inputs"], r["checked"]
        assert r["planted_exact"] >= n // 5 and r["planted_near"] >= n // 10  # the one image's copies and the rest
        assert checked["largest_bucket"] > n // 20  # its near copies share buckets (exact ones are collapsed first)
        assert checked["exact_found"] == r["planted_exact"] and checked["near_found"] == r["planted_near"]
        assert checked["distinct_flagged"] == 0
