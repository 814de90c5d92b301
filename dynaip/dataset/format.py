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


def shard_path(rel: Any, where: str = MANIFEST) -> str:
    """A manifest's shard path, checked: relative, POSIX, inside the dataset (no ``..``, no absolute
    path, no drive or backslash). A manifest naming any other file is refused, so reading a dataset
    never reads outside it."""
    ok = isinstance(rel, str) and rel != "" and not rel.startswith(("/", "~")) and "\\" not in rel \
        and ":" not in rel and all(part not in ("", ".", "..") for part in rel.split("/"))
    if not ok:
        raise ValueError(f"{where} lists shard path {rel!r}, which is not a relative path inside the dataset; "
                         f"the manifest is damaged or not from this tool — {NOT_OURS}")
    return rel


def shard_name(chunk: int, part: int) -> str:
    """The path of part ``part`` of chunk ``chunk``'s shard, relative to the dataset directory."""
    return f"{SHARDS_DIR}/{chunk:06d}.tar" if part == 0 else f"{SHARDS_DIR}/{chunk:06d}_{part:02d}.tar"


def shard_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's shards that hold samples, in manifest order: ``{path, samples, sha256, ...}``."""
    return [s for s in manifest.get("shards", []) if int(s["samples"]) > 0]


__all__ = ["FORMAT", "IMAGE_MEMBERS", "MANIFEST", "MEMBER_ORDER", "NOT_OURS", "SHARDS_DIR", "check_format",
           "shard_entries", "shard_name", "shard_path"]
