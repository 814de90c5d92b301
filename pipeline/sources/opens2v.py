"""OpenS2V-5M reader: intra records (one subject in one annotated video frame) and cross-video pairs.

The published layout, the clip and pair formats and the filters are described in docs/sources.md
("OpenS2V-5M"); in short, at ``root``:

- ``Jsons/<subset>/total_partN.json`` (option ``subset``, default every subset folder: ``mask_and_bbox``,
  ``mask_and_bbox_High-Quality``; a ``.json.zip`` read in place; or option ``clips``, a glob): ``{clip_key: clip}``, one file per
  part (30–66 GB each). Parsed as a stream (``ijson``): one clip is in memory at a time. The part name is
  the file stem; a clip's id is ``<part>/<clip_key>``. A file whose top level is itself a clip (first key
  ``metadata``) is one clip with id ``<parent folder>/<stem>`` (the per-clip files of the processing steps).
- ``Videos/total_partN/`` (option ``videos`` is the ``Videos`` folder): the part's videos, either extracted
  (``Videos/<part>/<metadata.path>``; ``Videos/<metadata.path>`` and ``<root>/<metadata.path>`` are tried
  too) or as published, a tar in pieces ``*.tar.split.NNN`` (or a plain ``*.tar``) read in place: the
  record's ``image`` is then ``ImageRef(path=<first piece>, member=<video in the tar>, frame=N)``.
- ``Jsons/cross_video_pairs/`` (option ``cross_pairs``, a glob; default none): pair files, one JSON list
  per cluster (``<cluster>.json``), or ``{cluster: [pairs]}``, or JSON Lines. ``cluster_videos.json``
  beside them (``{cluster: [clip ids]}``) is an index, not pairs, and is skipped. Two record formats:
  current ``{cur_id, aft_id, cur_class_id, aft_class_id, cur_class_name, aft_class_name,
  text_similarity, image_similarity, cur_frame_idx, aft_frame_idx}`` with ids ``<part>/<clip_key>``; and
  the older one without class ids and with bare clip keys.

A clip: ``metadata`` (``crop`` ``[x0, x1, y0, y1]`` in source-video pixels, ``fps``, ``num_frames``,
``path``, ``aesthetic``, captions ``face_cap_qwen`` (str) and in older files ``cap`` (list of str)),
``word_tags`` (``background`` / ``subject`` / ``object`` / ``pre_define`` tag lists) and ``annotation``:
``ann_frame_data`` (``ann_frame_idx``, ``annotations[]`` with ``class_name``, ``bbox`` XYXY, ``gme_score``,
``aes_score``; ``img_width``/``img_height`` of the cropped frame), ``mask_map`` ``{"1": {class_name}}``
and ``mask_annotation`` ``{frame: {obj_id: {size, counts, score: [float]}}}`` — COCO RLE in the *cropped*
frame. Object ``i`` (1-based) is ``annotations[i - 1]``.

Frames: every box/mask of a record is in pixels of the **cropped** frame; the decode stage calls
``pipeline.sources.video.read_frame(path, frame, crop=extra["crop_xyxy"], member=image.member)``
(cross records carry ``extra["reference_crop_xyxy"]`` for ``reference``).

Intra record (``id`` = ``<clip id>/o<obj>``): ``phrase`` = the object's ``class_name``, ``caption`` = the
clip caption (first present of ``caption_keys``, default ``[face_cap_qwen, cap]``: upstream's loader reads
``face_cap_qwen``), ``masks`` = [its RLE at ``ann_frame_idx``], ``boxes`` = [its ``bbox``] (else the mask's
bounds), ``group`` = the record id. Cross record (``id`` =
``<target clip>/o<obj>/f<frame>><reference clip>/o<obj>/f<frame>``): target = the ``cur`` clip's frame with
its mask/box when annotated there, ``reference`` = the ``aft`` clip's frame, ``reference_mask`` = its RLE,
``group`` = the cluster; with ``cross_both_directions`` each pair also yields the reversed record.

Filters (per subject, as upstream's pipeline scores them; an explicit null disables one):
``exclude_background`` (true: a subject whose class is one of the clip's ``word_tags.background`` tags is
not a reference), ``min_mask_frac`` 1/32 of the frame, ``min_subject_aesthetic`` 4.5 on the subject's
``aes_score`` (a subject without one passes), ``dedup_iou`` 0.8 (of two masks overlapping more, the
larger is kept), ``max_masks`` 6 (a clip keeps its top subjects by ``aes_score``; the rest are rejected,
the clip is not dropped), ``min_clip_aesthetic`` (default null) on ``metadata.aesthetic``; cross pairs
also ``min_text_similarity`` / ``min_image_similarity``, and their class ids must name the class the
pair states. Older pairs (no class ids) are placed by upstream's pair order (docs/sources.md).

Nothing is dropped in silence: every object of every clip, every pair record (once per direction) and
every unreadable file ends as one record or one ``Reject(source="opens2v", stage="read", reason)``; a
clip that cannot be used at all (no metadata, bad crop, missing video, ...) is one reject with the clip id.
An empty glob, a missing ``Videos`` folder or a bad option is a ``SourceError`` / ``ValueError`` raised by
``read`` itself, before any record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sqlite3
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.records import Box, ImageRef, Reject, SourceRecord
from pipeline.sources.common import (RLEError, SourceError, as_xyxy, check_rle, glob_files, option, read_options,
                                     require_dir, rle_bbox)

SOURCE = "opens2v"
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Options:
    """Reader options for OpenS2V-5M: the recipe's ``source:`` keys besides ``kind`` and ``root``."""

    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "min_aesthetic": "is gone: the threshold now applies per subject as upstream's pipeline scores it; use "
                         "min_subject_aesthetic (annotations[i].aes_score) and/or min_clip_aesthetic (metadata.aesthetic)"}
    clips: str | None = None
    """Glob (under root) of the per-part annotation files; None = the annotation subsets under ``Jsons/``
    (see ``subset``). Set it only for a layout other than the release's."""
    subset: str | None = None
    """Annotation subset: a folder under ``Jsons/`` holding ``total_partN.json`` (or ``.json.zip``) files,
    as published ``mask_and_bbox`` (all clips) and ``mask_and_bbox_High-Quality`` (the filtered subset);
    None = every such folder, a clip found in several read once (from the first, in name order)."""
    videos: str = "Videos"
    """Folder (under root) holding one folder per part (extracted videos or the split tar)."""
    cross_pairs: str | None = None
    """Glob (under root) of the cross-video pair files; None = no cross records."""
    cluster_index: str = "cluster_videos.json"
    """File name of the cluster index beside the pair files (skipped: it holds no pairs)."""
    intra: bool = True
    """Yield intra records (subject and target from the same frame)."""
    cross: bool = True
    """Yield cross records (needs cross_pairs)."""
    cross_both_directions: bool = True
    """Also yield each pair reversed (aft as target, cur as reference)."""
    caption_keys: str | list[str] = field(default_factory=lambda: ["face_cap_qwen", "cap"])
    """Caption: the first of these metadata keys that holds text (upstream's loader reads face_cap_qwen)."""
    exclude_background: bool = True
    """Subjects whose class is a word_tags.background tag are not references."""
    min_mask_frac: float | None = 1 / 32
    """Mask area at least this fraction of the (cropped) frame."""
    min_subject_aesthetic: float | None = 4.5
    """Subject aes_score at least this (a subject without one passes)."""
    dedup_iou: float | None = 0.8
    """Masks of one frame overlapping more than this are duplicates; the larger is kept."""
    max_masks: int | None = 6
    """Subjects kept per clip, best aes_score first."""
    min_clip_aesthetic: float | None = None
    """Clip metadata.aesthetic at least this (None = off)."""
    min_text_similarity: float | None = None
    """Cross pairs: class-name similarity at least this."""
    min_image_similarity: float | None = None
    """Cross pairs: subject image similarity at least this."""
    work_dir: str | None = None
    """Where the cross-pair clip index (SQLite, removed afterwards) is written; None = the system temp dir."""


@dataclass(frozen=True, kw_only=True)
class OpenS2VSource(Options):
    """The whole source section as one object (``read(OpenS2VSource(root=...))``)."""

    root: str
    """Dataset folder (the downloaded OpenS2V-5M)."""


FILTER_KEYS = ("exclude_background", "min_mask_frac", "min_subject_aesthetic", "dedup_iou", "max_masks",
               "min_clip_aesthetic", "min_text_similarity", "min_image_similarity", "cross_both_directions",
               "caption_keys")


# ------------------------------------------------------------------------------------------ helpers


def _reject(rid: str, reason: str) -> Reject:
    return Reject(source=SOURCE, id=rid, stage="read", reason=reason)


def _num(value: Any) -> float | None:
    """A JSON number as float; a list holding one number (SAM 2's ``score: [float]``) gives that number."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
        return float(value)
    return None


def _int_key(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _crop_xyxy(crop: Any) -> Box | None:
    """OpenS2V ``[x0, x1, y0, y1]`` → XYXY; None when absent; ValueError when malformed."""
    if crop is None:
        return None
    if not (isinstance(crop, (list, tuple)) and len(crop) == 4):
        raise ValueError(f"metadata.crop {crop!r} is not [x0, x1, y0, y1]")
    x0, x1, y0, y1 = crop
    return as_xyxy([x0, y0, x1, y1])


def _caption(meta: dict[str, Any], keys: list[str]) -> tuple[str | None, str | None]:
    """(caption, key it came from): the first of ``keys`` holding text (a list gives its first string)."""
    for key in keys:
        value = meta.get(key)
        if isinstance(value, list):
            value = next((v for v in value if isinstance(v, str) and v.strip()), None)
        if isinstance(value, str) and value.strip():
            return value.strip(), key
    return None, None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _tag(text: Any) -> str:
    return " ".join(str(text).lower().split())


# --------------------------------------------------------------------------------------- the clip


@dataclass(kw_only=True)
class _Clip:
    """What the reader keeps of one clip (boxes/masks in cropped-frame pixels)."""

    id: str
    key: str
    video: str
    member: str | None
    crop_xyxy: Box | None
    frame_hw: tuple[int, int] | None
    ann_frame: int | None
    aesthetic: float | None
    caption: str | None
    caption_key: str | None
    fps: Any = None
    num_frames: Any = None
    classes: dict[int, str] = field(default_factory=dict)  # mask_map order (upstream's pair order)
    annotations: dict[int, dict[str, Any]] = field(default_factory=dict)
    masks: dict[int, dict[int, Any]] = field(default_factory=dict)  # frame → object id → raw RLE
    background: list[str] = field(default_factory=list)

    def image(self, frame: int) -> ImageRef:
        return ImageRef(path=self.video, member=self.member, frame=frame)

    def aes(self, oid: int) -> float | None:
        return _num(self.annotations.get(oid, {}).get("aes_score"))

    def is_background(self, oid: int) -> bool:
        name = self.classes.get(oid)
        return name is not None and _tag(name) in {_tag(t) for t in self.background}

    def to_json(self) -> str:
        d = dict(vars(self))
        d["classes"] = [[k, v] for k, v in self.classes.items()]
        d["annotations"] = [[k, v] for k, v in self.annotations.items()]
        d["masks"] = [[f, [[o, m] for o, m in objs.items()]] for f, objs in self.masks.items()]
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "_Clip":
        d = json.loads(text)
        d["classes"] = {int(k): v for k, v in d["classes"]}
        d["annotations"] = {int(k): v for k, v in d["annotations"]}
        d["masks"] = {int(f): {int(o): m for o, m in objs} for f, objs in d["masks"]}
        d["crop_xyxy"] = tuple(d["crop_xyxy"]) if d["crop_xyxy"] is not None else None
        d["frame_hw"] = tuple(d["frame_hw"]) if d["frame_hw"] is not None else None
        return cls(**d)


class _Videos:
    """Finds a clip's video: an extracted file, else a member of the part's (split) tar.

    The member index is built for one part at a time (parts are read in order), from the headers only.
    """

    def __init__(self, root: Path, videos: Path):
        self.root, self.videos = root, videos
        self._part: str | None = None
        self._index: dict[str, list[tuple[str, str]]] = {}
        self._archives: list[str] = []
        self._errors: list[str] = []

    def _archives_of(self, part: str) -> list[Path]:
        from pipeline.sources.video import SPLIT_RE

        found: list[Path] = []
        for folder, prefix in ((self.videos / part, ""), (self.videos, part)):
            if not folder.is_dir():
                continue
            first_piece: dict[str, tuple[int, Path]] = {}
            for p in sorted(folder.iterdir()):
                if prefix and not p.name.startswith(prefix + "."):
                    continue
                m = SPLIT_RE.match(p.name)
                if m is not None:
                    n = int(m["num"])
                    if m["stem"] not in first_piece or n < first_piece[m["stem"]][0]:
                        first_piece[m["stem"]] = (n, p)
                elif p.name.endswith(".tar") and p.is_file():
                    found.append(p)
            found.extend(p for _, p in sorted(first_piece.values(), key=lambda t: t[1]))
        return found

    def _load(self, part: str) -> None:
        from pipeline.sources.video import iter_tar_members, member_key

        self._part, self._index, self._archives, self._errors = part, {}, [], []
        for archive in self._archives_of(part):
            rel = archive.relative_to(self.root).as_posix()
            self._archives.append(rel)
            try:
                for name, _, _ in iter_tar_members(archive):
                    key = member_key(name)
                    self._index.setdefault(os.path.basename(key), []).append((key, str(archive)))
            except Exception as e:  # a broken / incomplete archive: its clips become rejects saying so
                self._errors.append(f"{rel}: {type(e).__name__}: {e}")

    def find(self, part: str, rel: str) -> tuple[str, str | None] | str:
        """``(path, member or None)``, or the reason it was not found."""
        from pipeline.sources.video import member_key

        for candidate in (self.videos / part / rel, self.videos / rel, self.root / rel):
            if candidate.is_file():
                return str(candidate), None
        if self._part != part:
            self._load(part)
        key = member_key(rel)
        for member, archive in self._index.get(os.path.basename(key), []):
            if member == key or member.endswith("/" + key):
                return archive, member
        where = f"not under {self.videos / part}, {self.videos} or {self.root}"
        if self._archives:
            where += f", nor in the archive(s) {', '.join(self._archives)}"
        if self._errors:
            where += f" (unreadable: {'; '.join(self._errors)})"
        return f"video {rel} {where}"


def _parse_clip(videos: _Videos, part: str, key: str, item: Any, caption_keys: list[str]) -> _Clip | Reject:
    cid = f"{part}/{key}"
    if not isinstance(item, dict) or not isinstance(item.get("metadata"), dict):
        return _reject(cid, "clip has no metadata object")
    meta = item["metadata"]
    ann = item.get("annotation")
    if not isinstance(ann, dict):
        return _reject(cid, "clip has no annotation object")
    try:
        crop = _crop_xyxy(meta.get("crop"))
    except (ValueError, TypeError) as e:
        return _reject(cid, str(e))
    rel = meta.get("path")
    if not isinstance(rel, str) or not rel:
        return _reject(cid, "metadata.path is missing; cannot locate the clip's video")
    found = videos.find(part, rel)
    if isinstance(found, str):
        return _reject(cid, found)
    frame_data = ann.get("ann_frame_data") if isinstance(ann.get("ann_frame_data"), dict) else {}
    h, w = frame_data.get("img_height"), frame_data.get("img_width")
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        frame_hw: tuple[int, int] | None = (h, w)
    elif crop is not None:
        frame_hw = (int(round(crop[3] - crop[1])), int(round(crop[2] - crop[0])))
    else:
        frame_hw = None
    caption, caption_key = _caption(meta, caption_keys)
    tags = item.get("word_tags") if isinstance(item.get("word_tags"), dict) else {}
    background = tags.get("background") if isinstance(tags.get("background"), list) else []
    clip = _Clip(
        id=cid,
        key=key,
        video=found[0],
        member=found[1],
        crop_xyxy=crop,
        frame_hw=frame_hw,
        ann_frame=_int_key(frame_data.get("ann_frame_idx")),
        aesthetic=_num(meta.get("aesthetic")),
        caption=caption,
        caption_key=caption_key,
        fps=meta.get("fps"),
        num_frames=meta.get("num_frames"),
        background=[t for t in background if isinstance(t, str)],
    )
    mask_map = ann.get("mask_map") if isinstance(ann.get("mask_map"), dict) else {}
    for k, v in mask_map.items():
        oid = _int_key(k)
        if oid is not None and isinstance(v, dict) and isinstance(v.get("class_name"), str):
            clip.classes[oid] = v["class_name"]
    annotations = frame_data.get("annotations") if isinstance(frame_data.get("annotations"), list) else []
    for i, a in enumerate(annotations, start=1):  # object ids are 1-based
        if isinstance(a, dict):
            clip.annotations[i] = a
            if i not in clip.classes and isinstance(a.get("class_name"), str):
                clip.classes[i] = a["class_name"]
    mask_ann = ann.get("mask_annotation") if isinstance(ann.get("mask_annotation"), dict) else {}
    for fk, objs in mask_ann.items():
        f = _int_key(fk)
        if f is not None and isinstance(objs, dict):
            clip.masks[f] = {o: v for o, v in ((_int_key(k), v) for k, v in objs.items()) if o is not None}
    return clip


def _checked_mask(clip: _Clip, frame: int, oid: int) -> tuple[dict[str, Any], int, float | None]:
    """The object's RLE at ``frame``, checked against the frame size: (rle, area, score). Raises ValueError."""
    raw = clip.masks.get(frame, {}).get(oid)
    if raw is None:
        raise ValueError(f"no mask for object {oid} at frame {frame} in mask_annotation")
    h, w = clip.frame_hw if clip.frame_hw else (None, None)
    rle, area = check_rle(raw, h, w)
    score = _num(raw.get("score")) if isinstance(raw, dict) else None
    return rle, area, score


def _mask_frac(rle: dict[str, Any], area: int) -> float:
    h, w = rle["size"]
    return area / float(h * w)


def _clip_aesthetic_fails(clip: _Clip, low: float | None) -> str | None:
    if low is not None and clip.aesthetic is not None and clip.aesthetic < low:
        return f"clip {clip.id} metadata.aesthetic {clip.aesthetic} < min_clip_aesthetic {low}"
    return None


def _subject_fails(clip: _Clip, oid: int, opts: dict[str, Any]) -> str | None:
    """Why object ``oid`` of ``clip`` is not a usable subject (background tag, low aes_score), or None."""
    if opts["exclude_background"] and clip.is_background(oid):
        return (f"object {oid} class {clip.classes.get(oid)!r} is a word_tags.background tag of {clip.id} "
                "(background, not a subject)")
    low, aes = opts["min_subject_aesthetic"], clip.aes(oid)
    if low is not None and aes is not None and aes < low:
        return f"object {oid} aes_score {aes:.3f} < min_subject_aesthetic {low}"
    return None


def _base_extra(clip: _Clip, oid: int, rle: dict[str, Any] | None, area: int, score: float | None) -> dict[str, Any]:
    """Extra keys common to intra and cross records; ``rle`` None when the object has no mask here."""
    size = list(rle["size"]) if rle is not None else (list(clip.frame_hw) if clip.frame_hw else None)
    return {
        "clip_id": clip.id,
        "object_id": oid,
        "frame_size": size,
        "crop_xyxy": clip.crop_xyxy,
        "fps": clip.fps,
        "num_frames": clip.num_frames,
        "aesthetic": clip.aesthetic,
        "aes_score": clip.aes(oid),
        "gme_score": _num(clip.annotations.get(oid, {}).get("gme_score")),
        "caption_key": clip.caption_key,
        "mask_score": score,
        "mask_frac": _mask_frac(rle, area) if rle is not None else None,
    }


# ------------------------------------------------------------------------------------------- intra


def _intra(clip: _Clip, opts: dict[str, Any]) -> Iterator[SourceRecord | Reject]:
    """One record or reject per object of the clip (or one reject for the whole clip)."""
    why = _clip_aesthetic_fails(clip, opts["min_clip_aesthetic"])
    if why:
        yield _reject(clip.id, why)
        return
    if clip.ann_frame is None:
        yield _reject(clip.id, "annotation.ann_frame_data.ann_frame_idx is missing")
        return
    frame = clip.ann_frame
    oids = sorted(set(clip.classes) | set(clip.annotations) | set(clip.masks.get(frame, {})))
    if not oids:
        yield _reject(clip.id, f"no annotated objects at frame {frame}")
        return
    out: dict[int, SourceRecord | Reject] = {}
    kept: list[tuple[int, float, int, dict[str, Any]]] = []  # (area, score, oid, rle) surviving so far
    for oid in oids:  # the cheap per-subject checks first, then the mask (parsing RLE is the costly part)
        rid = f"{clip.id}/o{oid}"
        why = _subject_fails(clip, oid, opts)
        if why:
            out[oid] = _reject(rid, why)
            continue
        try:
            rle, area, score = _checked_mask(clip, frame, oid)
        except (RLEError, ValueError) as e:
            out[oid] = _reject(rid, f"object {oid}: {e}")
            continue
        frac = _mask_frac(rle, area)
        if opts["min_mask_frac"] is not None and frac < opts["min_mask_frac"]:
            out[oid] = _reject(rid, f"mask covers {frac:.4f} of the frame < min_mask_frac {opts['min_mask_frac']:.4f}")
            continue
        a = clip.annotations.get(oid, {})
        try:
            box = as_xyxy(a.get("bbox"))
        except (ValueError, TypeError):
            box = rle_bbox(rle)
        extra = _base_extra(clip, oid, rle, area, score)
        extra["det_scores"] = {k: v for k, v in a.items() if k != "bbox" and _num(v) is not None}
        out[oid] = SourceRecord(
            source=SOURCE,
            id=rid,
            image=clip.image(frame),
            phrase=clip.classes.get(oid),
            caption=clip.caption,
            boxes=[box] if box is not None else [],
            masks=[rle],
            group=rid,
            extra=extra,
        )
        kept.append((area, score if score is not None else 0.0, oid, rle))

    if opts["dedup_iou"] is not None and len(kept) > 1:
        import pycocotools.mask as mask_utils

        kept.sort(key=lambda t: (-t[0], -t[1], t[2]))  # larger mask first; then higher score, lower id
        encs = [{"size": rle["size"], "counts": rle["counts"].encode()} for _, _, _, rle in kept]
        boxes = mask_utils.toBbox(encs)  # x, y, w, h of each mask's pixels
        survivors: list[tuple[int, float, int, dict[str, Any]]] = []
        alive: list[int] = []

        def overlap(i: int, j: int) -> float:
            """Mask IoU, computed only when the areas and boxes allow it to pass the threshold."""
            (xi, yi, wi, hi), (xj, yj, wj, hj) = boxes[i], boxes[j]
            inter_box = max(0.0, min(xi + wi, xj + wj) - max(xi, xj)) * max(0.0, min(yi + hi, yj + hj) - max(yi, yj))
            a, b = kept[i][0], kept[j][0]
            most = min(a, b, inter_box)  # the masks' intersection is at most this
            if a + b - most <= 0 or most / (a + b - most) <= opts["dedup_iou"]:
                return 0.0
            return float(mask_utils.iou([encs[i]], [encs[j]], [0])[0][0])

        for i, (area, score, oid, rle) in enumerate(kept):
            dup = None
            for j in alive:
                iou = overlap(i, j)
                if iou > opts["dedup_iou"]:
                    dup = (kept[j][2], iou)
                    break
            if dup is None:
                survivors.append((area, score, oid, rle))
                alive.append(i)
            else:
                why = (f"duplicate of object {dup[0]} (mask IoU {dup[1]:.3f} > dedup_iou {opts['dedup_iou']}; "
                       "the larger mask is kept)")
                out[oid] = _reject(f"{clip.id}/o{oid}", why)
        kept = survivors
    k = opts["max_masks"]
    if k is not None and len(kept) > k:
        ranked = sorted(kept, key=lambda t: (-(clip.aes(t[2]) if clip.aes(t[2]) is not None else -math.inf), -t[0], t[2]))
        for rank, (_, _, oid, _) in enumerate(ranked, start=1):
            if rank > k:
                aes = clip.aes(oid)
                out[oid] = _reject(f"{clip.id}/o{oid}", f"not among the clip's top max_masks={k} subjects by "
                                   f"aes_score (its aes_score {aes if aes is None else round(aes, 3)} ranks {rank} "
                                   f"of {len(ranked)})")
    yield from (out[o] for o in oids)


# ------------------------------------------------------------------------------------- files


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
                yield _reject(rel, f"{rel} top level is {'empty' if not first else repr(first)}, expected a list of pair records")
    except (OSError, ValueError, ijson.JSONError) as e:
        yield _reject(rel, f"cannot parse cross-pair file {rel}: {_one_line(e)} (after {n} records)")


# ------------------------------------------------------------------------------------- clip store


class _Store:
    """On-disk index (SQLite in a temp dir) of the clips cross pairs name: kept across the intra pass so
    that cross records can look up any clip without holding annotation files in memory."""

    def __init__(self, work_dir: str | None):
        self.dir = tempfile.mkdtemp(prefix="opens2v-", dir=work_dir)
        self.db = sqlite3.connect(os.path.join(self.dir, "clips.sqlite"))
        self.db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16384;"
            "CREATE TABLE wanted (id TEXT PRIMARY KEY);"
            "CREATE TABLE clips (id TEXT PRIMARY KEY, key TEXT, data TEXT);"
            "CREATE INDEX clips_key ON clips (key);"
            "CREATE TABLE seen (rid TEXT PRIMARY KEY, first TEXT);"
        )

    def want(self, ids: list[str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", [(i,) for i in ids])

    def wanted(self, clip: _Clip) -> bool:
        row = self.db.execute("SELECT 1 FROM wanted WHERE id IN (?, ?) LIMIT 1", (clip.id, clip.key)).fetchone()
        return row is not None

    def put(self, clip: _Clip) -> None:
        self.db.execute("INSERT OR REPLACE INTO clips VALUES (?, ?, ?)", (clip.id, clip.key, clip.to_json()))

    def find(self, cid: Any) -> _Clip | str:
        """The clip a pair names (``<part>/<key>`` or a bare key), or why it cannot be used."""
        if not isinstance(cid, str) or not cid:
            return "is not a clip id string"
        row = self.db.execute("SELECT data FROM clips WHERE id = ?", (cid,)).fetchone()
        if row is not None:
            return _Clip.from_json(row[0])
        rows = self.db.execute("SELECT id, data FROM clips WHERE key = ?", (cid.rsplit("/", 1)[-1],)).fetchall()
        if "/" in cid or not rows:
            return "is not a readable clip (not in the annotation files, or rejected there)"
        if len(rows) > 1:
            return f"is a bare clip key found in several parts: {', '.join(sorted(r[0] for r in rows))}"
        return _Clip.from_json(rows[0][1])

    def first_seen(self, rid: str, where: str) -> str | None:
        """None the first time ``rid`` is seen (and records ``where``); else where it was first seen."""
        row = self.db.execute("SELECT first FROM seen WHERE rid = ?", (rid,)).fetchone()
        if row is not None:
            return row[0]
        self.db.execute("INSERT INTO seen VALUES (?, ?)", (rid, where))
        return None

    def close(self) -> None:
        self.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------- cross


@dataclass(kw_only=True)
class _Pair:
    """A pair record with its clips and objects resolved (``cur`` / ``aft`` sides)."""

    cluster: str
    rec: dict[str, Any]
    where: str
    clips: dict[str, _Clip]
    oids: dict[str, int]
    frames: dict[str, int]
    how: str  # class_id | pair_order


def _frame(rec: dict[str, Any], side: str, clip: _Clip | None) -> int | None:
    value = rec.get(f"{side}_frame_idx")
    return _int_key(value) if value is not None else (clip.ann_frame if clip else None)


def _by_class_id(rec: dict[str, Any], side: str, clip: _Clip) -> int | str:
    """Object id from ``<side>_class_id``, checked against ``<side>_class_name``; or why not."""
    oid = _int_key(rec.get(f"{side}_class_id"))
    name = rec.get(f"{side}_class_name")
    if oid is None:
        return f"{side}_class_id {rec.get(f'{side}_class_id')!r} is not an object id"
    if oid not in clip.classes:
        return f"{side}_class_id {oid} is not an object of {clip.id} (mask_map has {sorted(clip.classes)})"
    if name is not None and _tag(clip.classes[oid]) != _tag(name):
        return (f"class id mismatch: {side}_class_id {oid} is {clip.classes[oid]!r} in {clip.id}, "
                f"but the pair says {side}_class_name {name!r}")
    return oid


def _by_pair_order(run: list[dict[str, Any]], cur: _Clip, aft: _Clip) -> list[tuple[int, int] | str]:
    """Object ids of older pair records (class names only) from upstream's pair order.

    Upstream writes the pairs of two clips in nested mask_map order (for each ``cur`` object, for each
    ``aft`` object, when the similarities pass), so a run of records is a subsequence of that order. A
    record's position is certain when its earliest and latest placements agree; otherwise it is
    ambiguous (several objects share the class names) and becomes a reject.
    """
    order = [(c, a) for c in cur.classes for a in aft.classes]
    names = [(_tag(cur.classes[c]), _tag(aft.classes[a])) for c, a in order]
    want = [(_tag(r.get("cur_class_name")), _tag(r.get("aft_class_name"))) for r in run]
    lo: list[int | None] = []
    p = 0
    for w in want:
        while p < len(names) and names[p] != w:
            p += 1
        lo.append(p if p < len(names) else None)
        p += 1
    hi: list[int | None] = [None] * len(want)
    p = len(names) - 1
    for k in range(len(want) - 1, -1, -1):
        while p >= 0 and names[p] != want[k]:
            p -= 1
        hi[k] = p if p >= 0 else None
        p -= 1
    out: list[tuple[int, int] | str] = []
    for k, w in enumerate(want):
        if lo[k] is None or hi[k] is None or lo[k] > hi[k]:
            out.append(f"class names {w[0]!r} / {w[1]!r} do not fit the objects of {cur.id} / {aft.id} in "
                       "upstream's pair order (older pair format, no class ids)")
        elif lo[k] != hi[k]:
            cands = sorted({order[i] for i in range(lo[k], hi[k] + 1) if names[i] == w})
            out.append(f"ambiguous: class names {w[0]!r} / {w[1]!r} fit object pairs {cands} of {cur.id} / "
                       f"{aft.id} (older pair format, no class ids)")
        else:
            out.append(order[lo[k]])
    return out


def _resolve_run(store: _Store, run: list[tuple[str, int, dict[str, Any]]], rel: str) -> list[_Pair | str]:
    """Resolve a run of pair records naming the same two clips (and frames) to objects."""
    cur_id, aft_id = run[0][2].get("cur_id"), run[0][2].get("aft_id")
    cur, aft = store.find(cur_id), store.find(aft_id)
    for side, clip in (("cur_id", cur), ("aft_id", aft)):
        if isinstance(clip, str):
            return [f"pair names {side}={run[0][2].get(side)!r}, which {clip}"] * len(run)
    assert isinstance(cur, _Clip) and isinstance(aft, _Clip)
    legacy = [i for i, (_, _, r) in enumerate(run) if r.get("cur_class_id") is None and r.get("aft_class_id") is None]
    by_order = dict(zip(legacy, _by_pair_order([run[i][2] for i in legacy], cur, aft))) if legacy else {}
    out: list[_Pair | str] = []
    for i, (cluster, n, rec) in enumerate(run):
        frames = {"cur": _frame(rec, "cur", cur), "aft": _frame(rec, "aft", aft)}
        if frames["cur"] is None or frames["aft"] is None:
            out.append("pair record lacks a frame index that resolves")
            continue
        if i in by_order:
            got = by_order[i]
            if isinstance(got, str):
                out.append(got)
                continue
            oids, how = {"cur": got[0], "aft": got[1]}, "pair_order"
        else:
            c, a = _by_class_id(rec, "cur", cur), _by_class_id(rec, "aft", aft)
            if isinstance(c, str) or isinstance(a, str):
                out.append(c if isinstance(c, str) else a)  # type: ignore[arg-type]
                continue
            oids, how = {"cur": c, "aft": a}, "class_id"
        out.append(_Pair(cluster=cluster, rec=rec, where=f"{rel} record {n}", clips={"cur": cur, "aft": aft},
                         oids=oids, frames=frames, how=how))
    return out


def _cross_one(pair: _Pair, t: str, r: str, opts: dict[str, Any]) -> SourceRecord | Reject:
    """One cross record from a resolved pair: target side ``t``, reference side ``r`` ("cur"/"aft")."""
    tgt, ref = pair.clips[t], pair.clips[r]
    t_oid, r_oid, t_frame, r_frame = pair.oids[t], pair.oids[r], pair.frames[t], pair.frames[r]
    rec = pair.rec
    rid = f"{tgt.id}/o{t_oid}/f{t_frame}>{ref.id}/o{r_oid}/f{r_frame}"
    if tgt.id == ref.id and t_oid == r_oid and t_frame == r_frame:
        return _reject(rid, "pair joins an object with itself in the same frame")
    for clip in (tgt, ref):
        why = _clip_aesthetic_fails(clip, opts["min_clip_aesthetic"])
        if why:
            return _reject(rid, why)
    for key in ("text_similarity", "image_similarity"):
        low = opts[f"min_{key}"]
        value = _num(rec.get(key))
        if low is not None and (value is None or value < low):
            return _reject(rid, f"{key} {rec.get(key)!r} < min_{key} {low}")
    why = _subject_fails(ref, r_oid, opts)
    if why:
        return _reject(rid, f"reference {why}")
    try:
        r_rle, r_area, r_score = _checked_mask(ref, r_frame, r_oid)
    except (RLEError, ValueError) as e:
        return _reject(rid, f"reference {ref.id}: {e}")
    min_frac = opts["min_mask_frac"]
    if min_frac is not None and _mask_frac(r_rle, r_area) < min_frac:
        return _reject(rid, f"reference mask covers {_mask_frac(r_rle, r_area):.4f} of the frame < min_mask_frac {min_frac:.4f}")
    # Target: its mask/box when the target clip annotates this object at this frame (else the stages detect it).
    masks: list[dict[str, Any]] = []
    boxes: list[Box] = []
    extra = _base_extra(tgt, t_oid, None, 0, None)
    if t_oid in tgt.masks.get(t_frame, {}):
        try:
            t_rle, t_area, t_score = _checked_mask(tgt, t_frame, t_oid)
        except (RLEError, ValueError) as e:
            return _reject(rid, f"target {tgt.id}: {e}")
        if min_frac is not None and _mask_frac(t_rle, t_area) < min_frac:
            return _reject(rid, f"target mask covers {_mask_frac(t_rle, t_area):.4f} of the frame < min_mask_frac {min_frac:.4f}")
        masks = [t_rle]
        box = rle_bbox(t_rle)
        boxes = [box] if box is not None else []
        extra = _base_extra(tgt, t_oid, t_rle, t_area, t_score)
    extra.update(
        reference_clip_id=ref.id,
        reference_object_id=r_oid,
        reference_crop_xyxy=ref.crop_xyxy,
        reference_frame_size=list(r_rle["size"]),
        reference_class_name=ref.classes.get(r_oid),
        reference_mask_score=r_score,
        reference_aes_score=ref.aes(r_oid),
        text_similarity=_num(rec.get("text_similarity")),
        image_similarity=_num(rec.get("image_similarity")),
        cluster=pair.cluster,
        object_ids_from=pair.how,
    )
    return SourceRecord(
        source=SOURCE,
        id=rid,
        image=tgt.image(t_frame),
        phrase=tgt.classes.get(t_oid),
        caption=tgt.caption,
        boxes=boxes,
        masks=masks,
        reference=ref.image(r_frame),
        reference_mask=r_rle,
        reference_box=rle_bbox(r_rle),
        group=pair.cluster,
        extra=extra,
    )


def _runs(items: Iterator[tuple[str, int, Any] | Reject]) -> Iterator[list[tuple[str, int, Any]] | Reject]:
    """Consecutive pair records naming the same two clips and frames, grouped (upstream writes a clip
    pair's records together); a non-object record is a run of its own."""
    run: list[tuple[str, int, Any]] = []

    def key(rec: Any) -> Any:
        if not isinstance(rec, dict):
            return None
        return tuple(json.dumps(rec.get(k)) for k in ("cur_id", "aft_id", "cur_frame_idx", "aft_frame_idx"))

    for item in items:
        if isinstance(item, Reject):
            if run:
                yield run
                run = []
            yield item
            continue
        if run and (key(item[2]) is None or key(item[2]) != key(run[-1][2])):
            yield run
            run = []
        run.append(item)
    if run:
        yield run


def _cross(root: Path, files: list[Path], store: _Store, opts: dict[str, Any]) -> Iterator[SourceRecord | Reject]:
    sides = [("cur", "aft"), ("aft", "cur")] if opts["cross_both_directions"] else [("cur", "aft")]
    for path in files:
        rel = path.relative_to(root).as_posix()
        for run in _runs(_stream_pairs(root, path)):
            if isinstance(run, Reject):
                yield run
                continue
            if not isinstance(run[0][2], dict):
                n = run[0][1]
                yield _reject(f"{rel}#{n}", f"pair record {n} of {rel} is not an object")
                continue
            for (cluster, n, rec), got in zip(run, _resolve_run(store, run, rel)):
                for t, r in sides:
                    if isinstance(got, str):
                        yield _reject(f"{rec.get(f'{t}_id')}>{rec.get(f'{r}_id')}@{rel}#{n}", got)
                        continue
                    out = _cross_one(got, t, r, opts)
                    first = store.first_seen(out.id, got.where)
                    if first is not None:
                        yield _reject(f"{out.id}~{rel}#{n}", f"repeats the pair record of {out.id} ({first})")
                        continue
                    yield out


# -------------------------------------------------------------------------------------------- read


def _options(given: Options) -> dict[str, Any]:
    opts = {key: getattr(given, key) for key in FILTER_KEYS}
    keys = opts["caption_keys"]
    if isinstance(keys, str):
        keys = [keys]
    if not (isinstance(keys, list) and all(isinstance(k, str) and k for k in keys)):
        raise ValueError(f"opens2v: caption_keys {keys!r} must be a list of metadata keys, e.g. [face_cap_qwen, cap]")
    opts["caption_keys"] = keys
    m = opts["max_masks"]
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"opens2v: max_masks={m!r} must be an integer >= 1 or null")
    opts["cluster_index"] = given.cluster_index
    return opts


def _subset_files(folder: Path) -> list[Path]:
    """The part files of one subset folder; a part present both extracted and zipped is read extracted."""
    files = {p.name: p for p in folder.glob("total_part*") if p.is_file()
             and (p.name.endswith(".json") or p.name.endswith(ZIP_SUFFIX))}
    return sorted(p for name, p in files.items() if not (name.endswith(ZIP_SUFFIX) and name[:-4] in files))


def _annotation_files(root: Path, given: Options) -> list[tuple[str, Path]]:
    """``(subset, file)`` of every annotation file to read, by part then subset (so that a clip published in
    several subsets is met in one place). ``clips`` (a glob) names the files itself, as one subset."""
    if given.clips is not None:
        if given.subset is not None:
            raise ValueError("opens2v: set source.subset or source.clips, not both (clips is a glob of its own)")
        return [("", p) for p in glob_files(root, given.clips, "opens2v", "annotation files (source.clips)")]
    jsons = root / "Jsons"
    found = {d.name: _subset_files(d) for d in sorted(jsons.iterdir()) if d.is_dir()} if jsons.is_dir() else {}
    found = {name: files for name, files in found.items() if files}
    if given.subset is not None:
        files = found.get(given.subset)
        if not files:
            raise SourceError(f"opens2v: source.subset {given.subset!r} is not an annotation folder under {jsons} "
                              f"(folders holding total_partN.json there: {', '.join(found) or 'none'})")
        found = {given.subset: files}
    if not found:
        raise SourceError(f"opens2v: no annotation subset under {jsons}: no folder there holds total_partN.json "
                          "(or .json.zip) files, as the release's Jsons/mask_and_bbox/ does; download one, or set "
                          "source.clips to a glob of your annotation files")
    pairs = [(name, p) for name, files in found.items() for p in files]
    return sorted(pairs, key=lambda sp: (_part_name(sp[1]), sp[0]))


def read(cfg: Any) -> Iterator[SourceRecord | Reject]:
    """Check the layout now (SourceError naming what matched nothing); return the iterator of intra
    records (annotation-file order), then cross records (pair-file order), with their rejects."""
    given = read_options(cfg, Options, SOURCE)
    root = require_dir(option(cfg, "root", ""), "opens2v", "the OpenS2V-5M folder (holding Jsons/ and Videos/)")
    opts = _options(given)
    clip_files = _annotation_files(root, given)
    videos = root / given.videos
    if not videos.is_dir():
        raise SourceError(f"opens2v: videos folder {videos} does not exist; set source.videos (under root) to the "
                          "folder holding Videos/total_partN/")
    do_intra, do_cross = given.intra, given.cross
    pairs_glob = given.cross_pairs
    pair_files: list[Path] = []
    if do_cross and pairs_glob:
        _check_pairs_extracted(root, pairs_glob)
        pair_files = [p for p in glob_files(root, pairs_glob, "opens2v", "cross-pair files (source.cross_pairs)")
                      if p.name != opts["cluster_index"]]
        if not pair_files:
            raise SourceError(f"opens2v: source.cross_pairs {pairs_glob!r} under {root} matches only the cluster "
                              f"index {opts['cluster_index']}, no pair files")
    if not do_intra and not pair_files:
        raise ValueError("opens2v: intra is false and no cross_pairs are read; nothing would be produced")
    return _read(root, clip_files, videos, pair_files, opts, do_intra, given.work_dir)


def _check_pairs_extracted(root: Path, pattern: str) -> None:
    """The release publishes the pair files as one tar (``Jsons/cross_video_pairs/cross_video_pairs.tar``):
    a glob that finds no pair file beside such a tar says to extract it (one line), not just "no match"."""
    if glob_files(root, pattern, "opens2v", "", required=False):
        return
    folder = (root / pattern).parent
    tars = sorted(folder.glob("*.tar")) if "*" not in folder.as_posix() and folder.is_dir() else []
    if tars:
        raise SourceError(f"opens2v: {folder} holds {tars[0].name} as published but no pair files matching "
                          f"source.cross_pairs {pattern!r}; extract it there (tar -xf {tars[0].name}) or set "
                          "source.cross: false")


def _read(root: Path, clip_files: list[tuple[str, Path]], videos_dir: Path, pair_files: list[Path],
          opts: dict[str, Any], do_intra: bool, work_dir: str | None) -> Iterator[SourceRecord | Reject]:
    store = _Store(work_dir) if pair_files else None
    try:
        if store is not None:  # which clips the pairs name: only those are kept for the cross pass
            for path in pair_files:
                batch = []
                for item in _stream_pairs(root, path):
                    if not isinstance(item, Reject) and isinstance(item[2], dict):
                        batch.extend(v for v in (item[2].get("cur_id"), item[2].get("aft_id")) if isinstance(v, str))
                    if len(batch) >= 10_000:
                        store.want(batch)
                        batch = []
                store.want(batch)
            store.db.commit()
        videos = _Videos(root, videos_dir)
        several = len({subset for subset, _ in clip_files}) > 1
        seen: dict[str, str] = {}  # clip key -> subset, for the current part (files come part by part)
        seen_part = None
        for subset, path in clip_files:
            for item in _stream_clips(root, path):
                if isinstance(item, Reject):
                    yield item
                    continue
                part, key, raw = item
                if several:  # a clip published in two subsets is one input, read from the first
                    if part != seen_part:
                        seen, seen_part = {}, part
                    first = seen.setdefault(key, subset)
                    if first != subset:
                        yield _reject(f"{part}/{key}@{subset}", f"clip {part}/{key} is also in subset {first}, "
                                      f"read from there; this copy in {subset} is skipped")
                        continue
                clip = _parse_clip(videos, part, key, raw, opts["caption_keys"])
                if isinstance(clip, Reject):
                    if do_intra:
                        yield clip
                    continue
                if store is not None and store.wanted(clip):
                    store.put(clip)
                if do_intra:
                    yield from _intra(clip, opts)
        if store is not None:
            store.db.commit()
            yield from _cross(root, pair_files, store, opts)
    finally:
        if store is not None:
            store.close()
