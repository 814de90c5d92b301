"""Gradient checkpointing with the adapter attached: diffusers recomputes each block during backward,
after ``adapter.conditioning(...)`` has closed. The conditioning travels in ``joint_attention_kwargs``
(see ``DynaIPAdapter.attach``), so the recomputation must see it and the gradients must equal those of
a run without checkpointing."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from dynaip.models.tiny import TINY_FLUX_TRANSFORMER_CONFIG
from dynaip.train.step import enable_checkpointing
from test_adapter import H, W, clip_states, make_adapter, make_inputs


def _grads(
    checkpointing: bool, subjects: int, branches: str, masked: bool, keep_last: int = 0
) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER_CONFIG).train().requires_grad_(False)
    if checkpointing:
        assert enable_checkpointing(transformer, keep_last) == 3 - keep_last
    adapter = make_adapter(expert_dropout=0.0).train()  # both runs must use the same experts
    adapter.attach(transformer)
    refs = [adapter.encode_reference(clip_states(seed=10 + i)) for i in range(subjects)]
    masks = None
    if masked:
        masks = [torch.zeros(H, W) for _ in range(subjects)]
        for i, m in enumerate(masks):  # vertical bands, the last overlapping its neighbour
            m[:, i * W // (subjects + 1) : (i + 2) * W // (subjects + 1)] = 1.0
    with adapter.conditioning(
        refs, masks=masks, scales=[1.0, 0.7, 0.4][:subjects], branches=branches, image_size=(H, W)
    ):
        pred = transformer(**make_inputs())[0]
    # backward after the block has closed, exactly as the trainer does
    pred.square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in adapter.named_parameters() if p.grad is not None}
    adapter.detach(transformer)
    return grads


@pytest.mark.parametrize(
    "subjects,branches,masked,keep_last",
    [
        (1, "both", False, 0),
        (2, "both", True, 0),
        (3, "image", True, 0),  # diffusers' own checkpointing
        (1, "both", False, 1),
        (2, "both", True, 2),  # ours, with the last blocks kept
    ],
)
def test_checkpointed_gradients_equal_plain_ones(subjects, branches, masked, keep_last):
    plain = _grads(False, subjects, branches, masked)
    ckpt = _grads(True, subjects, branches, masked, keep_last)
    assert plain.keys() == ckpt.keys()
    # the CA of every block and the HMoE/projection received gradient
    assert any(k.startswith("single_blocks.1.") for k in plain) and any(k.startswith("hmoe.") for k in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in plain.values())


def test_detach_removes_the_conditioning_hook():
    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER_CONFIG).eval()
    adapter = make_adapter()
    before = len(transformer._forward_pre_hooks)
    adapter.attach(transformer)
    assert len(transformer._forward_pre_hooks) == before + 1
    adapter.detach(transformer)
    assert len(transformer._forward_pre_hooks) == before
