"""Which PyTorch SDPA kernel FLUX's attention runs on (``parallel.attention``), checked before use.

A backend is used only after it passed ``check_backend``: forward and backward of one attention at
the run's head count, head size and dtype, compared with the math backend in fp32 on the same inputs.
The choice is process-wide (``torch.backends.cuda.enable_*_sdp``) rather than an ``sdpa_kernel``
context, because backward runs on autograd's device threads, where a context would not reach.

``auto`` takes the first backend of ``AUTO_ORDER`` for the device that passes the check. cuDNN is not
in CUDA's ``auto`` order: its backward failed on an H100 with FLUX.1-dev under gradient checkpointing
(torch 2.11, cuDNN from CUDA 13: ``mha_graph.execute(...).is_good()``, then illegal memory accesses,
which poison the CUDA context, so a failed check could not fall back). Name it (``cudnn``) to use it;
``benchmarks/gpu_suite.py --parts attention`` checks and times every backend on the GPU, each in a
process of its own.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
"""Choices of ``parallel.attention``."""

SDP: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}

AUTO_ORDER = {"cuda": ("flash", "efficient", "math"), "cpu": ("flash", "math")}
"""``auto``'s preference per device type, fastest first (flash: FlashAttention-2 on CUDA, PyTorch's
own flash kernel on the CPU)."""

FLAGS: dict[str, Callable[[bool], None]] = {
    "flash": torch.backends.cuda.enable_flash_sdp,
    "cudnn": torch.backends.cuda.enable_cudnn_sdp,
    "efficient": torch.backends.cuda.enable_mem_efficient_sdp,
    "math": torch.backends.cuda.enable_math_sdp,
}
STATE: dict[str, Callable[[], bool]] = {
    "flash": torch.backends.cuda.flash_sdp_enabled,
    "cudnn": torch.backends.cuda.cudnn_sdp_enabled,
    "efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
    "math": torch.backends.cuda.math_sdp_enabled,
}

TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}
"""Max |difference| / max |math result| of outputs and input gradients: a wrong kernel (bad layout,
wrong scale, broken backward) is off by O(1) in these units; rounding of a correct one stays well
below them."""


class AttentionBackendError(ValueError):
    """A named SDPA backend is unavailable or wrong on this device, dtype and shape."""


def check_backend(
    name: str, device: torch.device, dtype: torch.dtype, heads: int, head_dim: int, tokens: int = 256, batch: int = 1
) -> str | None:
    """None when backend ``name`` runs forward and backward of a (batch, heads, tokens, head_dim)
    attention in ``dtype`` and matches the math backend in fp32 within ``TOLERANCE``; else why not."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, g = (torch.randn(batch, heads, tokens, head_dim, generator=gen).to(device) for _ in range(4))

    def run(backend: SDPBackend, dt: torch.dtype) -> list[torch.Tensor]:
        qkv = [t.to(dt).requires_grad_(True) for t in (q, k, v)]
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(*qkv)
        out.backward(g.to(dt))
        return [out.detach().float()] + [t.grad.float() for t in qkv]

    try:
        got = run(SDP[name], dtype)
    except RuntimeError as e:  # "No available kernel", a failed cuDNN graph, ...
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    want = run(SDPBackend.MATH, torch.float32)
    tol = TOLERANCE.get(dtype, 3e-2)
    for what, a, b in zip(("output", "dq", "dk", "dv"), got, want):
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        if not err <= tol:
            return f"{what} differs from the math backend by {err:.2e} (relative; tolerance {tol:.0e})"
    return None


def select_backend(choice: str, device: torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> str:
    """The backend ``choice`` stands for on ``device``: itself after a passing check, or for ``auto``
    the first of ``AUTO_ORDER`` that passes. Raises ``AttentionBackendError`` naming the failure."""
    if choice not in BACKENDS:
        raise AttentionBackendError(f"parallel.attention={choice!r}: choose one of {BACKENDS}")
    names = AUTO_ORDER.get(device.type, ("math",)) if choice == "auto" else (choice,)
    failures = []
    for name in names:
        why = check_backend(name, device, dtype, heads, head_dim)
        if why is None:
            return name
        failures.append(f"{name}: {why}")
    raise AttentionBackendError(
        f"parallel.attention={choice!r} on {device.type} in {str(dtype).removeprefix('torch.')}"
        f" at {heads} heads x {head_dim}: " + "; ".join(failures)
    )


def apply_backend(name: str) -> dict[str, bool]:
    """Enables backend ``name`` process-wide (math stays on as the fallback for shapes the kernel does
    not take; ``math`` alone turns every other off); returns the flags before, for ``restore_flags``."""
    before = {k: f() for k, f in STATE.items()}
    for k, f in FLAGS.items():
        f(k == name or k == "math")
    return before


def restore_flags(flags: dict[str, bool]) -> None:
    """Puts back what ``apply_backend`` returned."""
    for k, on in flags.items():
        FLAGS[k](on)


def configure(choice: str, device: torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> str:
    """``select_backend`` then ``apply_backend``; returns the backend in use (logged)."""
    name = select_backend(choice, device, dtype, heads, head_dim)
    apply_backend(name)
    log.info("attention: SDPA backend %s (parallel.attention=%s, checked against math)", name, choice)
    return name
