"""kill -9 of a two-rank (gloo) training run, twice, then resume: the final weights equal an
uninterrupted run's bit for bit and no checkpoint is lost (benchmarks/faults_train.py runs 20+ kills)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.mark.slow  # four two-rank process starts (two kill -9s and the resumes) are what is tested
@pytest.mark.timeout(1800)  # four two-rank starts; ~10 min on a loaded 2-core machine, start-up dominated
def test_two_kills_then_resume_is_bitwise_identical(tmp_path):
    import faults_train

    result = faults_train.main(["--kills", "2", "--steps", "3", "--seed", "1", "--root", str(tmp_path)])
    assert result["injected"] == 2 and result["lost"] == 0 and result["survived"] == 2, result["events"]
    assert result["completed"] and result["weights_bitwise_equal"] and result["losses_equal"]
    assert not list((tmp_path / "faulted" / "checkpoints").glob(".*"))  # no leftovers after the last start
