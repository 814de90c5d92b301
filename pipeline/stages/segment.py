"""Stage 3 — subject masks: SAM from the primary box (batched), or the source's RLE / mask image;
then clean-up (small islands removed, small holes filled) and the mask-level filters.

Masks are ``(H, W) bool`` in the pixels of the image they belong to; RLE is COCO ``{size: [H, W], counts}``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dynaip.geometry import clean_mask, cut_to_box, mask_box
from pipeline.recipe import Recipe
from pipeline.records import Box
from pipeline.sample import Item, View
from pipeline.stages.common import LazyModel, SetupError, resolve_device
from pipeline.stages.select import check_mask, view_name


class MaskError(ValueError):
    """A provided mask that cannot be used; the message is the reject reason."""


def decode_rle(rle: dict[str, Any], height: int, width: int) -> np.ndarray:
    """COCO RLE → ``(H, W) bool``; the RLE must describe an ``height`` × ``width`` image."""
    from pycocotools import mask as mask_utils

    from pipeline.sources.common import RLEError, check_rle

    try:
        norm, _ = check_rle(rle, height, width)
    except RLEError as e:
        raise MaskError(f"provided RLE mask is invalid: {e}") from None
    return mask_utils.decode({"size": norm["size"], "counts": norm["counts"].encode()}).astype(bool)


def rle_box(rle: dict[str, Any], height: int, width: int) -> Box | None:
    """Tight XYXY box of an RLE's foreground (None when empty)."""
    return mask_box(decode_rle(rle, height, width))


class SegmentStage(LazyModel):
    """``__call__(items) -> items``: fills ``view.mask`` for every view with a primary subject.
    SAM failures reject with stage 'segment'; mask filters reject with stage 'filter'."""

    name = "segment"
    _model_attrs = ("_segmenter",)

    def __init__(self, recipe: Recipe, models: Any, segmenter: Any = None):
        self.recipe = recipe
        self.models = models
        self._segmenter = segmenter

    @property
    def segmenter(self):
        """``SamBoxSegmenter`` built from ``models.sam`` on first use."""
        if self._segmenter is None:
            from dynaip.models.sam import SamBoxSegmenter, load_sam

            device = resolve_device(self.recipe.executor.device)
            if self.models is None:
                raise SetupError("segmentation is needed but no models config was given; pass --models M.yaml")
            try:
                self._segmenter = SamBoxSegmenter(
                    load_sam(self.models.require("sam"), device=device),
                    device=device,
                    precision=self.recipe.executor.precision,
                )
            except Exception as e:
                raise SetupError(f"cannot load SAM: {e}") from e
        return self._segmenter

    def _sam(self, jobs: list[tuple[Item, View]]) -> None:
        bs = self.recipe.executor.batch_size
        segmenter = self.segmenter  # loads once; a setup failure stops the job
        for i in range(0, len(jobs), bs):
            part = jobs[i : i + bs]
            try:
                outs = segmenter.segment([v.image for _, v in part], [np.array([v.primary.box]) for _, v in part])
            except Exception:
                outs = []
                for item, view in part:
                    try:
                        outs.append(segmenter.segment([view.image], [np.array([view.primary.box])])[0])
                    except Exception as e:
                        item.fail(self.name, f"SAM failed on this image ({type(e).__name__}: {e})")
                        outs.append(None)
            margin = self.recipe.segmentation.box_margin
            for (item, view), out in zip(part, outs):
                if out is not None and item.ok:
                    view.mask = out[0][0] if margin is None else cut_to_box(out[0][0], view.primary.box, margin)
                    view.mask_score = float(out[1][0])  # SAM's predicted IoU: recorded in the sample's quality

    def __call__(self, items: list[Item]) -> list[Item]:
        jobs: list[tuple[Item, View]] = []
        for item in items:
            if not item.ok:
                continue
            for view in item.views():
                try:
                    if view.given_mask is not None:
                        view.mask = view.given_mask
                    elif view.primary is not None and view.primary.rle is not None:
                        h, w = view.shape
                        view.mask = decode_rle(view.primary.rle, h, w)
                    else:
                        jobs.append((item, view))
                except MaskError as e:
                    item.fail(self.name, str(e))
        if jobs:
            self._sam(jobs)
        s, f = self.recipe.segmentation, self.recipe.filters
        for item in items:
            if not item.ok:
                continue
            for view in item.views():
                view.mask = clean_mask(view.mask, s.island_frac, s.hole_frac)
                reason = check_mask(view.mask, f, check_area=item.record.diptych is not None or view is item.target)
                if reason:
                    item.fail("filter", f"{view_name(item, view)}{reason}")
                    break
        return items
