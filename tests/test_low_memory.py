"""Low-memory inference (issue #17 item 4): diffusers' CPU offload with the adapter following the
transformer's execution device, and a weight-quantized (int8 / fp8) frozen FLUX transformer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from test_inference import CALL, _arr, _trained_like, assert_same_image

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
H = W = 64


def _pipe(tiny_models, device="cpu"):
    from dynaip import DynaIPAdapter, load_dynaip
    from dynaip.inference import adapter_config_for
    from dynaip.models.clip_vision import load_clip_vision
    from dynaip.models.flux import load_flux_pipeline

    flux = load_flux_pipeline(tiny_models.flux).to(device)
    tower = load_clip_vision(tiny_models.clip_vision, layers=tiny_models.clip_vision.layers)
    torch.manual_seed(0)
    adapter = _trained_like(DynaIPAdapter(adapter_config_for(flux.transformer, tower)))
    return load_dynaip(flux, adapter, image_encoder=tower)


def _two(pipe, **kw):
    left = np.zeros((H, W), np.uint8)
    left[:, : W // 2] = 255
    refs = [Image.fromarray(data.chelsea()), Image.fromarray(data.astronaut())]
    return _arr(pipe("a cat and a person", references=refs, masks=[left, 255 - left], seed=3, **CALL, **kw).images[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_cpu_offload_with_the_adapter(tiny_models, mode, device):
    if mode == "sequential" and device == "cpu":
        pytest.skip(
            "accelerate's sequential offload fails inside the CLIP text encoder on a CPU-only torch "
            "(set_module_tensor_to_device); this case runs where CUDA is present"
        )
    pipe = _pipe(tiny_models, device)
    before = _two(pipe)
    getattr(pipe, f"enable_{mode}_cpu_offload")(device=device)
    assert pipe.offloaded and pipe.device.type == device
    after = _two(pipe)
    # the adapter and the CLIP tower stay on the CPU; their outputs went to the execution device
    assert all(p.device.type == "cpu" for p in pipe.adapter.parameters())
    assert all(p.device.type == "cpu" for p in pipe.image_encoder.parameters())
    if device == "cpu":
        assert_same_image(before, after)  # up to a rounding (tests/test_inference.py)
    else:
        assert np.abs(before - after).max() <= 1
    assert not np.array_equal(after, _two(pipe, scale=0.0))  # the references do act under offload


@pytest.mark.parametrize("weights", ["int8", "fp8"])
def test_quantized_frozen_base(tiny_models, weights):
    from optimum.quanto.nn import QLinear

    from dynaip import unload_dynaip
    from dynaip.inference.lowmem import quantize_transformer

    pipe = _pipe(tiny_models)
    full = _two(pipe)
    quantize_transformer(pipe.flux, weights)  # after load_dynaip: the processors use the quantized projections
    assert isinstance(pipe.flux.transformer.transformer_blocks[0].attn.to_q, QLinear)
    quant = _two(pipe)
    off = _two(pipe, scale=0.0)
    assert np.abs(full.astype(int) - quant).mean() < 8  # close to the bf16/fp32 base (tiny random weights)
    assert not np.array_equal(quant, off)
    flux = pipe.flux
    unload_dynaip(flux)  # scale 0 equals the quantized plain pipeline bit for bit
    plain = _arr(flux("a cat and a person", generator=torch.Generator().manual_seed(3), **CALL).images[0])
    assert np.array_equal(off, plain)
    with pytest.raises(ValueError, match="choose one of"):
        quantize_transformer(flux, "int3")


def test_generate_cli_offload_and_quantize(tiny_models_yaml, tmp_path):
    from dynaip.cli import main

    ref = tmp_path / "cat.png"
    Image.fromarray(data.chelsea()).save(ref)
    common = [
        "generate",
        "--models",
        str(tiny_models_yaml),
        "--adapter",
        str(_adapter_dir(tiny_models_yaml, tmp_path)),
        "--prompt",
        "a cat",
        "--ref",
        str(ref),
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--seed",
        "3",
        "--max-sequence-length",
        "32",
        "--device",
        "cpu",
    ]
    base, off, quant = tmp_path / "b.png", tmp_path / "o.png", tmp_path / "q.png"
    assert main([*common, "--out", str(base)]) == 0
    assert main([*common, "--out", str(off), "--offload", "model"]) == 0
    assert main([*common, "--out", str(quant), "--quantize", "int8"]) == 0
    assert_same_image(_arr(Image.open(base)), _arr(Image.open(off)))
    assert json.loads(off.with_suffix(".json").read_text())["offload"] == "model"
    assert json.loads(quant.with_suffix(".json").read_text())["quantize"] == "int8"
    assert np.abs(_arr(Image.open(base)).astype(int) - _arr(Image.open(quant))).mean() < 8


def _adapter_dir(models_yaml, tmp_path):
    from dynaip import DynaIPAdapter, DynaIPConfig

    torch.manual_seed(0)
    return _trained_like(DynaIPAdapter(DynaIPConfig.tiny())).save_pretrained(tmp_path / "adapter")


def test_lowmem_weights_table_is_consistent():
    """docs/low_memory.md's table comes from benchmarks/lowmem_weights.py (computed from module sizes)."""
    import re
    from pathlib import Path

    from benchmarks.lowmem_weights import GIB, table

    rows = dict(table())
    assert rows["full (bf16, every model on the GPU)"] > rows["model offload (bf16)"] > rows["sequential offload"]
    assert rows["model offload, int8/fp8 transformer"] < rows["model offload (bf16)"]
    doc = (Path(__file__).resolve().parents[1] / "docs" / "low_memory.md").read_text()
    for name, b in rows.items():
        assert re.search(rf"\| {re.escape(name)} \| {b / GIB:.1f} \|", doc), name
