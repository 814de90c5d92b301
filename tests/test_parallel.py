"""The adapter layouts of dynaip.train.parallel on two gloo processes: sharding the adapter (FSDP2)
must train the same adapter as DDP, with gradient checkpointing on, and its exported state must be
the whole adapter."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_two_steps(rank: int, world: int, port: int, strategy: str, out: str) -> None:
    import os

    import torch.distributed as dist
    from diffusers import FluxTransformer2DModel

    from dynaip.models.tiny import TINY_FLUX_TRANSFORMER_CONFIG
    from dynaip.train.parallel import apply_strategy, full_adapter_state, is_sharded
    from dynaip.train.step import enable_checkpointing
    from test_adapter import H, W, clip_states, make_adapter, make_inputs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER_CONFIG).requires_grad_(False)
        enable_checkpointing(transformer, 0)
        adapter = make_adapter(expert_dropout=0.0).train()
        adapter.attach(transformer)
        encode = apply_strategy(strategy, transformer, adapter, torch.device("cpu"))
        assert is_sharded(adapter) == (strategy == "fsdp2_adapter")
        opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
        for step in range(2):  # each rank its own data, as in training
            c = encode(clip_states(seed=10 + 2 * rank + step))
            with adapter.conditioning([c], branches="both", image_size=(H, W)):
                pred = transformer(**make_inputs(seed=rank + 5 * step))[0]
            pred.square().mean().backward()
            torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        state = full_adapter_state(adapter)
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


def _run(strategy: str, out: Path) -> dict[str, torch.Tensor]:
    mp.spawn(_train_two_steps, args=(2, _free_port(), strategy, str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


@pytest.mark.timeout(300)
def test_sharded_adapter_trains_like_ddp(tmp_path):
    ddp = _run("ddp", tmp_path / "ddp.pt")
    sharded = _run("fsdp2_adapter", tmp_path / "fsdp.pt")
    assert ddp.keys() == sharded.keys()
    for name in ddp:
        assert sharded[name].shape == ddp[name].shape  # whole tensors, not shards
        torch.testing.assert_close(sharded[name], ddp[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.manual_seed(3)
    from test_adapter import make_adapter

    initial = make_adapter(expert_dropout=0.0).state_dict()
    assert sum(not torch.equal(initial[k], ddp[k]) for k in ddp) > 0.8 * len(ddp)  # both did train
