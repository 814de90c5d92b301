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

Every file the walk meets is accounted for (docs/sources.md, "Folder"): it is an input record, the
caption of one (``NAME.txt`` beside ``NAME.ext``), or a ``Reject(stage="read")`` naming it by its
relative path with the reason: a broken symlink, a symlink loop, a link resolving outside the root, a
link to a folder (never followed: one outside the root would open the whole machine to the reader,
one inside would read its files twice), a HEIC/AVIF file when the Pillow plugin to decode it is not
installed (the reason names the package), any other file that is not an image, a caption with no
image, a special file (FIFO, socket, device; never opened) and an unreadable subfolder (an object
store root has no links or special files: its objects are classified by name the same way). Hidden
entries (name starting with ``.``) are skipped, and with ``recursive: false`` subfolders are not
read (selections, not drops).

A local root is resolved (``os.path.realpath``) before the walk, so records carry the same absolute paths
however the root was spelled (``../photos``, an absolute path, a symlink to it) and a re-run with
another spelling keeps every finished chunk.

A root that is not a folder, or holds no image file, is a ``SourceError`` raised by ``read`` itself
(docs/sources.md, "Reader contract").

Record order (deterministic): first every intra record in sorted relative-path order (exactly the
records without the option, so their chunk positions do not move), then the cross records in the
same sorted order of their targets, then the rejects of the walk in sorted relative-path order (last,
so a file that cannot be read moves no record to another chunk).
"""

from __future__ import annotations

import errno
import os
import stat
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.image_formats import AVIF_EXTS, HEIF_EXTS, missing_plugin
from pipeline.records import ImageRef, Reject, SourceRecord
from pipeline.sources.common import (
    SourceError,
    SourceLicense,
    check_not_empty,
    option,
    read_options,
    source_path,
)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} | HEIF_EXTS | AVIF_EXTS
CAPTION_EXT = ".txt"
CROSS_PAIRS = ("none", "subfolders")
CROSS_SUFFIX = "~cross"


LICENSE = SourceLicense(
    name="a local image folder",
    license="unknown",
    note="your own images: set the card's license to the terms you hold for them before publishing",
)
"""The terms of this source's data, repeated in the card of every dataset curated from it."""


@dataclass(frozen=True, kw_only=True)
class Options:
    """Reader options for a plain folder: the recipe's ``source:`` keys besides ``kind`` and ``root``."""

    recursive: bool = True
    """Also read images in subfolders (sorted by relative path)."""
    phrase: str | None = None
    """Detection phrase of every image; None = the recipe's ``detection.prompt``."""
    cross_pairs: str = "none"
    """none | subfolders: images sharing an immediate subfolder also give cross records (module docstring)."""

    def __post_init__(self) -> None:
        """An option given but saying nothing fails when the recipe loads (``check_not_empty``)."""
        check_not_empty("folder", "phrase", self.phrase)


@dataclass(frozen=True)
class Scan:
    """What a walk of the root found: the image inputs and every other file with its reject reason."""

    images: list[Any]
    """Image files (``Path`` or ``FsPath``), sorted by relative POSIX path."""
    rejects: list[tuple[str, str]]
    """``(relative POSIX path, reason)`` of every file that is neither an image input nor a caption, sorted."""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _link_problem(path: Path, rel: str, real_root: str, recursive: bool) -> tuple[bool, str | None]:
    """``(is a folder, reject reason or None)`` of the symlink ``path``; a folder link in a
    non-recursive walk is ``(True, None)``: subfolders are not read then (a selection, not a drop)."""
    try:
        target = os.stat(path)  # follows the link
    except OSError as e:
        if e.errno == errno.ELOOP:
            return False, f"symlink loop: {rel} leads back to itself; remove the link"
        if e.errno == errno.ENOENT:
            return (
                False,
                f"broken symlink: {rel} points at a file that does not exist; remove the link or restore its target",
            )
        return False, f"unreadable symlink: {rel} ({e.strerror})"
    real = os.path.realpath(path)
    if stat.S_ISDIR(target.st_mode):
        if not recursive:
            return True, None
        if not _inside(real, real_root):
            return True, (
                f"folder link not followed: {rel} leads outside the source root; copy the folder into "
                "the root instead of linking it"
            )
        inner = Path(real).relative_to(real_root).as_posix()
        return True, (
            f"folder link not followed: {rel} leads to {inner!r} inside the root, whose files are "
            "read there (following it would read them twice)"
        )
    if not _inside(real, real_root):  # the same words as pipeline.inputs.guard_records
        return (
            False,
            f"{rel} is a symlink resolving outside the source root; copy the file into the root instead of linking it",
        )
    return False, None


def scan(root: Any, recursive: bool = True) -> Scan:
    """Walks ``root`` (a ``Path``, or an ``FsPath`` of an object store, which has no links; hidden
    entries skipped, folder links never followed) and sorts every file it meets into an image input,
    a caption (``NAME.txt`` beside an image ``NAME.ext``) or a reject with the reason (module docstring)."""
    if isinstance(root, Path):
        files, rejects = _walk_local(root, recursive)
    else:
        listing = root.rglob("*") if recursive else root.glob("*")
        files = [
            (p.relative_to(root).as_posix(), p)
            for p in listing
            if not any(part.startswith(".") for part in p.relative_to(root).parts) and p.is_file()
        ]
        rejects = []
    stems = {(p.parent, p.stem) for _, p in files if p.suffix.lower() in IMAGE_EXTS}
    images = []
    for rel, path in files:
        ext = path.suffix.lower()
        if ext in IMAGE_EXTS:
            problem = missing_plugin(ext)
            if problem is None:
                images.append((rel, path))
            else:
                rejects.append((rel, f"unsupported format: {rel}: {problem}"))
        elif ext == CAPTION_EXT:
            if (path.parent, path.stem) not in stems:
                rejects.append((rel, f"caption without an image: {rel} has no image of the same name beside it"))
        else:
            exts = ", ".join(sorted(IMAGE_EXTS))
            rejects.append((rel, f"not an image: {rel} (the folder source reads {exts} files and NAME.txt captions)"))
    images.sort(key=lambda x: x[0])
    rejects.sort(key=lambda x: x[0])
    return Scan(images=[p for _, p in images], rejects=rejects)


def _walk_local(root: Path, recursive: bool) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """``(files, rejects)`` of a local walk: the regular files (through links that stay in the root)
    and the links and special files that are rejects, each with its relative POSIX path."""
    real_root = os.path.realpath(root)
    files: list[tuple[str, Path]] = []
    rejects: list[tuple[str, str]] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            rejects.append((folder.relative_to(root).as_posix(), f"folder not readable: {e.strerror}"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            rel = path.relative_to(root).as_posix()
            if entry.is_symlink():
                is_dir, problem = _link_problem(path, rel, real_root, recursive)
                if problem is not None:
                    rejects.append((rel, problem))
                if problem is not None or is_dir:
                    continue
            elif entry.is_dir(follow_symlinks=False):
                if recursive:
                    stack.append(path)
                continue
            if not stat.S_ISREG(os.stat(path).st_mode):  # never opened: reading a FIFO blocks for ever
                rejects.append((rel, f"not a regular file: {rel} is a FIFO, socket or device; it is not read"))
                continue
            files.append((rel, path))
    return files, rejects


def list_images(root: Any, recursive: bool = True) -> list[Any]:
    """Image files under ``root``, sorted by relative POSIX path (hidden files skipped)."""
    return scan(root, recursive).images


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


def read(cfg) -> Iterator[SourceRecord | Reject]:
    """Check the folder now (SourceError when it holds no image); return the iterator of records,
    then of the rejects of the walk."""
    opts = read_options(cfg, Options, "folder")  # options first: a typo fails before the disk is read
    recursive, phrase, cross = opts.recursive, opts.phrase, opts.cross_pairs
    given = option(cfg, "root", "")
    root = source_path(given) if given else None
    if root is None or not root.is_dir():
        raise SourceError(
            f"folder source: root {given!r} is not a directory; set source.root in the recipe or pass --source-root"
        )
    if cross not in CROSS_PAIRS:
        raise ValueError(f"folder source: cross_pairs must be one of {', '.join(CROSS_PAIRS)}, not {cross!r}")
    if isinstance(root, Path):  # one spelling of the root: ids, paths and fingerprints do not depend on it
        root = Path(os.path.realpath(root))
    found = scan(root, recursive)
    if not found.images:
        exts = ", ".join(sorted(IMAGE_EXTS))
        where = "below" if recursive else "directly in"
        held = f"; it holds {len(found.rejects)} other file(s), e.g. {found.rejects[0][1]}" if found.rejects else ""
        raise SourceError(f"folder source: no image file ({exts}) {where} {root}{held}")
    return _records(root, found, phrase, cross)


def _records(root: Any, found: Scan, phrase: str | None, cross: str) -> Iterator[SourceRecord | Reject]:
    images = found.images
    yield from _image_records(root, images, phrase, cross)
    for rel, reason in found.rejects:
        yield Reject(source="folder", id=rel, stage="read", reason=reason)


def _image_records(root: Path, images: list[Path], phrase: str | None, cross: str) -> Iterator[SourceRecord]:
    used: set[str] = set()
    for path in images:
        rel = path.relative_to(root).with_suffix("").as_posix()
        used.add(rel)
        yield SourceRecord(
            source="folder", id=rel, image=ImageRef(path=str(path)), phrase=phrase, caption=_caption(path)
        )
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
        yield SourceRecord(
            source="folder",
            id=rid,
            image=ImageRef(path=str(path)),
            phrase=phrase,
            caption=_caption(path),
            reference=ImageRef(path=str(ref)),
            group=group,
        )
