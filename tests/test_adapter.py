"""DynaIP adapter on the tiny FLUX transformer (1 double + 2 single blocks, inner 32) with random CLIP states."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from dynaip import DynaIPAdapter, DynaIPConfig
from dynaip.adapter.attention import DynaIPAttnProcessor
from dynaip.geometry import resample_mask
from dynaip.models.tiny import TINY_FLUX_TRANSFORMER_CONFIG

H = W = 64  # pixels → 4 x 4 = 16 packed image tokens
N_IMG, N_TXT, B = 16, 8, 2


@pytest.fixture(scope="module")
def transformer() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER_CONFIG).eval()


def make_inputs(seed: int = 1, batch: int = B, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(H // 16), torch.arange(W // 16), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).flatten(0, 1).float()  # (N_IMG, 3)
    return dict(
        hidden_states=torch.randn(batch, N_IMG, 16, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, N_TXT, 32, generator=g, dtype=dtype),
        pooled_projections=torch.randn(batch, 32, generator=g, dtype=dtype),
        timestep=torch.full((batch,), 0.7, dtype=dtype),
        guidance=torch.full((batch,), 3.5, dtype=dtype),
        img_ids=img_ids,
        txt_ids=torch.zeros(N_TXT, 3),
        return_dict=False,
    )


def clip_states(seed: int = 2, batch: int = B) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 17, 32, generator=g) for _ in range(3)]


def make_adapter(random_v: bool = True, seed: int = 3, **overrides) -> DynaIPAdapter:
    torch.manual_seed(seed)
    adapter = DynaIPAdapter(DynaIPConfig.tiny(**overrides)).eval()
    if random_v:  # V is zero-initialised; give it weights so CA does something measurable
        for m in adapter.modules():
            if hasattr(m, "to_v"):
                torch.nn.init.normal_(m.to_v.weight, std=0.5)
    return adapter


@pytest.fixture()
def attached(transformer):
    adapter = make_adapter()
    adapter.attach(transformer)
    yield adapter
    adapter.detach(transformer)


def run(transformer, **kw) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**make_inputs(**kw))[0]


# ---------------------------------------------------------------- identity cases
def test_fresh_adapter_lambda_zero_and_empty_mask_leave_flux_unchanged(transformer):
    bare = run(transformer)
    fresh = make_adapter(random_v=False)
    fresh.attach(transformer)
    try:
        C = fresh.encode_reference(clip_states()).detach()
        with fresh.conditioning([C], branches="both", image_size=(H, W)):
            assert torch.equal(run(transformer), bare)
    finally:
        fresh.detach(transformer)

    adapter = make_adapter()
    adapter.attach(transformer)
    try:
        C = adapter.encode_reference(clip_states()).detach()
        with adapter.conditioning([C], scales=0.0, branches="both", image_size=(H, W)):
            assert torch.equal(run(transformer), bare)
        with adapter.conditioning([C], masks=[torch.zeros(H, W)], branches="image"):
            assert torch.equal(run(transformer), bare)
        with adapter.conditioning([C], branches="both", image_size=(H, W)):  # the same adapter does act
            assert (run(transformer) - bare).abs().max() > 1e-3
    finally:
        adapter.detach(transformer)
    assert torch.equal(run(transformer), bare)  # detach restores FLUX's processors


def test_all_zero_reference_row_contributes_nothing(transformer, attached):
    bare = run(transformer)
    C = attached.encode_reference(clip_states()).detach()
    C[1] = 0  # image-CFG dropout of sample 1, as the trainer does it
    with attached.conditioning([C], branches="both", image_size=(H, W)):
        out = run(transformer)
    assert torch.equal(out[1], bare[1])
    assert (out[0] - bare[0]).abs().max() > 1e-3


def test_attach_keeps_adapter_weights_out_of_the_transformer(transformer):
    keys = set(transformer.state_dict())
    adapter = make_adapter()
    adapter.attach(transformer)
    try:
        assert set(transformer.state_dict()) == keys
        procs = transformer.attn_processors
        assert sum(isinstance(p, DynaIPAttnProcessor) for p in procs.values()) == 3
        with pytest.raises(ValueError, match="already attached"):
            adapter.attach(transformer)
    finally:
        adapter.detach(transformer)
    assert all(type(p) is FluxAttnProcessor for p in transformer.attn_processors.values())
    with pytest.raises(ValueError, match="double \\+ .* single blocks"):
        make_adapter(num_single_blocks=3).attach(transformer)


# ---------------------------------------------------------------- Dynamic Decoupling
def _text_rows_changed(transformer, adapter, branches: str) -> tuple[list[bool], list[bool]]:
    """Per block: did the adapter change the text rows / the image rows of the attention output?

    Each block's output is compared with FLUX's own processor on the very same inputs, so
    changes propagated from earlier blocks do not count.
    """
    text_changed, image_changed = [], []

    def hook(module, args, kwargs, output):
        base = FluxAttnProcessor()(
            module, kwargs["hidden_states"], kwargs.get("encoder_hidden_states"), None, kwargs.get("image_rotary_emb")
        )
        if isinstance(output, tuple):  # double-stream: (image, text)
            img, txt, base_img, base_txt = output[0], output[1], base[0], base[1]
        else:  # single-stream: [text, image]
            img, txt, base_img, base_txt = output[:, N_TXT:], output[:, :N_TXT], base[:, N_TXT:], base[:, :N_TXT]
        text_changed.append(not torch.equal(txt, base_txt))
        image_changed.append(not torch.equal(img, base_img))

    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    handles = [b.attn.register_forward_hook(hook, with_kwargs=True) for b in blocks]
    try:
        C = adapter.encode_reference(clip_states()).detach()
        with adapter.conditioning([C], branches=branches, image_size=(H, W)):
            run(transformer)
    finally:
        for h in handles:
            h.remove()
    assert len(text_changed) == 3
    return text_changed, image_changed


def test_dynamic_decoupling_branches(transformer, attached):
    text, image = _text_rows_changed(transformer, attached, "image")
    assert text == [False] * 3 and image == [True] * 3
    text, image = _text_rows_changed(transformer, attached, "both")
    assert text == [True] * 3 and image == [True] * 3
    text, image = _text_rows_changed(transformer, attached, "text")
    assert text == [True] * 3 and image == [False] * 3


# ---------------------------------------------------------------- HMoE-FFM
def test_granularity_router_weights_and_expert_dropout():
    adapter = make_adapter()
    hs = clip_states()
    low_only = adapter.hmoe(hs, granularity=(1, 0, 0))
    assert torch.equal(low_only, adapter.hmoe.experts[0](hs[0]))
    assert torch.allclose(adapter.hmoe(hs, granularity=(0, 2, 0)), adapter.hmoe.experts[1](hs[1]))
    assert not torch.allclose(adapter.hmoe(hs), low_only)

    w = adapter.hmoe.router_weights(hs)
    assert w.shape == (B, 3) and torch.allclose(w.sum(1), torch.ones(B)) and (w > 0).all()
    fused = adapter.hmoe(hs)
    manual = sum(w[:, i, None, None] * adapter.hmoe.experts[i](hs[i]) for i in range(3))
    assert torch.allclose(fused, manual, atol=1e-6)

    # p = 1: every expert is drawn dropped, so exactly one (random) expert survives per sample
    sure = make_adapter(expert_dropout=1.0)
    keep = sure.hmoe.sample_keep_mask(4000, generator=torch.Generator().manual_seed(0))
    assert (keep.sum(1) == 1).all()
    assert set(keep.float().argmax(1).tolist()) == {0, 1, 2}
    keep = make_adapter(expert_dropout=0.5).hmoe.sample_keep_mask(4000, generator=torch.Generator().manual_seed(0))
    assert (keep.sum(1) >= 1).all() and (keep.sum(1) == 3).any()
    kw = sure.hmoe.router_weights(hs, keep[:B])
    assert torch.allclose(kw.sum(1), torch.ones(B)) and torch.equal(kw == 0, ~keep[:B])
    sure.train()
    torch.manual_seed(0)
    out = sure.hmoe(hs)  # training forward with dropout equals one expert's output per sample
    singles = [sure.hmoe.experts[i](hs[i]) for i in range(3)]
    assert all(any(torch.allclose(out[b], s[b], atol=1e-6) for s in singles) for b in range(B))

    with pytest.raises(ValueError, match="non-negative weights"):
        adapter.hmoe(hs, granularity=(1, 0))


def test_ablation_fusions_and_expert_subsets():
    hs = clip_states()
    add = make_adapter(fusion="add")
    expected = sum(add.hmoe.experts[i](hs[i]) for i in range(3)) / 3
    assert torch.allclose(add.hmoe(hs), expected, atol=1e-6)
    concat = make_adapter(fusion="concat")
    cat = torch.cat([concat.hmoe.experts[i](hs[i]) for i in range(3)], dim=-1)
    assert torch.allclose(concat.hmoe(hs), concat.hmoe.concat_proj(cat), atol=1e-6)
    with pytest.raises(ValueError, match="granularity needs fusion='hmoe'"):
        add.hmoe(hs, granularity=(1, 0, 0))

    sub = make_adapter(expert_layers=(2, 6))  # low + high only
    assert len(sub.hmoe.experts) == 2
    assert torch.equal(sub.hmoe(hs, granularity=(0, 1)), sub.hmoe.experts[1](hs[2]))
    assert sub.encode_reference(hs).shape == (B, 17, 32)
    with pytest.raises(ValueError, match="non-empty subset"):
        DynaIPConfig.tiny(expert_layers=(3,))


# ---------------------------------------------------------------- multi-subject
def test_mask_resampling_to_the_packed_token_grid():
    m = torch.zeros(64, 64)
    m[:, :24] = 1  # 1.5 token columns: column 0 full, column 1 half covered (0.5 → kept)
    tokens = resample_mask(m, (4, 4)).view(4, 4)
    assert tokens[:, :2].all() and not tokens[:, 2:].any()
    m[:, :20] = 1
    m[:, 20:] = 0  # column 1 a quarter covered → dropped
    assert resample_mask(m, (4, 4)).view(4, 4).sum() == 4
    assert resample_mask(torch.full((2, 64, 64), 255, dtype=torch.uint8), (4, 4)).all()


@pytest.mark.parametrize("block", ["double", "single"])
def test_two_subjects_with_disjoint_masks(transformer, attached, block):
    g = torch.Generator().manual_seed(5)
    m1, m2 = torch.zeros(H, W), torch.zeros(H, W)
    m1[:32, :] = 1  # top half → tokens 0..7
    m2[32:, :32] = 1  # bottom-left quarter → tokens 8, 9, 12, 13
    in1, in2 = resample_mask(m1, (4, 4))[0], resample_mask(m2, (4, 4))[0]
    outside = ~(in1 | in2)
    assert in1.sum() == 8 and in2.sum() == 4 and outside.sum() == 4

    C1, C2 = (attached.encode_reference(clip_states(seed)).detach() for seed in (10, 11))
    C2b = attached.encode_reference(clip_states(12)).detach()
    if block == "double":
        attn = transformer.transformer_blocks[0].attn
        x, t = torch.randn(B, N_IMG, 32, generator=g), torch.randn(B, N_TXT, 32, generator=g)

        def call():
            return attn(hidden_states=x, encoder_hidden_states=t)[0]  # image stream (B, N_IMG, D)
    else:
        attn = transformer.single_transformer_blocks[0].attn
        x = torch.randn(B, N_TXT + N_IMG, 32, generator=g)

        def call():
            return attn(hidden_states=x)[:, N_TXT:]  # image rows of [text, image]

    def image_rows(refs, scales) -> torch.Tensor:
        with torch.no_grad(), attached.conditioning(refs, masks=[m1, m2], scales=scales, branches="image"):
            return call()

    off = image_rows([C1, C2], 0.0)
    both = image_rows([C1, C2], [1.0, 0.8])
    assert torch.equal(both[:, outside], off[:, outside])
    assert (both[:, in1] - off[:, in1]).abs().min() > 0 and (both[:, in2] - off[:, in2]).abs().min() > 0
    swapped = image_rows([C1, C2b], [1.0, 0.8])  # change subject 2 only
    assert torch.equal(swapped[:, in1], both[:, in1])
    assert not torch.allclose(swapped[:, in2], both[:, in2])
    # inside mask 1 the result equals single-subject injection of C1 without a mask
    with torch.no_grad(), attached.conditioning([C1], branches="image", image_size=(H, W)):
        single = call()
    assert torch.allclose(both[:, in1], single[:, in1], atol=1e-6)


def test_multi_subject_argument_errors(attached):
    C = attached.encode_reference(clip_states()).detach()
    with pytest.raises(ValueError, match="one mask per reference"):
        attached.make_conditioning([C, C], masks=[torch.ones(H, W)])
    with pytest.raises(ValueError, match="one λ per reference"):
        attached.make_conditioning([C, C], scales=[1.0])
    with pytest.raises(ValueError, match="branches='all'"):
        attached.make_conditioning([C], branches="all")
    with pytest.raises(ValueError, match="divisible by 16"):
        attached.make_conditioning([C], image_size=(60, 64))


# ---------------------------------------------------------------- K/V cache
def test_reference_kv_computed_once_per_conditioning(transformer, attached):
    calls = []
    kv_modules = [m for m in attached.modules() if hasattr(m, "to_k")]
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in kv_modules]
    try:
        C = attached.encode_reference(clip_states()).detach()
        with attached.conditioning([C], branches="image", image_size=(H, W)):
            first = run(transformer)
            assert len(calls) == 3  # one K/V per block (image stream in the double block)
            assert torch.equal(run(transformer, seed=1), first) and len(calls) == 3  # steps reuse it
            run(transformer, seed=4)
            assert len(calls) == 3
            C.mul_(2.0)  # the conditioning changed in place → recompute
            changed = run(transformer)
            assert len(calls) == 6 and not torch.equal(changed, first)
        with attached.conditioning([C], branches="both", image_size=(H, W)):  # a new conditioning
            run(transformer)
            assert len(calls) == 6 + 4  # + the text-stream K/V of the double block
        with torch.enable_grad(), attached.conditioning([C], branches="image", image_size=(H, W)):
            transformer(**make_inputs())
            transformer(**make_inputs())
            assert len(calls) == 10 + 6  # no cache with autograd on (training)
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- checkpoints, sizes, dtypes
def test_save_load_roundtrip_and_mismatch_errors(transformer, attached, tmp_path):
    C = attached.encode_reference(clip_states()).detach()
    with attached.conditioning([C], branches="both", image_size=(H, W)):
        before = run(transformer)
    attached.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["config"] == attached.config.to_dict()
    assert DynaIPConfig.from_dict(meta["config"]) == attached.config

    loaded = DynaIPAdapter.from_pretrained(tmp_path / "ckpt")
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    assert torch.equal(loaded.encode_reference(clip_states()), C)
    attached.detach(transformer)
    loaded.attach(transformer)
    try:
        with loaded.conditioning([C], branches="both", image_size=(H, W)):
            assert torch.equal(run(transformer), before)
    finally:
        loaded.detach(transformer)
        attached.attach(transformer)

    bf16 = DynaIPAdapter.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    with pytest.raises(ValueError, match="does not fit this adapter's config: shape mismatch"):
        make_adapter(ref_dim=48).load_weights(tmp_path / "ckpt")
    with pytest.raises(
        ValueError, match=r"missing 2 tensors \(hmoe.concat_proj.bias.*unexpected 12 tensors \(hmoe.routers"
    ):
        make_adapter(fusion="concat").load_weights(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="missing adapter.safetensors"):
        DynaIPAdapter.from_pretrained(tmp_path)


def test_bf16_forward(transformer):
    bf_transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER_CONFIG).eval()
    bf_transformer.load_state_dict(transformer.state_dict())
    bf_transformer.to(torch.bfloat16)
    adapter = make_adapter().to(torch.bfloat16)
    adapter.attach(bf_transformer)
    with torch.no_grad():
        bare_inputs = make_inputs(dtype=torch.bfloat16)
        C = adapter.encode_reference([h.bfloat16() for h in clip_states()])
        with adapter.conditioning([C], image_size=(H, W)):
            out = bf_transformer(**bare_inputs)[0]
    adapter.detach(bf_transformer)
    ref = run(transformer)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() > 1e-2  # the adapter acted


def test_full_size_on_meta():
    from dynaip.models.flux import build_flux_transformer_meta

    with torch.device("meta"):
        adapter = DynaIPAdapter(DynaIPConfig.full())
    n = adapter.num_trainable_parameters()
    assert 1.2e9 <= n <= 1.7e9, n
    assert n == sum(p.numel() for p in adapter.parameters())  # nothing frozen
    transformer = build_flux_transformer_meta()
    adapter.attach(transformer)
    procs = transformer.attn_processors.values()
    assert sum(isinstance(p, DynaIPAttnProcessor) for p in procs) == 57 == len(procs)


def test_config_roundtrip_and_validation():
    cfg = DynaIPConfig.full()
    assert DynaIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    tiny = DynaIPConfig.tiny()
    assert (tiny.inner_dim, tiny.num_double_blocks, tiny.num_single_blocks) == (32, 1, 2)
    with pytest.raises(ValueError, match="fusion='sum'"):
        DynaIPConfig.tiny(fusion="sum")
    with pytest.raises(ValueError, match="Unknown DynaIPConfig fields"):
        DynaIPConfig.from_dict({"widht": 3})
    with pytest.raises(TypeError):
        DynaIPConfig(1024)  # keyword-only


def test_training_step_reaches_every_adapter_parameter(transformer):
    adapter = make_adapter().train()
    transformer.requires_grad_(False)
    adapter.attach(transformer)
    try:
        C = adapter(clip_states())  # forward == encode_reference (what DDP wraps)
        with adapter.conditioning([C], branches="both", image_size=(H, W)):
            out = transformer(**make_inputs())[0]
        out.square().mean().backward()
    finally:
        adapter.detach(transformer)
    assert all(p.grad is not None for p in adapter.parameters())
    assert all(p.grad.abs().sum() > 0 for n, p in adapter.named_parameters() if "to_k" in n or "to_v" in n)
    assert all(p.grad is None for p in transformer.parameters())


def test_row_restricted_reference_attention_equals_the_full_computation():
    """Subjects attend only on the rows their mask (× λ) covers; the result is the full weighted sum."""
    from dynaip.adapter.attention import reference_attention

    g = torch.Generator().manual_seed(0)
    b, lq, h, dh, lc, n = 2, 24, 2, 8, 5, 3
    q = torch.randn(b, lq, h, dh, generator=g)
    k = torch.randn(n, 1, h, lc, dh, generator=g)
    v = torch.randn(n, 1, h, lc, dh, generator=g)
    w = torch.zeros(n, b, lq)
    w[0, :, :10] = 1.0  # disjoint bands
    w[1, :, 8:20] = 0.5  # overlaps subject 0 on rows 8-9
    w[2] = 0.0  # λ = 0: skipped entirely
    rows = [(wi != 0).any(0).nonzero().flatten() for wi in w]
    full = reference_attention(q, k, v, w)
    fast = reference_attention(q, k, v, w, rows)
    torch.testing.assert_close(fast, full)
    assert torch.equal(fast.view(b, lq, -1)[:, 20:], torch.zeros_like(fast.view(b, lq, -1)[:, 20:]))
