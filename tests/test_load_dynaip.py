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
    named = adapter.save_pretrained(
        tmp_path_factory.mktemp("ad") / "named", clip_vision=asdict(tiny_models.clip_vision)
    )
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


def fake_hub_cache(
    cache, repo_id: str, files: dict[str, bytes], commit: str = "0123456789abcdef0123456789abcdef01234567"
):
    """A Hugging Face hub cache holding one snapshot of the model repo ``repo_id``, laid out as
    huggingface_hub writes it (its docs, "Understand caching": huggingface.co/docs/huggingface_hub/guides/manage-cache):
    ``models--{owner}--{name}/blobs/<hash>`` (the files' bytes; a sha256 for LFS files, the git blob sha1 for
    the others), ``snapshots/<commit>/<file>`` (relative symlinks ``../../blobs/<hash>``) and ``refs/main``
    (the commit hash, no newline)."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, content in files.items():
        blob = (
            hashlib.sha256(content).hexdigest()
            if name.endswith(".safetensors")
            else hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        )
        (repo / "blobs" / blob).write_bytes(content)
        (snap / name).symlink_to(f"../../blobs/{blob}")
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_hub_repo_id_resolves_from_the_local_hub_cache_only(flux, checkpoint, tiny_models, tmp_path, monkeypatch):
    """``load_dynaip(pipe, "owner/name")`` and ``DynaIPAdapter.from_pretrained("owner/name")`` read the
    snapshot in the hub cache (HF_HUB_CACHE, offline); a local directory of that name wins; a repo not in
    the cache is one line saying how to download it."""
    from safetensors.torch import load_file

    from dynaip import DynaIPAdapter, load_dynaip

    named, _ = checkpoint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = fake_hub_cache(
        tmp_path / "hub", "acme/dynaip-tiny", {p.name: p.read_bytes() for p in sorted(named.iterdir())}
    )
    assert {p.name for p in snap.iterdir()} == {"adapter.safetensors", "config.json", "README.md"}
    want = load_file(str(named / "adapter.safetensors"))
    got = DynaIPAdapter.from_pretrained("acme/dynaip-tiny").state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    ref = Image.fromarray(data.chelsea())
    dyn = load_dynaip(flux, named, clip_vision=tiny_models.clip_vision.path)
    try:
        local = _arr(dyn("a cat", references=[ref], seed=3, **CALL).images[0])
    finally:
        dyn.unload()
    dyn = load_dynaip(flux, "acme/dynaip-tiny", clip_vision=tiny_models.clip_vision.path)
    try:
        assert np.array_equal(_arr(dyn("a cat", references=[ref], seed=3, **CALL).images[0]), local)
    finally:
        dyn.unload()

    # without HF_HUB_CACHE the cache is HF_HOME/hub, read when loading
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    fake_hub_cache(
        tmp_path / "home" / "hub", "acme/dynaip-tiny", {p.name: p.read_bytes() for p in sorted(named.iterdir())}
    )
    got = DynaIPAdapter.from_pretrained("acme/dynaip-tiny").state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)

    # a local directory named like the repo id is read instead of the cache
    monkeypatch.chdir(tmp_path)
    other = DynaIPAdapter(DynaIPAdapter.from_pretrained(named).config)
    other.save_pretrained(tmp_path / "acme" / "dynaip-tiny")
    mine = DynaIPAdapter.from_pretrained("acme/dynaip-tiny").state_dict()
    assert all(torch.equal(mine[k], v) for k, v in other.state_dict().items())
    assert not all(torch.equal(mine[k], want[k]) for k in want)

    with pytest.raises(
        FileNotFoundError,
        match=r"'acme/missing' is neither a local directory nor a Hugging Face repo "
        r"in the hub cache .*huggingface-cli download acme/missing",
    ):
        DynaIPAdapter.from_pretrained("acme/missing")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download acme/missing"):
        load_dynaip(flux, "acme/missing", clip_vision=tiny_models.clip_vision.path)
    assert not hasattr(flux, "dynaip")


def test_saved_adapter_has_a_model_card(checkpoint):
    """Every ``save_pretrained`` writes README.md, a model card the hub's ``ModelCard`` parses; with the
    trainer's ``training`` it names FLUX.1-dev as the base model with its license (tests/test_train.py
    checks a trainer checkpoint's card)."""
    from huggingface_hub import ModelCard

    from dynaip.adapter.card import FLUX_DEV, flux_base_model, model_card

    named, bare = checkpoint
    card = ModelCard.load(named / "README.md")
    meta = json.loads((named / "config.json").read_text())
    assert card.data.pipeline_tag == "text-to-image" and "dynaip" in card.data.tags
    assert card.data.base_model is None  # the tiny FLUX is no published model
    assert "## How to load" in card.text and "## Training" not in card.text
    assert f"| dtype | {meta['dtype']} |" in card.text and json.dumps(meta["clip_vision"], sort_keys=True) in card.text
    assert ModelCard.load(bare / "README.md").data.pipeline_tag == "text-to-image"

    dev = {
        "num_layers": 19,
        "num_single_layers": 38,
        "num_attention_heads": 24,
        "attention_head_dim": 128,
        "guidance_embeds": True,
    }
    assert flux_base_model(dev) == FLUX_DEV and flux_base_model({**dev, "guidance_embeds": False}) is None  # schnell
    training = {
        "base_model": {"path": "/ckpt/FLUX.1-dev", "hub_id": FLUX_DEV},
        "step": 10,
        "max_steps": 20,
        "stage": "intra",
        "run_id": "r1",
        "config": {"seed": 0},
        "datasets": [{"stage": "intra", "dirs": ["/data/a"], "manifests": ["sha256:" + "ab" * 32]}],
    }
    data = ModelCard(model_card(meta, 123, training)).data
    assert (data.base_model, data.license, data.license_name) == (
        FLUX_DEV,
        "other",
        "flux-1-dev-non-commercial-license",
    )
