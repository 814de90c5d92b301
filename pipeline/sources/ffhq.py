"""FFHQ (in-the-wild) reader: one record per face, on the uncropped photo.

Layout at ``root``: ``ffhq-dataset-v2.json`` and ``in-the-wild-images/00000/00000.png`` … (PNG, folders
of 1000; the path is taken from each entry's ``in_the_wild.file_path``, relative to ``root``).

JSON (docs/sources.md, "FFHQ"): keys ``"0"``, ``"1"``, …; each entry has ``category`` (training |
validation), ``metadata`` (photo_url, author, license, …), ``image`` / ``thumbnail`` (the aligned crops, not
used) and ``in_the_wild`` with ``file_path``, ``file_size``, ``file_md5``, ``pixel_size`` ``[W, H]``,
``pixel_md5`` (MD5 of the decoded pixel array), ``face_rect`` ``[x0, y0, x1, y1]``, ``face_landmarks`` (68
``[x, y]`` points), ``face_quad`` (4 ``[x, y]`` corners). When ``face_rect`` is missing the face box is the
bounds of ``face_landmarks``, else of ``face_quad``.

Options (recipe ``source:``; a mapping or an ``FFHQSource``): ``root`` (required), ``json`` (default
``ffhq-dataset-v2.json``), ``category`` (``training`` | ``validation`` | a list; default all — entries
outside it are out of scope and not yielded at all), ``dedupe`` (default true).

Dedupe: the in-the-wild folder holds a photo once per face extracted from it, and the copies need not be
byte-identical (re-encoded PNGs differ in ``file_md5``). Entries with the same ``pixel_md5`` (else the same
``file_md5``, else the same ``file_path``) are one photo: every face becomes its own record, all pointing at one file (the lowest
entry index whose file exists), with ids ``{photo:05d}_face{k}`` — ``photo`` the lowest entry index of the
photo, ``k`` the face's rank by entry index. With ``dedupe: false`` each entry is its own photo.

Record (``source="ffhq"``): ``image`` = ``ImageRef(path=png)``; ``phrase="person"``; ``caption`` None;
``boxes`` = ``[face_box]`` (XYXY pixels, clipped to ``pixel_size``); ``group`` = ``ffhq-{photo:05d}``.
``extra``: ``face_box`` (the same XYXY box, named so the human stage can crop face vs body),
``face_box_from`` (face_rect | face_landmarks | face_quad), ``ffhq_index`` (the JSON key), ``category``,
``n_faces`` (faces in this photo), ``other_face_boxes`` (XYXY boxes of the photo's other faces),
``pixel_size`` ``[W, H]`` when given, ``photo_url``, ``license``, ``author`` when given.

A root that is not a folder, a metadata file that does not exist or holds no entries, or a ``category``
that no entry has, is a ``SourceError`` raised by ``read`` itself (before any record). Malformed inputs
never raise: unparsable JSON → one ``Reject(id=<json file name>, stage="read")``; an
entry without ``in_the_wild``/file path or any usable face geometry, or whose image file is missing →
``Reject(id=<record id or ffhq index>, stage="read", reason)``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.records import Box, ImageRef, Reject, SourceRecord
from pipeline.sources.common import (
    SourceError,
    SourceLicense,
    as_xyxy,
    check_not_empty,
    option,
    read_options,
    require_dir,
)

SOURCE = "ffhq"


LICENSE = SourceLicense(
    name="FFHQ",
    license="cc-by-nc-sa-4.0",
    url="https://github.com/NVlabs/ffhq-dataset",
    note="the dataset is CC BY-NC-SA 4.0; each photo keeps its own Flickr license (the sample json's extra.license)",
)
"""The terms of this source's data, repeated in the card of every dataset curated from it."""


@dataclass(frozen=True, kw_only=True)
class Options:
    """Reader options for FFHQ in-the-wild: the recipe's ``source:`` keys besides ``kind`` and ``root``."""

    json: str = "ffhq-dataset-v2.json"
    """Metadata file, relative to ``root``."""
    category: str | list[str] | None = None
    """Keep only these categories (training | validation); None keeps all."""
    dedupe: bool = True
    """Treat entries with the same pixel_md5 (else file_md5, else file_path) as one photo with several faces."""

    def __post_init__(self) -> None:
        """An option given but saying nothing fails when the recipe loads (``check_not_empty``)."""
        check_not_empty("ffhq", "category", self.category)


@dataclass(frozen=True, kw_only=True)
class FFHQSource(Options):
    """The whole source section as one object (``read(FFHQSource(root=...))``)."""

    root: str
    """Folder holding ``ffhq-dataset-v2.json`` and ``in-the-wild-images/``."""


def _reject(rid: str, reason: str) -> Reject:
    return Reject(source=SOURCE, id=rid, stage="read", reason=reason)


def _points(value: Any) -> list[tuple[float, float]]:
    """``[[x, y], …]`` or flat ``[x0, y0, x1, y1, …]`` → list of points; ValueError if neither."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("not a non-empty list")
    if all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        return [(float(p[0]), float(p[1])) for p in value]
    if len(value) % 2 == 0 and all(isinstance(v, (int, float)) for v in value):
        return [(float(value[i]), float(value[i + 1])) for i in range(0, len(value), 2)]
    raise ValueError("not a list of [x, y] points")


def face_box(wild: dict[str, Any]) -> tuple[Box, str]:
    """Face box XYXY from ``face_rect``, else the bounds of ``face_landmarks``, else of ``face_quad``.

    Clipped to ``pixel_size`` ``[W, H]`` when known. Raises ValueError when nothing usable is there.
    """
    box, src, errors = None, None, []
    rect = wild.get("face_rect")
    if rect is not None:
        try:
            box, src = as_xyxy(rect), "face_rect"
        except (ValueError, TypeError) as e:
            errors.append(f"face_rect: {e}")
    for key in ("face_landmarks", "face_quad"):
        if box is not None or wild.get(key) is None:
            continue
        try:
            pts = _points(wild[key])
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            box, src = as_xyxy([min(xs), min(ys), max(xs), max(ys)]), key
        except (ValueError, TypeError) as e:
            errors.append(f"{key}: {e}")
    if box is None:
        detail = "; ".join(errors) or "none of face_rect, face_landmarks, face_quad is present"
        raise ValueError(f"no usable face geometry ({detail})")
    size = wild.get("pixel_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, (int, float)) for v in size):
        w, h = float(size[0]), float(size[1])
        box = as_xyxy([max(0.0, box[0]), max(0.0, box[1]), min(w, box[2]), min(h, box[3])])
    return box, src


def _sort_key(key: str) -> tuple[int, int, str]:
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


def photo_key(wild: dict[str, Any]) -> tuple[str, str]:
    """What identifies a photo: ``pixel_md5`` (same pixels, however encoded), else ``file_md5``, else the path."""
    for name in ("pixel_md5", "file_md5"):
        if isinstance(wild.get(name), str) and wild[name]:
            return name, wild[name]
    return "file_path", wild["file_path"]


def read(cfg: Any) -> Iterator[SourceRecord | Reject]:
    """Check the source now (SourceError when it matches nothing); return the iterator of FFHQ face
    records (and rejects) in photo, then face order; see the module docstring."""
    opts = read_options(cfg, Options, SOURCE)
    root = require_dir(option(cfg, "root", ""), "ffhq", "the FFHQ folder (ffhq-dataset-v2.json + in-the-wild-images/)")
    json_name, category, dedupe = opts.json, opts.category, opts.dedupe
    categories = {category} if isinstance(category, str) else set(category) if category else None
    meta_path = root / json_name
    if not meta_path.is_file():
        raise SourceError(
            f"ffhq: metadata file {meta_path} does not exist; set source.json or point source.root "
            "at the folder holding ffhq-dataset-v2.json"
        )
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"top level is {type(meta).__name__}, expected an object keyed by index")
    except (OSError, ValueError) as e:
        return iter([_reject(json_name, f"cannot read {meta_path}: {e}; point source.root at the FFHQ folder")])
    if not meta:
        raise SourceError(f"ffhq: {meta_path} holds no entries")
    if categories is not None:
        found = {e.get("category") for e in meta.values() if isinstance(e, dict)}
        if not categories & found:
            raise SourceError(
                f"ffhq: no entry of {meta_path} has category {sorted(categories)} "
                f"(the file has: {sorted(str(c) for c in found)})"
            )
    return _records(root, meta, categories, dedupe)


def _records(
    root: Path, meta: dict[str, Any], categories: set[str] | None, dedupe: bool
) -> Iterator[SourceRecord | Reject]:
    # Group entries into photos; every face keeps its own box.
    photos: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
    for key in sorted(meta, key=_sort_key):
        entry = meta[key]
        if not isinstance(entry, dict):
            yield _reject(key, f"entry is {type(entry).__name__}, expected an object")
            continue
        if categories is not None and entry.get("category") not in categories:
            continue  # outside the selection: not an input
        wild = entry.get("in_the_wild")
        if not isinstance(wild, dict) or not isinstance(wild.get("file_path"), str):
            yield _reject(key, "entry has no in_the_wild.file_path")
            continue
        photos.setdefault(photo_key(wild) if dedupe else ("entry", key), []).append((key, entry))

    groups = sorted(photos.values(), key=lambda faces: _sort_key(faces[0][0]))
    for faces in groups:
        first = faces[0][0]
        photo_id = f"{int(first):05d}" if first.isdigit() else first
        paths = [root / e["in_the_wild"]["file_path"] for _, e in faces]
        image_path = next((p for p in paths if p.is_file()), None)
        boxes: list[Box | None] = []
        sources: list[str] = []  # where each box came from, or why there is none
        for _, e in faces:
            try:
                box, src = face_box(e["in_the_wild"])
            except (ValueError, TypeError) as err:
                box, src = None, str(err)
            boxes.append(box)
            sources.append(src)
        for k, (key, entry) in enumerate(faces):
            rid = f"{photo_id}_face{k}"
            wild = entry["in_the_wild"]
            if image_path is None:
                yield _reject(rid, f"image {wild['file_path']} not found under {root}")
                continue
            if boxes[k] is None:
                yield _reject(rid, f"ffhq entry {key}: {sources[k]}")
                continue
            md = entry.get("metadata") if isinstance(entry.get("metadata"), dict) else {}
            extra: dict[str, Any] = {
                "face_box": boxes[k],
                "face_box_from": sources[k],
                "ffhq_index": key,
                "category": entry.get("category"),
                "n_faces": len(faces),
                "other_face_boxes": [b for j, b in enumerate(boxes) if j != k and b is not None],
            }
            if wild.get("pixel_size") is not None:
                extra["pixel_size"] = list(wild["pixel_size"])
            for name in ("photo_url", "license", "author"):
                if md.get(name) is not None:
                    extra[name] = md[name]
            yield SourceRecord(
                source=SOURCE,
                id=rid,
                image=ImageRef(path=str(image_path)),
                phrase="person",
                boxes=[boxes[k]],
                group=f"ffhq-{photo_id}",
                extra=extra,
            )
