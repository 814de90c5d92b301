"""VITON-HD reader: cross pairs garment (reference) → the person wearing it (target).

Layout: ``root`` is the dataset folder holding ``train/``, ``test/``, ``train_pairs.txt``,
``test_pairs.txt`` (as unzipped), or directly a split folder. A split folder holds ``image/``,
``cloth/``, ``cloth-mask/`` (same file name as the person image, e.g. ``00000_00.jpg``), plus
``image-parse-v3/`` (palette PNG, labels 0–19) and pose/densepose folders this reader does not use.
Images are 1024×768 (H×W).

Why the same-name cloth: ``{split}_pairs.txt`` lines are ``person.jpg cloth.jpg`` but these lists are
*unpaired* — for try-on evaluation they pair a person with someone else's garment, so the target does
not contain that garment. The person's own garment is ``cloth/<person name>``; only that pair is a true
(reference, target) pair. The pairs list is therefore used only for the list of person images (its
first column); without a pairs file, ``image/*.jpg`` is listed.

Options (recipe ``source:``; a mapping or a ``VitonHDSource``): ``root`` (required), ``split``
(train | test, default train), ``phrase`` (default ``upper-body garment``).

Record (``source="vitonhd"``, ``id`` = person file stem, e.g. ``00000_00``): ``image`` =
``ImageRef(image/<name>)`` (target), ``reference`` = ``ImageRef(cloth/<name>)`` (garment on a near-white
background), ``reference_mask`` = ``ImageRef(cloth-mask/<name>)`` (a grey-level mask image, white =
garment), ``phrase`` = the option, ``caption``/``boxes``/``masks`` empty (the garment's location in the
target comes from detection), ``group`` = ``vitonhd-<id>``. ``extra``: ``split``, ``cloth`` (file name),
``parse`` (path of ``image-parse-v3/<stem>.png`` when it exists).

A root without the split (e.g. a root holding only ``test/``, as the test-only download does, read with
``split: train``) or a split that lists no person image is a ``SourceError`` raised by ``read`` itself,
naming the split folders the root does hold. Malformed inputs never raise: a missing pairs file falls
back to listing ``image/``; a pairs line that is not ``person.jpg [cloth.jpg]`` →
``Reject(id="<split>_pairs-line<N>")``, as is a line repeating an earlier person; a missing person image,
cloth or cloth-mask → ``Reject(id=<stem>, stage="read", reason)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.records import ImageRef, Reject, SourceRecord
from pipeline.sources.common import (
    SourceError,
    SourceLicense,
    check_not_empty,
    option,
    read_options,
    require_dir,
)

SOURCE = "vitonhd"
_IMAGE_EXT = (".jpg", ".jpeg", ".png")


LICENSE = SourceLicense(
    name="VITON-HD", license="cc-by-nc-4.0", url="https://github.com/shadow2496/VITON-HD", note="non-commercial use"
)
"""The terms of this source's data, repeated in the card of every dataset curated from it."""


@dataclass(frozen=True, kw_only=True)
class Options:
    """Reader options for VITON-HD: the recipe's ``source:`` keys besides ``kind`` and ``root``."""

    split: str = "train"
    """train | test."""
    phrase: str = "upper-body garment"
    """Detection phrase for the garment in the target image."""

    def __post_init__(self) -> None:
        """An option given but saying nothing fails when the recipe loads (``check_not_empty``)."""
        check_not_empty("vitonhd", "phrase", self.phrase)


@dataclass(frozen=True, kw_only=True)
class VitonHDSource(Options):
    """The whole source section as one object (``read(VitonHDSource(root=...))``)."""

    root: str
    """Dataset folder (with train/ and test/) or one split folder."""


def _reject(rid: str, reason: str) -> Reject:
    return Reject(source=SOURCE, id=rid, stage="read", reason=reason)


def _split_dir(root: Path, split: str) -> Path:
    if (root / split / "image").is_dir():
        return root / split
    if (root / "image").is_dir():
        return root
    present = sorted(p.name for p in root.iterdir() if (p / "image").is_dir())
    if present:
        other = [p for p in present if p in ("train", "test")]
        hint = f"set source.split: {other[0]}" if other else "point source.root at the VITON-HD folder"
        raise SourceError(
            f"vitonhd: split {split!r} not found: {root} holds {', '.join(p + '/' for p in present)} "
            f"but no {split}/image/; {hint}"
        )
    raise SourceError(
        f"vitonhd: no {split}/image/ (nor image/) under {root}; point source.root at the VITON-HD "
        "folder (holding train/ and test/) or at a split folder"
    )


def _person_names(root: Path, split_dir: Path, split: str) -> list[str | Reject]:
    """Person image names from the pairs list's first column (sorted; a repeated person is a reject),
    else from ``image/``."""
    pairs = next((p for p in (root / f"{split}_pairs.txt", split_dir / f"{split}_pairs.txt") if p.is_file()), None)
    if pairs is None:
        return sorted(p.name for p in (split_dir / "image").iterdir() if p.suffix.lower() in _IMAGE_EXT)
    rejects: list[str | Reject] = []
    first: dict[str, int] = {}
    for n, line in enumerate(pairs.read_text(errors="replace").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2 or not parts[0].lower().endswith(_IMAGE_EXT):
            rejects.append(
                _reject(f"{split}_pairs-line{n}", f"{pairs.name} line {n} {line!r} is not 'person.jpg cloth.jpg'")
            )
            continue
        if parts[0] in first:
            rejects.append(
                _reject(
                    f"{split}_pairs-line{n}",
                    f"{pairs.name} line {n} repeats person {parts[0]} "
                    f"(first on line {first[parts[0]]}); each person is read once",
                )
            )
            continue
        first[parts[0]] = n
    return rejects + sorted(first)


def read(cfg: Any) -> Iterator[SourceRecord | Reject]:
    """Check the split now (SourceError when missing or empty); return the iterator of garment → person
    cross records, one per person image (and rejects); see the module docstring."""
    opts = read_options(cfg, Options, SOURCE)
    split, phrase = opts.split, opts.phrase
    if split not in ("train", "test"):
        raise ValueError(f"vitonhd split={split!r}: expected train or test")
    root = require_dir(option(cfg, "root", ""), "vitonhd", "the VITON-HD folder (holding train/ and test/)")
    split_dir = _split_dir(root, split)
    names = _person_names(root, split_dir, split)
    if not any(isinstance(n, str) for n in names):
        raise SourceError(
            f"vitonhd: split {split!r} lists no person image ({split}_pairs.txt is empty or missing "
            f"and {split_dir / 'image'} holds no .jpg/.png)"
        )
    return _records(split_dir, split, phrase, names)


def _records(split_dir: Path, split: str, phrase: str, names: list[str | Reject]) -> Iterator[SourceRecord | Reject]:
    for name in names:
        if isinstance(name, Reject):
            yield name
            continue
        stem = Path(name).stem
        person, cloth, cloth_mask = (split_dir / d / name for d in ("image", "cloth", "cloth-mask"))
        missing = [p for p in (person, cloth, cloth_mask) if not p.is_file()]
        if missing:
            what = ", ".join(f"{p.parent.name}/{p.name}" for p in missing)
            yield _reject(stem, f"missing {what} in {split_dir}")
            continue
        parse = split_dir / "image-parse-v3" / f"{stem}.png"
        extra: dict[str, Any] = {"split": split, "cloth": name}
        if parse.is_file():
            extra["parse"] = str(parse)
        yield SourceRecord(
            source=SOURCE,
            id=stem,
            image=ImageRef(path=str(person)),
            phrase=phrase,
            reference=ImageRef(path=str(cloth)),
            reference_mask=ImageRef(path=str(cloth_mask)),
            group=f"{SOURCE}-{stem}",
            extra=extra,
        )
