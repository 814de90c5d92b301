"""Checks that the bytes a training stream reads are the bytes the manifest lists (sha256 per shard).

The loader reads each shard once per block with ``tarfile`` over ``fsspec`` (dynaip/train/data.py).
Hashing a shard separately before training would read every byte twice; instead ``ShardGuard.open``
wraps the file so every byte ``tarfile`` reads is hashed as it goes by, forward seeks (tarfile
passing over members it does not need) are turned into hashed reads, and after the block's samples
the rest of the shard is read to complete the hash (``ShardGuard.finish``). So the first block of
a shard that a process reads costs one full read of that shard and verifies it; later blocks of
the same shard in the same process are trusted (``_VERDICTS``, per process, by url and sha256).

The trade-off of hashing while reading is that the verdict comes only at the end of the shard, after
its samples were read. The guard therefore holds back the samples of an unverified shard until the
verdict (``iter_tar`` buffers them: at most one block's ``count`` samples, which the consumer
materialises anyway), so no sample of a shard that fails its hash ever reaches training.

Policy (``data.on_corrupt_shard`` in the train config, ``StreamSpec.on_corrupt_shard``):
``error`` (default) raises ``ShardIntegrityError`` naming the shard for a hash mismatch or a
missing shard; ``skip`` drops the shard's samples (counted as skipped) and counts the shard
(``corrupt_count``; the trainer logs it as ``corrupt_shards``). A shard whose manifest entry has
no ``sha256`` (older manifests) is not hash-checked, only opened.
"""

from __future__ import annotations

import hashlib
import io
import logging
from typing import IO, Any

import fsspec

log = logging.getLogger(__name__)

POLICIES = ("error", "skip")
_CHUNK = 1 << 20

_VERDICTS: dict[tuple[str, str | None], bool] = {}
"""(url, sha256) → verified (True) or corrupt/missing (False), in this process."""
_CORRUPT = 0
"""Distinct corrupt or missing shards this process met (the consumer adds the change to its position)."""


class ShardIntegrityError(ValueError):
    """A shard is missing or its bytes are not the manifest's (``data.on_corrupt_shard: error``)."""


def corrupt_count() -> int:
    return _CORRUPT


def reset() -> None:
    """Forgets every verdict (tests; a new process starts empty anyway)."""
    global _CORRUPT
    _VERDICTS.clear()
    _CORRUPT = 0


class HashingReader(io.RawIOBase):
    """A read-only file whose bytes, read in order, feed a sha256; forward seeks read through."""

    def __init__(self, raw: IO[bytes]):
        super().__init__()
        self.raw, self.pos, self.h = raw, 0, hashlib.sha256()
        self.ordered = True
        """False after a backward seek: the hash no longer covers the file in order (see ``digest``)."""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read() if n is None or n < 0 else self.raw.read(n)
        if self.ordered:
            self.h.update(data)
        self.pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self.pos + offset}.get(whence)
        if target is None or target < self.pos:  # tarfile only moves forward; anything else stops hashing
            self.ordered = False
            self.pos = self.raw.seek(offset, whence)
            return self.pos
        while self.pos < target:  # read through instead of skipping: those bytes must be hashed too
            if not self.read(min(_CHUNK, target - self.pos)):
                break
        return self.pos

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


class ShardGuard:
    """Verification of one shard open (see the module docstring)."""

    def __init__(self, url: str, sha256: str | None, policy: str = "error"):
        if policy not in POLICIES:
            raise ValueError(f"on_corrupt_shard={policy!r}: choose one of {POLICIES}")
        self.url, self.sha256, self.policy = url, sha256, policy
        self.reader: HashingReader | None = None
        self._raw = None

    @property
    def verdict(self) -> bool | None:
        """True: verified before; False: known corrupt; None: this open decides."""
        return _VERDICTS.get((self.url, self.sha256))

    @property
    def pending(self) -> bool:
        """Samples of this open must wait for ``finish`` (first read of a shard with a known hash)."""
        return self.sha256 is not None and self.verdict is None

    def open(self) -> IO[bytes]:
        """The shard's file (hashing when pending). A missing shard goes through the policy."""
        try:
            self._raw = fsspec.open(self.url, "rb").open()
        except FileNotFoundError:
            self._fail(f"shard {self.url} listed in the manifest does not exist")
            raise
        if not self.pending:
            return self._raw
        self.reader = HashingReader(self._raw)
        return self.reader  # type: ignore[return-value]

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    def finish(self) -> bool:
        """Completes the hash (reads the rest of the shard) and applies the policy; True = samples may go."""
        if self.reader is None:
            return self.verdict is not False
        self.reader.drain()
        if not self.reader.ordered:  # cannot happen with tarfile; stay correct anyway, at the cost of a re-read
            with fsspec.open(self.url, "rb") as f:
                h = hashlib.sha256()
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
            got = h.hexdigest()
        else:
            got = self.reader.h.hexdigest()
        self.reader = None
        if got == self.sha256:
            _VERDICTS[(self.url, self.sha256)] = True
            return True
        self._fail(f"shard {self.url} has sha256 {got[:16]}…, the manifest lists {str(self.sha256)[:16]}…: "
                   "its bytes changed after curation")
        return False

    def _fail(self, what: str) -> None:
        global _CORRUPT
        if (self.url, self.sha256) not in _VERDICTS or _VERDICTS[(self.url, self.sha256)]:
            _CORRUPT += 1
        _VERDICTS[(self.url, self.sha256)] = False
        if self.policy == "error":
            raise ShardIntegrityError(f"{what}; restore it from the curation output (or re-run `dynaip curate`), "
                                      "or set data.on_corrupt_shard: skip in the train config to train without it")
        log.warning("%s; skipping its samples (data.on_corrupt_shard: skip)", what)
