"""The work item that flows through the curation stages, and the finished sample.

Formats: images are ``(H, W, 3) uint8`` RGB; masks ``(H, W) bool``; boxes XYXY float pixels of the
image they belong to. A stage fills fields of ``Item`` and may set ``reject``; later stages skip
rejected items, so each input ends as samples or exactly one reject.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.records import Box, ImageRef, Reject, SourceRecord, safe_key


@dataclass(frozen=True)
class Candidate:
    """A subject candidate in one image: XYXY pixel box, score in [0, 1], phrase, optional RLE mask."""

    box: Box
    score: float
    phrase: str
    rle: dict[str, Any] | None = None


@dataclass(kw_only=True)
class View:
    """One image of an item (the target, or a cross-pair's reference) and what stages found in it."""

    ref: ImageRef
    """Where the image bytes are."""
    crop: tuple[float, float, float, float] | None = None
    """XYXY crop applied after decoding (video frames)."""
    image: np.ndarray | None = None
    """Decoded ``(H, W, 3) uint8`` RGB."""
    candidates: list[Candidate] = field(default_factory=list)
    """Subject candidates (detections or provided boxes/masks), best first after selection."""
    searched: bool = False
    """True once candidates are final (provided, or detection ran)."""
    given_mask: np.ndarray | None = None
    """A mask the source gives for this whole view (VITON cloth-mask), ``(H, W) bool``."""
    primary: Candidate | None = None
    """The chosen subject."""
    mask: np.ndarray | None = None
    """Cleaned subject mask ``(H, W) bool``."""
    mask_score: float | None = None
    """SAM's predicted IoU of ``mask`` (None for masks the source gives)."""
    face_box: Box | None = None
    """Face box for face-crop references (XYXY pixels)."""

    @property
    def shape(self) -> tuple[int, int]:
        assert self.image is not None
        return self.image.shape[0], self.image.shape[1]


@dataclass(kw_only=True)
class Sample:
    """One accepted training pair (before encoding to shard bytes)."""

    key: str
    """WebDataset key ``{source}-{id}-{n}``, only ``[A-Za-z0-9_-]``."""
    ref: np.ndarray
    """Reference: subject on pure white, ``(h, w, 3) uint8``."""
    tgt: np.ndarray
    """Target image ``(H, W, 3) uint8``."""
    mask: np.ndarray
    """Subject mask in target pixels ``(H, W) bool``."""
    caption: str
    meta: dict[str, Any]
    """The sample's json (source, source_id, pair, phrase, box, det_score, mask_area, width, height, ...)."""


@dataclass(kw_only=True)
class Item:
    """One input record on its way through the stages."""

    record: SourceRecord
    index: int = 0
    """Position of the record in the reader's order (decides its chunk/shard)."""
    target: View | None = None
    reference: View | None = None
    crop_mode: str = "body"
    """body | face (people only; seeded per record)."""
    face_fallback: bool = False
    """Face mode was drawn but no face was found, so the whole body is used."""
    ref_image: np.ndarray | None = None
    """Composed reference ``(h, w, 3) uint8`` on white."""
    ref_box: Box | None = None
    """Where the reference was cut, XYXY pixels of the reference's source image."""
    caption: str | None = None
    caption_source: str | None = None
    caption_model: str | None = None
    """The captioning model's name when ``caption_source`` is model."""
    caption_prompt: str | None = None
    """What produced the caption: the model's text prompt ("" = unconditional) or the template."""
    quality: dict[str, Any] | None = None
    """Quality scores (``pipeline.stages.quality``), computed once; the sample json's ``quality``."""
    samples: list[Sample] = field(default_factory=list)
    reject: Reject | None = None
    pixels: np.ndarray | None = None
    """An image a stage made for this record (the ``generate`` stage's diptych), read by decode instead
    of ``record.image``."""
    panel: int | None = None
    """Diptych records: which panel the target is (0 = left, 1 = right)."""
    twin: "Item | None" = None
    """Diptych records: the same input in the other direction (target and reference panels swapped),
    made by the compose stage; its sample gets key ``n = 1``. Never rejected on its own: a reason
    found for it rejects this item."""
    consistency: float | None = None
    """Diptych records: cosine of the two cut-outs' OpenCLIP image embeddings (``consistency`` stage)."""

    @property
    def ref_view(self) -> View:
        """The view the reference is cut from: the reference for cross pairs, else the target."""
        view = self.reference if self.reference is not None else self.target
        assert view is not None
        return view

    def views(self) -> list[View]:
        return [v for v in (self.target, self.reference) if v is not None]

    def directions(self) -> list["Item"]:
        """This item and, for a composed diptych, its twin: every (reference → target) pair it yields."""
        return [self] if self.twin is None else [self, self.twin]

    @property
    def provided_caption(self) -> str | None:
        """The source's caption for this direction's target: the target panel's description for a diptych."""
        d = self.record.diptych
        if d is not None and self.panel is not None:
            return d.captions[self.panel]
        return self.record.caption

    def adopt_twin_reject(self) -> None:
        """A reason found for the twin rejects the input (one input → both samples or one reject)."""
        if self.twin is not None and self.twin.reject is not None and self.reject is None:
            self.fail(self.twin.reject.stage, self.twin.reject.reason)

    def fail(self, stage: str, reason: str) -> None:
        """Mark the item rejected (first reason wins)."""
        if self.reject is None:
            self.reject = Reject(source=self.record.source, id=self.record.id, stage=stage, reason=reason)
        self.samples = []
        self.twin = None

    @property
    def ok(self) -> bool:
        return self.reject is None

    def key(self, n: int = 0) -> str:
        """``{source}-{id}-{n}`` with only ``[A-Za-z0-9_-]``; when sanitising changed the id, a crc32
        of the original id is appended to it so distinct ids never share a key."""
        return sample_key(self.record.source, self.record.id, n)


def sample_key(source: str, id: str, n: int = 0) -> str:
    """The WebDataset key of sample ``n`` of input ``(source, id)`` (see ``Item.key``)."""
    sid = safe_key(id)
    if sid != id:
        sid = f"{sid}_{zlib.crc32(id.encode()):08x}"
    return f"{safe_key(source)}-{sid}-{n}"


def make_items(records: list[SourceRecord], start: int = 0) -> list[Item]:
    """Wrap reader records as items, ``index`` counting from ``start`` in reader order."""
    return [Item(record=r, index=start + i) for i, r in enumerate(records)]
