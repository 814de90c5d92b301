"""The ``folder`` source: a plain folder of images, optional ``NAME.txt`` caption beside ``NAME.ext``.

Options under ``source:``: ``root`` (the folder), ``recursive`` (default true), ``phrase``
(detection phrase for every image; default: the recipe prompt), ``cross_pairs`` (``none``, the
default, or ``subfolders``). Files are listed in sorted relative-path order; a record's id is its
relative path without extension (made key-safe later). Every file with an image extension becomes a
record, even if it turns out not to decode (the decode stage rejects it with a reason).

``cross_pairs: subfolders``: images that share an immediate subfolder (their parent folder, not the
root itself) are taken as photos of one subject. For every such subfolder with at least 2 images,
each image additionally yields one cross record: target = that image, ``reference`` = the next
image of the same subfolder in sorted order (cyclic: the last one takes the first), ``group`` = the
subfolder's relative path, id = ``<relative path without extension>~cross`` (``~cross2``, ... only if
a file's own id already takes that name), caption = the target's
``.txt`` caption. The reference carries no mask or box, so the subject is detected (Grounding DINO)
and segmented (SAM) in it by the stages, as in an intra record's target.

A root that is not a folder, or holds no image file, is a ``SourceError`` raised by ``read`` itself
(docs/sources.md, "Reader contract").

Record order (deterministic): first every intra record in sorted relative-path order (exactly the
records without the option, so their chunk positions do not move), then the cross records in the
same sorted order of their targets.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.records import ImageRef, SourceRecord
from pipeline.sources.common import SourceError, option, read_options, source_path

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CROSS_PAIRS = ("none", "subfolders")
CROSS_SUFFIX = "~cross"


@dataclass(frozen=True, kw_only=True)
class Options:
    """Reader options for a plain folder: the recipe's ``source:`` keys besides ``kind`` and ``root``."""

    recursive: bool = True
    """Also read images in subfolders (sorted by relative path)."""
    phrase: str | None = None
    """Detection phrase of every image; None = the recipe's ``detection.prompt``."""
    cross_pairs: str = "none"
    """none | subfolders: images sharing an immediate subfolder also give cross records (module docstring)."""


def list_images(root: Path, recursive: bool = True) -> list[Path]:
    """Image files under ``root``, sorted by relative POSIX path (hidden files skipped)."""
    files = root.rglob("*") if recursive else root.glob("*")
    out = [p for p in files if p.is_file() and p.suffix.lower() in IMAGE_EXTS
           and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _caption(path: Path) -> str | None:
    txt = path.with_suffix(".txt")
    if txt.is_file():
        return txt.read_text(encoding="utf-8", errors="replace").strip() or None
    return None


def subfolder_groups(root: Path, images: list[Path]) -> dict[str, list[Path]]:
    """Images grouped by their immediate subfolder (relative POSIX path; images directly in ``root``
    belong to no group), each group in the order of ``images``; only groups of >= 2 images."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in images:
        parent = path.relative_to(root).parent.as_posix()
        if parent != ".":
            groups[parent].append(path)
    return {g: ps for g, ps in groups.items() if len(ps) >= 2}


def read(cfg) -> Iterator[SourceRecord]:
    """Check the folder now (SourceError when it holds no image); return the iterator of records."""
    opts = read_options(cfg, Options, "folder")  # options first: a typo fails before the disk is read
    recursive, phrase, cross = opts.recursive, opts.phrase, opts.cross_pairs
    given = option(cfg, "root", "")
    root = source_path(given) if given else None
    if root is None or not root.is_dir():
        raise SourceError(f"folder source: root {given!r} is not a directory; set source.root in the recipe or pass --source-root")
    if cross not in CROSS_PAIRS:
        raise ValueError(f"folder source: cross_pairs must be one of {', '.join(CROSS_PAIRS)}, not {cross!r}")
    images = list_images(root, recursive)
    if not images:
        exts = ", ".join(sorted(IMAGE_EXTS))
        where = "below" if recursive else "directly in"
        raise SourceError(f"folder source: no image file ({exts}) {where} {root}")
    return _records(root, images, phrase, cross)


def _records(root: Path, images: list[Path], phrase: str | None, cross: str) -> Iterator[SourceRecord]:
    used: set[str] = set()
    for path in images:
        rel = path.relative_to(root).with_suffix("").as_posix()
        used.add(rel)
        yield SourceRecord(source="folder", id=rel, image=ImageRef(path=str(path)), phrase=phrase, caption=_caption(path))
    if cross != "subfolders":
        return
    groups = subfolder_groups(root, images)
    nxt: dict[Path, tuple[str, Path]] = {}
    for group, paths in groups.items():
        for i, path in enumerate(paths):
            nxt[path] = (group, paths[(i + 1) % len(paths)])
    for path in images:  # sorted order of the targets
        if path not in nxt:
            continue
        group, ref = nxt[path]
        rid = path.relative_to(root).with_suffix("").as_posix() + CROSS_SUFFIX
        n = 1
        while rid in used:  # only when a file itself is named like a cross id (``x~cross.png`` beside ``x.png``)
            n += 1
            rid = f"{path.relative_to(root).with_suffix('').as_posix()}{CROSS_SUFFIX}{n}"
        used.add(rid)
        yield SourceRecord(source="folder", id=rid, image=ImageRef(path=str(path)), phrase=phrase,
                           caption=_caption(path), reference=ImageRef(path=str(ref)), group=group)
