"""One run per output directory: ``RunLock(store, what)`` is held for the whole of a run that writes
a directory — a curation (``pipeline.orchestrate``, synth included), a training run (``--out``, in
``dynaip.train.trainer.run_training``: ``dynaip train`` and the demo), a feature precompute (each
``DATASET/features/NAME``) and an eval generation (``--out``).

- Local directories: ``DIR/.dynaip.lock``, an advisory ``fcntl.flock`` (exclusive, non-blocking)
  on a file whose text names the holder (host, pid, start time). The kernel drops the lock when
  its process dies (even on SIGKILL), so a stale lock never blocks a later run; the text only
  serves the error message. The file is removed on release (a finished dataset holds none). Where ``flock`` is not supported (some network filesystems) the file
  itself is the lock (created with O_EXCL), and one whose pid is dead *on this host* is taken over.
- Object stores (no locks there): ``DIR/.dynaip.lock`` is a lease object ``{host, pid, time,
  token, expires}`` renewed by a background thread every ``ttl / 3`` seconds. A lease that has
  expired (its holder died without releasing it) is taken over. Two runs starting in the same
  instant could both write a lease; each reads it back after writing and only the one whose token
  is there proceeds.

A refused run raises ``error`` (``RunDirError`` unless the caller names its own, e.g. curation's
``OutputDirError``) with one line naming the holder and what to do.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from dynaip.dataset.store import Store

LOCK_NAME = ".dynaip.lock"
LEASE_TTL = 120.0
"""Seconds a lease on an object store stays valid without renewal."""


_HELD_FDS: set[int] = set()
"""Lock files this process holds; a forked child (a DataLoader worker) closes its copies at once, so a
child that outlives a killed run cannot keep the run's lock (closing a copy never unlocks the parent's)."""


def _close_held_in_child() -> None:
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class RunDirError(ValueError):
    """A run directory in use by another run (a ValueError: the CLI reports it in one line)."""


def _holder(ttl: float | None = None) -> dict[str, Any]:
    now = time.time()
    h = {"host": socket.gethostname(), "pid": os.getpid(), "time": round(now, 3), "token": uuid.uuid4().hex}
    if ttl is not None:
        h["expires"] = round(now + ttl, 3)
    return h


def _describe(h: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(h.get("time", 0))))
    return f"pid {h.get('pid')} on host {h.get('host')} (since {when})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    return True


class RunLock:
    """Exclusive use of a run directory; a context manager (``acquire`` / ``release``). ``what`` names
    the kind of run in the refusal ("curation run", "training run" ...), ``error`` its exception class."""

    def __init__(
        self, store: Store, *, ttl: float = LEASE_TTL, what: str = "curation run", error: type[Exception] = RunDirError
    ):
        self.store = store
        self.ttl = ttl
        self.what, self.error = what, error
        self.info: dict[str, Any] | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _refuse(self, holder: dict[str, Any]) -> None:
        raise self.error(
            f"output directory {self.store.display()} is in use by another {self.what} "
            f"({_describe(holder)}); wait for it to finish or stop it, or pass another --out"
        )

    # ---- local -------------------------------------------------------------------------------

    def acquire(self) -> None:
        if self.store.local:
            self._acquire_local()
        else:
            self._acquire_lease()

    def _acquire_local(self) -> None:
        import fcntl

        self.store.makedirs()
        path = self.store.local_path(LOCK_NAME)
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_json(path)
                os.close(fd)
                self._refuse(holder)
            except OSError:  # no flock here: the file's existence is the lock
                os.close(fd)
                self._acquire_pidfile(path)
                return
            try:  # the holder before us unlinks the file on release: locked an orphan inode? try again
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise RuntimeError(f"could not lock {path}: it keeps being replaced")
        self.info = _holder()
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(self.info, sort_keys=True) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        _HELD_FDS.add(fd)

    def _acquire_pidfile(self, path: Any) -> None:
        held = _read_json(path)
        if held and held.get("host") == socket.gethostname() and not _pid_alive(int(held.get("pid", -1))):
            os.unlink(path)  # its run died on this host: stale
        elif held:
            self._refuse(held)
        self.info = _holder()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            self._refuse(_read_json(path))
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.info, sort_keys=True) + "\n")

    # ---- object stores -----------------------------------------------------------------------

    def _read_lease(self) -> dict[str, Any]:
        self.store.invalidate()
        try:
            return json.loads(self.store.read_bytes(LOCK_NAME))
        except (OSError, ValueError):
            return {}

    def _acquire_lease(self) -> None:
        held = self._read_lease()
        if held and float(held.get("expires", 0)) > time.time():
            self._refuse(held)
        self.info = _holder(self.ttl)
        self.store.write_bytes(LOCK_NAME, json.dumps(self.info, sort_keys=True).encode())
        time.sleep(0.05)  # let a racing writer's lease land before reading back
        if self._read_lease().get("token") != self.info["token"]:
            self.info = None
            self._refuse(self._read_lease())
        self._thread = threading.Thread(target=self._renew, daemon=True, name="curate-lease")
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            assert self.info is not None
            self.info["expires"] = round(time.time() + self.ttl, 3)
            try:
                self.store.write_bytes(LOCK_NAME, json.dumps(self.info, sort_keys=True).encode())
            except Exception:  # a transient store error: the next renewal tries again
                pass

    # ---- release -----------------------------------------------------------------------------

    def release(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
            if self.info is not None and self._read_lease().get("token") == self.info["token"]:
                self.store.remove(LOCK_NAME)
        elif self._fd is not None:
            # unlinked while still locked (a finished dataset holds no lock file); a run that opened the
            # old inode meanwhile notices it is gone (the inode check above) and locks the new file
            self.store.local_path(LOCK_NAME).unlink(missing_ok=True)
            _HELD_FDS.discard(self._fd)
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        elif self.info is not None and self.store.local:
            path = self.store.local_path(LOCK_NAME)
            if _read_json(path).get("token") == self.info["token"]:
                path.unlink(missing_ok=True)
        self.info = None


def _read_json(path: Any) -> dict[str, Any]:
    try:
        with open(path) as f:
            d = json.loads(f.read() or "{}")
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}
