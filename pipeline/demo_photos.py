"""Bundled sample inputs for the demo and tests: real photos from ``skimage.data`` written into a
folder, with a ``.txt`` caption beside some of them (the others get template captions).

``write_sample_photos(out)`` → list of written image paths. Same call → same bytes.

Subject views (``subject_views=True``, the default): ``motorcycle`` is written as a subfolder of two
views of one subject, ``motorcycle/left.png`` and ``motorcycle/right.png`` (the two cameras of
``skimage.data.stereo_motorcycle()``), each with a caption, so a ``folder`` recipe with
``cross_pairs: subfolders`` gets cross pairs from it. ``subject_views=False`` writes the single
``motorcycle.png`` (the left view) instead. Either way only when ``names`` is None or holds ``motorcycle``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# name → (skimage.data loader, caption or None, file format)
PHOTOS: dict[str, tuple[str, str | None, str]] = {
    "astronaut": ("astronaut", "an astronaut in a white spacesuit in front of an American flag", "jpg"),
    "chelsea": ("chelsea", "a ginger tabby cat looking to the side", "jpg"),
    "coffee": ("coffee", "a cup of coffee on a saucer with a spoon", "jpg"),
    "rocket": ("rocket", None, "jpg"),
    "motorcycle": ("stereo_motorcycle", "a red motorcycle in a workshop", "png"),
    "logo": ("logo", None, "png"),  # RGBA: transparency is flattened onto white
    "camera": ("camera", "a black and white photo of a man with a camera", "png"),
}
# name → the views written into the subfolder NAME/ when subject_views: (file stem, index into the
# loader's tuple, caption)
SUBJECT_VIEWS: dict[str, tuple[tuple[str, int, str], ...]] = {
    "motorcycle": (
        ("left", 0, "a red motorcycle in a workshop, seen from the left"),
        ("right", 1, "a red motorcycle in a workshop, seen from the right"),
    ),
}
N_FACES = 3
FACE_SIDE = 256


def _load(loader: str, index: int = 0) -> np.ndarray:
    from skimage import data

    img = getattr(data, loader)()
    if isinstance(img, tuple):  # stereo_motorcycle → (left, right, disparity)
        img = img[index]
    return np.asarray(img)


def _save(img: Image.Image, path: Path, fmt: str, caption: str | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jpg":
        img.convert("RGB").save(path, format="JPEG", quality=92)
    else:
        img.save(path, format="PNG")
    if caption:
        path.with_suffix(".txt").write_text(caption + "\n")
    return path


def write_sample_photos(
    out: str | Path, faces: int = N_FACES, names: list[str] | None = None, subject_views: bool = True
) -> list[Path]:
    """Writes the photos (``names`` of ``PHOTOS``, default all) + captions and ``faces`` upscaled
    lfw faces into ``out``; returns the image paths, sorted. With ``subject_views`` a name of
    ``SUBJECT_VIEWS`` is written as its subfolder of views (``motorcycle/left.png``, ``motorcycle/right.png``)
    instead of one file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (loader, caption, fmt) in PHOTOS.items():
        if names is not None and name not in names:
            continue
        if subject_views and name in SUBJECT_VIEWS:
            for stem, index, view_caption in SUBJECT_VIEWS[name]:
                written.append(
                    _save(Image.fromarray(_load(loader, index)), out / name / f"{stem}.{fmt}", fmt, view_caption)
                )
            continue
        written.append(_save(Image.fromarray(_load(loader)), out / f"{name}.{fmt}", fmt, caption))
    if faces:
        from skimage import data

        lfw = data.lfw_subset()  # (200, 25, 25) float in [0, 1]; the first 100 are faces
        for i in range(faces):
            face = Image.fromarray((lfw[i * 7] * 255).round().astype(np.uint8)).resize(
                (FACE_SIDE, FACE_SIDE), Image.BICUBIC
            )
            path = out / f"face_{i:02d}.png"
            face.save(path, format="PNG")
            (out / f"face_{i:02d}.txt").write_text("a black and white portrait photo of a person\n")
            written.append(path)
    return sorted(written)
