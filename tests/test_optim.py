"""``optim.fused``: the adapter's AdamW, fused where PyTorch has the kernel (the CPU included)."""

from __future__ import annotations

import torch

from dynaip.train.config import OptimConfig
from dynaip.train.optim import make_optimizer


def _steps(fused: bool) -> tuple[torch.optim.AdamW, list[torch.Tensor]]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
    opt = make_optimizer(params, OptimConfig(lr=1e-2, weight_decay=1e-2, fused=fused))
    for i in range(3):
        loss = sum(((p * (i + 1)) ** 2).sum() for p in params)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt, params


def test_fused_adamw_on_the_cpu_steps_like_the_default_implementation():
    fused, got = _steps(True)
    plain, want = _steps(False)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # its state is a plain AdamW state: a checkpoint of it loads into a fused optimizer again
    again = make_optimizer([torch.nn.Parameter(p.detach().clone()) for p in got], OptimConfig(lr=1e-2, fused=True))
    again.load_state_dict(fused.state_dict())
    assert again.state_dict()["state"][0]["step"].item() == 3.0


def test_fused_falls_back_where_the_parameters_do_not_allow_it():
    ints = [torch.zeros(3, dtype=torch.int64)]
    from dynaip.train.optim import fusable

    assert not fusable(ints) and not fusable([])
    assert fusable([torch.nn.Parameter(torch.zeros(2))])
