"""The ``folder`` source: a plain folder of images, optional ``NAME.txt`` caption beside ``NAME.ext``.

Options under ``source:``: ``root`` (the folder), ``recursive`` (default true), ``phrase``
(detection phrase for every image; default: the recipe prompt). Files are listed in sorted
relative-path order; a record's id is its relative path without extension (made key-safe later).
Every file with an image extension becomes a record, even if it turns out not to decode (the decode
stage rejects it with a reason).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from pipeline.records import ImageRef, SourceRecord

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(root: Path, recursive: bool = True) -> list[Path]:
    """Image files under ``root``, sorted by relative POSIX path (hidden files skipped)."""
    files = root.rglob("*") if recursive else root.glob("*")
    out = [p for p in files if p.is_file() and p.suffix.lower() in IMAGE_EXTS
           and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def read(cfg) -> Iterator[SourceRecord]:
    root = Path(cfg.root).expanduser() if cfg.root else None
    if root is None or not root.is_dir():
        raise ValueError(f"folder source: root {cfg.root!r} is not a directory; set source.root in the recipe or pass --source-root")
    recursive = cfg.get("recursive", True)
    phrase = cfg.get("phrase")
    for path in list_images(root, recursive):
        rel = path.relative_to(root).with_suffix("").as_posix()
        txt = path.with_suffix(".txt")
        caption = None
        if txt.is_file():
            caption = txt.read_text(encoding="utf-8", errors="replace").strip() or None
        yield SourceRecord(source="folder", id=rel, image=ImageRef(path=str(path)), phrase=phrase, caption=caption)
