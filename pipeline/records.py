"""The typed records that flow between curation stages.

A reader yields ``SourceRecord``s; stages turn them into ``Sample``s (accepted) or ``Reject``s.
Every input record ends as exactly one of: one or more samples, or one reject.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

Box = tuple[float, float, float, float]  # XYXY in the image's pixels

_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")
_ADDRESS = re.compile(r"<([A-Za-z_][\w.]*) object at 0x[0-9A-Fa-f]+>")
_BARE_ADDRESS = re.compile(r"\b0x[0-9a-f]{8,16}\b")


def clean_reason(reason: str) -> str:
    """A reject reason without process-specific details: object reprs such as
    ``<_io.BytesIO object at 0x7f…>`` (PIL puts the file object in its messages) become
    ``<_io.BytesIO>``, other heap addresses ``0x…``. Re-runs then write the same rejects.jsonl."""
    return _BARE_ADDRESS.sub("0x…", _ADDRESS.sub(r"<\1>", str(reason)))


def safe_key(text: str) -> str:
    """WebDataset keys allow only ``[A-Za-z0-9_-]`` (a dot would split the key)."""
    return _KEY_BAD.sub("_", text)


@dataclass(frozen=True, kw_only=True)
class ImageRef:
    """Where an image's bytes live. Exactly one way of reading applies:

    - ``path`` alone: a file on disk (or an fsspec URL);
    - ``path`` + ``member``: a member of a tar file (SA-1B tars);
    - ``path`` + ``frame``: frame index ``frame`` of a video file (OpenS2V);
    - ``path`` + ``member`` + ``frame``: a frame of the video stored as ``member`` of the tar at ``path``,
      which may be the first piece of a split tar ``X.tar.split.000`` (OpenS2V as published; see
      docs/sources.md);
    - ``path`` + ``column`` + ``row``: the image held in cell (``row``, ``column``) of the Parquet file at
      ``path`` (``row`` counts from the file's first row; the cell is raw bytes or a Hugging Face
      ``Image`` struct ``{bytes, path}``), as AnyInsertion and Subjects200K publish their images.
    """

    path: str
    member: str | None = None
    frame: int | None = None
    column: str | None = None
    row: int | None = None

    def __post_init__(self) -> None:
        if (self.column is None) != (self.row is None):
            raise ValueError("ImageRef: a Parquet cell needs both column and row")


@dataclass(frozen=True, kw_only=True)
class Diptych:
    """A record whose ``image`` holds the same subject twice, as two square panels side by side
    (Subjects200K-style releases and ``dynaip synth``; docs/sources.md "Diptych cross pairs").

    The image is ``2·H`` wide and ``H`` high; with ``padding`` p each panel is the square of side
    ``s = H - 2p`` at ``(p, p)`` (left) and ``(s + 2p, p)`` (right) — the crop OminiControl's
    Subjects200K loader makes. Both panels are detected and segmented; each one is the target of one
    cross sample whose reference is cut from the other panel (two samples per accepted input)."""

    padding: int = 0
    """Border pixels around each panel (8 in Subjects200K's 1056 × 528 images; 0 for our own)."""
    captions: tuple[str | None, str | None] = (None, None)
    """Per-panel descriptions (left, right): the provided caption of the sample whose target is that panel."""
    generate: dict[str, Any] | None = None
    """Set for diptychs that do not exist yet: the generation settings (prompt, seed, steps, guidance,
    width, height) the ``generate`` stage renders the image from; ``image`` is then only a name."""


@dataclass(kw_only=True)
class SourceRecord:
    """One input item from a source dataset, before any decoding."""

    source: str
    """Source kind: sa1b | ffhq | vitonhd | opens2v | anyinsertion | folder."""
    id: str
    """Unique id within the source (goes into the sample key after `safe_key`)."""
    image: ImageRef
    """The target image (the ground truth the model learns to generate)."""
    phrase: str | None = None
    """Detection phrase / category hint (e.g. 'person', 'dog'); the recipe's prompt is used when None."""
    caption: str | None = None
    """A caption shipped with the source, if any."""
    boxes: list[Box] = field(default_factory=list)
    """Boxes the source already provides (FFHQ face_rect, OpenS2V bboxes), XYXY pixels of `image`."""
    masks: list[dict[str, Any]] = field(default_factory=list)
    """Masks the source already provides, as COCO RLE dicts {size: [H, W], counts} in `image` pixels."""
    image_mask: ImageRef | None = None
    """The subject's mask in `image` as a mask image (white = subject), when the source ships one
    (AnyInsertion ``tar_mask``); it must have `image`'s size. Read by the decode stage, not the reader,
    so records stay small."""
    reference: ImageRef | None = None
    """Cross-pair: the image the subject reference is cut from (VITON-HD garment, OpenS2V other clip)."""
    reference_mask: ImageRef | dict[str, Any] | None = None
    """Cross-pair: subject mask of `reference` (a mask image such as VITON cloth-mask, or an RLE dict)."""
    reference_box: Box | None = None
    """Cross-pair: subject box in `reference` pixels, when the source gives one."""
    group: str | None = None
    """Subject identity shared by records that may be cross-paired (OpenS2V cluster)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Source-specific metadata kept in the sample json (e.g. aesthetic score, face landmarks)."""
    diptych: Diptych | None = None
    """Set when ``image`` is two panels of one subject side by side (see ``Diptych``): a cross pair
    in both directions."""

    @property
    def pair(self) -> Literal["intra", "cross"]:
        return "cross" if self.reference is not None or self.diptych is not None else "intra"


@dataclass(kw_only=True)
class Reject:
    """An input that did not become a sample, and why."""

    source: str
    id: str
    stage: str
    reason: str

    def __post_init__(self) -> None:
        self.reason = clean_reason(self.reason)

    def to_json(self) -> dict[str, str]:
        return {"source": self.source, "id": self.id, "stage": self.stage, "reason": self.reason}
