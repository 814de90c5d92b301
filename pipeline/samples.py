"""Bundled sample inputs for the demo and tests: real photos from ``skimage.data`` written into a
folder, with a ``.txt`` caption beside some of them (the others get template captions).

``write_sample_photos(out)`` → list of written image paths. Same call → same bytes.
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
N_FACES = 3
FACE_SIDE = 256


def _load(loader: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, loader)()
    if isinstance(img, tuple):  # stereo_motorcycle → (left, right, disparity)
        img = img[0]
    return np.asarray(img)


def write_sample_photos(out: str | Path, faces: int = N_FACES, names: list[str] | None = None) -> list[Path]:
    """Writes the photos (``names`` of ``PHOTOS``, default all) + captions and ``faces`` upscaled
    lfw faces into ``out``; returns the image paths, sorted."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (loader, caption, fmt) in PHOTOS.items():
        if names is not None and name not in names:
            continue
        img = Image.fromarray(_load(loader))
        path = out / f"{name}.{fmt}"
        if fmt == "jpg":
            img.convert("RGB").save(path, format="JPEG", quality=92)
        else:
            img.save(path, format="PNG")
        if caption:
            (out / f"{name}.txt").write_text(caption + "\n")
        written.append(path)
    if faces:
        from skimage import data

        lfw = data.lfw_subset()  # (200, 25, 25) float in [0, 1]; the first 100 are faces
        for i in range(faces):
            face = Image.fromarray((lfw[i * 7] * 255).round().astype(np.uint8)).resize((FACE_SIDE, FACE_SIDE), Image.BICUBIC)
            path = out / f"face_{i:02d}.png"
            face.save(path, format="PNG")
            (out / f"face_{i:02d}.txt").write_text("a black and white portrait photo of a person\n")
            written.append(path)
    return sorted(written)
