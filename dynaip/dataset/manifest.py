"""Reading a dataset's ``manifest.json``, in one place (docs/ARCHITECTURE.md, "Dataset directory"):

- ``read_manifest(dir)``: the checked manifest of a dataset directory or URL (the trainer, preflight);
- ``open_dataset(root)``: the checked manifest and its shard list, every entry checked by the strict
  reader's rules (dynaip/dataset/reader.py: paths inside the root, ``samples``/``bytes`` integers,
  ``sha256``) — what training, preflight, precompute and the browser read;
- ``load_manifest(root)``: the same plus its ``totals`` shape (``dynaip manifest``, the demo, the
  inspection functions);
- ``read_store_manifest(store)``: a JSON object only, format unchecked (the writer reads its own
  earlier manifest to resume and decides on the format itself);
- ``parse_manifest(bytes, where)``: the parse and format check under all three (and the browser).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec

from dynaip.dataset.format import MANIFEST, NOT_OURS, check_format
from dynaip.dataset.reader import Dataset, dataset_root, shard_refs
from dynaip.dataset.store import Store


COUNTS = ("inputs", "accepted", "rejected", "samples", "bytes")
"""The whole-number fields of a manifest's ``totals``."""


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
        raise ValueError(
            f"{where} holds a {type(m).__name__}, not a JSON object; it is not a manifest of this tool — {NOT_OURS}"
        )
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
            "(the manifest is written last, so an unfinished curation has none yet)"
        ) from e
    return parse_manifest(data, url)


def read_store_manifest(store: Store) -> dict[str, Any]:
    """``manifest.json`` of ``store`` as a dict; ValueError (one line) when it is not a JSON object.
    Its format is not checked here: the caller decides (``load_manifest`` does)."""
    return parse_manifest(store.read_bytes(MANIFEST), f"{store.display()}/{MANIFEST}", require_format=False)


def open_dataset(root: Any) -> Dataset:
    """The checked manifest and shard list of the dataset at ``root`` as the user named it (a local path
    or a URL); nothing of a shard is read. One-line errors (DatasetError) name the entry and the rule."""
    base = dataset_root(root)
    url = manifest_url(base)
    manifest = read_manifest(base)  # a JSON object of this format, one line otherwise
    return Dataset(root=base, where=url, manifest=manifest, shards=shard_refs(manifest, base, url))


def load_dataset(root: str | Path) -> Dataset:
    """``open_dataset`` for inspection: errors say what is missing and what to do, and the manifest must
    carry its ``totals``."""
    path = manifest_url(str(root))
    if not Store(root).is_file(MANIFEST):
        raise FileNotFoundError(
            f"{path} does not exist: {root} is not a finished dataset (run `dynaip curate` to build or resume it)"
        )
    ds = open_dataset(root)
    totals = ds.manifest.get("totals")
    if isinstance(totals, dict):
        for key in COUNTS:  # counts shown, added and formatted by every reader of the summary
            v = totals.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(
                    f"{path}: totals.{key} is {v!r}, not a whole number >= 0; the manifest was edited or "
                    "not written by this tool; re-run `dynaip curate` on the dataset to rewrite it"
                )
        return ds
    raise ValueError(
        f"{path} has no 'totals' dict: the manifest is incomplete or not from this "
        "tool; re-run `dynaip curate` on the dataset to rewrite it"
    )


def load_manifest(root: str | Path) -> dict[str, Any]:
    """``root/manifest.json`` (``root``: a directory or an fsspec URL) as a dict, every shard entry checked
    (``load_dataset``); errors say what is missing and what to do."""
    return load_dataset(root).manifest


__all__ = [
    "load_dataset",
    "load_manifest",
    "manifest_url",
    "open_dataset",
    "parse_manifest",
    "read_manifest",
    "read_store_manifest",
]
