"""Atomic file writes: a temporary sibling, fsync, rename, fsync of the directory — readers never
see half a file, and a finished write survives a power cut.

``mkstemp`` creates its file 0600 whatever the umask; every file written here is switched to
``0666 & ~umask`` (what ``open(path, "w")`` would give), so shards, manifests and markers all get
the same mode as any other file the user creates (``file_mode``).
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

TMP_SUFFIX = ".tmp"
"""Temporary siblings are ``.{name}.{random}.tmp``; ``clean_temp_files`` removes leftovers of a crash."""

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask. Read from /proc where it is shown (no change of process state); elsewhere
    set and restored under a lock (``os.umask`` has no read-only form)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would create: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def fsync_dir(path: str | Path) -> None:
    """Makes a rename durable (POSIX: the directory entry itself must reach the disk)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_temp(final: Path) -> tuple[int, str]:
    """``(fd, path)`` of a new temporary sibling of ``final`` with the umask's file mode."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX, dir=final.parent)
    try:
        os.fchmod(fd, file_mode())
    except OSError:  # a filesystem without modes (some FUSE mounts): keep mkstemp's
        pass
    return fd, tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` (parents created) through a unique temporary sibling + fsync +
    rename + directory fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def clean_temp_files(folder: str | Path) -> list[Path]:
    """Removes ``.*.tmp`` siblings that a crashed writer left in ``folder`` (not recursive); returns
    them. Only safe while no other writer uses the folder (the caller holds its lock)."""
    removed = []
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_image(image, path: str | Path, format: str = "PNG") -> None:
    """Saves a PIL image atomically."""
    import io

    buf = io.BytesIO()
    image.save(buf, format=format)
    atomic_write_bytes(path, buf.getvalue())
