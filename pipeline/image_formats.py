"""Image formats Pillow decodes only with a plugin or a recent release: HEIC/HEIF and AVIF.

Phone cameras save HEIC by default, so a folder of someone's photos often holds some. ``pillow-heif``
(a dependency) registers a HEIF opener with Pillow; Pillow decodes AVIF itself from 11.2 on. Where
either is missing (an older environment), ``missing_plugin`` names what to install, and the folder
source rejects such a file with that line instead of skipping it (docs/sources.md, "Folder").
"""

from __future__ import annotations

import functools

HEIF_EXTS = frozenset({".heic", ".heif"})
AVIF_EXTS = frozenset({".avif"})


@functools.cache
def heif_ready() -> bool:
    """True once Pillow can open HEIC/HEIF in this process (registers pillow-heif's opener once)."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


@functools.cache
def avif_ready() -> bool:
    """True when this Pillow decodes AVIF (built with libavif: the wheels of Pillow >= 11.2)."""
    from PIL import features

    try:
        return bool(features.check("avif"))
    except ValueError:  # a Pillow that does not know the feature name at all
        return False


def missing_plugin(ext: str) -> str | None:
    """None when a file with extension ``ext`` (any case) can be decoded here; else the reason, naming
    the package to install."""
    ext = ext.lower()
    if ext in HEIF_EXTS and not heif_ready():
        return f"{ext} (HEIC/HEIF) needs the pillow-heif plugin to decode; pip install pillow-heif"
    if ext in AVIF_EXTS and not avif_ready():
        return f"{ext} (AVIF) needs a Pillow built with AVIF support; pip install 'pillow>=11.2'"
    return None


def register_plugins() -> None:
    """Makes every installed plugin known to Pillow in this process (cheap after the first call)."""
    heif_ready()
