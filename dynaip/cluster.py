"""Ray cluster access in one place: which cluster to join, joining it or starting an embedded local
Ray bound to loopback, and the runtime environment its workers get (the console policy of
``dynaip.console.ray_init_kwargs``). Curation (``pipeline.executor_ray``), the feature precompute
(``dynaip.features``), synth (a curation run), training (``dynaip.train.trainer``) and the eval's
generation (``dynaip.eval.generate``) all start Ray through ``connect``, and every Ray Train run takes
its torch.distributed setup from ``torch_config`` (loopback only on the embedded Ray; docs/security.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def ray_address_from_env(cli_value: str | None) -> str | None:
    """``--ray-address`` wins; inside ``ray job submit`` Ray sets RAY_ADDRESS, so the job joins its cluster."""
    return cli_value or os.environ.get("RAY_ADDRESS") or None


def connect(address: str | None, *, num_cpus: int | None = None) -> None:
    """Joins a cluster (``auto`` or ``host:port``) or starts an embedded local Ray.

    The embedded Ray keeps token authentication on (Ray's default), has no dashboard, and listens
    on loopback only (``loopback_ray``): nothing of a local curation run is reachable from the network.
    """
    import ray

    if ray.is_initialized():
        return
    from dynaip.console import quiet_ray_data, ray_init_kwargs

    with _keep_stop_handler():
        if address and on_loopback(address):  # a head bound to 127.0.0.1 (the embedded one, `ray start
            with loopback_ray():  # --node-ip-address=127.0.0.1`): Ray would dial the host's routable address
                ray.init(address=address, **{"log_to_driver": True, **ray_init_kwargs()})
        elif address:
            ray.init(address=address, **{"log_to_driver": True, **ray_init_kwargs()})
        else:
            with loopback_ray():
                ray.init(
                    num_cpus=num_cpus,
                    include_dashboard=False,
                    dashboard_host="127.0.0.1",
                    _node_ip_address="127.0.0.1",
                    **ray_init_kwargs({"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}),
                )
    quiet_ray_data()


def on_loopback(address: str) -> bool:
    """True for ``127.x.y.z:port``, ``localhost:port`` and ``[::1]:port`` (``ray://`` and ``auto`` are not)."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


@contextmanager
def _keep_stop_handler() -> Iterator[None]:
    """``ray.init`` replaces the SIGTERM handler with its own ``sys.exit(15)``; under the ``dynaip`` CLI
    (``dynaip.cli.stop_signals``) SIGTERM must keep ending the run like Ctrl-C, with its one line."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and getattr(before, "dynaip_stop", False):
            signal.signal(signal.SIGTERM, before)


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def loopback_ray() -> Iterator[None]:
    """While an embedded Ray starts: its node address is 127.0.0.1, so GCS, raylet and agents bind
    to loopback. Checked on Ray 2.60 (tests/test_curation_reliability.py lists the listening
    sockets): ``_node_ip_address="127.0.0.1"`` alone is not enough — Ray swaps a loopback address for
    the host's routable one (``services.resolve_ip_for_localhost``) unless
    ``ray_constants.ENABLE_RAY_CLUSTER`` is off, its single-machine mode (read from this variable at
    import, so the imported constant is switched too). GCS and raylet then listen on 127.0.0.1, where
    they otherwise listen on every interface. Both are restored once Ray runs: they only matter while
    the node starts (the raylet and its workers are spawned with the variable set)."""
    from ray._private import ray_constants

    old_env, old_const = os.environ.get(LOOPBACK_ENV), getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = old_env
        if old_const is not None:
            ray_constants.ENABLE_RAY_CLUSTER = old_const


def loopback_cluster() -> bool:
    """True when every live node of the Ray cluster this process is connected to is on 127.0.0.1: the
    embedded Ray of ``connect``. Its Ray Train workers then need no socket beyond loopback either."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return bool(nodes) and all(n.get("NodeManagerAddress") == "127.0.0.1" for n in nodes)


def torch_config(backend: str):
    """Ray Train's ``TorchConfig`` for ``backend`` (gloo | nccl). On a loopback cluster it is
    ``loopback_torch_config``'s, so torch.distributed listens on 127.0.0.1 only; on a cluster the user
    named, Ray Train's own (ranks on other machines must reach rank 0)."""
    from ray.train.torch import TorchConfig

    return loopback_torch_config(backend) if loopback_cluster() else TorchConfig(backend=backend)


def loopback_torch_config(backend: str):
    """A ``TorchConfig`` whose process group lives on loopback. Ray Train's own setup (Ray 2.60) starts
    torch's rendezvous store (``TCPStore``, unauthenticated: any client can read and write its keys)
    in rank 0 on *every* interface, whatever address the ranks are told (checked with the listening
    sockets of a two-worker run: ``*:port``). Here rank 0 binds a socket to 127.0.0.1 first and starts
    the store on it (``master_listen_fd``, ``multi_tenant``): the store the process-group setup then
    creates on that port is this one. Gloo and NCCL are told to use the loopback interface for their
    own connections (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``; gloo otherwise follows the
    address the host name resolves to)."""
    from dataclasses import dataclass

    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend, get_address_and_port

    class RankZeroStore:
        """The worker group as ``_TorchBackend.on_start`` sees it, except that asking rank 0 for the
        rendezvous address starts the loopback store there and answers its address."""

        def __init__(self, group):
            self._group = group

        def execute_single(self, rank, fn, *args, **kwargs):
            if fn is get_address_and_port:
                return self._group.execute_single(rank, _serve_rendezvous_on_loopback)
            return self._group.execute_single(rank, fn, *args, **kwargs)

        def __len__(self) -> int:
            return len(self._group)

        def __getattr__(self, name):
            return getattr(self._group, name)

    class LoopbackTorchBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            worker_group.execute(_loopback_interfaces)
            super().on_start(RankZeroStore(worker_group), backend_config)

    @dataclass
    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return LoopbackTorchBackend

    return LoopbackTorchConfig(backend=backend)


_RENDEZVOUS = []
"""The loopback rendezvous store of this process (rank 0 of a loopback run): kept alive for the
process's life, as the process group's store refers to the same server."""


def _serve_rendezvous_on_loopback() -> tuple[str, int]:
    """In rank 0: torch's rendezvous store on a free port of 127.0.0.1; returns ``(address, port)``."""
    import datetime
    import socket

    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    _RENDEZVOUS[:] = [
        dist.TCPStore(
            "127.0.0.1",
            port,
            None,
            True,
            datetime.timedelta(minutes=30),
            wait_for_workers=False,
            multi_tenant=True,
            master_listen_fd=sock.detach(),
        )
    ]
    return "127.0.0.1", port


def _loopback_interfaces() -> None:
    """In every rank: gloo and NCCL open their connections on the loopback interface."""
    import socket

    names = [name for _, name in socket.if_nameindex()]
    lo = next((n for n in ("lo", "lo0") if n in names), None)
    if lo is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = lo
        os.environ["NCCL_SOCKET_IFNAME"] = lo
