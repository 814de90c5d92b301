"""``benchmarks/bench_scale.py`` as shipped, at sizes a test affords: every switch it takes, and the report
it writes (medians of ``--repeats`` runs, the growth from size to size, the reader's one read per shard)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
