"""RLE and subject checks of one clip object: its mask at a frame checked against the frame size
(``_checked_mask``), its area fraction, the clip and subject filters, and the ``extra`` every record
carries.

Part of the OpenS2V-5M reader (``pipeline.sources.opens2v``; docs/sources.md, "OpenS2V-5M")."""

from __future__ import annotations

from typing import Any

from pipeline.sources.common import check_rle
from pipeline.sources.opens2v.clips import _Clip, _num


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
        return (
            f"object {oid} class {clip.classes.get(oid)!r} is a word_tags.background tag of {clip.id} "
            "(background, not a subject)"
        )
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
