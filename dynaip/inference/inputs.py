"""Validation and preprocessing of references and masks, done before any model runs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from dynaip.geometry import pad_to_square_white

ImageLike = Union[str, Path, Image.Image, np.ndarray]


def check_image_path(item: str | Path, what: str) -> Path:
    """``item`` as a Path naming an existing file; else a one-line ValueError saying what it is instead."""
    path = Path(item)
    if path.is_dir():
        raise ValueError(
            f"{what} '{path}' is a directory, not an image file; name one image file (repeat the option for several)"
        )
    if not path.is_file():
        raise ValueError(f"{what} '{path}' does not exist")
    return path


def load_image(item: ImageLike, what: str) -> Image.Image:
    """Any image-like → RGB PIL (EXIF orientation applied; alpha composited on white)."""
    if isinstance(item, Image.Image):
        img = item
    elif isinstance(item, np.ndarray):
        img = Image.fromarray(item)
    else:
        path = check_image_path(item, what)
        try:
            img = Image.open(path)
            img.load()
        except Exception as e:
            raise ValueError(f"{what} '{path}' is not a readable image ({type(e).__name__}: {e})") from e
        img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "P"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def reference_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """RGB PILs → ``(N, 3, size, size)`` float in [0, 1], padded square on white, bicubic resize."""
    out = []
    for img in images:
        sq = pad_to_square_white(img).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(sq, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255))
    return torch.stack(out)


def load_mask(item: ImageLike | torch.Tensor, height: int, width: int, index: int) -> torch.Tensor:
    """A subject mask at the output size: resized (bilinear) then thresholded at 50% → ``(H, W)`` float {0, 1}.

    Raises ValueError for an aspect ratio differing from the output's by more than 1% or an empty mask.
    """
    what = f"mask {index + 1}"
    if isinstance(item, torch.Tensor):
        arr = item.detach().float().cpu().numpy()
        if arr.max() > 1.0:
            arr = arr / 255.0
    else:
        if isinstance(item, (str, Path)):
            check_image_path(item, what)
            item = _open_mask(Path(item), what)
        arr = np.asarray(item.convert("L") if isinstance(item, Image.Image) else item, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr.mean(axis=-1)
        arr = arr / 255.0 if arr.max() > 1.0 else arr
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D mask, got shape {arr.shape}")
    mh, mw = arr.shape
    if abs(mw / mh - width / height) > 0.01 * (width / height):
        raise ValueError(
            f"{what} is {mw}x{mh} (aspect {mw / mh:.3f}) but the output is {width}x{height} "
            f"(aspect {width / height:.3f}); give a mask with the output's aspect ratio"
        )
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    t = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    m = (t >= 0.5).float()
    if m.sum() == 0:
        raise ValueError(f"{what} is empty (no pixel ≥ 50%); every subject needs a region to go to")
    return m


def _open_mask(path: Path, what: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except Exception as e:
        raise ValueError(f"{what} '{path}' is not a readable image ({type(e).__name__}: {e})") from e


def per_subject(value, n: int, name: str) -> list:
    """A global value or one per subject → a list of n values."""
    if (
        value is None
        or isinstance(value, (int, float))
        or (isinstance(value, (tuple, list)) and value and isinstance(value[0], (int, float)) and name == "granularity")
    ):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"got {len(value)} {name} values for {n} references; give one, or one per reference")
    return value
