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

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.records import Reject, SourceRecord
from pipeline.sources.common import (
    SourceError,
    SourceLicense,
    glob_files,
    option,
    read_options,
    require_dir,
)
from pipeline.sources.opens2v.annotations import (
    ZIP_SUFFIX,
    _part_name,
    _stream_clips,
    _stream_pairs,
)
from pipeline.sources.opens2v.clip_store import _Store
from pipeline.sources.opens2v.clips import SOURCE, _parse_clip, _reject
from pipeline.sources.opens2v.cross import _cross
from pipeline.sources.opens2v.intra import _intra
from pipeline.sources.opens2v.videos import _Videos


LICENSE = SourceLicense(
    name="OpenS2V-5M",
    license="cc-by-4.0",
    hub_id="BestWishYsh/OpenS2V-5M",
    url="https://huggingface.co/datasets/BestWishYsh/OpenS2V-5M",
)
"""The terms of this source's data, repeated in the card of every dataset curated from it."""


@dataclass(frozen=True, kw_only=True)
class Options:
    """Reader options for OpenS2V-5M: the recipe's ``source:`` keys besides ``kind`` and ``root``."""

    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "min_aesthetic": "is gone: the threshold now applies per subject as upstream's pipeline scores it; use "
        "min_subject_aesthetic (annotations[i].aes_score) and/or min_clip_aesthetic (metadata.aesthetic)"
    }
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


FILTER_KEYS = (
    "exclude_background",
    "min_mask_frac",
    "min_subject_aesthetic",
    "dedup_iou",
    "max_masks",
    "min_clip_aesthetic",
    "min_text_similarity",
    "min_image_similarity",
    "cross_both_directions",
    "caption_keys",
)


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
    files = {
        p.name: p
        for p in folder.glob("total_part*")
        if p.is_file() and (p.name.endswith(".json") or p.name.endswith(ZIP_SUFFIX))
    }
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
            raise SourceError(
                f"opens2v: source.subset {given.subset!r} is not an annotation folder under {jsons} "
                f"(folders holding total_partN.json there: {', '.join(found) or 'none'})"
            )
        found = {given.subset: files}
    if not found:
        raise SourceError(
            f"opens2v: no annotation subset under {jsons}: no folder there holds total_partN.json "
            "(or .json.zip) files, as the release's Jsons/mask_and_bbox/ does; download one, or set "
            "source.clips to a glob of your annotation files"
        )
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
        raise SourceError(
            f"opens2v: videos folder {videos} does not exist; set source.videos (under root) to the "
            "folder holding Videos/total_partN/"
        )
    do_intra, do_cross = given.intra, given.cross
    pairs_glob = given.cross_pairs
    pair_files: list[Path] = []
    if do_cross and pairs_glob:
        _check_pairs_extracted(root, pairs_glob)
        pair_files = [
            p
            for p in glob_files(root, pairs_glob, "opens2v", "cross-pair files (source.cross_pairs)")
            if p.name != opts["cluster_index"]
        ]
        if not pair_files:
            raise SourceError(
                f"opens2v: source.cross_pairs {pairs_glob!r} under {root} matches only the cluster "
                f"index {opts['cluster_index']}, no pair files"
            )
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
        raise SourceError(
            f"opens2v: {folder} holds {tars[0].name} as published but no pair files matching "
            f"source.cross_pairs {pattern!r}; extract it there (tar -xf {tars[0].name}) or set "
            "source.cross: false"
        )


def _read(
    root: Path,
    clip_files: list[tuple[str, Path]],
    videos_dir: Path,
    pair_files: list[Path],
    opts: dict[str, Any],
    do_intra: bool,
    work_dir: str | None,
) -> Iterator[SourceRecord | Reject]:
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
                        yield _reject(
                            f"{part}/{key}@{subset}",
                            f"clip {part}/{key} is also in subset {first}, "
                            f"read from there; this copy in {subset} is skipped",
                        )
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
