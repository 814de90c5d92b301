"""The dataset format ``dynaip-dataset/1`` in one place: its version, the shard member names, the
shard names and the check of a manifest's format and shard paths (docs/ARCHITECTURE.md, "Dataset
directory"). Reading a manifest is ``dynaip/dataset/manifest.py``; inspecting a dataset (show,
verify, grid, sort keys) is ``dynaip/dataset/inspect.py``.

Used by the writer (``pipeline/writer.py``), ``dynaip manifest``, the trainer's reader
(``dynaip/train/data.py``), the feature precompute and the dataset browser
(``dynaip/serve/datasets.py``), so a dataset of another format is refused with the same one line
everywhere.

A base module (tests/test_layering.py): it imports the standard library only, so curation and
training can both use it.
"""

from __future__ import annotations

import re
from typing import Any

FORMAT = "dynaip-dataset/1"
"""The ``format`` of every manifest this version writes and reads."""
MANIFEST = "manifest.json"
"""The manifest's name in a dataset directory (written last, atomically)."""
SHARDS_DIR = "shards"
"""Folder of the WebDataset tars: ``shards/{chunk:06d}.tar`` (``_{part:02d}`` past ``max_bytes``)."""
MEMBER_ORDER = ("ref.png", "tgt.jpg", "mask.png", "txt", "json")
"""Members of one sample, in the order the writer puts them: ``KEY.ref.png`` (subject on white),
``KEY.tgt.jpg`` (target), ``KEY.mask.png`` (L, 0/255), ``KEY.txt`` (caption), ``KEY.json``."""
IMAGE_MEMBERS = ("ref.png", "tgt.jpg")
"""The image members the trainer decodes (the mask and the json are read as they are)."""
NOT_OURS = "rebuild it with `dynaip curate`"


def check_format(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """``manifest`` when its ``format`` is ``FORMAT``; else ValueError naming both."""
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{where} has format {manifest.get('format')!r}; this tool reads {FORMAT!r}")
    return manifest


class DatasetError(ValueError):
    """A dataset breaks a rule of its format (one line: where, which entry or member, which rule)."""


FIX = "the dataset is damaged or was not written by `dynaip curate`; get it again from its source or rebuild it"
SEGMENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
"""One segment of a shard path: the writer's names (``shards/000000_01.tar``) and any plain file name."""


def shard_path(rel: Any, where: str = MANIFEST, i: int | None = None) -> str:
    """A manifest's shard path (entry ``i``), checked: relative, POSIX, normalised, every segment a plain
    name (no ``..``, ``.``, empty segment, absolute path, ``~``, scheme, backslash, ``%``, ``?``, ``#``).
    A manifest naming any other file or any URL is refused (DatasetError), so reading a dataset never
    reads outside the root it was named by (dynaip/dataset/reader.py joins and resolves it)."""
    entry = "shard entry" if i is None else f"shard entry {i}"
    if not isinstance(rel, str) or not rel:
        raise DatasetError(f"{where}: {entry} has no 'path' string; {FIX}")
    entry += f" ({rel!r})"
    bad = [seg for seg in rel.split("/") if not SEGMENT_RE.fullmatch(seg)]
    if bad:
        rule = (
            "is an absolute path"
            if rel.startswith(("/", "\\", "~"))
            else "names a URL"
            if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", rel)
            else "climbs out with '..'"
            if ".." in rel.split("/")
            else f"has segment {bad[0]!r}, not a plain file or folder name"
        )
        raise DatasetError(f"{where}: {entry} {rule}; a shard path must be relative and inside the dataset — {FIX}")
    return rel


def shard_name(chunk: int, part: int) -> str:
    """The path of part ``part`` of chunk ``chunk``'s shard, relative to the dataset directory."""
    return f"{SHARDS_DIR}/{chunk:06d}.tar" if part == 0 else f"{SHARDS_DIR}/{chunk:06d}_{part:02d}.tar"


__all__ = [
    "FIX",
    "FORMAT",
    "IMAGE_MEMBERS",
    "MANIFEST",
    "MEMBER_ORDER",
    "NOT_OURS",
    "SHARDS_DIR",
    "DatasetError",
    "check_format",
    "shard_name",
    "shard_path",
]
