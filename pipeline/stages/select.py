"""Stage 4 — choose the primary subject and filter, each rejection with a reason.

``rank_candidates`` orders candidates best first (score, then box area). ``select_primary``
applies the box-level filters (no subject, several comparable subjects, box too small/large);
``check_mask`` applies the mask-level ones (empty, fragmented, too small) after segmentation.
All take XYXY pixel boxes and ``(H, W) bool`` masks.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.recipe import FilterConfig, Recipe
from pipeline.sample import Candidate, Item
from pipeline.stages.common import box_area, iou


def rank_candidates(cands: list[Candidate]) -> list[Candidate]:
    """Best first: higher score, then larger box; stable for equal keys."""
    return sorted(cands, key=lambda c: (-c.score, -box_area(c.box)))


def comparable_subjects(ranked: list[Candidate], f: FilterConfig) -> int:
    """How many distinct subjects (greedy, IoU <= ``same_subject_iou`` with every kept one) score at
    least ``comparable_score_ratio`` × the best score; the primary counts as one."""
    if not ranked:
        return 0
    floor = ranked[0].score * f.comparable_score_ratio
    kept = [ranked[0]]
    for c in ranked[1:]:
        if c.score >= floor and all(iou(c.box, k.box) <= f.same_subject_iou for k in kept):
            kept.append(c)
    return len(kept)


def select_primary(
    cands: list[Candidate], height: int, width: int, f: FilterConfig, check_area: bool = True
) -> tuple[Candidate | None, str | None]:
    """``(primary, None)`` when it passes, else ``(None, reason)``."""
    ranked = rank_candidates(cands)
    if not ranked:
        return None, "no subject detected"
    n = comparable_subjects(ranked, f)
    if n > f.max_comparable_subjects:
        return None, (
            f"several comparable subjects: {n} distinct boxes score >= "
            f"{f.comparable_score_ratio:g} x best (max {f.max_comparable_subjects})"
        )
    primary = ranked[0]
    if check_area:
        frac = box_area(primary.box) / float(height * width)
        if frac < f.min_box_area:
            return None, f"subject box too small: {frac:.3f} of the image < filters.min_box_area={f.min_box_area:g}"
        if frac > f.max_box_area:
            return None, f"subject box too large: {frac:.3f} of the image > filters.max_box_area={f.max_box_area:g}"
    return primary, None


def check_mask(mask: np.ndarray, f: FilterConfig, check_area: bool = True) -> str | None:
    """None when the cleaned ``(H, W) bool`` mask passes, else the reason."""
    area = int(mask.sum())
    if area == 0:
        return "empty subject mask"
    labels, n = ndimage.label(mask)
    if n > f.max_mask_components:
        return f"fragmented mask: {n} parts > filters.max_mask_components={f.max_mask_components}"
    largest = int(np.bincount(labels.ravel())[1:].max())
    if largest / area < f.min_largest_component:
        return (
            f"fragmented mask: largest part holds {largest / area:.2f} of the mask "
            f"< filters.min_largest_component={f.min_largest_component:g}"
        )
    if check_area:
        frac = area / float(mask.size)
        if frac < f.min_mask_area:
            return f"subject mask too small: {frac:.4f} of the image < filters.min_mask_area={f.min_mask_area:g}"
    return None


def view_name(item: Item, view: object) -> str:
    """Reject-reason prefix naming the view: '' (target), 'reference: ', or a diptych's panel."""
    if item.record.diptych is not None:
        return "left panel: " if view is item.target else "right panel: "
    return "" if view is item.target else "reference: "


class SelectStage:
    """Picks each view's primary subject. The target gets every filter; a cross-pair reference with a
    source-given mask or box is trusted (no area/comparable checks). Rejects use stage 'filter'."""

    name = "filter"

    def __init__(self, recipe: Recipe, models: object = None):
        self.recipe = recipe

    def __call__(self, items: list[Item]) -> list[Item]:
        f = self.recipe.filters
        for item in items:
            if not item.ok:
                continue
            for view in item.views():
                trusted = view is item.reference and (
                    view.given_mask is not None or item.record.reference_box is not None
                )
                if trusted:
                    view.primary = rank_candidates(view.candidates)[0] if view.candidates else None
                    reason = None if view.primary else "reference has no subject"
                else:
                    h, w = view.shape
                    both = item.record.diptych is not None  # each panel is the target of one of its samples
                    view.primary, reason = select_primary(
                        view.candidates, h, w, f, check_area=both or view is item.target
                    )
                    if reason:
                        reason = f"{view_name(item, view)}{reason}"
                if reason:
                    item.fail(self.name, reason)
                    break
        return items
