"""OpenS2V-5M reader: intra records (one subject in one annotated video frame) and cross-video pairs.

Layout at ``root`` (paths are options, defaults shown):

- ``Jsons/*.json`` (``clips``): per-part clip JSON ``{clip_key: clip}``; the part name is the file stem.
  A file whose top level is itself a clip (has ``metadata``) is one clip, ``part/clip_key`` = its parent
  folder / its stem (the per-clip layout of OpenS2V's processing scripts).
- ``Videos/`` (``videos``): the extracted video tars; a clip's video is the first that exists of
  ``Videos/<part>/<metadata.path>``, ``Videos/<metadata.path>``, ``<root>/<metadata.path>``.
- cross pairs (``cross_pairs``, a glob under ``root``; default none): JSON lists of pair records
  ``{cur_id, aft_id, cur_class_id, aft_class_id, cur_class_name, aft_class_name, text_similarity,
  image_similarity, cur_frame_idx, aft_frame_idx}``, one file per cluster (cluster = file stem); also
  accepted: ``{cluster: [records]}`` or JSON Lines. ``cur_id``/``aft_id`` are ``<part>/<clip_key>``.

A clip: ``metadata`` (``crop`` ``[x0, x1, y0, y1]`` — note the order — in source-video pixels, ``fps``,
``num_frames``, ``resolution``, ``path``, ``aesthetic``, caption ``cap`` (or ``face_cap_qwen``)) and
``annotation``: ``ann_frame_data`` (``ann_frame_idx``, ``annotations[]`` with ``class_name``, ``bbox``
XYXY, scores; ``img_width``/``img_height`` of the cropped frame), ``mask_map`` ``{"1": {class_name}}`` and
``mask_annotation`` ``{frame_idx: {obj_id: {size, counts, score}}}`` — COCO RLE (``size`` = [H, W]) in the
*cropped* frame. Object ids are 1-based: object ``i`` is ``annotations[i - 1]``.

Frames: ``image`` is ``ImageRef(path=<video>, frame=<index>)`` and every box/mask of the record is in
pixels of the **cropped** frame. The decode stage must call
``pipeline.sources.video.read_frame(path, frame, crop=extra["crop_xyxy"])`` (``crop_xyxy`` is the clip's
crop converted to XYXY, or None for no crop); cross records carry ``extra["reference_crop_xyxy"]`` for
``reference`` too.

Intra record (``id`` = ``<part>/<clip_key>/o<obj>``): ``phrase`` = the object's ``class_name``, ``caption``
= the clip caption, ``masks`` = [its RLE at ``ann_frame_idx``], ``boxes`` = [its ``bbox``] (else the mask's
bounds), ``group`` = ``<part>/<clip_key>/o<obj>``.
Cross record (``id`` = ``<cur clip>/o<obj>/f<frame>><aft clip>/o<obj>/f<frame>``): target = the ``cur``
clip's frame with its mask/box when annotated at that frame, ``reference`` = the ``aft`` clip's frame,
``reference_mask`` = its RLE dict, ``reference_box`` = the mask's bounds, ``phrase`` = ``cur_class_name``,
``group`` = the cluster. With ``cross_both_directions`` (default) each pair also yields the reversed record.
``extra`` (both kinds): ``clip_id``, ``object_id``, ``frame_size`` [H, W], ``crop_xyxy``, ``fps``,
``num_frames``, ``aesthetic``, ``mask_score``, ``mask_frac``; intra adds ``det_scores`` (the annotation's
non-bbox numeric fields); cross adds ``reference_clip_id``, ``reference_object_id``,
``reference_crop_xyxy``, ``reference_frame_size``, ``reference_class_name``, ``reference_mask_score``,
``text_similarity``, ``image_similarity``, ``cluster``. A cross target frame the clip does not annotate
gets no mask/box (``masks``/``boxes`` empty, ``mask_frac`` None): the stages detect ``phrase`` there.

OpenS2V's own quality filters (options; an absent key gives the default shown, an explicit null disables
the filter): ``min_aesthetic`` 4.5 (a clip without a score
passes), ``min_mask_frac`` 1/32 of the frame, ``dedup_iou`` 0.8 (of two masks of one frame overlapping
more, the lower-scoring one goes), ``max_masks`` 6 per clip (a clip with more surviving masks is dropped
whole: crowded scenes make ambiguous subjects); cross pairs also take ``min_text_similarity`` /
``min_image_similarity``. Options ``intra`` / ``cross`` (default true) switch the record kinds.

Malformed inputs never raise; each yields ``Reject(source="opens2v", id, stage="read", reason)``: an
unreadable JSON file (id = its path under ``root``), a clip without metadata/annotation, with a bad crop
or a missing video (id = clip id), failing the aesthetic or max-masks filter (id = clip id), an object
without a mask at the annotated frame, with a bad RLE, too small or a duplicate (id = record id), and a
pair record naming an unknown clip/object/frame or failing a filter (id = cross record id).
Pair records repeated verbatim are yielded once.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.records import Box, ImageRef, Reject, SourceRecord
from pipeline.sources.common import RLEError, as_xyxy, check_rle, lookup, option, rle_bbox

SOURCE = "opens2v"


@dataclass(kw_only=True)
class OpenS2VSource:
    """Reader options for OpenS2V-5M (same keys as the recipe's ``source:`` section)."""

    root: str
    """Dataset folder."""
    clips: str = "Jsons/*.json"
    """Glob (under root) of the per-part clip JSON files."""
    videos: str = "Videos"
    """Folder (under root) of the extracted videos."""
    cross_pairs: str | None = None
    """Glob (under root) of the cross-video pair files; None = no cross records."""
    intra: bool = True
    """Yield intra records (subject and target from the same frame)."""
    cross: bool = True
    """Yield cross records (needs cross_pairs)."""
    cross_both_directions: bool = True
    """Also yield each pair reversed (aft as target, cur as reference)."""
    min_aesthetic: float | None = 4.5
    """Clip aesthetic score at least this."""
    min_mask_frac: float | None = 1 / 32
    """Mask area at least this fraction of the (cropped) frame."""
    dedup_iou: float | None = 0.8
    """Masks of one frame overlapping more than this are duplicates."""
    max_masks: int | None = 6
    """Clips with more masks (after the filters above) are dropped."""
    min_text_similarity: float | None = None
    """Cross pairs: class-name similarity at least this."""
    min_image_similarity: float | None = None
    """Cross pairs: subject image similarity at least this."""


@dataclass(kw_only=True)
class _Clip:
    """What the reader keeps of one clip (boxes/masks in cropped-frame pixels)."""

    id: str
    video: str
    crop_xyxy: Box | None
    frame_hw: tuple[int, int] | None
    ann_frame: int | None
    aesthetic: float | None
    caption: str | None
    fps: Any = None
    num_frames: Any = None
    classes: dict[int, str] = field(default_factory=dict)
    annotations: dict[int, dict[str, Any]] = field(default_factory=dict)
    masks: dict[int, dict[int, Any]] = field(default_factory=dict)  # frame → object id → raw RLE


def _reject(rid: str, reason: str) -> Reject:
    return Reject(source=SOURCE, id=rid, stage="read", reason=reason)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int_key(value: Any) -> int | None:
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


def _caption(meta: dict[str, Any]) -> str | None:
    for key in ("cap", "face_cap_qwen", "caption"):
        value = meta.get(key)
        if isinstance(value, list):
            value = next((v for v in value if isinstance(v, str)), None)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _video_path(root: Path, videos: Path, part: str, rel: str) -> str | None:
    for candidate in (videos / part / rel, videos / rel, root / rel):
        if candidate.is_file():
            return str(candidate)
    return None


def _parse_clip(root: Path, videos: Path, part: str, key: str, item: Any) -> _Clip | Reject:
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
    if not isinstance(rel, str):
        return _reject(cid, "metadata.path is missing; cannot locate the clip's video")
    video = _video_path(root, videos, part, rel)
    if video is None:
        return _reject(cid, f"video {rel} not found under {videos / part}, {videos} or {root}")

    frame_data = ann.get("ann_frame_data") if isinstance(ann.get("ann_frame_data"), dict) else {}
    h, w = frame_data.get("img_height"), frame_data.get("img_width")
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        frame_hw: tuple[int, int] | None = (h, w)
    elif crop is not None:
        frame_hw = (int(round(crop[3] - crop[1])), int(round(crop[2] - crop[0])))
    else:
        frame_hw = None
    clip = _Clip(
        id=cid,
        video=video,
        crop_xyxy=crop,
        frame_hw=frame_hw,
        ann_frame=_int_key(frame_data.get("ann_frame_idx")),
        aesthetic=_num(meta.get("aesthetic")),
        caption=_caption(meta),
        fps=meta.get("fps"),
        num_frames=meta.get("num_frames"),
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


def _load_clips(root: Path, pattern: str, videos: Path) -> Iterator[_Clip | Reject]:
    """Parse every clip JSON matching ``pattern``, in sorted (part, clip key) order."""
    entries: list[tuple[str, str, Any]] = []
    rejects: list[Reject] = []
    for path in sorted(glob.glob(str(root / pattern), recursive=True)):
        rel = os.path.relpath(path, root)
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            rejects.append(_reject(rel, f"cannot parse {rel}: {e}"))
            continue
        p = Path(path)
        if isinstance(data, dict) and "metadata" in data:
            entries.append((p.parent.name, p.stem, data))
        elif isinstance(data, dict):
            entries.extend((p.stem, str(k), v) for k, v in data.items())
        else:
            rejects.append(_reject(rel, f"{rel} top level is {type(data).__name__}, expected {{clip_key: clip}}"))
    yield from rejects
    for part, key, item in sorted(entries, key=lambda e: (e[0], e[1])):
        yield _parse_clip(root, videos, part, key, item)


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


def _pass_aesthetic(clip: _Clip, min_aesthetic: float | None) -> bool:
    return min_aesthetic is None or clip.aesthetic is None or clip.aesthetic >= min_aesthetic


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
        "mask_score": score,
        "mask_frac": _mask_frac(rle, area) if rle is not None else None,
    }


def _intra(clip: _Clip, opts: dict[str, Any]) -> Iterator[SourceRecord | Reject]:
    if not _pass_aesthetic(clip, opts["min_aesthetic"]):
        yield _reject(clip.id, f"aesthetic {clip.aesthetic} < min_aesthetic {opts['min_aesthetic']}")
        return
    if clip.ann_frame is None:
        yield _reject(clip.id, "annotation.ann_frame_data.ann_frame_idx is missing")
        return
    frame = clip.ann_frame
    oids = sorted(set(clip.classes) | set(clip.masks.get(frame, {})))
    if not oids:
        yield _reject(clip.id, f"no annotated objects at frame {frame}")
        return
    out: dict[int, SourceRecord | Reject] = {}
    kept: list[tuple[float, int, dict[str, Any]]] = []  # (score, oid, rle) surviving so far
    import pycocotools.mask as mask_utils

    for oid in oids:
        rid = f"{clip.id}/o{oid}"
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
            image=ImageRef(path=clip.video, frame=frame),
            phrase=clip.classes.get(oid),
            caption=clip.caption,
            boxes=[box] if box is not None else [],
            masks=[rle],
            group=rid,
            extra=extra,
        )
        kept.append((score if score is not None else 0.0, oid, rle))

    if opts["dedup_iou"] is not None and len(kept) > 1:
        kept.sort(key=lambda t: (-t[0], t[1]))  # best score first; ties by object id
        survivors: list[tuple[float, int, dict[str, Any]]] = []
        for score, oid, rle in kept:
            enc = {"size": rle["size"], "counts": rle["counts"].encode()}
            dup = None
            for _, other, orle in survivors:
                other_enc = {"size": orle["size"], "counts": orle["counts"].encode()}
                iou = float(mask_utils.iou([enc], [other_enc], [0])[0][0])
                if iou > opts["dedup_iou"]:
                    dup = (other, iou)
                    break
            if dup is None:
                survivors.append((score, oid, rle))
            else:
                why = f"duplicate of object {dup[0]} (mask IoU {dup[1]:.3f} > dedup_iou {opts['dedup_iou']})"
                out[oid] = _reject(f"{clip.id}/o{oid}", why)
        kept = survivors
    if opts["max_masks"] is not None and len(kept) > opts["max_masks"]:
        yield _reject(clip.id, f"clip has {len(kept)} subject masks after filtering > max_masks {opts['max_masks']}")
        yield from (out[o] for o in oids if isinstance(out[o], Reject))
        return
    yield from (out[o] for o in oids)


def _pair_records(root: Path, pattern: str) -> Iterator[tuple[str, Any] | Reject]:
    """(cluster, pair record) from every cross-pair file, in file order."""
    for path in sorted(glob.glob(str(root / pattern), recursive=True)):
        rel = os.path.relpath(path, root)
        try:
            text = Path(path).read_text()
            try:
                data = json.loads(text)
            except ValueError:
                if not path.endswith(".jsonl"):
                    raise
                data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            yield _reject(rel, f"cannot parse cross-pair file {rel}: {e}")
            continue
        if isinstance(data, list):
            yield from ((Path(path).stem, r) for r in data)
        elif isinstance(data, dict):
            for cluster in sorted(data):
                if isinstance(data[cluster], list):
                    yield from ((str(cluster), r) for r in data[cluster])
                else:
                    yield _reject(f"{rel}/{cluster}", f"cluster {cluster!r} in {rel} is not a list of pair records")
        else:
            yield _reject(rel, f"{rel} top level is {type(data).__name__}, expected a list of pair records")


def _find_clip(clips: dict[str, _Clip], by_key: dict[str, list[str]], cid: Any) -> _Clip | None:
    if not isinstance(cid, str):
        return None
    if cid in clips:
        return clips[cid]
    matches = by_key.get(cid.rsplit("/", 1)[-1], [])
    return clips[matches[0]] if len(matches) == 1 else None


def _object_id(clip: _Clip, class_id: Any, class_name: Any) -> int | None:
    oid = _int_key(class_id)
    if oid is not None:
        return oid
    return next((o for o, n in sorted(clip.classes.items()) if n == class_name), None)


def _cross_one(
    cluster: str,
    rec: dict[str, Any],
    side: tuple[str, str],
    clips: dict[str, _Clip],
    by_key: dict[str, list[str]],
    opts: dict[str, Any],
) -> SourceRecord | Reject:
    """One cross record from a pair record, target side ``side[0]`` and reference side ``side[1]``."""
    t, r = side  # field prefixes of target and reference: ("cur", "aft") or ("aft", "cur")
    tgt, ref = _find_clip(clips, by_key, rec.get(f"{t}_id")), _find_clip(clips, by_key, rec.get(f"{r}_id"))
    t_oid = _object_id(tgt, rec.get(f"{t}_class_id"), rec.get(f"{t}_class_name")) if tgt else None
    r_oid = _object_id(ref, rec.get(f"{r}_class_id"), rec.get(f"{r}_class_name")) if ref else None
    t_frame, r_frame = (
        _int_key(rec[f"{p}_frame_idx"]) if rec.get(f"{p}_frame_idx") is not None else (c.ann_frame if c else None)
        for p, c in ((t, tgt), (r, ref))
    )
    rid = f"{rec.get(f'{t}_id')}/o{t_oid}/f{t_frame}>{rec.get(f'{r}_id')}/o{r_oid}/f{r_frame}"
    for name, clip in ((f"{t}_id", tgt), (f"{r}_id", ref)):
        if clip is None:
            return _reject(rid, f"pair names {name}={rec.get(name)!r}, which is not a readable clip")
    if t_oid is None or r_oid is None or t_frame is None or r_frame is None:
        return _reject(rid, "pair record lacks an object id/class name or frame index that resolves")
    if tgt.id == ref.id and t_oid == r_oid and t_frame == r_frame:
        return _reject(rid, "pair joins an object with itself in the same frame")
    for clip in (tgt, ref):
        if not _pass_aesthetic(clip, opts["min_aesthetic"]):
            return _reject(rid, f"clip {clip.id} aesthetic {clip.aesthetic} < min_aesthetic {opts['min_aesthetic']}")
    for key in ("text_similarity", "image_similarity"):
        low = opts[f"min_{key}"]
        value = _num(rec.get(key))
        if low is not None and (value is None or value < low):
            return _reject(rid, f"{key} {rec.get(key)!r} < min_{key} {low}")
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
        reference_class_name=rec.get(f"{r}_class_name") or ref.classes.get(r_oid),
        reference_mask_score=r_score,
        text_similarity=_num(rec.get("text_similarity")),
        image_similarity=_num(rec.get("image_similarity")),
        cluster=cluster,
    )
    return SourceRecord(
        source=SOURCE,
        id=rid,
        image=ImageRef(path=tgt.video, frame=t_frame),
        phrase=rec.get(f"{t}_class_name") or tgt.classes.get(t_oid),
        caption=tgt.caption,
        boxes=boxes,
        masks=masks,
        reference=ImageRef(path=ref.video, frame=r_frame),
        reference_mask=r_rle,
        reference_box=rle_bbox(r_rle),
        group=cluster,
        extra=extra,
    )


def _cross(root: Path, pattern: str, clips: dict[str, _Clip], opts: dict[str, Any]) -> Iterator[SourceRecord | Reject]:
    by_key: dict[str, list[str]] = {}
    for cid in clips:
        by_key.setdefault(cid.rsplit("/", 1)[-1], []).append(cid)
    sides = [("cur", "aft"), ("aft", "cur")] if opts["cross_both_directions"] else [("cur", "aft")]
    results: dict[str, SourceRecord | Reject] = {}
    for n, item in enumerate(_pair_records(root, pattern)):
        if isinstance(item, Reject):
            results.setdefault(item.id, item)
            continue
        cluster, rec = item
        if not isinstance(rec, dict):
            results.setdefault(f"{cluster}/pair{n}", _reject(f"{cluster}/pair{n}", "pair record is not an object"))
            continue
        for side in sides:
            out = _cross_one(cluster, rec, side, clips, by_key, opts)
            results.setdefault(out.id, out)  # verbatim repeats collapse to one
    for rid in sorted(results):
        yield results[rid]


def _filter_option(cfg: Any, key: str, default: Any) -> Any:
    """Like ``option`` but an explicit ``null`` is kept (it disables that filter); only absence gives the default."""
    present, value = lookup(cfg, key)
    return value if present else default


def read(cfg: Any) -> Iterator[SourceRecord | Reject]:
    """Yield OpenS2V intra records, then cross records (each kind in sorted id order), and rejects."""
    root = Path(option(cfg, "root"))
    if not root.is_dir():
        raise FileNotFoundError(f"opens2v root {root} is not a directory; point source.root at the OpenS2V folder")
    videos = root / option(cfg, "videos", "Videos")
    defaults = OpenS2VSource(root=str(root))
    opts = {
        key: _filter_option(cfg, key, getattr(defaults, key))
        for key in (
            "min_aesthetic",
            "min_mask_frac",
            "dedup_iou",
            "max_masks",
            "min_text_similarity",
            "min_image_similarity",
            "cross_both_directions",
        )
    }
    do_intra, do_cross = bool(option(cfg, "intra", True)), bool(option(cfg, "cross", True))
    pairs = option(cfg, "cross_pairs", None)
    clips: dict[str, _Clip] = {}
    for clip in _load_clips(root, option(cfg, "clips", "Jsons/*.json"), videos):
        if isinstance(clip, Reject):
            yield clip
            continue
        clips[clip.id] = clip
        if do_intra:
            yield from _intra(clip, opts)
    if do_cross and pairs:
        yield from _cross(root, pairs, clips, opts)
