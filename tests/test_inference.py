"""DynaIPFluxPipeline and `dynaip generate` with the tiny checkpoints."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

H = W = 64
CALL = dict(num_inference_steps=2, height=H, width=W, max_sequence_length=32)


def _trained_like(adapter, seed: int = 7):
    """A fresh adapter changes nothing (zero-init V); give V weights so references have an effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "to_v" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return adapter


@pytest.fixture(scope="module")
def pipe(tiny_models):
    from dynaip import DynaIPAdapter, DynaIPFluxPipeline  # the public API contract

    p = DynaIPFluxPipeline.from_local(tiny_models, with_auto_mask=True)
    fresh = p.adapter
    fresh.detach(p.flux.transformer)
    adapter = _trained_like(DynaIPAdapter(fresh.config))
    return DynaIPFluxPipeline(p.flux, adapter, p.image_encoder, detector=p.detector, segmenter=p.segmenter)


@pytest.fixture(scope="module")
def refs():
    return [Image.fromarray(data.chelsea()), Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    """Two pipelines loaded separately give the same picture up to rounding: oneDNN/MKL's CPU kernels
    may sum in a different order depending on where a tensor landed in memory, which moves a value
    across a .5 boundary now and then. At most 1 level on at most 0.1% of the values; anything real
    (another seed, scale, mask) changes thousands of values by far more."""
    assert a.shape == b.shape
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (int(diff.max()), int((diff > 0).sum()))


def _plain(pipe, seed: int) -> np.ndarray:
    """Plain diffusers FluxPipeline with the adapter detached."""
    pipe.adapter.detach(pipe.flux.transformer)
    try:
        return _arr(pipe.flux("a cat", generator=torch.Generator().manual_seed(seed), **CALL).images[0])
    finally:
        pipe.adapter.attach(pipe.flux.transformer)


def test_scale_zero_reproduces_plain_flux_and_references_matter(pipe, refs):
    plain = _plain(pipe, seed=3)
    zero = _arr(pipe("a cat", references=[refs[0]], scale=0.0, seed=3, **CALL).images[0])
    assert np.array_equal(plain, zero)
    full = _arr(pipe("a cat", references=[refs[0]], scale=1.0, seed=3, **CALL).images[0])
    assert not np.array_equal(plain, full)


def test_same_seed_same_image_and_seed_matters(pipe, refs):
    a = _arr(pipe("a cat", references=[refs[0]], seed=5, **CALL).images[0])
    b = _arr(pipe("a cat", references=[refs[0]], seed=5, **CALL).images[0])
    c = _arr(pipe("a cat", references=[refs[0]], seed=6, **CALL).images[0])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_granularity_changes_the_image(pipe, refs):
    low = _arr(pipe("a cat", references=[refs[0]], granularity=(1, 0, 0), seed=5, **CALL).images[0])
    high = _arr(pipe("a cat", references=[refs[0]], granularity=(0, 0, 1), seed=5, **CALL).images[0])
    assert not np.array_equal(low, high)


def _bands(n: int) -> list[np.ndarray]:
    out = []
    for i in range(n):
        m = np.zeros((H * 2, W * 2), np.uint8)  # any size with the output's aspect ratio
        m[:, i * (2 * W) // n : (i + 1) * (2 * W) // n] = 255
        out.append(m)
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_multi_subject_with_masks(pipe, refs, n):
    out = pipe(
        "a cat and a person",
        references=refs[:n],
        masks=[Image.fromarray(m) for m in _bands(n)],
        scale=[1.0] * n,
        seed=1,
        **CALL,
    )
    assert len(out.masks) == n and out.images[0].size == (W, H)
    for m in out.masks:
        assert m.shape == (H, W) and set(m.unique().tolist()) <= {0.0, 1.0}
    # masks partition the image, so every token is conditioned: the image differs from no references
    assert not np.array_equal(_arr(out.images[0]), _arr(pipe("a cat and a person", seed=1, **CALL).images[0]))


def test_auto_mask_end_to_end(pipe, refs):
    # tiny random detector: thresholds at 0 so it returns boxes; real runs keep 0.35 / 0.25
    out = pipe(
        "a cat and a person",
        references=refs[:2],
        auto_mask=["cat", "person"],
        box_threshold=0.0,
        text_threshold=0.0,
        seed=2,
        **CALL,
    )
    assert len(out.masks) == 2
    for m in out.masks:
        assert m.shape == (H, W) and m.sum() > 0
    assert out.settings["auto_mask"] == ["cat", "person"]


def test_lora_with_adapter(pipe, refs, tmp_path):
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = pipe.flux.transformer
    before = _arr(pipe("a cat", references=[refs[0]], seed=4, **CALL).images[0])
    transformer.add_adapter(
        LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"]),
        adapter_name="tmp",
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    lora_sd = get_peft_model_state_dict(transformer, adapter_name="tmp")
    transformer.delete_adapters("tmp")
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=lora_sd)
    pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors", adapter_name="test_lora")
    try:
        with_lora = _arr(pipe("a cat", references=[refs[0]], seed=4, **CALL).images[0])
    finally:
        pipe.flux.unload_lora_weights()
    assert not np.array_equal(before, with_lora)
    assert np.array_equal(before, _arr(pipe("a cat", references=[refs[0]], seed=4, **CALL).images[0]))


def test_bad_inputs_fail_before_compute(pipe, refs, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="reference 1 .* not a readable image"):
        pipe("x", references=[bad], **CALL)
    with pytest.raises(ValueError, match="aspect"):
        pipe("x", references=refs[:2], masks=[np.ones((64, 128), np.uint8) * 255] * 2, **CALL)
    with pytest.raises(ValueError, match="mask 2 is empty"):
        pipe("x", references=refs[:2], masks=[np.ones((64, 64), np.uint8) * 255, np.zeros((64, 64), np.uint8)], **CALL)
    with pytest.raises(ValueError, match="got 1 masks for 2 references"):
        pipe("x", references=refs[:2], masks=[np.ones((64, 64), np.uint8)], **CALL)
    with pytest.raises(ValueError, match="2 references need one mask each"):
        pipe("x", references=refs[:2], **CALL)
    with pytest.raises(ValueError, match="got 3 scale values for 2 references"):
        pipe("x", references=refs[:2], masks=_bands(2), scale=[1, 1, 1], **CALL)


def test_generate_cli_writes_png_and_sidecar(pipe, tiny_models_yaml, refs, tmp_path):
    from dynaip.cli import main

    ckpt = tmp_path / "adapter"
    pipe.adapter.save_pretrained(ckpt)
    ref = tmp_path / "cat.jpg"
    refs[0].save(ref)
    out = tmp_path / "gen" / "cat.png"
    rc = main(
        [
            "generate",
            "--models",
            str(tiny_models_yaml),
            "--adapter",
            str(ckpt),
            "--prompt",
            "a cat",
            "--ref",
            str(ref),
            "--out",
            str(out),
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
            "--granularity",
            "1,0,0",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    img = Image.open(out)
    assert img.size == (64, 64)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["seed"] == 3 and side["granularity"] == [1.0, 0.0, 0.0] and side["branches"] == "image"
    # the CLI's image equals the API's for the same settings
    api = pipe("a cat", references=[ref], granularity=(1, 0, 0), seed=3, **CALL).images[0]
    assert_same_image(_arr(img), _arr(api))


def test_generate_cli_writes_the_format_its_out_names_and_refuses_others(
    pipe, tiny_models_yaml, refs, tmp_path, caplog
):
    from dynaip.cli import main

    ckpt = tmp_path / "adapter"
    pipe.adapter.save_pretrained(ckpt)
    ref = tmp_path / "cat.png"
    refs[0].save(ref)
    args = [
        "generate",
        "--models",
        str(tiny_models_yaml),
        "--adapter",
        str(ckpt),
        "--prompt",
        "a cat",
        "--ref",
        str(ref),
        "--steps",
        "1",
        "--height",
        "64",
        "--width",
        "64",
        "--max-sequence-length",
        "32",
        "--device",
        "cpu",
    ]
    for name, fmt in (("x.jpg", "JPEG"), ("x.JPEG", "JPEG"), ("x.webp", "WEBP")):
        assert main([*args, "--out", str(tmp_path / name)]) == 0
        assert Image.open(tmp_path / name).format == fmt  # bytes of the format the name says
    sidecar = (tmp_path / "x.json").read_text()
    for bad in ("x.json", "x", "x.gif"):
        caplog.clear()
        assert main([*args, "--out", str(tmp_path / bad)]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "is not an image format generate writes" in errors[0]
    # a full disk (issue #26): one line naming the image, nothing of it left; x.png then writes as before
    import errno
    import os

    from dynaip import atomic

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    caplog.clear()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(atomic.os, "fsync", full)
        assert main([*args, "--out", str(tmp_path / "full.png")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"cannot write {tmp_path / 'full.png'}: no space left" in errors[0], errors
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("full", ".full"))]
    assert (tmp_path / "x.json").read_text() == sidecar  # the sidecar was not overwritten by an image


BARS = re.compile(r"Loading pipeline components|Loading checkpoint shards|\d+it/s\]|s/it\]|\|[█▏▎▍▌▋▊▉ ]*\| \d+/\d+")
"""diffusers' / transformers' loading and step bars (tqdm's ``|███| 3/7 [..., 1.2it/s]``)."""
THIRD_PARTY_INFO = re.compile(r"^\S+ INFO (?!dynaip|pipeline)\S+: ", re.M)
"""A library's INFO line in the project's log format (``10:00:00 INFO matplotlib.font_manager: ...``)."""


def test_generate_console_has_no_loading_bars_or_library_info_lines(pipe, tiny_models_yaml, refs, tmp_path):
    """Issue #35: `dynaip generate` run as a user runs it (its own process, so diffusers is imported after the
    console policy is set) prints no "Loading pipeline components" bar or library INFO line. (With `-v` the
    bar is shown; that run is left out to keep the suite short: it costs a second process.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    ckpt = tmp_path / "adapter"
    pipe.adapter.save_pretrained(ckpt)
    ref = tmp_path / "cat.png"
    refs[0].resize((64, 64)).save(ref)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    env.pop("DYNAIP_VERBOSE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dynaip.cli",
            "generate",
            "--models",
            str(tiny_models_yaml),
            "--adapter",
            str(ckpt),
            "--prompt",
            "a cat",
            "--ref",
            str(ref),
            "--out",
            str(tmp_path / "cat.png"),
            "--steps",
            "1",
            "--height",
            "64",
            "--width",
            "64",
            "--max-sequence-length",
            "32",
            "--device",
            "cpu",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert f"wrote {tmp_path / 'cat.png'}" in proc.stdout
    assert BARS.search(console) is None and THIRD_PARTY_INFO.search(console) is None, console[-3000:]
