"""Annotation streaming: clip files and cross-pair files are parsed as streams (``ijson``), one clip
or pair record in memory at a time; an unreadable file is one reject naming it.

Part of the OpenS2V-5M reader (``pipeline.sources.opens2v``; docs/sources.md, "OpenS2V-5M")."""

from __future__ import annotations

import contextlib
import json
import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.records import Reject
from pipeline.sources.opens2v.clips import _one_line, _reject

log = logging.getLogger(__name__)


def _first_byte(f) -> bytes:
    """The first non-whitespace byte of a binary file (after a UTF-8 BOM); the file is rewound."""
    head = f.read(4096)
    f.seek(0)
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    head = head.lstrip()
    return head[:1]


ZIP_SUFFIX = ".json.zip"
"""Some annotation parts are published zipped (``Jsons/mask_and_bbox/total_part13.json.zip``): read in place."""


def _part_name(path: Path) -> str:
    """The part an annotation file holds: its name without ``.json`` / ``.json.zip`` (``total_part13``)."""
    return path.name[: -len(ZIP_SUFFIX)] if path.name.endswith(ZIP_SUFFIX) else path.stem


def _open_annotations(path: Path, stack: contextlib.ExitStack) -> Any:
    """A binary stream of an annotation file; a ``.json.zip`` is read in place (its one ``.json`` member)."""
    if not path.name.endswith(ZIP_SUFFIX):
        return stack.enter_context(open(path, "rb"))
    archive = stack.enter_context(zipfile.ZipFile(path))
    members = [i for i in archive.infolist() if i.filename.endswith(".json") and not i.is_dir()]
    if len(members) != 1:
        raise ValueError(f"the zip holds {len(members)} .json members, expected one")
    return stack.enter_context(archive.open(members[0]))


def _stream_clips(root: Path, path: Path) -> Iterator[tuple[str, str, Any] | Reject]:
    """``(part, clip key, clip)`` from one annotation file, streamed; a Reject for an unreadable file."""
    import ijson

    rel = path.relative_to(root).as_posix()
    part = _part_name(path)
    n = 0
    try:
        with contextlib.ExitStack() as stack:
            f = _open_annotations(path, stack)
            first = _first_byte(f)
            if first != b"{":
                what = {b"[": "a list", b"": "empty"}.get(first, f"starts with {first!r}")
                yield _reject(rel, f"{rel} top level is {what}, expected {{clip_key: clip}}")
                return
            items = ijson.kvitems(f, "", use_float=True)
            head = next(items, None)
            if head is None:
                yield _reject(rel, f"{rel} holds no clips (an empty object)")
                return
            if head[0] == "metadata" and isinstance(head[1], dict):  # one clip per file
                clip = {head[0]: head[1]}
                clip.update(items)
                n += 1
                yield path.parent.name, part, clip
                return
            n += 1
            yield part, str(head[0]), head[1]
            for key, value in items:
                n += 1
                yield part, str(key), value
    except (OSError, ValueError, ijson.JSONError, zipfile.BadZipFile) as e:
        yield _reject(rel, f"cannot parse {rel}: {_one_line(e)} (after {n} clips)")


def _stream_pairs(root: Path, path: Path) -> Iterator[tuple[str, int, Any] | Reject]:
    """``(cluster, record number, pair record)`` from one pair file, streamed; a Reject for an unreadable
    file. A cluster index (``{cluster: [clip ids]}``) yields nothing."""
    import ijson

    rel = path.relative_to(root).as_posix()
    n = 0
    try:
        with open(path, "rb") as f:
            if path.suffix == ".jsonl":
                for line in f:
                    if line.strip():
                        yield path.stem, n, json.loads(line)
                        n += 1
                return
            first = _first_byte(f)
            if first == b"[":
                for rec in ijson.items(f, "item", use_float=True):
                    yield path.stem, n, rec
                    n += 1
            elif first == b"{":
                for cluster, records in ijson.kvitems(f, "", use_float=True):
                    if isinstance(records, list) and records and all(isinstance(r, str) for r in records):
                        if n == 0:
                            log.info("opens2v: %s is a cluster index ({cluster: [clip ids]}), not pairs; skipped", rel)
                            return
                    if not isinstance(records, list):
                        yield _reject(f"{rel}/{cluster}", f"cluster {cluster!r} in {rel} is not a list of pair records")
                        continue
                    for rec in records:
                        yield str(cluster), n, rec
                        n += 1
            else:
                yield _reject(
                    rel, f"{rel} top level is {'empty' if not first else repr(first)}, expected a list of pair records"
                )
    except (OSError, ValueError, ijson.JSONError) as e:
        yield _reject(rel, f"cannot parse cross-pair file {rel}: {_one_line(e)} (after {n} records)")
