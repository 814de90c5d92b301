"""Shared fixtures: the tiny checkpoints are written once per test session by the project's own code."""

from __future__ import annotations

import os
import sys
import signal
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two test processes share the machine's cores: one torch/OpenMP thread each (inherited by the commands
    # and Ray workers a test starts), instead of every process spinning a thread per core against the other
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_models_yaml(tmp_path_factory) -> Path:
    """Path of ``models.yaml`` for a freshly written tiny checkpoint set."""
    from dynaip.models.tiny import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def tiny_models(tiny_models_yaml):
    from dynaip.models import ModelsConfig

    return ModelsConfig.from_yaml(tiny_models_yaml)


@pytest.fixture(scope="session")
def local_train_once(tmp_path_factory, tiny_models_yaml):
    """``(config, run dir)`` of one uninterrupted `dynaip train --local` run (train_fixtures.local_train_config):
    the reference that interrupted and resumed runs must equal."""
    from train_fixtures import local_train, local_train_config, write_dataset

    root = tmp_path_factory.mktemp("local-train")
    config = local_train_config(root, write_dataset(root / "intra", [3, 2], size=64))
    assert local_train(config, tiny_models_yaml, root / "once") == 0
    return config, root / "once"


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Each test starts with Python's own SIGINT handler: Ray Train's trainer installs one of its own
    (it aborts its controller) and leaves it behind, so a later test that interrupts a run with
    ``_thread.interrupt_main()`` would reach a dead controller instead of raising KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def _ray_session():
    """Stops the shared embedded Ray once, at the end of the session (if a test left it running)."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(_ray_session):
    """The embedded Ray that ``dynaip train`` and ``curate`` start themselves (``dynaip.cluster.connect``:
    loopback only, 2 CPUs), shared by every test that only needs *a* cluster: started on first use and
    left running for the next module, restarted when a test stopped it. Tests that need a cluster of
    their own (two nodes, kills, their own start-up) do not use it; tests/README.md says when."""
    import ray

    if not ray.is_initialized():
        from dynaip.cluster import connect

        connect(None, num_cpus=2)
    return ray


# The files that take longest, longest first (the durations .ci/run prints). They are collected first so
# that in the two-process run (`-n 2 --dist loadfile`, whole files per process) they start early and the
# many short files fill both processes at the end; in alphabetical order most of them came last.
LONG_FILES = (
    "test_train.py",
    "test_demo.py",
    "test_shipped_configs.py",
    "test_serve_browser.py",
    "test_curation_ray.py",
    "test_cluster_two_nodes.py",
    "test_synth.py",
    "test_train_faults.py",
    "test_features.py",
    "test_stop_signals_ray.py",
    "test_stop_signals.py",
    "test_gpu_suite.py",
    "test_parallel.py",
    "test_curation_e2e.py",
    "test_reference_gap.py",
    "test_source_subjects200k.py",
    "test_run_dirs.py",
)


def pytest_collection_modifyitems(session, config, items):
    """Long files first; a file's own tests keep their order (the sort is stable)."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))
