"""SA-1B reader: images with class-agnostic SAM masks, from an extracted folder or the tars directly.

Layout at ``root`` (either or both):

- extracted: ``sa_N.jpg`` + ``sa_N.json`` side by side (any depth below ``root``);
- tars: ``sa_000000.tar`` … each holding ``sa_N.jpg`` + ``sa_N.json`` pairs (member order does not matter).

Per-image JSON: ``{"image": {image_id, width, height, file_name}, "annotations": [{id, segmentation,
bbox, area, predicted_iou, stability_score, crop_box, point_coords}]}``; ``segmentation`` is COCO RLE
``{"size": [H, W], "counts": str}`` and ``bbox`` is ``[x, y, w, h]`` as SAM's automatic mask generator
writes it: ``w`` = last column − first column of the mask, so ``x + w`` is the mask's last column, not
one past it (docs/sources.md, "SA-1B"); the record's XYXY box is ``(x, y, x + w + 1, y + h + 1)``, the
mask's exact bounds.

Options (recipe ``source:`` section; a mapping or an ``SA1BSource``):

- ``root`` (required), ``layout``: ``auto`` (tars when ``root`` holds any ``*.tar``, else the folder) |
  ``folder`` | ``tar``; ``top_k``: masks kept per image (default 16).

Record per image (``source="sa1b"``, ``id`` = file stem, e.g. ``sa_1``): ``image`` =
``ImageRef(path=jpg)`` or ``ImageRef(path=tar, member="sa_1.jpg")``; ``masks`` = the top-``top_k``
annotations ranked by ``area × predicted_iou × stability_score`` (descending, ties in JSON order),
each a checked RLE ``{"size": [H, W], "counts": str}``; ``boxes`` = their ``bbox`` converted to XYXY
pixels (exclusive right/bottom edge), index-aligned with ``masks``; ``phrase`` and ``caption`` None (no captions in SA-1B; the
recipe's prompt applies). ``extra``: ``width``, ``height``, ``image_id``, ``mask_ids`` (annotation ids of
``masks``), ``mask_scores`` (the ranking score of each), ``dropped_masks`` (annotations skipped as malformed).

A root that is not a folder, or holds neither ``*.tar`` nor any ``*.json``/``*.jpg`` (or no ``*.tar`` with
``layout: tar``), is a ``SourceError`` raised by ``read`` itself. Malformed inputs never raise: the iterator yields ``Reject(source="sa1b", id, stage="read", reason)``
for a missing/unparsable JSON, a JSON without its image, an image whose size is unknown, or an image
whose every annotation is malformed. Single malformed annotations (bad RLE, bad bbox) are dropped and
counted in ``extra["dropped_masks"]``. An unreadable tar yields one reject with ``id`` = the tar's name.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.records import ImageRef, Reject, SourceRecord
from pipeline.sources.common import (
    RLEError,
    SourceError,
    SourceLicense,
    check_rle,
    option,
    read_options,
    require_dir,
    xywh_to_xyxy,
)

SOURCE = "sa1b"


LICENSE = SourceLicense(
    name="SA-1B",
    license="other",
    license_name="sa-1b-dataset-research-license",
    url="https://ai.meta.com/datasets/segment-anything/",
    note="Meta's SA-1B Dataset Research License: research use only; read its terms before publishing",
)
"""The terms of this source's data, repeated in the card of every dataset curated from it."""


@dataclass(frozen=True, kw_only=True)
class Options:
    """Reader options for SA-1B: the recipe's ``source:`` keys besides ``kind`` and ``root``."""

    layout: str = "auto"
    """auto | folder | tar."""
    top_k: int = 16
    """Masks kept per image, best ``area × predicted_iou × stability_score`` first."""


@dataclass(frozen=True, kw_only=True)
class SA1BSource(Options):
    """The whole source section as one object (``read(SA1BSource(root=...))``)."""

    root: str
    """Folder holding the extracted pairs and/or the ``sa_*.tar`` files."""


def _reject(rid: str, reason: str) -> Reject:
    return Reject(source=SOURCE, id=rid, stage="read", reason=reason)


def _rank_score(ann: dict[str, Any]) -> float:
    def num(key: str, default: float) -> float:
        v = ann.get(key, default)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default

    return num("area", 0.0) * num("predicted_iou", 1.0) * num("stability_score", 1.0)


def record_from_json(stem: str, meta: Any, image: ImageRef, top_k: int) -> SourceRecord | Reject:
    """Turn one parsed SA-1B JSON into a record (or a reject saying why it cannot be one)."""
    if not isinstance(meta, dict):
        return _reject(stem, f"json top level is {type(meta).__name__}, expected an object with image/annotations")
    info = meta.get("image") if isinstance(meta.get("image"), dict) else {}
    h, w = info.get("height"), info.get("width")
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        return _reject(stem, f"json image.height/width {h!r}/{w!r} missing or not positive integers")
    anns = meta.get("annotations")
    if not isinstance(anns, list):
        return _reject(stem, "json has no 'annotations' list")

    valid: list[tuple[float, int, dict[str, Any]]] = []
    dropped = 0
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict):
            dropped += 1
            continue
        valid.append((_rank_score(ann), i, ann))
    valid.sort(key=lambda t: (-t[0], t[1]))  # best first; ties keep the JSON's order

    masks, boxes, ids, scores = [], [], [], []
    for score, i, ann in valid:
        if len(masks) >= top_k:
            break
        try:
            rle, _ = check_rle(ann.get("segmentation"), h, w)
            box = xywh_to_xyxy(ann.get("bbox"), inclusive=True)
        except (RLEError, ValueError, TypeError):
            dropped += 1
            continue
        masks.append(rle)
        boxes.append(box)
        ids.append(ann.get("id", i))
        scores.append(score)
    if not masks:
        why = "it has no annotations" if not anns else f"all {len(anns)} annotations are malformed"
        return _reject(stem, f"no usable mask: {why}")
    return SourceRecord(
        source=SOURCE,
        id=stem,
        image=image,
        boxes=boxes,
        masks=masks,
        extra={
            "width": w,
            "height": h,
            "image_id": info.get("image_id"),
            "mask_ids": ids,
            "mask_scores": scores,
            "dropped_masks": dropped,
        },
    )


def _read_folder(root: Path, top_k: int) -> Iterator[SourceRecord | Reject]:
    jsons = {p.with_suffix(""): p for p in root.rglob("*.json")}
    jpgs = {p.with_suffix(""): p for p in root.rglob("*.jpg")}
    for key in sorted(set(jsons) | set(jpgs), key=lambda k: (k.name, str(k))):
        stem = key.name
        if key not in jpgs:
            yield _reject(stem, f"image {key.name}.jpg missing beside {jsons[key]}")
            continue
        if key not in jsons:
            yield _reject(stem, f"annotation {key.name}.json missing beside {jpgs[key]}")
            continue
        try:
            meta = json.loads(jsons[key].read_text())
        except (OSError, ValueError) as e:
            yield _reject(stem, f"cannot parse {jsons[key].name}: {e}")
            continue
        yield record_from_json(stem, meta, ImageRef(path=str(jpgs[key])), top_k)


def _read_tar(tar_path: Path, top_k: int) -> Iterator[SourceRecord | Reject]:
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            stems = {os.path.splitext(n)[0] for n in members if n.endswith((".jpg", ".json"))}
            for stem_path in sorted(stems, key=lambda s: (os.path.basename(s), s)):
                stem = os.path.basename(stem_path)
                jpg, js = f"{stem_path}.jpg", f"{stem_path}.json"
                if jpg not in members:
                    yield _reject(stem, f"image {jpg} missing from {tar_path.name}")
                    continue
                if js not in members:
                    yield _reject(stem, f"annotation {js} missing from {tar_path.name}")
                    continue
                try:
                    f = tar.extractfile(members[js])
                    meta = json.loads(f.read()) if f is not None else None
                except (OSError, ValueError, tarfile.TarError) as e:
                    yield _reject(stem, f"cannot parse {js} in {tar_path.name}: {e}")
                    continue
                yield record_from_json(stem, meta, ImageRef(path=str(tar_path), member=jpg), top_k)
    except (OSError, tarfile.TarError) as e:
        yield _reject(tar_path.name, f"cannot read tar {tar_path}: {e}; re-download or remove it")


def read(cfg: Any) -> Iterator[SourceRecord | Reject]:
    """Check the layout now (SourceError when nothing matches); return the iterator of SA-1B records
    (and rejects) in sorted order; see the module docstring for the shape."""
    opts = read_options(cfg, Options, SOURCE)
    layout, top_k = opts.layout, opts.top_k
    if top_k < 1:
        raise ValueError(f"sa1b top_k={top_k}: must be >= 1 (masks kept per image)")
    if layout not in ("auto", "folder", "tar"):
        raise ValueError(f"sa1b layout={layout!r}: expected auto, folder or tar")
    root = require_dir(option(cfg, "root", ""), "sa1b", "the SA-1B folder (sa_000000.tar, ... or sa_N.jpg + sa_N.json)")
    tars = sorted(root.glob("*.tar"))
    if layout == "tar" or (layout == "auto" and tars):
        if not tars:
            raise SourceError(f"sa1b: layout tar but no *.tar (sa_000000.tar, ...) directly under {root}")
        return _read_tars(tars, top_k)
    if next(root.rglob("*.json"), None) is None and next(root.rglob("*.jpg"), None) is None:
        raise SourceError(f"sa1b: no sa_*.tar, *.json or *.jpg under {root}; point source.root at the SA-1B folder")
    return _read_folder(root, top_k)


def _read_tars(tars: list[Path], top_k: int) -> Iterator[SourceRecord | Reject]:
    for tar_path in tars:
        yield from _read_tar(tar_path, top_k)
