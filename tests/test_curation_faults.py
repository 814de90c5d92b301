"""Crash safety of the local curation executor: three SIGKILLs at random points of a run, each
followed by a resume, end in the same bytes as an uninterrupted run (benchmarks/faults.py; the
20-kill figures are in BENCHMARKS.md, "Fault injection — curation (#19)")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_three_kills_then_resume_give_the_uninterrupted_dataset(tmp_path):
    out = tmp_path / "faults.json"
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "faults.py"),
            "--kills",
            "3",
            "--inputs",
            "12",
            "--seed",
            "1",
            "--json",
            str(out),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert (
        r["kills_injected"] >= 3
        and r["rounds_survived"] == r["rounds"]
        and r["survived"]
        and r["bytes_lost"] == 0
        and r["unexpected_files"] == []
    )
