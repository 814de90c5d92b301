"""Stage 5c — subject consistency of diptych pairs: the cosine between the OpenCLIP image embeddings
(models.yaml ``clip_vision``) of the two composed cut-outs (subject on white, padded to a white square),
one score per input, recorded in both samples' json as ``diptych.consistency``. Below
``consistency.min_score`` the input is rejected (stage 'consistency') with the score in the reason.
Records that are not diptychs pass untouched and never load the model (docs/sources.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.recipe import Recipe
from pipeline.sample import Item
from pipeline.stages.common import LazyModel, SetupError, resolve_device


def square_on_white(image: np.ndarray) -> np.ndarray:
    """``(h, w, 3) uint8`` → the same pixels centred on a white square (nothing of the subject is cropped
    by CLIP's centre crop); ``dynaip.geometry.pad_to_square_white`` on arrays."""
    from PIL import Image

    from dynaip.geometry import pad_to_square_white

    return np.asarray(pad_to_square_white(Image.fromarray(image)), dtype=np.uint8)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two embedding vectors (0 when either is zero)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


class ConsistencyStage(LazyModel):
    """``__call__(items) -> items``: sets ``item.consistency`` (and its twin's) for live diptych items."""

    name = "consistency"
    _model_attrs = ("_embedder",)

    def __init__(self, recipe: Recipe, models: Any = None, embedder: Any = None):
        self.recipe = recipe
        self.clip = getattr(models, "clip_vision", None)
        self._embedder = embedder

    @property
    def embedder(self):
        """``dynaip.models.clip_vision.ClipImageEmbedder`` from models.yaml ``clip_vision``, on first use."""
        if self._embedder is None:
            if self.clip is None:
                raise SetupError("diptych consistency needs models.yaml 'clip_vision'; pass --models M.yaml")
            from dynaip.models.clip_vision import ClipImageEmbedder

            try:
                self._embedder = ClipImageEmbedder(self.clip, device=resolve_device(self.recipe.executor.device))
            except Exception as e:
                raise SetupError(f"cannot load the OpenCLIP image tower for consistency: {e}") from e
        return self._embedder

    def __call__(self, items: list[Item]) -> list[Item]:
        live = [it for it in items if it.ok and it.twin is not None]
        if not live:
            return items
        images = [square_on_white(d.ref_image) for it in live for d in (it, it.twin)]
        emb = self.embedder.embeddings(images).cpu().numpy().astype(np.float64)
        limit = self.recipe.consistency.min_score
        for i, item in enumerate(live):
            score = round(cosine(emb[2 * i], emb[2 * i + 1]), 4)
            item.consistency = item.twin.consistency = score
            if limit is not None and score < limit:
                item.fail(
                    self.name,
                    f"subjects differ: consistency {score:.4f} (OpenCLIP cosine of the two "
                    f"cut-outs) < consistency.min_score={limit:g}",
                )
        return items
