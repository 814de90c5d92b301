"""AnyInsertion reader: one cross record per Parquet row — the subject of ``ref_image`` (cut out with
``ref_mask``) inserted into ``tar_image`` (where ``tar_mask`` covers it). Layout: docs/sources.md
("AnyInsertion").

The release (Hugging Face dataset ``WensongSong/AnyInsertion``, the mask-prompt part of the "Insert
Anything" paper, arXiv 2504.15009) is Parquet with one row per sample. Its dataset viewer lists the
columns ``id`` (string, ``<split>/<category>/<n>`` such as ``train/object/3458``), ``split`` (string,
2 values), ``category`` (string, 5 values: object, accessory, person, ...), ``main_label`` (string,
96 values: ``Book``, ``Trousers``, ``person``, ...) and four ``Image`` columns ``ref_image``,
``ref_mask``, ``tar_image``, ``tar_mask`` (the Hugging Face ``Image`` feature, stored as the struct
``{bytes: binary, path: string}``). Upstream's own converter (insert-anything ``parquet_to_image.py``)
reads each image from ``row[col]["bytes"]`` and names the label column ``label``; that name is read
when ``main_label`` is absent. Upstream's loader (``src/data/all_data.py``) takes a mask pixel as the
subject where it is above 128: masks are white-on-black, and the decode stage reads them the same way
(grey > 127). The folder layout inside the release (which files, under which sub-folders) could not be
confirmed from the card, so any tree of ``*.parquet`` files is read: ``files`` (default
``**/*.parquet``) is globbed under a folder root.

Options (recipe ``source:``; ``Options`` lists them; an unknown key is an error naming the nearest
one): ``root`` — one ``.parquet`` file, a folder (every file matching ``files`` below it, sorted by
path), or an fsspec URL of either (``s3://…``, ``memory://…``); ``split`` (default ``train``; null =
every split); ``categories`` (default null = all; e.g. ``[accessory, object, person]``, what upstream
trains on).

Record (``source="anyinsertion"``, ``id`` = the row's ``id``): ``image`` = the ``tar_image`` cell,
``image_mask`` = the ``tar_mask`` cell (the subject in the target: its box is the target's subject box
and the mask the sample's mask), ``reference`` = the ``ref_image`` cell, ``reference_mask`` = the
``ref_mask`` cell (so the reference goes through the same mask clean-up and white-background
composition as every other source), ``phrase`` = ``main_label`` (``category`` when the label is
empty), no caption (captions come from the recipe's captioner or its template over the phrase),
``group`` = ``anyinsertion-<id>``. Cells are ``ImageRef(path, column, row)``: the reader reads only the
small text columns, one row group at a time, and the decode stage reads the images (one row group of
a column at a time, ``pipeline.stages.decode.ParquetCells``). ``extra``: ``split``, ``category``,
``main_label``, ``file`` (the file's path relative to the root), ``row``.

Checked when ``read`` is called (``SourceError``, one line): a root that is neither a Parquet file nor
a folder holding one; a file that is not Parquet or lacks a column (the message names the columns it
has); a ``split`` no row has, a category name that is no category of the release, or a selection no row
matches (the message names those present). A release category absent from the files read (part of the
release downloaded) is one warning, and the run goes on with the others; ``read`` returns a
``SelectedRecords`` whose ``selection`` (split, categories, rows found per category, those absent, files)
the run records in manifest.json as ``source_selection``. Bad rows never raise:
a null or empty ``id``, an id repeating an earlier row's, or an image column of another type than
binary / ``Image`` struct (the whole file's rows: "tar_mask is string …") become
``Reject(stage="read")``; missing image bytes, undecodable images and masks and a mask of another size
than its image are rejected by the decode stage with the reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pipeline.records import ImageRef, Reject, SourceRecord
from pipeline.sources.common import (
    SelectedRecords,
    SourceError,
    SourceLicense,
    check_not_empty,
    image_column_problem,
    option,
    read_options,
    source_path,
)

SOURCE = "anyinsertion"
log = logging.getLogger(__name__)
RELEASE_CATEGORIES = frozenset({"object", "accessory", "person"})
"""Categories of the release as its dataset viewer shows them (it counts 5 values; these three are the ones
its rows show and upstream trains on). A name that is neither one of these nor present in the files read is
an error; one of these absent from the files (part of the release downloaded) is a warning."""
IMAGE_COLUMNS = ("tar_image", "tar_mask", "ref_image", "ref_mask")
TEXT_COLUMNS = ("id", "split", "category")
LABEL_COLUMNS = ("main_label", "label")  # the viewer's name; upstream's converter reads "label"


LICENSE = SourceLicense(
    name="AnyInsertion",
    license="unknown",
    hub_id="WensongSong/AnyInsertion",
    url="https://huggingface.co/datasets/WensongSong/AnyInsertion",
    note="we could not confirm a license from its dataset card; check its terms before publishing",
)
"""The terms of this source's data, repeated in the card of every dataset curated from it."""


@dataclass(frozen=True, kw_only=True)
class Options:
    """Reader options: the recipe's ``source:`` keys besides ``kind`` and ``root`` (``root`` is a
    ``.parquet`` file, a folder of them, or an fsspec URL of either)."""

    files: str = "**/*.parquet"
    """Glob of the Parquet files under a folder root (``**`` descends)."""
    split: str | None = "train"
    """Keep rows whose ``split`` is this; None = every split."""
    categories: tuple[str, ...] | None = None
    """Keep rows whose ``category`` is one of these; None = every category."""

    def __post_init__(self) -> None:
        """An option given but saying nothing fails when the recipe loads (``check_not_empty``)."""
        check_not_empty("anyinsertion", "categories", self.categories)


def _reject(rid: str, reason: str) -> Reject:
    return Reject(source=SOURCE, id=rid, stage="read", reason=reason)


@dataclass
class _File:
    path: Any  # Path or FsPath
    rel: str
    groups: list[int]  # rows per row group
    label: str
    bad_columns: dict[str, str]  # image column → its wrong type


@contextmanager
def _open(path: Any) -> Iterator[Any]:
    """The file as a ``pyarrow.parquet.ParquetFile`` (an fsspec file object for a URL), closed after."""
    import pyarrow.parquet as pq

    fh = path.open("rb") if "://" in str(path) else None
    try:
        pf = pq.ParquetFile(fh if fh is not None else str(path))
        try:
            yield pf
        finally:
            pf.close()
    finally:
        if fh is not None:
            fh.close()


def _inspect(path: Any, rel: str) -> _File:
    """Schema and row groups of one file; SourceError for an unreadable file or a missing column."""
    try:
        with _open(path) as pf:
            schema = pf.schema_arrow
            groups = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
    except Exception as e:  # ArrowInvalid, OSError: not Parquet, truncated footer
        raise SourceError(f"anyinsertion: {path} is not a readable Parquet file ({type(e).__name__}: {e})") from None
    names = schema.names
    label = next((c for c in LABEL_COLUMNS if c in names), None)
    missing = [c for c in (*TEXT_COLUMNS, *IMAGE_COLUMNS) if c not in names] + ([] if label else ["main_label"])
    if missing:
        raise SourceError(
            f"anyinsertion: {path} has no column {', '.join(missing)} (its columns: "
            f"{', '.join(names) or 'none'}); expected the AnyInsertion release's id, split, category, "
            f"main_label, ref_image, ref_mask, tar_image, tar_mask"
        )
    bad = {c: p for c in IMAGE_COLUMNS if (p := image_column_problem(schema.field(c).type)) is not None}
    return _File(path=path, rel=rel, groups=groups, label=label, bad_columns=bad)


def _list_files(root: Any, pattern: str) -> list[tuple[Any, str]]:
    if root.is_file():
        return [(root, root.name)]
    if not root.is_dir():
        raise SourceError(
            f"anyinsertion: source.root {root} is neither a Parquet file nor a folder; point it at the "
            "AnyInsertion release (a folder of .parquet files) or at one file"
        )
    if "://" in str(root):
        found = [p for p in root.glob(pattern) if p.is_file()]
    else:
        import glob

        found = [
            type(root)(p) for p in glob.glob(os.path.join(str(root), pattern), recursive=True) if os.path.isfile(p)
        ]
    found = sorted(found, key=str)
    if not found:
        entries = sorted(str(p).rsplit("/", 1)[-1] for p in root.glob("*"))
        shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "") if entries else "nothing"
        raise SourceError(f"anyinsertion: no Parquet files match {pattern!r} under {root} (it holds: {shown})")
    return [(p, p.relative_to(root).as_posix()) for p in found]


def _column_texts(table: Any, name: str) -> list[str | None]:
    return [None if v is None else str(v) for v in table.column(name).to_pylist()]


def _scan_values(files: list[_File]) -> dict[str, dict[str, int]]:
    """Rows per category per split present (row group by row group, two columns)."""
    seen: dict[str, dict[str, int]] = {}
    for f in files:
        with _open(f.path) as pf:
            for g in range(len(f.groups)):
                t = pf.read_row_group(g, columns=["split", "category"])
                for s, c in zip(_column_texts(t, "split"), _column_texts(t, "category")):
                    counts = seen.setdefault(s or "", {})
                    counts[c or ""] = counts.get(c or "", 0) + 1
    return seen


_warned: set[str] = set()  # the reader is called more than once per run (check, then read): warn once


def _check_selection(opts: Options, seen: dict[str, dict[str, int]], root: Any) -> dict[str, Any]:
    """What the split/categories select in these files: a name that is no category of the release, or a
    selection no row matches, is a SourceError (one line); a release category absent from these files (a
    partial download) is one warning. Returns the selection record for the manifest."""
    if opts.split is not None and opts.split not in seen:
        raise SourceError(
            f"anyinsertion: no row has split {opts.split!r} under {root} (splits present: "
            f"{', '.join(sorted(s for s in seen if s)) or 'none'}); set source.split (null = all)"
        )
    found: dict[str, int] = {}
    for split, counts in seen.items():
        if opts.split is None or split == opts.split:
            for cat, n in counts.items():
                found[cat] = found.get(cat, 0) + n
    anywhere = {c for counts in seen.values() for c in counts}
    wanted = list(opts.categories) if opts.categories is not None else None
    where = f" in split {opts.split!r}" if opts.split is not None else ""
    unknown = [c for c in wanted or () if c not in RELEASE_CATEGORIES and c not in anywhere]
    if unknown:
        raise SourceError(
            f"anyinsertion: {', '.join(map(repr, unknown))} is not a category of the AnyInsertion "
            f"release (its categories: {', '.join(sorted(RELEASE_CATEGORIES | (anywhere - {''})))}); "
            "fix source.categories"
        )
    absent = [c for c in wanted or () if c not in found]
    selected = sum(n for c, n in found.items() if wanted is None or c in wanted)
    if not selected and wanted is None:
        raise SourceError(
            f"anyinsertion: the Parquet files under {root} hold no row{where}; point source.root at "
            "the AnyInsertion release"
        )
    if not selected:
        raise SourceError(
            f"anyinsertion: no row has category {', '.join(map(repr, wanted or []))}{where} under "
            f"{root} (categories present: {', '.join(sorted(c for c in found if c)) or 'none'}); fix "
            "source.categories"
        )
    if absent:
        msg = (
            f"anyinsertion: no row has category {', '.join(map(repr, absent))}{where} under {root} (part of the "
            f"release downloaded?); reading the {selected} row(s) of "
            f"{', '.join(c for c in wanted or [] if c in found)}"
        )
        if msg not in _warned:
            _warned.add(msg)
            log.warning(msg)
    return {
        "split": opts.split,
        "categories": wanted,
        "found": dict(sorted(found.items())),
        "absent": absent,
        "rows_selected": selected,
    }


def read(cfg: Any) -> Iterator[SourceRecord | Reject]:
    """Check the root, every file's columns and the split/category selection now (SourceError naming
    what is there instead); return the iterator of cross records and rejects (see the module doc)."""
    opts = read_options(cfg, Options, SOURCE)  # options first: a typo fails before any file is opened
    given = option(cfg, "root", "")
    if not given:
        raise SourceError(
            "anyinsertion: source.root is not set; point it at the AnyInsertion release (a folder of "
            ".parquet files, one file, or a URL) or pass --source-root"
        )
    root = source_path(given)
    files = [_inspect(p, rel) for p, rel in _list_files(root, opts.files)]
    if opts.split is None and opts.categories is None:  # every row: nothing to check, no pass over the rows
        selection: dict[str, Any] = {"split": None, "categories": None}
    else:
        selection = _check_selection(opts, _scan_values(files), root)
    selection["files"] = [f.rel for f in files]
    return SelectedRecords(_records(files, opts), selection)


def _records(files: list[_File], opts: Options) -> Iterator[SourceRecord | Reject]:
    seen: dict[str, tuple[str, int]] = {}  # id → (file, row) where it was first read: ids of a run are unique
    for f in files:
        with _open(f.path) as pf:
            yield from _file_records(f, pf, opts, seen)


def _file_records(
    f: _File, pf: Any, opts: Options, seen: dict[str, tuple[str, int]]
) -> Iterator[SourceRecord | Reject]:
    """The records and rejects of one file's rows (``seen`` spans the run's files)."""
    path = str(f.path)
    stem = f.rel.rsplit(".", 1)[0]
    start = 0
    for g, n in enumerate(f.groups):
        table = pf.read_row_group(g, columns=[*TEXT_COLUMNS, f.label])  # the small columns only
        ids, splits, cats, labels = (_column_texts(table, c) for c in (*TEXT_COLUMNS, f.label))
        del table
        for i in range(n):
            row = start + i
            if opts.split is not None and splits[i] != opts.split:
                continue
            if opts.categories is not None and cats[i] not in opts.categories:
                continue
            rid = (ids[i] or "").strip()
            where = f"{f.rel} row {row}"
            if not rid:
                yield _reject(f"{stem}-row{row}", f"no id: {where}")
                continue
            if rid in seen:
                yield _reject(
                    f"{stem}-row{row}",
                    f"repeated id: {where} repeats {rid!r} (first at {seen[rid][0]} row {seen[rid][1]})",
                )
                continue
            seen[rid] = (f.rel, row)
            if f.bad_columns:
                what = "; ".join(f"{c} is {t}" for c, t in f.bad_columns.items())
                yield _reject(
                    rid,
                    f"image column of another type: {what} in {f.rel}, expected image bytes "
                    "(binary or the Hugging Face Image struct {bytes, path})",
                )
                continue
            label = (labels[i] or "").strip()
            cell = {c: ImageRef(path=path, column=c, row=row) for c in IMAGE_COLUMNS}
            yield SourceRecord(
                source=SOURCE,
                id=rid,
                image=cell["tar_image"],
                image_mask=cell["tar_mask"],
                phrase=label or (cats[i] or None),
                reference=cell["ref_image"],
                reference_mask=cell["ref_mask"],
                group=f"{SOURCE}-{rid}",
                extra={"split": splits[i], "category": cats[i], "main_label": labels[i], "file": f.rel, "row": row},
            )
        start += n
