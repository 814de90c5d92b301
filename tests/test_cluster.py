"""Ray cluster access lives in one module (dynaip/cluster.py; docs/ARCHITECTURE.md, "Layers")."""

from __future__ import annotations

import ast

from test_layering import MODULES


def test_the_cli_address_wins_then_the_jobs_ray_address(monkeypatch):
    from dynaip.cluster import ray_address_from_env

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_address_from_env("auto") == "auto"
    assert ray_address_from_env(None) == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert ray_address_from_env(None) is None
    monkeypatch.delenv("RAY_ADDRESS")
    assert ray_address_from_env(None) is None


def test_a_loopback_address_is_joined_on_loopback():
    """``connect`` joins these under ``loopback_ray`` (Ray swaps 127.0.0.1 for the host's routable address
    otherwise, and never reaches a head bound to loopback: tests/test_stop_signals_ray.py joins one)."""
    from dynaip.cluster import on_loopback

    assert all(on_loopback(a) for a in ("127.0.0.1:6379", "127.1.2.3:1", "localhost:6379", "[::1]:6379", "LOCALHOST:1"))
    assert not any(
        on_loopback(a)
        for a in ("10.0.0.1:6379", "auto", "head.example:6379", "ray://127.0.0.1:10001", "1127.0.0.1:6379")
    )


def test_only_the_cluster_module_calls_ray_init():
    """Curation, precompute, synth, training and eval join or start Ray through ``dynaip.cluster.connect``."""
    callers = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            f = node.func if isinstance(node, ast.Call) else None
            if (
                isinstance(f, ast.Attribute)
                and f.attr == "init"
                and isinstance(f.value, ast.Name)
                and f.value.id == "ray"
            ):
                callers.append(name)
    assert sorted(set(callers)) == ["dynaip.cluster"]
