"""benchmarks/gpu_suite.py: one line and status 1 without a GPU; --smoke runs every part on tiny sizes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path, capsys):
    import gpu_suite

    assert gpu_suite.main(["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU" in err
    assert not list(tmp_path.iterdir())


def test_smoke_run_covers_every_part(tmp_path):
    import gpu_suite

    assert gpu_suite.main(["--out", str(tmp_path), "--smoke", "--repeats", "1", "--profile"]) == 0
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["smoke"] is True
    assert [(r["batch_per_rank"], r["blocks_recomputed"]) for r in report["train"]] == [
        (1, 3),
        (2, 3),
        (2, 2),
        (2, 2),
        (1, 0),
    ]
    assert all(r["seconds_per_step"] > 0 and r["model_tflop_per_step"] > 0 for r in report["train"])
    assert set(report["generate"]["ratio_to_bare"]) == {"bare", "1 subject", "2 subjects", "3 subjects"}
    cur = report["curate"]  # benchmarks/gpu_curate.py: fp32 then bf16 (autocast on the CPU), agreement, e2e
    assert [(r["precision"], r["batch"]) for r in cur["models"]] == [("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)]
    assert all(0.5 < r["mask_iou_vs_fp32"] <= 1 and r["box_match_vs_fp32"] is not None for r in cur["models"][2:])
    assert cur["limit"]["detect_tflop_per_image"] > 0 and cur["limit"]["segment_tflop_per_image"] > 0
    assert [(r["prefetch"], r["inputs"]) for r in cur["end_to_end"]] == [(1, 4), (0, 4)]
    assert all(r["images_per_s"] > 0 for r in cur["end_to_end"])
    assert [r["batch"] for r in report["precompute"]] == [1, 2] and report["precompute"][0]["samples_per_s"] > 0
    assert "SMOKE RUN" in (tmp_path / "gpu_suite.md").read_text()
    assert (tmp_path / "train_profile.txt").stat().st_size > 0
    assert gpu_suite.main(["--out", str(tmp_path), "--smoke", "--parts", "nope"]) == 2


def test_smoke_lowmem_and_synth(tmp_path):
    """The low-memory part (docs/low_memory.md's modes): every mode that a CPU can run produces a whole
    generation; sequential offload is recorded as skipped with its reason, never silently missing. The
    synth part times the generate stage's FLUX call."""
    import gpu_suite

    assert gpu_suite.main(["--out", str(tmp_path), "--smoke", "--parts", "lowmem,synth", "--repeats", "1"]) == 0
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["synth"]["diptychs_per_minute"] > 0 and (report["synth"]["width"], report["synth"]["height"]) == (
        64,
        32,
    )
    modes = report["lowmem"]["modes"]
    assert list(modes) == list(gpu_suite.LOWMEM_MODES)
    for name in ("full", "model offload", "int8", "int8 + model offload"):
        assert modes[name]["seconds_per_generation"] > 0, (name, modes[name])
    assert "CUDA" in modes["sequential offload"]["skipped"]
    assert "| int8 + model offload |" in (tmp_path / "gpu_suite.md").read_text()


def test_smoke_compile_generate_and_the_attention_probe(tmp_path):
    """Issue #28's parts (benchmarks/gpu_compile.py): ``--compile`` generation eager and compiled (the
    timed loop never recompiles), and one SDPA backend probe as ``--parts attention`` runs it per backend.
    The compiled training rows run the same code on the GPU (``--parts train --compile``); on the CPU their
    tracing is covered by tests/test_compile.py."""
    import gpu_compile
    import gpu_suite

    assert (
        gpu_suite.main(["--out", str(tmp_path), "--smoke", "--parts", "generate", "--compile", "--repeats", "1"]) == 0
    )
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    gen = report["generate"]
    assert report["compile_backend"] == "aot_eager"
    for mode in ("eager", "compiled"):
        assert set(gen[mode]["ratio_to_bare"]) == {"bare", "1 subject", "2 subjects", "3 subjects"}
        assert gen[mode]["graphs_compiled_while_timing"] == 0
    assert "| 3 subjects |" in (tmp_path / "gpu_suite.md").read_text()
    flash = gpu_compile.probe_attention("flash", smoke=True, repeats=1)
    assert flash["check"] == "passed" and flash["seconds_fwd_bwd"] > 0
    assert "RuntimeError" in gpu_compile.probe_attention("efficient", smoke=True, repeats=1)["check"]  # CUDA only
