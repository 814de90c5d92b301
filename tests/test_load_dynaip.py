"""diffusers-style loading (issue #17 item 5): load_dynaip / unload_dynaip on a FluxPipeline the user holds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from test_inference import CALL, _arr, _trained_like


@pytest.fixture(scope="module")
def flux(tiny_models):
    from dynaip.models.flux import load_flux_pipeline

    return load_flux_pipeline(tiny_models.flux)


@pytest.fixture(scope="module")
def checkpoint(tiny_models, flux, tmp_path_factory):
    """A trained-like adapter whose config.json names the CLIP tower (as the trainer writes it)."""
    from dataclasses import asdict

    from dynaip import DynaIPAdapter
    from dynaip.inference import adapter_config_for
    from dynaip.models.clip_vision import load_clip_vision

    tower = load_clip_vision(tiny_models.clip_vision, layers=tiny_models.clip_vision.layers)
    adapter = _trained_like(DynaIPAdapter(adapter_config_for(flux.transformer, tower)))
    named = adapter.save_pretrained(tmp_path_factory.mktemp("ad") / "named", clip_vision=asdict(tiny_models.clip_vision))
    bare = adapter.save_pretrained(tmp_path_factory.mktemp("ad") / "bare")
    return named, bare


def _plain(flux, seed=3):
    return _arr(flux("a cat", generator=torch.Generator().manual_seed(seed), **CALL).images[0])


def test_load_then_unload_restores_bit_identical_outputs(flux, checkpoint, tiny_models):
    from dynaip import load_dynaip, unload_dynaip

    named, bare = checkpoint
    ref = Image.fromarray(data.chelsea())
    before = _plain(flux)
    processors = dict(flux.transformer.attn_processors)
    hooks = (len(flux.transformer._forward_pre_hooks), len(flux.transformer._forward_hooks))

    dyn = load_dynaip(flux, named)  # the tower named in the checkpoint's config.json
    assert flux.dynaip is dyn and dyn.flux is flux
    assert json.loads((named / "config.json").read_text())["clip_vision"]["path"] == tiny_models.clip_vision.path
    assert np.array_equal(_plain(flux), before)  # loaded but no references: the plain pipeline
    assert np.array_equal(_arr(dyn("a cat", references=[ref], scale=0.0, seed=3, **CALL).images[0]), before)
    with_ref = _arr(dyn("a cat", references=[ref], seed=3, **CALL).images[0])
    assert not np.array_equal(with_ref, before)
    with pytest.raises(ValueError, match="already has a DynaIP adapter"):
        load_dynaip(flux, named)

    unload_dynaip(flux)
    assert not hasattr(flux, "dynaip")
    assert flux.transformer.attn_processors == processors  # the very same processor objects
    assert (len(flux.transformer._forward_pre_hooks), len(flux.transformer._forward_hooks)) == hooks
    assert np.array_equal(_plain(flux), before)
    with pytest.raises(ValueError, match="no DynaIP adapter is loaded"):
        unload_dynaip(flux)

    # a checkpoint that names no tower: the caller names one (a path), with the same result
    with pytest.raises(ValueError, match="no CLIP vision tower"):
        load_dynaip(flux, bare)
    dyn = load_dynaip(flux, bare, clip_vision=tiny_models.clip_vision.path)
    try:
        assert np.array_equal(_arr(dyn("a cat", references=[ref], seed=3, **CALL).images[0]), with_ref)
    finally:
        dyn.unload()
    assert np.array_equal(_plain(flux), before)


def test_load_dynaip_bad_inputs(flux, checkpoint, tmp_path):
    from dynaip import load_dynaip

    with pytest.raises(ValueError, match="needs a diffusers FluxPipeline"):
        load_dynaip(object(), checkpoint[0])
    with pytest.raises(FileNotFoundError, match="is not a DynaIP adapter checkpoint"):
        load_dynaip(flux, tmp_path)
    with pytest.raises(ValueError, match="clip_vision needs 'path'"):
        load_dynaip(flux, checkpoint[1], clip_vision={"where": "x"})
    assert not hasattr(flux, "dynaip")
