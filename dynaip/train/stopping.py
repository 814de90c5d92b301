"""Ctrl-C and SIGTERM during a Ray Train ``fit`` in the driver: both stop the run the way Ray Train's own
Ctrl-C handler does, and both end as the CLI's stop (one line, 130 / 143; dynaip/cli.py ``stop_signals``).

Ray Train (2.60) installs a SIGINT handler in ``fit`` (main thread only) that aborts its controller: the
controller stops the training workers and its detached ``PlacementGroupCleaner`` actor, then exits; the
handler then calls ``sys.exit(0)``. A driver that simply dies instead (the plain SIGTERM path) leaves that
cleaner to notice the controller's death through Ray's state API, which it reaches only where one Ray
instance runs on the machine — with several (a shared machine) it stays alive on a joined cluster. So
SIGTERM is handed to Ray Train's handler too, and the ``SystemExit(0)`` (or the KeyboardInterrupt Ray
makes of it inside ``ray.get``) is turned back into the stop of the signal that came: the previous SIGTERM
handler's (the CLI's ``Stopped``) for SIGTERM, a KeyboardInterrupt for Ctrl-C. Both handlers are put back
afterwards: Ray Train leaves its own behind, bound to a controller that is gone.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def stops_through_ray_train() -> Iterator[None]:
    """Wraps ``trainer.fit()`` (see the module docstring); off the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before_int, before_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    got: list[int] = []

    def on_term(signum, frame) -> None:
        got.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during the abort kills at once
        ray_train = signal.getsignal(signal.SIGINT)
        if ray_train is not before_int and callable(ray_train):  # fit has started its controller
            ray_train(signal.SIGINT, frame)  # aborts it (workers, cleaner) and exits, or returns when it is done
        _term(before_term, frame)

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except (SystemExit, KeyboardInterrupt):  # Ray Train's handler exits 0; inside ray.get it is a KeyboardInterrupt
        if got:
            _term(before_term, None)
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGINT, before_int)
        signal.signal(signal.SIGTERM, before_term)


def _term(handler, frame) -> None:
    """What SIGTERM did before ``fit``: the CLI's handler raises its ``Stopped``; the default ends the process."""
    if callable(handler):
        handler(signal.SIGTERM, frame)
    raise KeyboardInterrupt
