"""Feature shard files: safetensors written as a stream, read by byte ranges, every tensor checksummed.

A feature shard is one standard safetensors file (``safetensors.safe_open`` loads it; nothing is
pickled). Two things are ours:

* **Writing as a stream.** A shard of 2,000 samples at 1024² holds ~10 GB, so tensors are appended
  to a temporary data file as they are computed and the header (whose offsets are only known at
  the end) is written in front of them when the shard is finished: header + data go to a temporary
  sibling, fsync, rename. Memory stays at one batch; a crash never leaves a half shard under its name.
* **Checksums a reader can use without reading the whole file.** The header's ``__metadata__``
  holds the sha256 of every tensor's bytes (``digests``), and the feature manifest holds the sha256
  of the header itself. A reader verifies the header once when it opens a shard and each tensor it
  reads, so every byte that reaches training is checked at no extra I/O (a training run reads only
  the tensors of its samples and buckets, never whole shards). The manifest's whole-file sha256 is
  for ``verify`` and for resuming.

Byte order is little-endian (every platform torch trains on); tensors are C-contiguous.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from dynaip.atomic import StorageError, writing

DTYPES: dict[torch.dtype, str] = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
FROM_CODE = {v: k for k, v in DTYPES.items()}
ALIGN = 8  # the header is padded with spaces so the data starts 8-byte aligned (as safetensors does)


class FeatureError(ValueError):
    """A feature file is missing, corrupt or does not match: the message names the path and the fix."""


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of ``t`` (C order)."""
    if t.dtype not in DTYPES:
        raise TypeError(f"feature tensors are float32, bfloat16 or float16, got {t.dtype}")
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class WrittenFile:
    """What ``ShardWriter.finish`` wrote: size, whole-file sha256, header sha256, tensor count."""

    bytes: int
    sha256: str
    header_sha256: str
    tensors: int


class ShardWriter:
    """Appends named tensors, then ``finish`` writes ``path`` atomically as a safetensors file.

    Names must be unique. ``metadata`` (str → str) goes into the header next to the digests.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data_path = self.path.with_name(f".{self.path.name}.data.tmp{os.getpid()}")
        self._data: BinaryIO | None = open(self._data_path, "wb")
        self._entries: dict[str, dict[str, Any]] = {}
        self._digests: dict[str, str] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        data = tensor_bytes(tensor)
        assert self._data is not None, "add after finish"
        try:
            with writing(self.path):
                self._data.write(data)
        except StorageError:  # nothing of this shard stays behind: the job is redone when space is back
            self._data.close()
            self._data = None
            self._data_path.unlink(missing_ok=True)
            raise
        self._entries[name] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + len(data)],
        }
        self._digests[name] = digest(data)
        self._offset += len(data)

    def finish(self, metadata: dict[str, str] | None = None) -> WrittenFile:
        assert self._data is not None, "finish twice"
        data_file, self._data = self._data, None
        meta = {**(metadata or {}), "digests": json.dumps(self._digests, sort_keys=True, separators=(",", ":"))}
        header = json.dumps({"__metadata__": meta, **self._entries}, sort_keys=True, separators=(",", ":")).encode()
        header += b" " * (-len(header) % ALIGN)
        prefix = struct.pack("<Q", len(header)) + header
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        h = hashlib.sha256(prefix)
        try:
            with writing(self.path):
                data_file.close()  # flushes the buffered tail: a small shard meets a full disk only here
            with writing(self.path), open(tmp, "wb") as out, open(self._data_path, "rb") as data:
                out.write(prefix)
                while chunk := data.read(1 << 22):
                    out.write(chunk)
                    h.update(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)
            self._data_path.unlink(missing_ok=True)
        return WrittenFile(
            bytes=len(prefix) + self._offset,
            sha256=h.hexdigest(),
            header_sha256=digest(prefix),
            tensors=len(self._entries),
        )

    def abort(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None
        self._data_path.unlink(missing_ok=True)


def write_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> WrittenFile:
    """A small shard in one call (the empty prompt's file)."""
    w = ShardWriter(path)
    try:
        for name, t in tensors.items():
            w.add(name, t)
    except BaseException:
        w.abort()
        raise
    return w.finish(metadata)


class ShardReader:
    """Random access to the tensors of one feature shard (local path or fsspec URL) by byte range.

    Opening checks the file's size and its header's sha256 against the manifest's values; ``get``
    checks each tensor against its digest. Every failure is a ``FeatureError`` naming ``url``.
    """

    def __init__(self, url: str, *, size: int | None = None, header_sha256: str | None = None):
        import fsspec

        self.url = url
        try:
            self._file = fsspec.open(url, "rb").open()
        except FileNotFoundError as e:
            raise FeatureError(f"feature shard {url} is missing; re-run `dynaip precompute` for its dataset") from e
        try:
            self._open(size, header_sha256)
        except BaseException:
            self._file.close()
            raise

    def _fail(self, what: str) -> FeatureError:
        return FeatureError(
            f"feature shard {self.url} is corrupt ({what}); re-run `dynaip precompute` "
            "for its dataset (finished shards are kept, damaged ones are rebuilt after you delete them)"
        )

    def _open(self, size: int | None, header_sha256: str | None) -> None:
        f = self._file
        if size is not None:
            f.seek(0, os.SEEK_END)
            actual = f.tell()
            if actual != size:
                raise self._fail(f"{actual} bytes, the manifest says {size}")
            f.seek(0)
        head = f.read(8)
        if len(head) != 8:
            raise self._fail("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > 1 << 31:
            raise self._fail(f"header length {n}")
        raw = f.read(n)
        if len(raw) != n:
            raise self._fail("truncated header")
        if header_sha256 is not None and digest(head + raw) != header_sha256:
            raise self._fail("header sha256 differs from the manifest's")
        try:
            header = json.loads(raw)
            meta = header.pop("__metadata__", {}) or {}
            self.digests: dict[str, str] = json.loads(meta.get("digests", "{}"))
        except ValueError as e:
            raise self._fail(f"unreadable header: {e}") from e
        self.metadata: dict[str, str] = meta
        self.entries: dict[str, dict[str, Any]] = header
        self._base = 8 + n

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> torch.Tensor:
        e = self.entries.get(name)
        if e is None:
            raise FeatureError(
                f"feature shard {self.url} has no tensor {name!r}; the features do not cover this "
                "sample (re-run `dynaip precompute` for its dataset)"
            )
        begin, end = e["data_offsets"]
        self._file.seek(self._base + begin)
        data = self._file.read(end - begin)
        if len(data) != end - begin:
            raise self._fail(f"tensor {name!r} is truncated")
        if self.digests.get(name) != digest(data):
            raise self._fail(f"tensor {name!r} does not match its sha256")
        dtype = FROM_CODE.get(e["dtype"])
        if dtype is None:
            raise self._fail(f"tensor {name!r} has dtype {e['dtype']}")
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(e["shape"])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
