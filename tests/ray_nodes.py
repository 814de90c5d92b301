"""Real Ray nodes for tests: `ray start --block` subprocesses on loopback, stopped by process id.

Shared by the tests that need a cluster outside the pytest process. Every node gets its own ports
(Ray's fixed defaults would collide between two nodes on one machine and with other Ray instances
running beside the tests), a small object store (CI containers often have a 64 MiB /dev/shm), and
PYTHONPATH pointing at this checkout so that job drivers and workers import the code under test
rather than whatever copy the virtual environment's editable install points to."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
OBJECT_STORE_BYTES = 100 * 1024**2  # the tests move a few MB; Ray's minimum is 75 MiB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env() -> dict[str, str]:
    """Environment of a node's processes (and so of its workers and job drivers)."""
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "RAY_AUTH_MODE": "token",  # Ray's default; the job client presents the token
        "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO),
        "TOKENIZERS_PARALLELISM": "false",
    }


def start_node(args: list[str], log: Path) -> subprocess.Popen:
    """One node: `ray start --block` keeps itself the parent of the node's processes, in a session
    of its own, so `stop_nodes` can find exactly this node's processes."""
    ports = [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        "--min-worker-port=0",
        "--max-worker-port=0",
    ]  # 0: workers bind ports the OS picks
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                RAY,
                "start",
                "--block",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
                f"--object-store-memory={OBJECT_STORE_BYTES}",
                *args,
                *ports,
            ],
            env=node_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_nodes(procs: list[subprocess.Popen], grace: float = 3) -> None:
    """SIGTERM each node's process group, then SIGKILL whatever is left of the process trees after
    ``grace`` seconds. Short: a test's nodes hold nothing to save (their files are in temp dirs), and
    `ray start --block` took over 10 s to stop its processes on the 2-core CI machine.

    Ray workers move into process groups of their own and job drivers into sessions of their own,
    so the group signal alone can leave them behind: their pids are collected (as descendants of
    the `ray start` processes this test started) before anything is signalled."""
    tree: list[psutil.Process] = []
    for p in procs:
        try:
            tree += psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in reversed(procs):  # worker nodes first, the head last
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
    _, alive = psutil.wait_procs(tree, timeout=max(0.1, deadline - time.time()))
    for child in alive:  # psutil checks the creation time, so a reused pid is never hit
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
