"""Reading a dataset's ``manifest.json``, in one place (docs/ARCHITECTURE.md, "Dataset directory"):

- ``read_manifest(dir)``: the checked manifest of a dataset directory or URL (the trainer, preflight);
- ``load_manifest(root)``: the same plus its ``shards`` / ``totals`` shape and every shard path
  checked (``dynaip manifest``, the demo, the inspection functions);
- ``read_store_manifest(store)``: a JSON object only, format unchecked (the writer reads its own
  earlier manifest to resume and decides on the format itself);
- ``parse_manifest(bytes, where)``: the parse and format check under all three (and the browser).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec

from dynaip.dataset.format import MANIFEST, NOT_OURS, check_format, shard_path
from dynaip.dataset.store import Store


def manifest_url(directory: str) -> str:
    """``DIR/manifest.json`` of a dataset directory (local path or fsspec URL)."""
    return f"{str(directory).rstrip('/')}/{MANIFEST}"


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


def read_store_manifest(store: Store) -> dict[str, Any]:
    """``manifest.json`` of ``store`` as a dict; ValueError (one line) when it is not a JSON object.
    Its format is not checked here: the caller decides (``load_manifest`` does)."""
    return parse_manifest(store.read_bytes(MANIFEST), f"{store.display()}/{MANIFEST}", require_format=False)


def load_manifest(root: str | Path) -> dict[str, Any]:
    """``root/manifest.json`` (``root``: a directory or an fsspec URL) as a dict; errors say what is
    missing and what to do."""
    store = Store(root)
    path = f"{str(root).rstrip('/')}/manifest.json"
    if not store.is_file("manifest.json"):
        raise FileNotFoundError(f"{path} does not exist: {root} is not a finished dataset "
                                "(run `dynaip curate` to build or resume it)")
    manifest = check_format(read_store_manifest(store), path)
    for key, kind in (("shards", list), ("totals", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ValueError(f"{path} has no {key!r} {kind.__name__}: the manifest is incomplete or not from this "
                             "tool; re-run `dynaip curate` on the dataset to rewrite it")
    for s in manifest["shards"]:
        shard_path(s.get("path") if isinstance(s, dict) else None, path)
    return manifest


__all__ = ["load_manifest", "manifest_url", "parse_manifest", "read_manifest", "read_store_manifest"]
