"""The one reader of finished dataset directories, strict by default: a dataset from elsewhere (a shared
bucket, a download) is untrusted input (docs/security.md, "Datasets from elsewhere").

Every reader — training (dynaip/train/data.py), feature precompute (local and on Ray), the web app's
Datasets page (dynaip/serve/datasets.py) and ``dynaip manifest show/verify/grid``
(dynaip/dataset/inspect.py) — gets its shard list from ``open_dataset`` (dynaip/dataset/manifest.py,
built on ``shard_refs`` here) and its tar members through ``check_member`` / ``check_sample``, so the rules below hold everywhere and a violation is refused with the same one
line, naming the manifest (or shard), the entry and the rule, before any byte of the shard is used:

- the dataset is named by the root the *user* gives (a local path, or a URL such as
  ``s3://bucket/ds`` or ``https://host/ds``); a shard path in the manifest is relative, normalised
  (no ``..``, ``.``, empty segment, backslash, scheme, ``~``, ``%``, ``?`` or ``#``) and resolves under
  that root only — for a local root also after resolving symlinks;
- every shard entry carries ``path`` (str), ``samples`` and ``bytes`` (non-negative integers, not
  strings) and ``sha256`` (64 lowercase hex digits);
- a shard's members are regular files named ``KEY.EXT`` (``KEY`` of ``[A-Za-z0-9_-]``, ``EXT`` one of
  ``MEMBER_ORDER``), no member twice, a sample's members together; every sample has all five members
  and its ``.json`` is a JSON object.

Bytes are checked while they stream (``HashingReader``): reading past the manifest's ``bytes`` fails at
once, and at the end of the shard its size and sha256 must match. Since that verdict comes only at the
end, a reader never hands out a sample of a shard before it: ``read_shard`` returns a shard's samples
only after the whole shard was read and verified, and the trainer holds a shard's samples back until
its verdict (dynaip/train/shard_integrity.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import fsspec

from dynaip.dataset.format import FIX, MEMBER_ORDER, DatasetError, shard_path

_CHUNK = 1 << 20
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MEMBER_RE = re.compile(r"([A-Za-z0-9_-]+)\.(" + "|".join(re.escape(e) for e in MEMBER_ORDER) + r")")
"""A tar member of a shard: ``KEY.EXT`` (sample keys are ``[A-Za-z0-9_-]``, pipeline/sample.py)."""


class ShardIntegrityError(DatasetError):
    """A shard's bytes are not the ones its manifest entry lists (size or sha256)."""


@dataclass(frozen=True)
class ShardRef:
    """One shard entry of a manifest, checked."""

    path: str
    """Relative to the dataset root, as the manifest lists it."""
    url: str
    """Where it is read from: under the root the user gave (a local path or a URL)."""
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Dataset:
    root: str
    """The root the user gave: a local path made absolute, or a URL without a trailing slash."""
    where: str
    """``ROOT/manifest.json``, for messages."""
    manifest: dict[str, Any]
    shards: list[ShardRef]


def is_url(root: str) -> bool:
    return "://" in root


def dataset_root(root: Any) -> str:
    """The root as the user named it: a URL as given (no trailing slash), a local path made absolute."""
    text = str(root).strip()
    if not text:
        raise DatasetError("give a dataset directory or URL (the folder that holds manifest.json)")
    if text.startswith("file://"):  # a local root however it is spelled: symlinks are checked for it
        text = text.removeprefix("file://")
    elif is_url(text):
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text))


def _entry(i: int, path: Any) -> str:
    return f"shard entry {i} ({path!r})" if isinstance(path, str) else f"shard entry {i}"


def shard_url(root: str, rel: Any, where: str, i: int = 0) -> str:
    """``rel`` (a manifest's shard path) under ``root``; DatasetError when it would lead anywhere else:
    the path's syntax (``shard_path``), and for a local root also where its symlinks resolve."""
    rel = shard_path(rel, where, i)
    if is_url(root):
        return f"{root}/{rel}"
    full = os.path.join(root, *rel.split("/"))
    base = os.path.realpath(root)
    real = os.path.realpath(full)
    if not (real == base or real.startswith(base.rstrip(os.sep) + os.sep)):
        raise DatasetError(
            f"{where}: {_entry(i, rel)} resolves through a symlink to {real}, outside the dataset; {FIX}"
        )
    return full


def _count(entry: dict[str, Any], key: str, where: str, name: str) -> int:
    v = entry.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise DatasetError(f"{where}: {name} has {key!r} {v!r}, not a non-negative integer; {FIX}")
    return v


def shard_refs(manifest: dict[str, Any], root: str, where: str) -> list[ShardRef]:
    """Every shard entry of ``manifest`` checked (see the module docstring), in manifest order."""
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise DatasetError(f"{where}: 'shards' is {type(shards).__name__}, not a list; {FIX}")
    refs, seen = [], set()
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            raise DatasetError(f"{where}: shard entry {i} is a {type(s).__name__}, not an object; {FIX}")
        url = shard_url(root, s.get("path"), where, i)
        name = _entry(i, s["path"])
        if s["path"] in seen:
            raise DatasetError(f"{where}: {name} lists a shard path twice; {FIX}")
        seen.add(s["path"])
        samples, size = _count(s, "samples", where, name), _count(s, "bytes", where, name)
        sha = s.get("sha256")
        if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
            raise DatasetError(
                f"{where}: {name} has 'sha256' {sha!r}, not 64 lowercase hex digits; every shard "
                f"must carry its hash so its bytes can be checked — {FIX}"
            )
        refs.append(ShardRef(path=s["path"], url=url, samples=samples, bytes=size, sha256=sha))
    return refs


# ----------------------------------------------------------------------------- bytes


class HashingReader(io.RawIOBase):
    """A read-only file whose bytes, read in order, feed a sha256; forward seeks read through.

    With ``size`` it fails (ShardIntegrityError) as soon as more than ``size`` bytes come, and
    ``finish`` drains the rest and checks size and hash (the verdict at EOF)."""

    def __init__(self, raw: IO[bytes], size: int | None = None, sha256: str | None = None, where: str = "shard"):
        super().__init__()
        self.raw, self.pos, self.h = raw, 0, hashlib.sha256()
        self.size, self.sha256, self.where = size, sha256, where
        self.ordered = True
        """False after a backward seek: the hash no longer covers the file in order (see ``digest``)."""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        data = self.raw.read() if n is None or n < 0 else self.raw.read(n)
        if self.ordered:
            self.h.update(data)
        self.pos += len(data)
        if self.size is not None and self.pos > self.size:
            raise ShardIntegrityError(
                f"{self.where} is longer than the {self.size} bytes its manifest entry lists; "
                f"its bytes changed after curation — {FIX}"
            )
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

    def finish(self) -> None:
        """Reads the rest and checks size and sha256 (ShardIntegrityError naming the shard when they differ)."""
        self.drain()
        if not self.ordered:
            raise ShardIntegrityError(f"{self.where} was read out of order, so its hash cannot be checked")
        if self.size is not None and self.pos != self.size:
            raise ShardIntegrityError(
                f"{self.where} has {self.pos} bytes, its manifest entry lists {self.size}; "
                f"its bytes changed after curation — {FIX}"
            )
        got = self.h.hexdigest()
        if self.sha256 is not None and got != self.sha256:
            raise ShardIntegrityError(
                f"{self.where} has sha256 {got[:16]}…, its manifest entry lists "
                f"{self.sha256[:16]}…; its bytes changed after curation — {FIX}"
            )


def open_raw(url: str) -> IO[bytes]:
    """The shard's bytes: a local file (already checked to lie inside the dataset) or a URL under the root."""
    return fsspec.open(url, "rb").open() if is_url(url) else open(url, "rb")


# ----------------------------------------------------------------------------- tar members


def check_member(member: tarfile.TarInfo, where: str) -> tuple[str, str]:
    """``(key, ext)`` of a shard member that is a regular file with a shard member's name; else DatasetError."""
    if not member.isfile():
        kind = (
            "a symlink"
            if member.issym()
            else "a hard link"
            if member.islnk()
            else "a folder"
            if member.isdir()
            else "not a regular file"
        )
        raise DatasetError(f"{where}: member {member.name!r} is {kind}; a shard holds regular files only — {FIX}")
    m = MEMBER_RE.fullmatch(member.name)
    if m is None:
        raise DatasetError(
            f"{where}: member {member.name!r} is not named KEY.EXT with EXT one of {', '.join(MEMBER_ORDER)}; {FIX}"
        )
    return m.group(1), m.group(2)


def check_sample(key: str, members: dict[str, Any], where: str) -> None:
    """A sample's members are complete and its json (when read, i.e. in ``members``) is a JSON object."""
    missing = [e for e in MEMBER_ORDER if e not in members]
    if missing:
        raise DatasetError(f"{where}: sample {key!r} lacks {', '.join(missing)}; {FIX}")
    data = members["json"]
    if isinstance(data, (bytes, bytearray)):
        try:
            meta = json.loads(data)
        except ValueError as e:
            raise DatasetError(f"{where}: {key}.json is not valid JSON ({e}); {FIX}") from None
        if not isinstance(meta, dict):
            raise DatasetError(f"{where}: {key}.json holds a {type(meta).__name__}, not a JSON object; {FIX}")


def check_new_member(members: dict[str, Any], key: str, ext: str, where: str) -> None:
    """``key.ext`` is not already among the sample's ``members`` (a member twice would hide one of them)."""
    if ext in members:
        raise DatasetError(f"{where}: member {key}.{ext} appears twice; {FIX}")


class SampleGrouper:
    """Groups a shard's checked members into samples: ``add`` returns the sample it closes (if any)."""

    def __init__(self, where: str):
        self.where = where
        self.key: str | None = None
        self.cur: dict[str, Any] = {}
        self.done: set[str] = set()

    def add(self, key: str, ext: str, data: Any) -> tuple[str, dict[str, Any]] | None:
        closed = None
        if key != self.key:
            closed = self.close()
            if key in self.done:
                raise DatasetError(f"{self.where}: sample {key!r} has members apart from each other; {FIX}")
            self.key = key
        check_new_member(self.cur, key, ext, self.where)
        self.cur[ext] = data
        return closed

    def close(self) -> tuple[str, dict[str, Any]] | None:
        if self.key is None:
            return None
        key, cur = self.key, self.cur
        check_sample(key, cur, self.where)
        self.done.add(key)
        self.key, self.cur = None, {}
        return key, cur


def read_shard(
    ref: ShardRef, keep: Callable[[str], bool] = lambda ext: True, each: Callable[[str, str, bytes], None] | None = None
) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of the shard as ``(key, {ext: bytes})`` with the members ``keep`` selects, returned only
    after the whole shard was read, every member checked and its size and sha256 matched (so nothing of a
    shard that breaks a rule is used). ``each(key, ext, data)`` sees every member's bytes as they stream
    (``verify`` decodes them); the json members are always read, to check them."""
    try:
        raw = open_raw(ref.url)
    except FileNotFoundError:
        raise DatasetError(f"shard {ref.url} is listed in the manifest but does not exist; {FIX}") from None
    reader = HashingReader(raw, ref.bytes, ref.sha256, where=f"shard {ref.url}")
    samples: list[tuple[str, dict[str, bytes]]] = []
    groups = SampleGrouper(f"shard {ref.url}")
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tf:  # type: ignore[call-overload]
            for member in tf:
                key, ext = check_member(member, groups.where)
                wanted = keep(ext) or ext == "json" or each is not None
                data = tf.extractfile(member).read() if wanted else b""  # type: ignore[union-attr]
                if each is not None:
                    each(key, ext, data)
                closed = groups.add(key, ext, data if (keep(ext) or ext == "json") else True)
                if closed:
                    samples.append(closed)
        closed = groups.close()
        if closed:
            samples.append(closed)
        reader.finish()
    except ShardIntegrityError:
        raise
    except (tarfile.TarError, EOFError, DatasetError) as e:
        reader.finish()  # when the bytes changed, the hash mismatch is the message that says why
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"shard {ref.url} is not a readable tar ({e}); {FIX}") from None
    finally:
        reader.raw.close()
    return [(k, {e: v for e, v in m.items() if keep(e)}) for k, m in samples]


def iter_samples(
    ds: Dataset, keep: Callable[[str], bool] = lambda ext: True
) -> Iterator[tuple[ShardRef, str, dict[str, bytes]]]:
    """Samples of every shard in manifest order, each shard verified before its samples come."""
    for ref in ds.shards:
        for key, members in read_shard(ref, keep):
            yield ref, key, members


__all__ = [
    "Dataset",
    "DatasetError",
    "HashingReader",
    "SampleGrouper",
    "ShardIntegrityError",
    "ShardRef",
    "check_member",
    "check_new_member",
    "check_sample",
    "dataset_root",
    "iter_samples",
    "open_raw",
    "read_shard",
    "shard_path",
    "shard_refs",
    "shard_url",
]
