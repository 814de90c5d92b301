"""Parallelism: how the frozen base and the adapter are laid out over the workers.

``ddp``           the frozen FLUX/CLIP are replicated; the adapter is wrapped in
                  ``DistributedDataParallel``. Only ``adapter(hidden_states)`` (encode_reference) goes
                  through the wrapper; the cross-attention weights are used later inside the transformer
                  call and still get their gradients all-reduced, because DDP's reducer hooks every
                  parameter's gradient, not the forward.
``fsdp2``         additionally shards the frozen transformer with ``fully_shard`` per block (and the
                  root), so each rank holds 1/world of FLUX's 12B weights between uses. The adapter's
                  weights are not children of the transformer (its attention processors are plain
                  objects), so they stay out of those FSDP groups and remain in DDP.
``fsdp2_adapter`` shards the adapter's parameters, gradients and AdamW state with FSDP2 instead of DDP:
                  one unit per reference K/V module (the processors call them as modules, so FSDP's
                  hooks gather each just in time, in forward, in the checkpointed recomputation and
                  in backward) and the root unit for HMoE + projection. Per rank the adapter's fp32
                  state drops from 16 bytes/parameter (23 GB for 1.44 B) to 16/world plus one gathered
                  unit. The frozen base stays replicated.
``fsdp2_full``    both: the frozen transformer as in ``fsdp2`` and the adapter as in ``fsdp2_adapter``.

Which one fits an 80 GB card is worked out in docs/memory.md (``benchmarks/memory_plan.py``).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import STRATEGIES

log = logging.getLogger(__name__)

SHARDS_BASE = ("fsdp2", "fsdp2_full")
SHARDS_ADAPTER = ("fsdp2_adapter", "fsdp2_full")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def wrap_adapter(adapter: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """The module to call for C: DDP around the adapter when distributed, the adapter itself otherwise."""
    if not _distributed():
        return adapter
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        adapter, device_ids=ids, find_unused_parameters=find_unused_parameters, broadcast_buffers=False
    )


def shard_frozen_transformer(transformer: nn.Module, device: torch.device) -> None:
    """FSDP2 on the frozen FLUX transformer: one group per double/single block, plus the root."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(device)
    for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(transformer, mesh=mesh, reshard_after_forward=True)
    log.info("fsdp2: frozen transformer sharded over %d ranks", dist.get_world_size())


def shard_adapter(adapter: nn.Module, device: torch.device) -> None:
    """FSDP2 on the trainable adapter: one unit per reference K/V module, the root for HMoE + projection."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(device)
    for block in list(adapter.double_blocks) + list(adapter.single_blocks):
        for kv in (block.kv, block.text_kv):
            if kv is not None:
                fully_shard(kv, mesh=mesh, reshard_after_forward=True)
    fully_shard(adapter, mesh=mesh, reshard_after_forward=True)
    log.info("fsdp2: adapter parameters, gradients and optimizer state sharded over %d ranks", dist.get_world_size())


def is_sharded(module: nn.Module) -> bool:
    """True when the module's parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def apply_strategy(
    strategy: str,
    transformer: nn.Module,
    adapter: nn.Module,
    device: torch.device,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """Lays out the models for ``strategy``; returns the module that encodes references (call it, not
    ``adapter.encode_reference``, so DDP's and FSDP's hooks run)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: choose one of {STRATEGIES}")
    if not _distributed():
        return adapter
    if strategy in SHARDS_BASE:
        shard_frozen_transformer(transformer, device)
    if strategy in SHARDS_ADAPTER:
        shard_adapter(adapter, device)
        return adapter
    return wrap_adapter(adapter, device, find_unused_parameters)


# ----------------------------------------------------------------------------- sharded state
def full_adapter_state(adapter: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's whole state dict on the CPU. Collective when sharded: every rank must call it;
    every rank gets the full tensors (the adapter is small enough for host memory: 5.8 GB fp32)."""
    if not is_sharded(adapter):
        return {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(
        adapter, options=StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
    )
    return {k: v.contiguous() for k, v in sd.items()}


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every DTensor replaced by this rank's local shard (on the CPU), so
    each rank saves only its part and the file loads with ``torch.load(weights_only=True)``."""
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    state = {
        i: {k: (v.to_local().detach().cpu().clone() if isinstance(v, DTensor) else v) for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    return {"state": state, "param_groups": sd["param_groups"]}


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Inverse of ``local_optimizer_state``: wraps each saved local shard back into a DTensor laid out
    like its parameter (same world size and sharding as when it was saved)."""
    from torch.distributed.tensor import DTensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in saved["state"].items():
        p = params[int(i)]
        entry = {}
        for k, v in s.items():
            if isinstance(p, DTensor) and torch.is_tensor(v) and v.ndim == p.ndim and v.ndim > 0:
                v = DTensor.from_local(
                    v.to(p.to_local().device),
                    p.device_mesh,
                    p.placements,
                    shape=p.shape,
                    stride=p.stride(),
                    run_check=False,
                )
            entry[k] = v
        state[int(i)] = entry
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
