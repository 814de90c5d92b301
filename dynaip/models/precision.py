"""Numeric precision of the curation model stages (recipe ``executor.precision``, docs/curation_speed.md).

``auto`` resolves per device: bf16 on a CUDA device that supports it, else fp32 (the CPU's default).
Under bf16/fp16 the model forward passes run inside ``torch.autocast`` with TF32 matmuls allowed;
callers convert model outputs to fp32 before any box decoding, mask upsampling, thresholding or
keep/reject decision, so the recipe's thresholds mean the same thing at every precision.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``precision`` with ``auto`` resolved for ``device``: ``bf16`` on a CUDA device with bf16 support,
    otherwise ``fp32``. ValueError on an unknown name."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


@contextlib.contextmanager
def model_precision(precision: str, device: str | torch.device) -> Iterator[None]:
    """Runs the block under the resolved ``precision``: nothing changes for fp32; bf16/fp16 enable
    autocast on ``device``'s type and allow TF32 matmuls/convolutions (restored on exit)."""
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        yield
        return
    dev = torch.device(device)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast(device_type=dev.type, dtype=DTYPES[resolved]):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
