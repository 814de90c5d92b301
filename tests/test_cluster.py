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


def test_only_the_cluster_module_calls_ray_init():
    """Curation, precompute, synth, training and eval join or start Ray through ``dynaip.cluster.connect``."""
    callers = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            f = node.func if isinstance(node, ast.Call) else None
            if isinstance(f, ast.Attribute) and f.attr == "init" and isinstance(f.value, ast.Name) and f.value.id == "ray":
                callers.append(name)
    assert sorted(set(callers)) == ["dynaip.cluster"]
