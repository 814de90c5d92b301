"""Subjects200K-style releases: Parquet rows whose ``image`` is two panels of one subject side by side
(docs/sources.md, "Subjects200K").

Layout as published (Hugging Face ``Yuanshi/Subjects200K`` and ``Yuanshi/Subjects200K_collection3``,
dataset cards' ``dataset_info``): ``<root>/data/train-NNNNN-of-MMMMM.parquet``, one row per diptych::

    image               struct{bytes: binary, path: string}   HF ``Image``: a 1056 × 528 PNG/JPEG, two
                                                               512² panels with an 8-pixel border
    collection          string                                e.g. collection_1 | collection_2 | collection_3
    quality_assessment  struct{compositeStructure: int64, objectConsistency: int64, imageQuality: int64}
                                                               (null for unassessed rows)
    description         struct{item: string, category: string, description_0: string,
                               description_1: string, description_valid: bool}
    raw_json            string                                (collection3 only; not read)

The panels are cut as OminiControl's loader does (``src/train/data.py`` of Yuanshi9815/OminiControl,
``Subject200KDataset``: left ``(p, p, p + 512, p + 512)``, right ``(512 + 2p, p, 1024 + 2p, p + 512)``
with ``padding: 8`` in its ``subject_512.yaml``); ``description_0`` describes the left panel and
``description_1`` the right. The quality filter defaults to that loader's own: every one of the three
``quality_assessment`` scores ``>= 5`` (``src/train/train.py``, ``filter_func``); the dataset card's
quick start also keeps only ``collection_2`` (``collections: [collection_2]``).

Options (``Options``): ``files`` (glob under ``root``), ``min_quality``, ``collections``, ``padding``,
``phrase``. One input is one row. A row outside ``collections`` is not an input (a selection, as
FFHQ's ``category``). Rows are never dropped in silence: a row failing the quality filter or without
``quality_assessment``, a row whose ``quality_assessment`` or ``description`` is not a struct, every
row of a file whose ``image`` column has the wrong Arrow type, and a
file that cannot be read become ``Reject(stage="read")`` with the reason; a row whose image cell holds
no bytes is rejected by the decode stage, an image that is not two square panels wide likewise.

Record (``source="subjects200k"``, ``id`` = ``<file stem>-r<row>``): ``image`` = the Parquet cell
``ImageRef(path=<file>, column="image", row=<row>)`` (no bytes travel in records), ``phrase`` = the
description's ``item`` (or ``category``), ``diptych`` = ``Diptych(padding, captions=(description_0,
description_1))``, ``extra`` = ``collection``, ``quality_assessment`` (the three scores), ``item``, ``category``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.records import Diptych, ImageRef, Reject, SourceRecord
from pipeline.sources.common import (
    SourceLicense,
    check_not_empty,
    glob_files,
    image_column_problem,
    read_options,
    require_dir,
)

SOURCE = "subjects200k"
SCORES = ("compositeStructure", "objectConsistency", "imageQuality")
META_COLUMNS = ("collection", "quality_assessment", "description")


LICENSE = SourceLicense(
    name="Subjects200K",
    license="apache-2.0",
    hub_id="Yuanshi/Subjects200K",
    url="https://huggingface.co/datasets/Yuanshi/Subjects200K",
)
"""The terms of this source's data, repeated in the card of every dataset curated from it."""


@dataclass(frozen=True, kw_only=True)
class Options:
    """Reader options (the recipe's ``source:`` keys besides kind/root)."""

    files: str = "data/train-*.parquet"
    """Parquet files under ``root`` (glob, ``**`` allowed), read in sorted order."""
    min_quality: int | None = 5
    """Keep a row only when each of the three ``quality_assessment`` scores is at least this (OminiControl's
    filter); rows failing it, or without scores, are rejects. null keeps every row."""
    collections: list[str] | None = None
    """Only rows of these ``collection`` values are inputs; null = every collection."""
    padding: int = 8
    """Border pixels around each panel (``records.Diptych.padding``)."""
    phrase: Literal["item", "category"] = "item"
    """Detection phrase: the description's ``item`` (e.g. "Eames lounge chair") or its ``category``."""

    def __post_init__(self) -> None:
        """An option given but saying nothing fails when the recipe loads (``check_not_empty``)."""
        check_not_empty("subjects200k", "collections", self.collections)


def _reject(rid: str, reason: str) -> Reject:
    return Reject(source=SOURCE, id=rid, stage="read", reason=reason)


def _image_column(arrow_type: Any) -> str | None:
    problem = image_column_problem(arrow_type)
    return (
        None
        if problem is None
        else (f"column 'image' is {problem}, not image bytes (struct{{bytes: binary, path: string}} or binary)")
    )


def read(cfg: Any) -> Iterator[SourceRecord | Reject]:
    """Check the options and the files now (SourceError when no file matches); return the iterator."""
    opt = read_options(cfg, Options, SOURCE)  # typed, unknown keys refused with the nearest name
    if opt.padding < 0:
        raise ValueError(f"{SOURCE}: source option 'padding' = {opt.padding}: must be >= 0")
    root = require_dir(
        getattr(cfg, "root", None) if not isinstance(cfg, dict) else cfg.get("root"),
        SOURCE,
        "the dataset folder (holding data/train-*.parquet)",
    )
    files = glob_files(root, opt.files, SOURCE, "Parquet files")
    return _records(files, opt)


def _records(files: list[Path], opt: Options) -> Iterator[SourceRecord | Reject]:
    import pyarrow.parquet as pq

    for path in files:
        stem = path.name.split(".", 1)[0]
        try:
            pf = pq.ParquetFile(str(path))
            schema = pf.schema_arrow
        except Exception as e:  # ArrowInvalid / OSError: not a Parquet file
            yield _reject(stem, f"{path.name} is not a readable Parquet file: {type(e).__name__}: {e}")
            continue
        missing = [c for c in ("image", *META_COLUMNS) if c not in schema.names]
        bad = f"missing column(s) {', '.join(missing)}" if missing else _image_column(schema.field("image").type)
        row = 0
        try:
            for batch in pf.iter_batches(columns=[c for c in META_COLUMNS if c in schema.names], batch_size=4096):
                for values in batch.to_pylist():
                    rid = f"{stem}-r{row:06d}"
                    out = _reject(rid, f"{path.name}: {bad}") if bad else _row(path, row, rid, values, opt)
                    row += 1
                    if out is not None:
                        yield out
        except Exception as e:  # a corrupt row group: the rest of the file is one reject
            yield _reject(
                f"{stem}-r{row:06d}-rest", f"{path.name}: cannot read rows from {row} on: {type(e).__name__}: {e}"
            )


def _row(path: Path, row: int, rid: str, values: dict[str, Any], opt: Options) -> SourceRecord | Reject | None:
    collection = values.get("collection")
    if opt.collections is not None and collection not in opt.collections:
        return None  # a selection, not an input
    qa = values.get("quality_assessment")
    if qa is not None and not isinstance(qa, dict):
        return _reject(rid, f"quality_assessment is {type(qa).__name__}, not a struct of the three scores")
    desc = values.get("description")
    if desc is not None and not isinstance(desc, dict):
        return _reject(rid, f"description is {type(desc).__name__}, not a struct (item, category, description_0/1)")
    if opt.min_quality is not None:
        if not qa:
            return _reject(rid, "no quality_assessment (the quality filter source.min_quality needs its scores)")
        low = [f"{k} {qa.get(k)}" for k in SCORES if not isinstance(qa.get(k), int) or qa[k] < opt.min_quality]
        if low:
            return _reject(rid, f"quality below source.min_quality={opt.min_quality}: {', '.join(low)}")
    desc = desc or {}
    phrase = desc.get(opt.phrase) or desc.get("item") or desc.get("category") or None
    extra: dict[str, Any] = {"collection": collection, "item": desc.get("item"), "category": desc.get("category")}
    if qa:
        extra["quality_assessment"] = {k: qa.get(k) for k in SCORES}
    return SourceRecord(
        source=SOURCE,
        id=rid,
        image=ImageRef(path=str(path), column="image", row=row),
        phrase=phrase,
        diptych=Diptych(padding=opt.padding, captions=(desc.get("description_0"), desc.get("description_1"))),
        extra=extra,
    )
