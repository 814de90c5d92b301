"""Stage 5 — the subject reference: subject pixels on pure white (255), cropped to the mask's box
plus a margin; for people in face mode, cropped to the (grown) face box instead.

Images ``(H, W, 3) uint8`` RGB, masks ``(H, W) bool``, boxes XYXY pixels.
"""

from __future__ import annotations

import numpy as np

from dynaip.geometry import grow_box, mask_box, on_white
from pipeline.recipe import Recipe
from pipeline.records import Box
from pipeline.sample import Item


def compose_reference(
    image: np.ndarray, mask: np.ndarray, margin: float, crop_box: Box | None = None
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``(ref (h, w, 3) uint8, crop XYXY ints)``: the subject on white, cropped to ``crop_box`` (or the
    mask's box) grown by ``margin`` × its longer side. Raises ValueError when nothing of the subject
    lies in the crop."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    h, w = mask.shape
    box = crop_box if crop_box is not None else mask_box(mask)
    if box is None:
        raise ValueError("the subject mask is empty")
    x0, y0, x1, y1 = grow_box(box, margin, h, w)
    if x1 <= x0 or y1 <= y0 or not mask[y0:y1, x0:x1].any():
        raise ValueError(f"the crop {(x0, y0, x1, y1)} holds none of the subject")
    return on_white(image[y0:y1, x0:x1], mask[y0:y1, x0:x1]), (x0, y0, x1, y1)


class ComposeStage:
    """``__call__(items) -> items``: sets ``item.ref_image`` / ``item.ref_box``. Face mode crops
    to the face box grown by ``human.face_margin``; when that crop misses the mask, the whole body
    is used (``face_fallback``)."""

    name = "compose"

    def __init__(self, recipe: Recipe, models: object = None):
        self.recipe = recipe

    def __call__(self, items: list[Item]) -> list[Item]:
        for item in items:
            if not item.ok:
                continue
            if item.record.diptych is not None:
                self._diptych(item)
                continue
            view = item.ref_view
            try:
                if item.crop_mode == "face" and view.face_box is not None:
                    try:
                        item.ref_image, item.ref_box = compose_reference(
                            view.image, view.mask, self.recipe.human.face_margin, view.face_box
                        )
                        self._check_size(item)
                        continue
                    except ValueError:
                        item.crop_mode, item.face_fallback = "body", True
                elif item.crop_mode == "face":
                    item.crop_mode, item.face_fallback = "body", True
                item.ref_image, item.ref_box = compose_reference(view.image, view.mask, self.recipe.reference.margin)
                self._check_size(item)
            except Exception as e:
                item.fail(self.name, f"cannot compose the reference: {e}")
        return items

    def _diptych(self, item: Item) -> None:
        """Both directions of a diptych: this item (left panel target, reference cut from the right)
        and its twin (right panel target, reference cut from the left); whole-subject crops."""
        item.twin = Item(record=item.record, index=item.index, target=item.reference, reference=item.target, panel=1)
        for direction in item.directions():
            source = "right" if direction.panel == 0 else "left"  # the panel the reference is cut from
            try:
                direction.ref_image, direction.ref_box = compose_reference(
                    direction.ref_view.image, direction.ref_view.mask, self.recipe.reference.margin
                )
                h, w = direction.ref_image.shape[:2]
                limit = self.recipe.filters.min_reference_side
                if min(h, w) < limit:
                    item.fail(
                        self.name,
                        f"{source} panel: reference too small: {w}x{h}, shorter side below "
                        f"filters.min_reference_side={limit}",
                    )
            except Exception as e:
                item.fail(self.name, f"{source} panel: cannot compose the reference: {e}")
            if not item.ok:
                return

    def _check_size(self, item: Item) -> None:
        """``filters.min_reference_side``: a reference too small to teach the image encoder anything."""
        h, w = item.ref_image.shape[:2]
        limit = self.recipe.filters.min_reference_side
        if min(h, w) < limit:
            item.fail(self.name, f"reference too small: {w}x{h}, shorter side below filters.min_reference_side={limit}")
            item.ref_image = None
