"""No unauthenticated port off loopback (#33): every embedded Ray starts through ``dynaip.cluster.connect``
(tests/test_cluster.py checks that only it calls ``ray.init``; tests/test_curation_reliability.py and
tests/test_train.py list the listening sockets of a run), and every Ray Train run takes its torch
process-group setup from ``dynaip.cluster.torch_config``, which keeps it on loopback on such a Ray."""

from __future__ import annotations

import ast

from test_layering import MODULES


def _calls(name: str) -> list[tuple[str, ast.Call]]:
    out = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if called == name:
                    out.append((module, node))
    return out


def test_every_ray_train_run_takes_its_torch_setup_from_the_cluster_module():
    trainers = _calls("TorchTrainer")
    assert trainers, "no TorchTrainer found: this test looks in the wrong place"
    for module, call in trainers:
        given = {k.arg: k.value for k in call.keywords}
        value = given.get("torch_config")
        assert isinstance(value, ast.Call) and getattr(value.func, "id", None) == "torch_config", (
            f"{module}: TorchTrainer without torch_config=torch_config(...) from dynaip.cluster"
        )
    assert sorted({m for m, _ in _calls("TorchConfig")}) == ["dynaip.cluster"]


def test_a_loopback_cluster_gets_the_loopback_torch_config(monkeypatch):
    import ray

    from dynaip import cluster

    monkeypatch.setattr(
        ray,
        "nodes",
        lambda: [
            {"Alive": True, "NodeManagerAddress": "127.0.0.1"},
            {"Alive": False, "NodeManagerAddress": "10.0.0.2"},
        ],
    )
    config = cluster.torch_config("gloo")
    assert config.backend == "gloo" and config.backend_cls.__name__ == "LoopbackTorchBackend"
    monkeypatch.setattr(
        ray,
        "nodes",
        lambda: [{"Alive": True, "NodeManagerAddress": "127.0.0.1"}, {"Alive": True, "NodeManagerAddress": "10.0.0.2"}],
    )
    config = cluster.torch_config("nccl")  # a cluster the user named: Ray Train's own setup, unchanged
    assert config.backend == "nccl" and config.backend_cls.__name__ == "_TorchBackend"


def test_the_rendezvous_store_listens_on_loopback_and_serves_a_process_group():
    """What rank 0 runs in a loopback run, in this process: the store on 127.0.0.1, and the store that
    ``init_process_group`` creates on the same port is that one (a one-rank gloo group forms on it)."""
    import os

    import psutil
    import torch.distributed as dist

    from dynaip import cluster

    addr, port = cluster._serve_rendezvous_on_loopback()
    try:
        listening = {
            (c.laddr.ip, c.laddr.port)
            for c in psutil.Process().net_connections("inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert (addr, port) == ("127.0.0.1", port) and ("127.0.0.1", port) in listening
        assert not any(p == port and ip != "127.0.0.1" for ip, p in listening)
        env = {"MASTER_ADDR": addr, "MASTER_PORT": str(port)}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            dist.init_process_group("gloo", init_method="env://", rank=0, world_size=1)
            dist.barrier()
            dist.destroy_process_group()
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    finally:
        cluster._RENDEZVOUS.clear()
