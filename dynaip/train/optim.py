"""The adapter's optimizer: AdamW from the ``optim:`` section, fused where the parameters allow it."""

from __future__ import annotations

from typing import Iterable

import torch

from .config import OptimConfig

FUSED_DEVICES = ("cuda", "cpu")
"""Devices with a fused AdamW kernel in PyTorch (``torch.optim.AdamW(fused=True)``)."""


def fusable(params: list[torch.Tensor]) -> bool:
    """Fused AdamW takes floating-point parameters on one of ``FUSED_DEVICES`` (FSDP2's DTensor shards
    included); anything else (another device, a mix of devices) falls back to foreach."""
    devices = {p.device.type for p in params}
    return (
        bool(params)
        and len(devices) == 1
        and devices <= set(FUSED_DEVICES)
        and all(p.is_floating_point() for p in params)
    )


def make_optimizer(params: Iterable[torch.Tensor], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with ``cfg``'s lr, betas and weight decay; fused when ``cfg.fused`` and ``fusable``, else
    PyTorch's default implementation for the device (foreach on CUDA)."""
    params = list(params)
    fused = cfg.fused and fusable(params)
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=True if fused else None
    )
