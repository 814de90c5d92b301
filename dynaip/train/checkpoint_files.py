"""Crash-safe checkpoint directories under ``RUN/checkpoints`` (written by rank 0, dynaip/train/resume.py).

A checkpoint is written whole under a temporary name (``.tmp-step-N``), its files and directories
fsynced, and then swapped in so that at every instant either the old or the new ``step-N`` exists:

1. ``step-N`` (a re-run writing the same step) is renamed aside to ``.old-step-N``;
2. ``.tmp-step-N`` is renamed to ``step-N``; the parent directory is fsynced;
3. ``.old-step-N`` is deleted.

``recover`` (run on start, before any checkpoint is read) undoes what a crash left: an aside copy
whose ``step-N`` is missing (a crash between 1 and 2) is renamed back; one whose ``step-N`` exists
(a crash before 3) is deleted; every ``.tmp-*`` directory and ``*.tmp`` file (a crash while writing)
is deleted. Checkpoints are pruned by step number, not by name (``step-1000000`` sorts before
``step-999999`` as text).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

from .checkpoints import STEP_DIR  # noqa: E402 (one definition of the directory name)

ASIDE = re.compile(r"^\.old-(step-\d{6,})$")


def fsync_path(path: Path) -> None:
    """fsync one file or directory (a directory's fsync makes its entries' renames durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file, then every directory bottom-up, then ``root``."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def step_of(path: Path) -> int | None:
    m = STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def steps(root: Path) -> list[tuple[int, Path]]:
    """The ``step-N`` directories of ``root``, by step number."""
    if not root.is_dir():
        return []
    return sorted((s, p) for p in root.iterdir() if (s := step_of(p)) is not None)


def swap_in(tmp: Path, final: Path) -> None:
    """Moves the finished ``tmp`` to ``final`` with no moment where neither exists."""
    fsync_tree(tmp)
    aside = final.with_name(f".old-{final.name}")
    if aside.exists():  # left by a crash that recover did not see (should not happen): the new data wins
        shutil.rmtree(aside)
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if aside.exists():
        shutil.rmtree(aside)


def prune(root: Path, keep: int, protect: int | None = None) -> list[Path]:
    """Deletes all but the ``keep`` highest-step checkpoints and the one of step ``protect`` (the best,
    ``checkpoints.keep_best``); returns the deleted ones."""
    old = [p for s, p in steps(root)[:-keep] if s != protect] if keep > 0 else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


def recover(root: Path) -> list[str]:
    """Repairs what a crash during ``swap_in`` or a write left in ``root``; returns what was done."""
    done: list[str] = []
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        m = ASIDE.match(p.name)
        if m:
            final = root / m.group(1)
            if final.exists():
                shutil.rmtree(p)
                done.append(f"removed {p.name} (superseded by {final.name})")
            else:
                os.replace(p, final)
                done.append(f"restored {final.name} from {p.name}")
        elif p.name.startswith(".tmp-") or p.name.endswith(".tmp"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            done.append(f"removed unfinished {p.name}")
    if done:
        fsync_path(root)
        for line in done:
            log.warning("checkpoints: %s", line)
    return done


def unreadable_file(ckpt: Path) -> str | None:
    """The first file of ``ckpt`` that is cut short or not in its format, in words; None when all look whole.

    Cheap enough for the driver before Ray starts: torch's ``.pt`` files are zip archives, whose
    directory sits at the end (a truncated file has none), and ``adapter.safetensors`` must be as
    long as its header says. Their contents are not read.
    """
    import json
    import struct
    import zipfile

    resume = ckpt / "resume"
    for p in sorted(resume.glob("*.pt")):
        try:
            with zipfile.ZipFile(p) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{p} is damaged ({e})"
    st = ckpt / "adapter.safetensors"
    try:
        with open(st, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if st.stat().st_size < 8 + n + end:
            return f"{st} is cut short ({st.stat().st_size} bytes, its header needs {8 + n + end})"
    except (OSError, ValueError, struct.error, KeyError, TypeError) as e:
        return f"{st} is damaged ({type(e).__name__}: {e})"
    return None
