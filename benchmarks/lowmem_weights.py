"""Weights resident on the GPU at once in each low-memory mode (docs/low_memory.md), COMPUTED from
module sizes — the meta-device builds of benchmarks/memory_plan.py — and not measured. Activations,
the CUDA context and allocator slack come on top and are not counted here.

    python benchmarks/lowmem_weights.py

bf16 = 2 bytes per parameter. int8 / fp8 (optimum-quanto, weight-only): 1 byte per nn.Linear weight
of the FLUX transformer plus one bf16 scale per output row; everything else stays bf16. The adapter
stays on the CPU under offload; the GPU then holds its per-generation reference K/V cache (one
subject: 57 image-branch K/V pairs of 577 tokens × 3072, bf16) and, while encoding, HMoE-FFM +
projection next to the CLIP vision tower.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024**3
BF16 = 2


def flux_linear_split() -> tuple[int, int, int, int]:
    """(Linear weight params, their output rows, other params, largest leaf module's params) of FLUX.1-dev."""
    import torch
    from torch import nn

    from dynaip.models.flux import build_flux_transformer_meta

    flux = build_flux_transformer_meta()
    lin = rows = 0
    largest = 0
    for m in flux.modules():
        own = sum(p.numel() for p in m.parameters(recurse=False))
        largest = max(largest, own)
        if isinstance(m, nn.Linear):
            lin += m.weight.numel()
            rows += m.weight.shape[0]
    total = sum(p.numel() for p in flux.parameters())
    del torch
    return lin, rows, total - lin, largest


def table() -> list[tuple[str, float]]:
    from benchmarks.memory_plan import measure_module_sizes

    z = measure_module_sizes()
    lin, rows, other, largest = flux_linear_split()
    kv_cache = 57 * 2 * 577 * 3072 * BF16  # one reference
    encoder = (z.clip_vision + z.adapter_root) * BF16
    flux_bf16 = z.flux * BF16
    flux_q = lin * 1 + rows * BF16 + other * BF16
    vae = (z.vae_encoder + z.vae_decoder) * BF16
    text = (z.t5_encoder + z.clip_text) * BF16
    full = flux_bf16 + text + vae + z.clip_vision * BF16 + z.adapter * BF16 + kv_cache
    model = max(z.t5_encoder * BF16, encoder, flux_bf16 + kv_cache, vae)
    sequential = max(largest * BF16, 4096 * 512 * BF16) + kv_cache  # one leaf at a time (or one CA projection)
    return [
        ("full (bf16, every model on the GPU)", full),
        ("full, int8/fp8 transformer", full - flux_bf16 + flux_q),
        ("model offload (bf16)", model),
        ("model offload, int8/fp8 transformer", max(z.t5_encoder * BF16, encoder, flux_q + kv_cache, vae)),
        ("sequential offload", sequential),
    ]


if __name__ == "__main__":
    print("| mode | weights resident at once (computed, GiB) |")
    print("| --- | --- |")
    for name, b in table():
        print(f"| {name} | {b / GIB:.1f} |")
