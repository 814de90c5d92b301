"""Ray cluster access in one place: which cluster to join, joining it or starting an embedded local
Ray bound to loopback, and the runtime environment its workers get (the console policy of
``dynaip.console.ray_init_kwargs``). Curation (``pipeline.executor_ray``), the feature precompute
(``dynaip.features``), synth (a curation run), training (``dynaip.train.trainer``) and the eval's
generation (``dynaip.eval.generate``) all start Ray through ``connect``.
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
        if address:
            ray.init(address=address, **{"log_to_driver": True, **ray_init_kwargs()})
        else:
            with loopback_ray():
                ray.init(num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1",
                         _node_ip_address="127.0.0.1",
                         **ray_init_kwargs({"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}))
    quiet_ray_data()


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
