"""ControlNet + DynaIP (issue #29, part 1) on the tiny checkpoints: diffusers' FluxControlNetPipeline
(one FluxControlNetModel, and a FluxMultiControlNetModel) with the adapter attached."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from test_inference import _trained_like, assert_same_image  # random V weights: references matter

H = W = 64
CALL = dict(num_inference_steps=1, height=H, width=W, max_sequence_length=32, guidance_scale=3.5)
# guidance_scale spelled out: FluxControlNetPipeline's default (7.0) is not FluxPipeline's (3.5), ours


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def _rgb(a: np.ndarray) -> Image.Image:
    return Image.fromarray(a).convert("RGB").resize((W, H))


@pytest.fixture(scope="module")
def controlnet_dir(tiny_models_yaml) -> Path:
    return Path(tiny_models_yaml).parent / "controlnet"


@pytest.fixture(scope="module")
def pipe(tiny_models, controlnet_dir):
    from dynaip import DynaIPAdapter, DynaIPFluxPipeline

    p = DynaIPFluxPipeline.from_local(tiny_models, controlnet=controlnet_dir)
    p.flux.set_progress_bar_config(disable=True)
    p.adapter.detach(p.flux.transformer)
    return DynaIPFluxPipeline(p.flux, _trained_like(DynaIPAdapter(p.adapter.config)), p.image_encoder)


@pytest.fixture(scope="module")
def images():
    return dict(
        cat=Image.fromarray(data.chelsea()),
        person=Image.fromarray(data.astronaut()),
        edges=_rgb(data.camera()),
        coins=_rgb(data.coins()),
    )


def _diffusers(flux, adapter, seed: int, **kwargs) -> np.ndarray:
    """diffusers' own pipeline with FLUX's own attention processors (the adapter detached)."""
    adapter.detach(flux.transformer)
    try:
        return _arr(flux("a cat", generator=torch.Generator().manual_seed(seed), **CALL, **kwargs).images[0])
    finally:
        adapter.attach(flux.transformer)


def test_tiny_controlnet_is_a_diffusers_release_directory(controlnet_dir, tiny_models):
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    assert sorted(p.name for p in controlnet_dir.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((controlnet_dir / "config.json").read_text())["_class_name"] == "FluxControlNetModel"
    net = FluxControlNetModel.from_pretrained(str(controlnet_dir))
    flux = FluxTransformer2DModel.load_config(str(Path(tiny_models.flux) / "transformer"))
    for key in ("in_channels", "num_attention_heads", "attention_head_dim", "joint_attention_dim"):
        assert net.config[key] == flux[key]
    # a trained ControlNet's zero-initialised layers are not zero any more; neither are the tiny one's
    assert net.controlnet_x_embedder.weight.abs().sum() > 0 and net.controlnet_single_blocks[0].weight.abs().sum() > 0


def test_scale_zero_is_diffusers_controlnet_bit_for_bit_and_both_conditions_matter(pipe, images):
    flux, edges = pipe.flux, images["edges"]
    assert type(flux).__name__ == "FluxControlNetPipeline"
    plain = _diffusers(flux, pipe.adapter, 3, control_image=edges, controlnet_conditioning_scale=0.8)
    zero = pipe(
        "a cat",
        references=[images["cat"]],
        scale=0.0,
        control_image=edges,
        controlnet_conditioning_scale=0.8,
        seed=3,
        **CALL,
    )
    none = pipe("a cat", control_image=edges, controlnet_conditioning_scale=0.8, seed=3, **CALL)
    assert np.array_equal(plain, _arr(zero.images[0])) and np.array_equal(plain, _arr(none.images[0]))
    assert zero.settings["num_control_images"] == 1 and zero.settings["controlnet_conditioning_scale"] == 0.8

    control = dict(control_image=edges, controlnet_conditioning_scale=0.8)
    cat = _arr(pipe("a cat", references=[images["cat"]], seed=3, **control, **CALL).images[0])
    cat_coins = _arr(
        pipe(
            "a cat",
            references=[images["cat"]],
            control_image=images["coins"],
            controlnet_conditioning_scale=0.8,
            seed=3,
            **CALL,
        ).images[0]
    )
    person = _arr(pipe("a cat", references=[images["person"]], seed=3, **control, **CALL).images[0])
    no_ref = plain
    no_control = _arr(pipe("a cat", references=[images["cat"]], seed=3, **CALL).images[0])
    assert not np.array_equal(cat, no_ref)  # the subject changes the picture under a ControlNet
    assert not np.array_equal(cat, person)  # ... and which subject matters
    assert not np.array_equal(cat, cat_coins)  # the control image changes it with the adapter on
    assert not np.array_equal(cat, no_control)  # without a control image: plain FLUX + DynaIP


def _bands(n: int, swap: bool = False) -> list[np.ndarray]:
    out = []
    for i in range(n):
        m = np.zeros((H, W), np.uint8)
        m[:, i * W // n : (i + 1) * W // n] = 255
        out.append(m)
    return out[::-1] if swap else out


def test_multi_subject_masks_apply_with_a_controlnet(pipe, images):
    refs, edges = [images["cat"], images["person"]], images["edges"]
    out = pipe("a cat and a person", references=refs, masks=_bands(2), control_image=edges, seed=1, **CALL)
    assert len(out.masks) == 2
    for m, given in zip(out.masks, _bands(2)):
        assert np.array_equal(m.numpy(), given / 255.0)
    swapped = pipe(
        "a cat and a person", references=refs, masks=_bands(2, swap=True), control_image=edges, seed=1, **CALL
    )
    alone = pipe("a cat and a person", control_image=edges, seed=1, **CALL)
    assert not np.array_equal(_arr(out.images[0]), _arr(swapped.images[0]))  # where each subject goes matters
    assert not np.array_equal(_arr(out.images[0]), _arr(alone.images[0]))
    # image CFG re-runs the transformer with the same ControlNet residuals: it composes too
    cfg = pipe(
        "a cat and a person",
        references=refs,
        masks=_bands(2),
        control_image=edges,
        image_guidance_scale=2.0,
        seed=1,
        **CALL,
    )
    assert not np.array_equal(_arr(out.images[0]), _arr(cfg.images[0]))


def test_load_dynaip_on_a_multi_controlnet_pipeline(pipe, images, controlnet_dir, tmp_path):
    """A user's FluxControlNetPipeline with a FluxMultiControlNetModel: load_dynaip attaches, λ = 0 is
    diffusers' output bit for bit, each ControlNet's scale reaches the picture."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxMultiControlNetModel

    from dynaip import load_dynaip, unload_dynaip

    ckpt = tmp_path / "adapter"
    pipe.adapter.save_pretrained(ckpt)
    # the user's own load of the release directory, twice: two ControlNets with two control images
    nets = FluxMultiControlNetModel([FluxControlNetModel.from_pretrained(str(controlnet_dir))] * 2)
    parts = {k: v for k, v in pipe.flux.components.items() if k != "controlnet"}
    user = FluxControlNetPipeline(**parts, controlnet=nets)
    user.set_progress_bar_config(disable=True)
    controls = [images["edges"], images["coins"]]
    pipe.adapter.detach(pipe.flux.transformer)  # the fixture's adapter shares this transformer
    try:
        plain = _arr(
            user(
                "a cat",
                control_image=controls,
                controlnet_conditioning_scale=[1.0, 0.5],
                generator=torch.Generator().manual_seed(4),
                **CALL,
            ).images[0]
        )
        dyn = load_dynaip(user, ckpt, image_encoder=pipe.image_encoder)
        try:
            with pytest.raises(ValueError, match="got 1 control images for 2 ControlNets"):
                dyn("a cat", control_image=controls[0], **CALL)
            with pytest.raises(ValueError, match="got 3 control scales for 2 ControlNets"):
                dyn("a cat", control_image=controls, controlnet_conditioning_scale=[1, 1, 1], **CALL)
            zero = dyn(
                "a cat",
                references=[images["cat"]],
                scale=0.0,
                control_image=controls,
                controlnet_conditioning_scale=[1.0, 0.5],
                seed=4,
                **CALL,
            )
            assert np.array_equal(plain, _arr(zero.images[0])) and zero.settings["num_control_images"] == 2
            both = dyn(
                "a cat",
                references=[images["cat"]],
                control_image=controls,
                controlnet_conditioning_scale=[1.0, 0.5],
                seed=4,
                **CALL,
            )
            first = dyn(
                "a cat",
                references=[images["cat"]],
                control_image=controls,
                controlnet_conditioning_scale=[1.0, 0.0],
                seed=4,
                **CALL,
            )
            assert not np.array_equal(_arr(both.images[0]), plain)
            assert not np.array_equal(_arr(both.images[0]), _arr(first.images[0]))  # the second ControlNet acts
        finally:
            unload_dynaip(user)
    finally:
        pipe.adapter.attach(pipe.flux.transformer)


def test_controlnet_input_errors_before_compute(pipe, images, tmp_path):
    from dynaip import DynaIPFluxPipeline

    with pytest.raises(ValueError, match="with the output's aspect ratio"):
        pipe("x", control_image=Image.new("RGB", (64, 32)), **CALL)
    with pytest.raises(ValueError, match="control image '.*' does not exist"):
        pipe("x", control_image=tmp_path / "missing.png", **CALL)
    with pytest.raises(ValueError, match="control scale"):
        pipe("x", control_image=images["edges"], controlnet_conditioning_scale=float("nan"), **CALL)
    # a pipeline without a ControlNet refuses a control image in one line
    from dynaip.inference.controlnet import make_controlnet, without_controlnet

    pipe.adapter.detach(pipe.flux.transformer)
    try:
        flux_only = DynaIPFluxPipeline(without_controlnet(pipe.flux), pipe.adapter, pipe.image_encoder)
        with pytest.raises(ValueError, match="has no ControlNet"):
            flux_only("x", control_image=images["edges"], **CALL)
        flux_only.unload()
    finally:
        pipe.adapter.attach(pipe.flux.transformer)
    from diffusers import FluxControlNetModel

    wrong = FluxControlNetModel(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=16,
        joint_attention_dim=32,
        pooled_projection_dim=32,
    )
    with pytest.raises(ValueError, match="attention_head_dim=8 but the FLUX transformer has 16"):
        make_controlnet(wrong, pipe.flux.transformer)


def _cli_errors(caplog, capsys, argv) -> list[str]:
    from dynaip.cli import main

    caplog.clear()
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_generate_cli_with_a_controlnet(pipe, images, tiny_models_yaml, controlnet_dir, tmp_path, caplog, capsys):
    from dynaip.cli import main

    ckpt = tmp_path / "adapter"
    pipe.adapter.save_pretrained(ckpt)
    ref, edges = tmp_path / "cat.png", tmp_path / "edges.png"
    images["cat"].save(ref)
    images["edges"].save(edges)
    out = tmp_path / "gen.png"
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
        "--seed",
        "3",
        "--max-sequence-length",
        "32",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    cn = ["--controlnet", str(controlnet_dir)]
    for extra, message in (
        (["--control-image", str(edges)], "need a --controlnet DIR"),
        (cn, "got 0 --control-image for 1 --controlnet"),
        ([*cn, "--control-image", str(edges), *cn], "got 1 --control-image for 2 --controlnet"),
        (["--controlnet", str(tmp_path / "nope"), "--control-image", str(edges)], "is not a directory"),
        ([*cn, "--control-image", str(tmp_path / "nope.png")], "does not exist"),
        ([*cn, "--control-image", str(edges), "--control-scale", "1,2"], "got 2 --control-scale values"),
    ):
        errors = _cli_errors(caplog, capsys, [*args, *extra])
        assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], errors
    caplog.set_level(logging.INFO)
    assert main([*args, *cn, "--control-image", str(edges), "--control-scale", "0.5"]) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["controlnet"] == [str(controlnet_dir)] and side["control_images"] == [str(edges)]
    assert side["controlnet_conditioning_scale"] == 0.5 and side["num_control_images"] == 1
    api = pipe(
        "a cat", references=[ref], control_image=edges, controlnet_conditioning_scale=0.5, seed=3, **CALL
    ).images[0]
    diff = np.abs(_arr(Image.open(out)) - _arr(api))  # two loads of the same files: equal up to rounding
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3


def test_generate_page_service_takes_optional_control_images(tiny_models_yaml, controlnet_dir, images, tmp_path):
    """What the web app's Generate page calls (dynaip serve --controlnet DIR)."""
    from dynaip.serve.generation import GenerationService

    service = GenerationService(tiny_models_yaml, None, tmp_path / "gen", device="cpu", controlnet=[controlnet_dir])
    common = dict(
        scales=[1.0],
        granularities=[None],
        masks=[None],
        phrases=[""],
        seed=2,
        steps=1,
        height=64,
        width=64,
        guidance=3.5,
        image_cfg=1.0,
        max_sequence_length=32,
    )
    with pytest.raises(ValueError, match="give 1 control scales"):
        service.generate("a cat", [images["cat"]], control_images=[images["edges"]], control_scales=[], **common)
    with pytest.raises(ValueError, match="for each of the 1 ControlNets"):
        service.generate(
            "a cat", [images["cat"]], control_images=[images["edges"], images["coins"]], control_scales=[1, 1], **common
        )
    with_control = service.generate(
        "a cat", [images["cat"]], control_images=[images["edges"]], control_scales=[0.7], **common
    )
    without = service.generate("a cat", [images["cat"]], control_images=[None], control_scales=[0.7], **common)
    assert with_control.settings["controlnet_conditioning_scale"] == 0.7
    assert with_control.settings["controlnet"] == [str(controlnet_dir)]
    saved = with_control.settings["control_images"]
    assert len(saved) == 1 and np.array_equal(_arr(Image.open(saved[0])), _arr(images["edges"]))
    assert "control_images" not in without.settings
    assert not np.array_equal(_arr(with_control.image), _arr(without.image))  # the control image reached FLUX


def test_a_bad_controlnet_directory_is_one_line(controlnet_dir, tmp_path):
    import shutil

    from dynaip.models.errors import CheckpointError
    from dynaip.models.flux import load_flux_controlnet

    broken = tmp_path / "cn"
    shutil.copytree(controlnet_dir, broken)
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    wrong = tmp_path / "unet"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((controlnet_dir / "config.json").read_text())
    for path, message in (
        (tmp_path / "none", "directory does not exist"),
        (wrong, "names 'UNet2DConditionModel'"),
        (bare, "No safetensors weights"),
        (broken, "Re-download the directory"),
    ):
        with pytest.raises(CheckpointError, match=message) as e:
            load_flux_controlnet(path)
        assert "\n" not in str(e.value) and "FLUX ControlNet: cannot load" in str(e.value)


def test_model_offload_with_a_controlnet(pipe, images):
    """diffusers' model CPU offload of the ControlNet pipeline (on the CPU here, as tests/test_low_memory.py
    does): the same picture; a call without a control image is refused in one line (the offload hooks
    belong to the ControlNet pipeline). Offload moves the weights through hooks; on the CPU a kernel may then
    sum in another order and move one value across a .5 boundary (seen: one value of 12,288 off by 1)."""
    kw = dict(references=[images["cat"]], control_image=images["edges"], seed=5, **CALL)
    before = _arr(pipe("a cat", **kw).images[0])
    pipe.enable_model_cpu_offload(device="cpu")
    try:
        assert pipe.offloaded
        assert_same_image(before, _arr(pipe("a cat", **kw).images[0]))  # up to a rounding, as two loads
        with pytest.raises(ValueError, match="CPU offload on: give control_image"):
            pipe("a cat", references=[images["cat"]], seed=5, **CALL)
    finally:
        pipe.flux.remove_all_hooks()
