"""Parallelism: how the frozen base and the adapter are laid out over the workers.

``ddp``   the frozen FLUX/CLIP are replicated; the adapter is wrapped in
          ``DistributedDataParallel``. Only ``adapter(hidden_states)`` (encode_reference) goes
          through the wrapper; the cross-attention weights are used later inside the transformer
          call and still get their gradients all-reduced, because DDP's reducer hooks every
          parameter's gradient, not the forward.
``fsdp2`` additionally shards the frozen transformer with ``fully_shard`` per block (and the
          root), so each rank holds 1/world of FLUX's 12B weights between uses. The adapter's
          weights are not children of the transformer (its attention processors are plain
          objects), so they stay out of the FSDP groups and remain in DDP.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


def wrap_adapter(adapter: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """The module to call for C: DDP around the adapter when distributed, the adapter itself otherwise."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return adapter
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(adapter, device_ids=ids, find_unused_parameters=find_unused_parameters,
                                   broadcast_buffers=False)


def shard_frozen_transformer(transformer: nn.Module, device: torch.device) -> None:
    """FSDP2 on the frozen FLUX transformer: one group per double/single block, plus the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(transformer, mesh=mesh, reshard_after_forward=True)
    log.info("fsdp2: frozen transformer sharded over %d ranks", dist.get_world_size())


def apply_strategy(strategy: str, transformer: nn.Module, adapter: nn.Module, device: torch.device,
                   find_unused_parameters: bool = False) -> nn.Module:
    """Lays out the models for ``strategy`` (ddp | fsdp2); returns the module that encodes references."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if strategy == "fsdp2" and distributed:
        shard_frozen_transformer(transformer, device)
    elif strategy not in ("ddp", "fsdp2"):
        raise ValueError(f"strategy={strategy!r}: choose ddp or fsdp2")
    return wrap_adapter(adapter, device, find_unused_parameters)
