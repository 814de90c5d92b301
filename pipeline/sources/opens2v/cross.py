"""Cross records: pair-file records resolved to their two clips and objects (by class id, or for older
pairs by upstream's pair order) and turned into target / reference records, both directions unless
``cross_both_directions`` is off.

Part of the OpenS2V-5M reader (``pipeline.sources.opens2v``; docs/sources.md, "OpenS2V-5M")."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.records import Box, Reject, SourceRecord
from pipeline.sources.common import RLEError, rle_bbox
from pipeline.sources.opens2v.annotations import _stream_pairs
from pipeline.sources.opens2v.clip_store import _Store
from pipeline.sources.opens2v.clips import SOURCE, _Clip, _int_key, _num, _reject, _tag
from pipeline.sources.opens2v.masks import (
    _base_extra,
    _checked_mask,
    _clip_aesthetic_fails,
    _mask_frac,
    _subject_fails,
)


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
        return (
            f"class id mismatch: {side}_class_id {oid} is {clip.classes[oid]!r} in {clip.id}, "
            f"but the pair says {side}_class_name {name!r}"
        )
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
            out.append(
                f"class names {w[0]!r} / {w[1]!r} do not fit the objects of {cur.id} / {aft.id} in "
                "upstream's pair order (older pair format, no class ids)"
            )
        elif lo[k] != hi[k]:
            cands = sorted({order[i] for i in range(lo[k], hi[k] + 1) if names[i] == w})
            out.append(
                f"ambiguous: class names {w[0]!r} / {w[1]!r} fit object pairs {cands} of {cur.id} / "
                f"{aft.id} (older pair format, no class ids)"
            )
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
        out.append(
            _Pair(
                cluster=cluster,
                rec=rec,
                where=f"{rel} record {n}",
                clips={"cur": cur, "aft": aft},
                oids=oids,
                frames=frames,
                how=how,
            )
        )
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
        return _reject(
            rid, f"reference mask covers {_mask_frac(r_rle, r_area):.4f} of the frame < min_mask_frac {min_frac:.4f}"
        )
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
            return _reject(
                rid, f"target mask covers {_mask_frac(t_rle, t_area):.4f} of the frame < min_mask_frac {min_frac:.4f}"
            )
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
