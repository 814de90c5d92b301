"""Reference and mask geometry shared by curation (``pipeline.stages``), training (``dynaip.train``)
and inference (``dynaip.inference``, ``dynaip.adapter``): one copy, so a reference is framed the
same way when a shard is written, when it is trained on and when a user passes one in.

Conventions: images ``(H, W, 3) uint8`` RGB or RGB PIL; masks ``(H, W) bool`` in the pixels of
their image; boxes XYXY pixels (x1/y1 exclusive).

Depends on numpy, PIL, scipy and torch only — never on another ``dynaip`` or ``pipeline`` module
(``tests/test_layering.py`` checks). scipy and torch are imported inside the functions that need
them so that curation workers importing this module do not pay for torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

Box = tuple[float, float, float, float]  # XYXY in the image's pixels

ISLAND_FRAC = 0.05
"""Default of ``clean_mask``'s ``island_frac`` (curation's ``segmentation.island_frac`` and auto-masks)."""
HOLE_FRAC = 0.05
"""Default of ``clean_mask``'s ``hole_frac`` (curation's ``segmentation.hole_frac`` and auto-masks)."""


# ----------------------------------------------------------------------------- boxes


def grow_box(box: Box, frac: float, height: int, width: int) -> tuple[int, int, int, int]:
    """Grows an XYXY box by ``frac`` × its longer side on every side, clipped to the image, as ints."""
    x0, y0, x1, y1 = box
    m = frac * max(x1 - x0, y1 - y0)
    return (
        max(0, math.floor(x0 - m)),
        max(0, math.floor(y0 - m)),
        min(width, math.ceil(x1 + m)),
        min(height, math.ceil(y1 + m)),
    )


def mask_box(mask: np.ndarray) -> Box | None:
    """Tight XYXY pixel box of a ``(H, W) bool`` mask (x1/y1 exclusive), None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def cut_to_box(mask: np.ndarray, box: Box, margin: float) -> np.ndarray:
    """``mask`` with everything outside ``box`` (XYXY) grown by ``margin`` × its longer side set False."""
    h, w = mask.shape
    x0, y0, x1, y1 = grow_box(box, margin, h, w)
    out = np.zeros_like(mask, dtype=bool)
    out[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return out


# ----------------------------------------------------------------------------- masks


def clean_mask(mask: np.ndarray, island_frac: float = ISLAND_FRAC, hole_frac: float = HOLE_FRAC) -> np.ndarray:
    """Removes foreground parts smaller than ``island_frac`` × mask area (the largest part always
    stays) and fills background holes (regions not touching the border) smaller than
    ``hole_frac`` × mask area. ``(H, W) bool`` → ``(H, W) bool``."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    area = int(mask.sum())
    if area == 0:
        return mask.copy()
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        keep = sizes >= island_frac * area
        keep[int(sizes.argmax())] = True
        keep[0] = False
        mask = keep[labels]
    holes, m = ndimage.label(~mask)
    if m > 0:
        sizes = np.bincount(holes.ravel())
        border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        fill = sizes < hole_frac * area
        fill[0] = False
        fill[border] = False
        mask = mask | fill[holes]
    return mask


def resample_mask(mask: "torch.Tensor", grid: tuple[int, int]) -> "torch.Tensor":
    """Pixel mask ``(H, W)`` or ``(B, H, W)`` (bool, or float in [0, 1], or uint8 0/255) → ``(B, h*w)`` bool.

    Area-resize to the packed latent token grid ``(h, w)`` then threshold at 0.5; flattened
    row-major, which is the order of FLUX's packed image tokens.
    """
    import torch
    import torch.nn.functional as F

    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"mask shape {tuple(mask.shape)}: expected (H, W) or (B, H, W) in pixel space")
    m = mask.float()
    if mask.dtype == torch.uint8 and m.max() > 1:
        m = m / 255.0
    m = F.interpolate(m[:, None], size=grid, mode="area")  # (B, 1, h, w)
    return (m[:, 0] >= 0.5).flatten(1)  # (B, h*w)


# ----------------------------------------------------------------------------- references on white


def on_white(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Subject pixels kept, everything else pure white: ``(H, W, 3) uint8``."""
    return np.where(mask[..., None], image, np.uint8(255)).astype(np.uint8)


def pad_to_square_white(img: Image.Image) -> Image.Image:
    """Centres an RGB image on a white square. References are padded, never cropped: curation cut
    the subject onto white, so white padding adds nothing the encoder has not seen."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas
