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
(``corrupt_count``; the trainer logs it as ``corrupt_shards``); a shard with more or fewer bytes than
its manifest entry lists is treated the same. A manifest entry without ``sha256`` or ``bytes`` never
gets here: the dataset reader refuses the manifest (dynaip/dataset/reader.py).
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import IO

import fsspec

from dynaip.dataset import reader as dataset_reader
from dynaip.dataset.reader import HashingReader

log = logging.getLogger(__name__)

POLICIES = ("error", "skip")
_CHUNK = 1 << 20

_VERDICTS: dict[tuple[str, str | None], bool] = {}
"""(url, sha256) → verified (True) or corrupt/missing (False), in this process."""
_CORRUPT = 0
"""Distinct corrupt or missing shards this process met (the consumer adds the change to its position)."""


ERROR_LINE = re.compile(r"^.*\b(ShardIntegrityError|DatasetError): ")
"""The exception's name in front of a shard error's line as a traceback's last line spells it (a
DataLoader worker's or a Ray worker's failure carries the error as text)."""


class ShardIntegrityError(dataset_reader.ShardIntegrityError):
    """A shard is missing or its bytes are not the manifest's (``data.on_corrupt_shard: error``)."""


def corrupt_count() -> int:
    return _CORRUPT


def reset() -> None:
    """Forgets every verdict (tests; a new process starts empty anyway)."""
    global _CORRUPT
    _VERDICTS.clear()
    _CORRUPT = 0


class ShardGuard:
    """Verification of one shard open (see the module docstring)."""

    def __init__(self, url: str, sha256: str | None, policy: str = "error", size: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"on_corrupt_shard={policy!r}: choose one of {POLICIES}")
        self.url, self.sha256, self.policy, self.size = url, sha256, policy, size
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
        length, self.reader = self.reader.pos, None
        if self.size is not None and length != self.size:
            self._fail(
                f"shard {self.url} has {length} bytes, the manifest lists {self.size}: its bytes changed after curation"
            )
            return False
        if got == self.sha256:
            _VERDICTS[(self.url, self.sha256)] = True
            return True
        self._fail(
            f"shard {self.url} has sha256 {got[:16]}…, the manifest lists {str(self.sha256)[:16]}…: "
            "its bytes changed after curation"
        )
        return False

    def _fail(self, what: str) -> None:
        global _CORRUPT
        if (self.url, self.sha256) not in _VERDICTS or _VERDICTS[(self.url, self.sha256)]:
            _CORRUPT += 1
        _VERDICTS[(self.url, self.sha256)] = False
        if self.policy == "error":
            raise ShardIntegrityError(
                f"{what}; restore it from the curation output (or re-run `dynaip curate`), "
                "or set data.on_corrupt_shard: skip in the train config to train without it"
            )
        log.warning("%s; skipping its samples (data.on_corrupt_shard: skip)", what)
