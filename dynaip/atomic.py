"""Atomic file writes: a temporary sibling, fsync, rename, fsync of the directory — readers never
see half a file, and a finished write survives a power cut.

A write that the disk refuses (full, over quota, read-only, no permission) becomes a ``StorageError``:
one line naming the path and what to do, shown by the CLI without a traceback (``storage_error`` finds
it inside wrapped errors too, e.g. a Ray worker's). The temporary sibling is removed, so what was there
before is intact and the same command resumes once space is back (README.md, "Full disks and stop
signals"). ``writing(path)`` gives the same for writers that stream (shards, logs, checkpoints).

``mkstemp`` creates its file 0600 whatever the umask; every file written here is switched to
``0666 & ~umask`` (what ``open(path, "w")`` would give), so shards, manifests and markers all get
the same mode as any other file the user creates (``file_mode``).
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


STORAGE_ERRNOS = {
    errno.ENOSPC: ("no space left on the device", "free space there (or write elsewhere)"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota (or write elsewhere)"),
    errno.EROFS: ("the file system is read-only", "write to a writable location"),
    errno.EACCES: ("permission denied", "make it writable for this user (or write elsewhere)"),
    errno.EPERM: ("operation not permitted", "make it writable for this user (or write elsewhere)"),
}
"""Errors of the storage, not of the program: reported in one line, never with a traceback."""


class StorageError(OSError):
    """A write the storage refused; ``str()`` is the one line to show."""

    def __init__(self, code: int, path: str | os.PathLike | None):
        what, fix = STORAGE_ERRNOS[code]
        where = f"cannot write {path}" if path else "a write failed"
        super().__init__(
            code,
            f"{where}: {what}; {fix}, then run the same command again: what was written "
            "before is intact and the run resumes from it",
        )
        self.path = None if path is None else str(path)

    def __str__(self) -> str:
        return self.strerror or ""


def storage_error(exc: BaseException, path: str | os.PathLike | None = None) -> StorageError | None:
    """The ``StorageError`` behind ``exc`` (itself, or an ENOSPC / EDQUOT / EROFS / EACCES / EPERM
    ``OSError`` in its cause chain, a Ray task error's ``cause`` included); None when it is not one."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StorageError):
            return e
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return StorageError(e.errno, path or e.filename)
        cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError keeps the worker's exception here
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turns a storage error raised inside the block into a ``StorageError`` naming ``path``."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        raise StorageError(e.errno, path) from e


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
    with writing(path):
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
