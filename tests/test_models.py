"""Every model loads from a local path through the loader a real checkpoint uses, and runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from dynaip.models import CheckpointError, ModelsConfig


def test_flux_pipeline_loads_with_plain_diffusers(tiny_models):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_models.flux, local_files_only=True)
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    assert pipe.transformer.config.num_layers == 1 and pipe.transformer.config.num_single_layers == 2


def test_flux_components_forward(tiny_models):
    from dynaip.models.flux import load_flux_pipeline

    pipe = load_flux_pipeline(tiny_models.flux)
    # both text encoders through the pipeline's own prompt encoding
    prompt_embeds, pooled, text_ids = pipe.encode_prompt("a photo of a dog", prompt_2=None, max_sequence_length=32)
    assert prompt_embeds.shape == (1, 32, 32) and pooled.shape == (1, 32) and text_ids.shape == (32, 3)
    assert torch.isfinite(prompt_embeds).all() and torch.isfinite(pooled).all()
    # VAE encode/decode at 64x64: latents are /8
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    lat = pipe.vae.encode(img).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    assert lat.shape == (1, 4, 8, 8)
    rec = pipe.vae.decode(lat).sample
    assert rec.shape == img.shape and torch.isfinite(rec).all()
    # transformer on packed latents: (B, (H/2)*(W/2), C*4)
    packed = pipe._pack_latents(lat, 1, 4, 8, 8)
    img_ids = pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
    out = pipe.transformer(
        hidden_states=packed,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled,
        timestep=torch.tensor([0.5]),
        img_ids=img_ids,
        txt_ids=text_ids,
        guidance=torch.tensor([3.5]),
        return_dict=False,
    )[0]
    assert out.shape == packed.shape == (1, 16, 16) and torch.isfinite(out).all()


def test_clip_vision_hidden_states(tiny_models):
    from dynaip.models.clip_vision import load_clip_vision

    tower = load_clip_vision(tiny_models.clip_vision, layers=tiny_models.clip_vision.layers)
    x = tower.normalize(torch.rand(2, 3, tower.image_size, tower.image_size))
    hs = tower(x)
    assert len(hs) == 3
    for h in hs:
        assert h.shape == (2, 1 + (56 // 14) ** 2, 32) and torch.isfinite(h).all()
    # the last requested layer is the tower's last block: different layers give different states
    assert not torch.allclose(hs[0], hs[2])
    with pytest.raises(ValueError, match="out of range"):
        load_clip_vision(tiny_models.clip_vision, layers=(2, 4, 7))


def test_grounding_dino_detects_on_one_image(tiny_models):
    from skimage import data

    from dynaip.models.grounding_dino import GroundingDinoDetector, load_grounding_dino, normalize_caption

    det = GroundingDinoDetector(load_grounding_dino(tiny_models.grounding_dino), size=128, max_size=192)
    image = data.astronaut()[::4, ::4]  # (128, 128, 3) uint8
    raw = det.model(
        __import__("groundingdino.util.misc", fromlist=["x"]).nested_tensor_from_tensor_list([det._prepare(image)]),
        captions=[normalize_caption("person . face")],
    )
    n_tokens = len(det.tokenizer(normalize_caption("person . face"))["input_ids"])
    assert raw["pred_boxes"].shape == (1, 20, 4) and torch.isfinite(raw["pred_boxes"]).all()
    # logits beyond the caption's tokens are -inf by design; the caption's own are finite
    assert torch.isfinite(raw["pred_logits"][..., :n_tokens]).all()
    dets = det.detect([image, image[:100]], ["person . face", "person"], box_threshold=0.0, text_threshold=0.0)
    assert len(dets) == 2 and len(dets[0]) > 0
    for d in dets[0]:
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128 and d.phrase in ("person", "face")
    assert normalize_caption(["Dog", " Cat. "]) == "dog . cat ."


def test_sam_segments_from_box(tiny_models):
    from skimage import data

    from dynaip.models.sam import SamBoxSegmenter, load_sam

    seg = SamBoxSegmenter(load_sam(tiny_models.sam))
    image = data.chelsea()  # (300, 451, 3)
    (masks, scores), (empty, _) = seg.segment([image, image], [np.array([[50, 40, 300, 250]]), np.zeros((0, 4))])
    assert masks.shape == (1, 300, 451) and masks.dtype == bool and scores.shape == (1,)
    assert np.isfinite(scores).all() and empty.shape == (0, 300, 451)


def test_full_size_meta_parameter_counts():
    from dynaip.models.clip_vision import build_clip_vision_meta
    from dynaip.models.flux import build_flux_transformer_meta

    flux = sum(p.numel() for p in build_flux_transformer_meta().parameters())
    vit = sum(p.numel() for p in build_clip_vision_meta("ViT-L-14-336").parameters())
    assert 11.8e9 < flux < 12.0e9, flux  # FLUX.1-dev: 11.9B
    assert 0.29e9 < vit < 0.31e9, vit  # ViT-L/14-336 vision tower: 0.30B


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_tiny_checkpoints_are_byte_identical_for_a_seed(tiny_models_yaml, tmp_path):
    from dynaip.models.tiny import write_tiny_checkpoints

    again = write_tiny_checkpoints(tmp_path / "again")
    assert _tree_digest(tiny_models_yaml.parent) == _tree_digest(again.parent)
    # weights are tensors only: every .pth loads with weights_only=True
    for pth in again.parent.rglob("*.pth"):
        torch.load(pth, weights_only=True)


def test_missing_and_corrupt_checkpoints_give_one_clear_line(tiny_models, tmp_path):
    from dataclasses import replace

    from dynaip.models.clip_vision import load_clip_vision
    from dynaip.models.flux import load_flux_pipeline
    from dynaip.models.sam import load_sam

    with pytest.raises(CheckpointError, match=r"FLUX.1-dev: cannot load .*directory does not exist.*tiny-checkpoints"):
        load_flux_pipeline(tmp_path / "nope")
    bad = tmp_path / "sam.pth"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match=r"SAM \(tiny\).*corrupt") as e:
        load_sam(replace(tiny_models.sam, checkpoint=str(bad)))
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="do not match the configured architecture"):
        load_sam(replace(tiny_models.sam, variant="vit_b"))
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_sam(replace(tiny_models.sam, checkpoint=str(tmp_path / "empty.pth")))
    with pytest.raises(CheckpointError, match="open_clip_config.json is missing"):
        load_clip_vision(replace(tiny_models.clip_vision, path=str(tmp_path)))


def test_models_yaml_resolves_relative_paths(tiny_models_yaml):
    cfg = ModelsConfig.from_yaml(tiny_models_yaml)
    assert Path(cfg.flux).is_dir() and Path(cfg.sam.checkpoint).is_file()
    assert cfg.clip_vision.layers == (2, 4, 6)
    assert Path(cfg.captioner).is_dir() and Path(cfg.aesthetic.path).is_file() and cfg.aesthetic.clip is None
    other = ModelsConfig.from_dict(
        {"flux": "f", "clip_vision": "c", "aesthetic": {"path": "h.safetensors", "clip": "l14"}}, base="/ckpt"
    )
    assert (other.aesthetic.path, other.aesthetic.clip.path) == ("/ckpt/h.safetensors", "/ckpt/l14")
    with pytest.raises(
        ValueError, match=r"unknown key 'aesthetic\.weights' \(keys of 'aesthetic': activation, clip, path\)"
    ):
        ModelsConfig.from_dict({"flux": "f", "clip_vision": "c", "aesthetic": {"weights": "h"}})
    with pytest.raises(FileNotFoundError, match="tiny-checkpoints"):
        ModelsConfig.from_yaml(tiny_models_yaml.parent / "missing.yaml")
