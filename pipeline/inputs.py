"""What identifies a run's inputs: the source (``source_identity``), each chunk's content
(``input_fingerprint``), and which input files may be read at all (``guard_records``).

Fingerprints decide whether a finished chunk is kept on a re-run, so they cover everything a chunk's
output depends on besides the recipe: every field of every record (ids, captions, boxes, masks ...)
and a *stamp* of every file a record points at:

- local files: ``size:mtime_ns:sha256(first 64 KiB + last 64 KiB)``. Size and mtime catch any normal
  rewrite; the head/tail hash catches a copy that kept both (``cp -p``, ``rsync -t`` of same-size
  files) at the cost of two small reads per file (a tar shared by many records is stamped once per
  chunk). A same-size edit confined to the middle of a file with its mtime restored is not caught.
- object stores (fsspec): the object's ETag (or md5 / generation where a store gives those instead)
  plus its size; no bytes are read.

A missing file stamps as ``missing`` (the decode stage rejects it with a reason).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.records import ImageRef, Reject, SourceRecord

EDGE = 64 * 1024
"""Bytes hashed at each end of a local file."""


def source_identity(kind: str, root: str) -> str:
    """``kind:root`` with the root made absolute (symlinks resolved) or, for a URL, without
    credentials: what a dataset directory records as its one source."""
    from dynaip.dataset.store import is_url, redact_url

    if not root:
        return f"{kind}:"
    if is_url(root):
        return f"{kind}:{redact_url(root).rstrip('/')}"
    return f"{kind}:{os.path.realpath(os.path.expanduser(root))}"


def _refs(r: SourceRecord) -> list[ImageRef]:
    # a diptych still to be generated names no file: its settings (in the record) are its content
    refs = [] if r.diptych is not None and r.diptych.generate is not None else [r.image]
    if r.image_mask is not None:
        refs.append(r.image_mask)
    if r.reference is not None:
        refs.append(r.reference)
    if isinstance(r.reference_mask, ImageRef):
        refs.append(r.reference_mask)
    return refs


def stamp(path: str) -> str:
    """Content stamp of one input file (see the module doc)."""
    if "://" in path:
        return _remote_stamp(path)
    try:
        st = os.stat(path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            h.update(f.read(EDGE))
            if st.st_size > 2 * EDGE:
                f.seek(st.st_size - EDGE)
                h.update(f.read(EDGE))
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()[:16]}"


def _remote_stamp(url: str) -> str:
    import fsspec

    fs, key = fsspec.core.url_to_fs(url)
    try:
        info = fs.info(key)
    except (OSError, FileNotFoundError):
        return "missing"
    tag = next(
        (
            info[k]
            for k in ("ETag", "etag", "md5Hash", "md5", "generation", "mtime", "LastModified")
            if info.get(k) is not None
        ),
        "",
    )
    return f"{info.get('size')}:{str(tag).strip(chr(34))}"


def input_fingerprint(part: list[SourceRecord | Reject]) -> str:
    """16 hex digits over a chunk's records (every field, in reader order) and the stamps of the
    files they point at."""
    h = hashlib.sha256()
    stamps: dict[str, str] = {}
    for r in part:
        h.update(json.dumps(dataclasses.asdict(r), sort_keys=True, default=str).encode())
        h.update(b"\n")
        if isinstance(r, SourceRecord):
            for ref in _refs(r):
                if ref.path not in stamps:
                    stamps[ref.path] = stamp(ref.path)
                h.update(f"{ref.path}={stamps[ref.path]}\n".encode())
    return h.hexdigest()[:16]


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def guard_records(records: Iterable[SourceRecord | Reject], root: str) -> Iterator[SourceRecord | Reject]:
    """Passes ``records`` through, but a record whose file lies in the local source ``root`` and
    resolves (through a symlink) to a place outside it becomes a Reject: a source folder must not
    become a way to read arbitrary files. Files a record names outside the root (reader options
    pointing elsewhere) are not this guard's business."""
    if not root or "://" in root:
        yield from records
        return
    lexical = os.path.abspath(os.path.expanduser(root))
    real = os.path.realpath(lexical)
    for r in records:
        if isinstance(r, SourceRecord):
            for ref in _refs(r):
                if "://" in ref.path:
                    continue
                p = os.path.abspath(ref.path)
                # a reader may have resolved the root already (the folder reader does): either spelling is "in it"
                base = lexical if _inside(p, lexical) else real if _inside(p, real) else None
                if base is not None and not _inside(os.path.realpath(p), real):
                    rel = Path(p).relative_to(base).as_posix()
                    r = Reject(
                        source=r.source,
                        id=r.id,
                        stage="read",
                        reason=f"{rel} is a symlink resolving outside the source root; copy the file "
                        "into the root instead of linking it",
                    )
                    break
        yield r
