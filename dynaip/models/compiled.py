"""Regional compilation of FLUX: ``torch.compile`` on each repeated transformer block, not the whole model.

FLUX.1-dev repeats two block classes (19 double-stream, 38 single-stream). Each block's ``forward``
is compiled in place; every block of a class runs the same code, so dynamo traces one graph per class
(and per input variant: the first block's input does not require grad, the first single-stream block
gets a differently strided input, training and sampling differ) and the other blocks reuse it with
their own weights as graph inputs. Start-up is a few graphs, not 57 blocks or one whole-model graph.

Shapes are static (``dynamic=False``): a new shape (another bucket, batch or resolution) compiles a
graph of its own once instead of one graph with symbolic sizes, whose kernels inductor cannot tune as
well; ``RECOMPILE_LIMIT`` leaves room for them.

What stays outside the compiled graphs, and why:

- hooks on the block module (FSDP2's all-gather / reshard, DDP) run eagerly around the compiled
  ``forward``: only ``forward`` is replaced, not the module's ``__call__``;
- gradient checkpointing wraps the compiled ``forward`` (``dynaip.train.step.enable_checkpointing``
  wraps whatever ``block.forward`` is; diffusers' own checkpointing calls the block module), so the
  recomputation in backward replays the same compiled graph;
- the adapter's per-conditioning bookkeeping (``DynaIPAttnProcessor._plan``: reference K/V, the
  λ·mask weights, cached per conditioning) is ``torch.compiler.disable``d — one graph break per
  cross-attention — so a new conditioning every step does not recompile anything.

Backend: ``inductor`` on CUDA (fused kernels: what the switch is for). On the CPU ``aot_eager``:
dynamo's capture, guards and AOTAutograd's joint forward/backward graphs — everything that meets
FSDP2, checkpointing and the adapter — without generating kernels, because inductor's C++ code
generation takes minutes for the tiny model on a 2-core CI machine and CPU runs are smoke runs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

COMPILED_ATTR = "_dynaip_compiled_forward"
"""Set on each compiled block: the compiled ``forward``, so undoing checkpointing can put it back."""

RECOMPILE_LIMIT = 64
"""Graphs dynamo keeps per code object before it falls back to eager for that code. Its default (8)
is reached by one run: input variants x training / eval / sampling x buckets."""


def compile_backend(device: torch.device) -> str:
    """The ``torch.compile`` backend for blocks on ``device`` (see the module docstring)."""
    return "inductor" if device.type == "cuda" else "aot_eager"


def flux_blocks(transformer: nn.Module) -> list[nn.Module]:
    """FLUX's repeated blocks: double-stream first, then single-stream."""
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def compile_blocks(
    transformer: nn.Module, device: torch.device, backend: str | None = None, *, grad_only: bool = False
) -> int:
    """Compiles each repeated block's ``forward`` in place (regional compilation); returns how many.

    Call it before gradient checkpointing wraps the blocks and before FSDP2 shards them. Compilation
    itself happens lazily, at the first call of each block class. Idempotent.

    ``grad_only`` (training): calls without autograd (validation losses, sample images) run the eager
    forward. They are rare next to the training steps, and each would trace graphs of its own (no
    grad, another batch, the image-only branch): on the CPU that doubled a short run's compile time.
    """
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    backend = backend or compile_backend(device)
    n = 0
    for block in flux_blocks(transformer):
        if getattr(block, COMPILED_ATTR, None) is None:
            compiled = torch.compile(block.forward, backend=backend, dynamic=False)
            if grad_only:
                compiled = _with_grad_only(compiled, block.forward)
            setattr(block, COMPILED_ATTR, compiled)
            block.forward = compiled
        n += 1
    log.info("compiled %d FLUX blocks (regional, backend %s)", n, backend)
    return n


def _with_grad_only(compiled, eager):
    import functools

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        return compiled(*args, **kwargs) if torch.is_grad_enabled() else eager(*args, **kwargs)

    return forward


def compiled_blocks(transformer: nn.Module) -> int:
    """How many of the transformer's blocks carry a compiled ``forward``."""
    return sum(getattr(b, COMPILED_ATTR, None) is not None for b in flux_blocks(transformer))


def restore_forward(block: nn.Module) -> None:
    """Drops a wrapper set on ``block.forward`` (checkpointing), keeping the compiled forward if any."""
    block.__dict__.pop("forward", None)
    compiled = getattr(block, COMPILED_ATTR, None)
    if compiled is not None:
        block.forward = compiled
