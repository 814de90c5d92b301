"""One OpenS2V clip as the reader keeps it (``_Clip``: its video, crop, caption, classes, annotations
and raw RLE masks per frame) and ``_parse_clip``, which checks one raw clip object of an annotation
file into a ``_Clip`` or one reject naming what is wrong; the small value helpers all modules share.

Part of the OpenS2V-5M reader (``pipeline.sources.opens2v``; docs/sources.md, "OpenS2V-5M")."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.records import Box, ImageRef, Reject
from pipeline.sources.common import as_xyxy
from pipeline.sources.opens2v.videos import _Videos

SOURCE = "opens2v"


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
