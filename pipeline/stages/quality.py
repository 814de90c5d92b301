"""Stage 5b — quality scores and the quality filters, after the reference is composed and before the
(costlier) captioning. Each sample's json gets ``quality`` (computed once, here)::

    aesthetic       float | None  aesthetic head over the target's OpenCLIP image embedding (None
                                   without ``aesthetic`` in models.yaml)
    sharpness       float         variance of the Laplacian over the reference's subject, grayscale 0-255
    subject_pixels  int           subject mask pixels inside the reference crop
    det_score       float         the target subject's detection score (1.0 for source-given boxes)
    mask_score      float | None  lowest SAM predicted IoU among the sample's SAM masks (None: masks given)

``filters.min_*`` turn them into rejects (stage 'quality') whose reason carries the value.
The training-side filters read ``quality.aesthetic``, ``quality.sharpness`` and
``quality.subject_pixels`` by those names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.recipe import Recipe
from pipeline.sample import Item
from pipeline.stages.common import LazyModel, SetupError, resolve_device

# ITU-R 601 luma, the weights PIL's "L" mode and OpenCV's BGR2GRAY use
LUMA = np.array([0.299, 0.587, 0.114])


def grayscale(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3) uint8`` RGB → ``(H, W) float64`` luma in 0-255."""
    return image.astype(np.float64) @ LUMA


def laplacian_variance(image: np.ndarray, region: np.ndarray | None = None) -> float:
    """Variance of the 4-neighbour Laplacian of the grayscale ``image`` over ``region`` ((H, W) bool;
    None = everywhere). Borders mirror (OpenCV's default), so the frame edge adds no fake detail."""
    lap = ndimage.laplace(grayscale(image), mode="mirror")
    values = lap if region is None else lap[region]
    return float(values.var()) if values.size else 0.0


def reference_region(item: Item) -> tuple[np.ndarray, np.ndarray]:
    """The reference crop of its source image (original pixels, not the white composite: the cut
    edge against white would count as detail) and the subject mask inside it."""
    view = item.ref_view
    x0, y0, x1, y1 = (int(v) for v in item.ref_box)
    return view.image[y0:y1, x0:x1], view.mask[y0:y1, x0:x1]


def measure(item: Item) -> dict[str, Any]:
    """The model-free scores of one composed item."""
    crop, region = reference_region(item)
    sam = [v.mask_score for v in item.views() if v.mask_score is not None]
    return {
        "aesthetic": None,
        "sharpness": round(laplacian_variance(crop, region), 3),
        "subject_pixels": int(region.sum()),
        "det_score": round(float(item.target.primary.score), 4),
        "mask_score": round(min(sam), 4) if sam else None,
    }


def threshold_reason(q: dict[str, Any], f: Any) -> str | None:
    """The first quality filter ``q`` fails, with its value; None when it passes."""
    if f.min_subject_pixels is not None and q["subject_pixels"] < f.min_subject_pixels:
        return (
            f"subject too small: {q['subject_pixels']} subject pixels in the reference "
            f"< filters.min_subject_pixels={f.min_subject_pixels}"
        )
    if f.min_sharpness is not None and q["sharpness"] < f.min_sharpness:
        return (
            f"blurry reference: sharpness {q['sharpness']:g} (variance of the Laplacian) "
            f"< filters.min_sharpness={f.min_sharpness:g}"
        )
    if f.min_mask_score is not None and q["mask_score"] is not None and q["mask_score"] < f.min_mask_score:
        return f"uncertain mask: SAM score {q['mask_score']:g} < filters.min_mask_score={f.min_mask_score:g}"
    if f.min_aesthetic is not None and q["aesthetic"] is not None and q["aesthetic"] < f.min_aesthetic:
        return f"low aesthetic score: {q['aesthetic']:g} < filters.min_aesthetic={f.min_aesthetic:g}"
    return None


class QualityStage(LazyModel):
    """``__call__(items) -> items``: sets ``item.quality``; rejects with stage 'quality'."""

    name = "quality"
    _model_attrs = ("_scorer",)

    def __init__(self, recipe: Recipe, models: Any = None, scorer: Any = None):
        self.recipe = recipe
        self.paths = getattr(models, "aesthetic", None)
        self.clip = getattr(models, "clip_vision", None)
        self._scorer = scorer

    @property
    def scorer(self):
        """``AestheticScorer`` from ``models.aesthetic`` on first use; None when none is configured."""
        if self._scorer is None and self.paths is None and self.recipe.filters.min_aesthetic is not None:
            raise SetupError(
                "filters.min_aesthetic is set but models.yaml has no 'aesthetic' entry; add the "
                "head's path (docs/curation_quality.md) or drop the threshold"
            )
        if self._scorer is None and self.paths is not None:
            from dynaip.models.aesthetic import AestheticScorer

            try:
                self._scorer = AestheticScorer(
                    self.paths.path,
                    self.paths.clip or self.clip,
                    device=resolve_device(self.recipe.executor.device),
                    activation=self.paths.activation,
                )
            except Exception as e:
                raise SetupError(f"models.yaml {self._failed_key(e)}: {e}") from e
        return self._scorer

    def _failed_key(self, e: Exception) -> str:
        """The models.yaml key whose file failed: the head itself, its own CLIP, or ``clip_vision`` (which the
        head reads when it names no CLIP of its own) — so the message points at the entry to fix."""
        path = str(getattr(e, "path", ""))

        def same(p: Any) -> bool:
            return bool(path) and path == str(Path(p))

        if same(self.paths.path):
            return "key 'aesthetic.path'"
        if self.paths.clip is not None:
            return "key 'aesthetic.clip.path'" if same(self.paths.clip.path) else "entry 'aesthetic'"
        if self.clip is not None and same(self.clip.path):
            return "key 'clip_vision.path' (the aesthetic head reads it: 'aesthetic.clip' is not set)"
        return "entry 'aesthetic'"

    def __call__(self, items: list[Item]) -> list[Item]:
        f = self.recipe.filters
        live = []
        for item in items:
            if not item.ok:
                continue
            for d in item.directions():  # a diptych is measured in both directions
                try:
                    d.quality = measure(d)
                except Exception as e:
                    item.fail(self.name, f"{_which(d)}cannot measure quality: {type(e).__name__}: {e}")
                    break
                reason = threshold_reason(d.quality, f)  # the model-free filters first: no CLIP for rejects
                if reason:
                    item.fail(self.name, f"{_which(d)}{reason}")
                    break
            if item.ok:
                live.extend(item.directions())
        scorer = self.scorer  # loads once; a setup failure stops the job
        if scorer is not None and live:
            scores = scorer.scores([d.target.image for d in live])
            for d, score in zip(live, scores):
                d.quality["aesthetic"] = round(score, 4)
                reason = threshold_reason(d.quality, f)
                owner = next(it for it in items if d is it or d is it.twin)
                if reason and owner.ok:
                    owner.fail(self.name, f"{_which(d)}{reason}")
        return items


def _which(direction: Item) -> str:
    """Reject-reason prefix for a diptych direction: the panel that is its target."""
    if direction.panel is None:
        return ""
    return "left-panel target: " if direction.panel == 0 else "right-panel target: "
