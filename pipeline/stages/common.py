"""Small helpers shared by stages: seeded per-record randomness, box geometry, model loading."""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np

from dynaip.models.errors import SetupError  # noqa: F401  (defined beside CheckpointError; stages import it from here)
from pipeline.records import Box, SourceRecord


def record_rng(seed: int, record: SourceRecord, purpose: str) -> np.random.Generator:
    """A generator that depends only on (seed, source, id, purpose): independent of order and batching."""
    return np.random.default_rng([int(seed), zlib.crc32(f"{record.source}/{record.id}/{purpose}".encode())])


def box_area(box: Box) -> float:
    """Area of an XYXY box in square pixels."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two XYXY boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def is_human(phrase: str | None, human_phrases: Sequence[str]) -> bool:
    """True when any ' . '-separated part of ``phrase`` is one of ``human_phrases`` (case-insensitive)."""
    if not phrase:
        return False
    words = {w.strip().lower() for w in phrase.replace(".", " . ").split(".")}
    return bool(words & {h.lower() for h in human_phrases})


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class LazyModel:
    """Mixin: models load on first use and are dropped when the stage is pickled (Ray actors
    rebuild them in their own process)."""

    _model_attrs: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in self._model_attrs:
            state[name] = None
        return state
