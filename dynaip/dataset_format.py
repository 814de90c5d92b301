"""The dataset format ``dynaip-dataset/1`` in one place: its version, the shard member names, reading
and checking ``manifest.json``, and the manifest's shard list (docs/ARCHITECTURE.md, "Dataset
directory").

Used by the writer (``pipeline/writer.py``), ``dynaip manifest`` (``pipeline/dataset.py``), the
trainer's reader (``dynaip/train/data.py``) and the dataset browser (``dynaip/serve/datasets.py``),
so a dataset of another format is refused with the same one line everywhere.

A base module (tests/test_layering.py): it imports the standard library and fsspec only, so curation
and training can both use it.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec

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


def manifest_url(directory: str) -> str:
    """``DIR/manifest.json`` of a dataset directory (local path or fsspec URL)."""
    return f"{str(directory).rstrip('/')}/{MANIFEST}"


def check_format(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """``manifest`` when its ``format`` is ``FORMAT``; else ValueError naming both."""
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{where} has format {manifest.get('format')!r}; this tool reads {FORMAT!r}")
    return manifest


def parse_manifest(data: bytes | str, where: str, require_format: bool = True) -> dict[str, Any]:
    """The manifest in ``data`` (the bytes of ``where``): a JSON object, of ``FORMAT`` unless
    ``require_format`` is False (the writer reads its own earlier manifest to resume). One-line
    ValueError otherwise."""
    try:
        m = json.loads(data)
    except ValueError as e:
        raise ValueError(f"{where} is not valid JSON ({e}); {NOT_OURS}") from None
    if not isinstance(m, dict):
        raise ValueError(f"{where} holds a {type(m).__name__}, not a JSON object; "
                         f"it is not a manifest of this tool — {NOT_OURS}")
    return check_format(m, where) if require_format else m


def read_manifest(directory: str) -> dict[str, Any]:
    """The checked manifest of the dataset ``directory`` (local path or fsspec URL).
    FileNotFoundError when it has none (an unfinished curation: the manifest is written last)."""
    url = manifest_url(directory)
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"dataset '{directory}' has no {MANIFEST}; pass a directory written by `dynaip curate` "
            "(the manifest is written last, so an unfinished curation has none yet)") from e
    return parse_manifest(data, url)


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


def shard_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's shards that hold samples, in manifest order: ``{path, samples, sha256, ...}``."""
    return [s for s in manifest.get("shards", []) if int(s["samples"]) > 0]


__all__ = ["FORMAT", "MANIFEST", "SHARDS_DIR", "MEMBER_ORDER", "IMAGE_MEMBERS", "manifest_url", "check_format",
           "parse_manifest", "read_manifest", "shard_path", "shard_entries"]
