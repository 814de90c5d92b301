"""Intra records: one subject in one annotated frame of a clip, after the per-subject filters,
``dedup_iou`` and ``max_masks`` (every object ends as a record or a reject).

Part of the OpenS2V-5M reader (``pipeline.sources.opens2v``; docs/sources.md, "OpenS2V-5M")."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from pipeline.records import Reject, SourceRecord
from pipeline.sources.common import RLEError, as_xyxy, rle_bbox
from pipeline.sources.opens2v.clips import SOURCE, _Clip, _num, _reject
from pipeline.sources.opens2v.masks import (
    _base_extra,
    _checked_mask,
    _clip_aesthetic_fails,
    _mask_frac,
    _subject_fails,
)


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
                why = (
                    f"duplicate of object {dup[0]} (mask IoU {dup[1]:.3f} > dedup_iou {opts['dedup_iou']}; "
                    "the larger mask is kept)"
                )
                out[oid] = _reject(f"{clip.id}/o{oid}", why)
        kept = survivors
    k = opts["max_masks"]
    if k is not None and len(kept) > k:
        ranked = sorted(
            kept, key=lambda t: (-(clip.aes(t[2]) if clip.aes(t[2]) is not None else -math.inf), -t[0], t[2])
        )
        for rank, (_, _, oid, _) in enumerate(ranked, start=1):
            if rank > k:
                aes = clip.aes(oid)
                out[oid] = _reject(
                    f"{clip.id}/o{oid}",
                    f"not among the clip's top max_masks={k} subjects by "
                    f"aes_score (its aes_score {aes if aes is None else round(aes, 3)} ranks {rank} "
                    f"of {len(ranked)})",
                )
    yield from (out[o] for o in oids)
