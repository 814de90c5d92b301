"""One training run per run directory, and no run over another run's checkpoints.

``hold(out, resume)`` is held by ``run_training`` for the whole run (``dynaip train``, ``jobs/train.py``,
the demo): the directory's ``RunLock`` (dynaip/run_lock.py; released on any exit, and by the kernel
when the process is killed, so a crashed run never blocks the ``--resume`` after it), then, without
``--resume``, a directory that already holds checkpoints is refused before a byte of it changes —
training over it would replace same-named checkpoints, keep the older ones of the first run beside
them and log two ``start`` records, and a later ``--resume`` would continue from a mix of two runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dynaip.dataset.store import Store
from dynaip.run_lock import RunLock

from .checkpoint_files import ASIDE, steps


class RunDirInUse(ValueError):
    """The run directory holds another run's checkpoints, or another live run holds it."""


def existing_checkpoints(out: Path) -> list[str]:
    """Names of the checkpoints under ``out/checkpoints`` (whole ones and a crash's aside copies)."""
    root = out / "checkpoints"
    names = [p.name for _, p in steps(root)]
    if root.is_dir():
        names += sorted(p.name for p in root.iterdir() if ASIDE.match(p.name))
    return names


def check_fresh(out: Path, resume: bool) -> None:
    """Without ``resume``, ``out`` must hold no checkpoint; one line saying what to do otherwise."""
    found = [] if resume else existing_checkpoints(out)
    if found:
        raise RunDirInUse(
            f"--out {out} already holds the checkpoints of a training run ({', '.join(found[-3:])}); "
            "pass --resume to continue it or choose another directory"
        )


@contextmanager
def hold(out: str, resume: bool) -> Iterator[None]:
    """The run directory's lock for the life of the block, after ``check_fresh``; a directory this call
    created is removed again when the run leaves nothing in it (a run refused by its preflight)."""
    path = Path(out)
    created = not path.exists()
    try:
        with RunLock(Store(str(path)), what="training run", error=RunDirInUse):
            check_fresh(path, resume)
            yield
    finally:
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
