"""Where a dataset lives: a local directory or an fsspec URL (``s3://…``, ``gs://…``, ``file://…``).

``Store(url)`` reads and writes paths relative to the dataset root, atomically:

- local (POSIX): a unique temporary sibling, fsync, rename, then fsync of the directory — a crash
  never leaves half a file under its final name;
- object stores: the object is uploaded whole (from a local temporary file for shards, so a failed
  upload never commits a partial object) — an object appears complete or not at all. Per-chunk
  markers are written after the chunk's shards, so a chunk without its marker is redone.

Credentials are the filesystem's business (environment variables, ``~/.aws`` and the like): a
``Store`` never stores them, and ``display`` / ``url`` never carry any.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from dynaip.atomic import atomic_write_bytes, fsync_dir, make_temp, writing


def is_url(path: str | os.PathLike) -> bool:
    """An fsspec URL (``s3://...``) rather than a local path."""
    return "://" in str(path)


class HashingWriter:
    """A write-only file wrapper that counts and sha256-hashes what passes through it."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()


class Store:
    """A dataset root on a local disk or behind an fsspec URL."""

    def __init__(self, url: str | os.PathLike):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        url = str(url)
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.local = isinstance(self.fs, LocalFileSystem)
        if not self.local:  # other processes write here too: never answer from a cached listing
            try:
                self.fs, root = fsspec.core.url_to_fs(url, use_listings_cache=False, skip_instance_cache=True)
            except TypeError:
                pass
        self.root = str(Path(root).expanduser().absolute()) if self.local else root.rstrip("/")

    def display(self) -> str:
        """The root as shown to users: the local path, or the URL without credentials."""
        return self.root if self.local else redact_url(self.url)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:  # filesystems re-open from the URL in each process
        return {"url": self.url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"])

    # ---- paths -------------------------------------------------------------------------------

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (relative to the root, POSIX separators)."""
        return f"{self.root}/{rel}" if rel else self.root

    def local_path(self, rel: str = "") -> Path:
        assert self.local, "local_path on an object store"
        return Path(self.path(rel))

    # ---- reading -----------------------------------------------------------------------------

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel))

    def is_file(self, rel: str) -> bool:
        return self.fs.isfile(self.path(rel))

    def size(self, rel: str) -> int | None:
        """Size in bytes, or None when ``rel`` does not exist."""
        if self.local:
            try:
                return os.stat(self.path(rel)).st_size
            except OSError:
                return None
        try:
            info = self.fs.info(self.path(rel))
        except (FileNotFoundError, OSError):
            return None
        return int(info["size"]) if info.get("type") == "file" else None

    def read_bytes(self, rel: str) -> bytes:
        if self.local:
            return Path(self.path(rel)).read_bytes()
        return self.fs.cat_file(self.path(rel))

    @contextmanager
    def open(self, rel: str) -> Iterator[IO[bytes]]:
        with self.fs.open(self.path(rel), "rb") as f:
            yield f

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``; empty when it does not exist."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except (FileNotFoundError, OSError):
            return []
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def is_empty(self) -> bool:
        """Nothing under the root but a run lock (``dynaip.run_lock``)."""
        return not [n for n in self.listdir("") if n != ".dynaip.lock"]

    def invalidate(self) -> None:
        """Forget cached listings (object stores): another process may have written since."""
        try:
            self.fs.invalidate_cache()
        except Exception:
            pass

    # ---- writing -----------------------------------------------------------------------------

    def makedirs(self, rel: str = "") -> None:
        if self.local:
            os.makedirs(self.path(rel), exist_ok=True)
        # object stores have no directories

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Writes ``data`` to ``rel`` atomically (see the module doc)."""
        if self.local:
            atomic_write_bytes(self.path(rel), data)  # file and directory fsynced
        else:
            with writing(self.path(rel)):
                self.fs.pipe_file(self.path(rel), data)

    @contextmanager
    def writer(self, rel: str) -> Iterator[HashingWriter]:
        """Streams a new file into ``rel``; it appears under that name only when the block ends
        without an error. The yielded writer's ``size`` / ``sha`` describe what was written."""
        with writing(self.path(rel)):  # a full / read-only disk: one line naming the file; the temp file goes
            if self.local:
                final = Path(self.path(rel))
                final.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = make_temp(final)  # the umask's mode, like every other file of the dataset
            else:
                fd, tmp = tempfile.mkstemp(prefix="dynaip-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as raw:
                    w = HashingWriter(raw)
                    yield w
                    raw.flush()
                    os.fsync(raw.fileno())
                if self.local:
                    os.replace(tmp, final)
                    fsync_dir(final.parent)
                else:
                    self.fs.put_file(tmp, self.path(rel))
            finally:
                Path(tmp).unlink(missing_ok=True)

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass


def redact_url(url: str) -> str:
    """``url`` without any ``user:password@`` part (what manifests and logs may show)."""
    import re

    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", str(url))
