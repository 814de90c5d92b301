"""OpenS2V-5M reader: intra records (one subject in one annotated video frame) and cross-video pairs.

The published layout, the clip and pair formats and the filters are described in docs/sources.md
("OpenS2V-5M"); in short, at ``root``:

- ``Jsons/mask_and_bbox/total_partN.json`` (option ``clips``, a glob): ``{clip_key: clip}``, one file per
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

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.records import Reject, SourceRecord
from pipeline.sources.common import (
    SourceError,
    glob_files,
    option,
    read_options,
    require_dir,
)
from pipeline.sources.opens2v.annotations import _stream_clips, _stream_pairs
from pipeline.sources.opens2v.clip_store import _Store
from pipeline.sources.opens2v.clips import SOURCE, _parse_clip
from pipeline.sources.opens2v.cross import _cross
from pipeline.sources.opens2v.intra import _intra
from pipeline.sources.opens2v.videos import _Videos


@dataclass(frozen=True, kw_only=True)
class Options:
    """Reader options for OpenS2V-5M: the recipe's ``source:`` keys besides ``kind`` and ``root``."""

    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "min_aesthetic": "is gone: the threshold now applies per subject as upstream's pipeline scores it; use "
                         "min_subject_aesthetic (annotations[i].aes_score) and/or min_clip_aesthetic (metadata.aesthetic)"}
    clips: str = "Jsons/mask_and_bbox/total_part*.json"
    """Glob (under root) of the per-part annotation files."""
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


def read(cfg: Any) -> Iterator[SourceRecord | Reject]:
    """Check the layout now (SourceError naming what matched nothing); return the iterator of intra
    records (annotation-file order), then cross records (pair-file order), with their rejects."""
    given = read_options(cfg, Options, SOURCE)
    root = require_dir(option(cfg, "root", ""), "opens2v", "the OpenS2V-5M folder (holding Jsons/ and Videos/)")
    opts = _options(given)
    clips_glob = given.clips
    clip_files = glob_files(root, clips_glob, "opens2v", "annotation files (source.clips)")
    videos = root / given.videos
    if not videos.is_dir():
        raise SourceError(f"opens2v: videos folder {videos} does not exist; set source.videos (under root) to the "
                          "folder holding Videos/total_partN/")
    do_intra, do_cross = given.intra, given.cross
    pairs_glob = given.cross_pairs
    pair_files: list[Path] = []
    if do_cross and pairs_glob:
        pair_files = [p for p in glob_files(root, pairs_glob, "opens2v", "cross-pair files (source.cross_pairs)")
                      if p.name != opts["cluster_index"]]
        if not pair_files:
            raise SourceError(f"opens2v: source.cross_pairs {pairs_glob!r} under {root} matches only the cluster "
                              f"index {opts['cluster_index']}, no pair files")
    if not do_intra and not pair_files:
        raise ValueError("opens2v: intra is false and no cross_pairs are read; nothing would be produced")
    return _read(root, clip_files, videos, pair_files, opts, do_intra, given.work_dir)


def _read(root: Path, clip_files: list[Path], videos_dir: Path, pair_files: list[Path], opts: dict[str, Any],
          do_intra: bool, work_dir: str | None) -> Iterator[SourceRecord | Reject]:
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
        for path in clip_files:
            for item in _stream_clips(root, path):
                if isinstance(item, Reject):
                    yield item
                    continue
                part, key, raw = item
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
