"""Small helpers shared by the source readers: option lookup and COCO RLE checks.

Formats used here:

- boxes are XYXY in pixels of the image they belong to (x0, y0 inclusive-left/top edge, x1, y1 right/bottom edge);
- masks are COCO RLE dicts ``{"size": [H, W], "counts": str}`` — note the size order is **[H, W]**, and
  ``counts`` is the compressed string form (what ``pycocotools.mask.encode`` returns, decoded to ``str``).

pycocotools does *not* validate a compressed ``counts`` string: a truncated or corrupt string decodes to
garbage without an error. ``check_rle`` therefore parses the run lengths itself and checks they cover
exactly ``H * W`` pixels, so corrupt masks become rejects instead of silently wrong samples.
"""

from __future__ import annotations

import glob as _glob
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from dynaip.configs import build
from pipeline.recipe import has_word
from pipeline.records import Box

_MISSING = object()


class SourceError(FileNotFoundError):
    """A source root, glob or split that matches nothing (or names the wrong thing).

    Raised by a reader's ``read(cfg)`` itself, before it returns its iterator, so a run stops with one
    line naming what was looked for and where before any model loads (docs/sources.md, "Reader contract").
    A ``FileNotFoundError`` so the CLI reports it as a user error.
    """


@dataclass(frozen=True, kw_only=True)
class SourceLicense:
    """The terms a source's data comes under, as a dataset card states them (``pipeline/sources/<kind>.py``
    defines ``LICENSE``; the card of every dataset curated from it repeats it: dynaip/dataset/card.py).

    ``license`` is a Hugging Face license id (``cc-by-4.0``, ``apache-2.0``, ...), ``other`` for terms
    that have no id (then ``license_name`` names them), or ``unknown`` when the source states none we
    could confirm (the card says so: check the source's own terms before publishing)."""

    name: str
    """The source dataset's name as its authors publish it."""
    license: str
    license_name: str | None = None
    """For ``license: other``: a slug naming the terms."""
    url: str | None = None
    """Where the terms (or the release) are published."""
    hub_id: str | None = None
    """The source's Hugging Face dataset repo when it is published there (the card's ``source_datasets``)."""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


UNKNOWN_LICENSE = SourceLicense(
    name="unknown source",
    license="unknown",
    note="the source states no license we know of; check its terms before publishing",
)


def require_dir(root: Any, kind: str, what: str = "the dataset folder") -> Path:
    """``root`` as a Path; SourceError when it is unset or not a directory."""
    if root is None or str(root) == "":
        raise SourceError(f"{kind}: source.root is not set; point it at {what} (or pass --source-root)")
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise SourceError(f"{kind}: source.root {path} is not a directory; point it at {what}")
    return path


def glob_files(root: Path, pattern: str, kind: str, what: str, *, required: bool = True) -> list[Path]:
    """Files under ``root`` matching ``pattern`` (``**`` allowed), sorted by path.

    With ``required`` an empty match is a SourceError naming the pattern, the root and, as a hint,
    the top-level entries of ``root`` (the usual mistake is one folder level too many or too few).
    """
    matches = sorted(Path(p) for p in _glob.glob(os.path.join(str(root), pattern), recursive=True) if os.path.isfile(p))
    if not matches and required:
        try:
            entries = sorted(os.listdir(root))
        except OSError:
            entries = []
        shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "") if entries else "nothing"
        raise SourceError(f"{kind}: no {what} match {pattern!r} under {root} (it holds: {shown})")
    return matches


def lookup(cfg: Any, key: str) -> tuple[bool, Any]:
    """``(present, value)`` of ``key`` in a source section: a mapping, a dataclass with the key as a
    field, or an object keeping reader options in an ``options`` mapping (``pipeline.recipe.SourceConfig``,
    whose attribute access answers None for absent keys, so presence is read from ``options``)."""
    if cfg is None:
        return False, None
    if isinstance(cfg, Mapping):
        return key in cfg, cfg.get(key)
    fields = getattr(cfg, "__dict__", {})
    if key in fields:
        return True, fields[key]
    options = fields.get("options")
    if isinstance(options, Mapping):
        return key in options, options.get(key)
    return hasattr(cfg, key), getattr(cfg, key, None)


def option(cfg: Any, key: str, default: Any = _MISSING) -> Any:
    """Read ``key`` from a recipe source section (see ``lookup`` for the accepted shapes).

    A missing key (or a value of None) gives ``default``; without a default a missing key is an error.
    """
    _, value = lookup(cfg, key)
    if value is None or value == "":
        if default is _MISSING:
            raise ValueError(
                f"source config has no {key!r}: it is required by this reader; "
                f"add `{key}: ...` under `source:` in the recipe (or pass --source-root for root)"
            )
        return default
    return value


class RLEError(ValueError):
    """A mask that is not a valid COCO RLE for the expected image size."""


def _runs_from_string(counts: str) -> np.ndarray:
    """Decode COCO's compressed counts string into run lengths (int64), as maskApi.c ``rleFrString`` does,
    vectorised: each number is 5-bit groups, low first, a set 0x20 bit meaning "more follows" and 0x10 in
    the last group the sign; from the fourth number on each is a delta to the one two places earlier."""
    try:
        raw = np.frombuffer(counts.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError as e:
        raise RLEError(f"RLE counts holds {counts[e.start]!r}, outside COCO's character range '0'..'o'") from None
    if raw.size == 0:
        return np.zeros(0, np.int64)
    c = raw - np.uint8(48)  # wraps below '0', so one test covers both ends of the range
    if (c > 63).any():
        raise RLEError(f"RLE counts holds {counts[int(np.argmax(c > 63))]!r}, outside COCO's character range '0'..'o'")
    ends = np.flatnonzero(c < 32)  # the last character of each number (no "more" bit)
    if ends.size == 0 or ends[-1] != c.size - 1:
        raise RLEError("RLE counts string ends in the middle of a number (truncated)")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if lengths.max() > 12:
        raise RLEError("RLE counts holds a number longer than 12 characters (corrupt string)")
    k = np.arange(c.size) - np.repeat(starts, lengths)  # position of each character inside its number
    vals = np.add.reduceat((c & 31).astype(np.int64) << (5 * k), starts)
    neg = (c[ends] & 16) != 0
    vals[neg] -= np.left_shift(np.int64(1), 5 * lengths[neg])  # sign-extend negative numbers
    if vals.size > 3:
        vals[3::2] = vals[1] + np.cumsum(vals[3::2])
    if vals.size > 4:
        vals[4::2] = vals[2] + np.cumsum(vals[4::2])
    return vals


def _string_from_runs(runs: list[int]) -> str:
    """Encode run lengths as COCO's compressed counts string (port of maskApi.c ``rleToString``)."""
    out = []
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = not ((c & 0x10) == 0 and x == 0 or (c & 0x10) != 0 and x == -1)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def check_rle(rle: Any, height: int | None = None, width: int | None = None) -> tuple[dict[str, Any], int]:
    """Validate a COCO RLE and return ``(normalized_rle, area_in_pixels)``.

    ``rle`` must be ``{"size": [H, W], "counts": str | bytes | list[int]}``. When ``height``/``width``
    are given, ``size`` must match them (a missing ``size`` is filled from them). The returned RLE
    always has ``size`` as ``[H, W]`` ints and ``counts`` as a compressed ``str``.
    Raises ``RLEError`` naming what is wrong.
    """
    if not isinstance(rle, Mapping):
        raise RLEError(f"mask is {type(rle).__name__}, expected a COCO RLE dict {{size: [H, W], counts}}")
    size = rle.get("size")
    if size is None and height is not None and width is not None:
        size = [height, width]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise RLEError(f"RLE size {size!r} is not [H, W] integers")
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise RLEError(f"RLE size {[h, w]} has a non-positive side")
    if height is not None and width is not None and (h, w) != (height, width):
        raise RLEError(f"RLE size [H, W]={[h, w]} does not match the image's [H, W]={[height, width]}")
    counts = rle.get("counts")
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError as e:
            raise RLEError(f"RLE counts bytes are not ASCII: {e}") from None
    if isinstance(counts, str):
        runs = _runs_from_string(counts)
    elif isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
        if any(r < 0 for r in counts):
            raise RLEError("RLE counts hold a negative run length")
        counts = _string_from_runs(list(counts))
        runs = np.asarray(counts and _runs_from_string(counts), dtype=np.int64)
    else:
        raise RLEError(f"RLE counts is {type(counts).__name__}, expected a COCO compressed string")
    if (runs < 0).any():
        raise RLEError("RLE counts decode to a negative run length (corrupt string)")
    total = int(runs.sum())
    if total != h * w:
        raise RLEError(f"RLE runs cover {total} pixels, expected H*W={h * w} (truncated or corrupt counts)")
    area = int(runs[1::2].sum())
    return {"size": [h, w], "counts": counts}, area


def rle_bbox(rle: Mapping[str, Any]) -> Box | None:
    """Tight XYXY box (pixels) of a checked RLE's foreground, or None when it is empty."""
    from pycocotools import mask as mask_utils

    x, y, bw, bh = (float(v) for v in mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()}))
    if bw <= 0 or bh <= 0:
        return None
    return (x, y, x + bw, y + bh)


def xywh_to_xyxy(box: Any, *, inclusive: bool = False) -> Box:
    """``[x, y, w, h]`` → ``(x0, y0, x1, y1)`` with ``x1``/``y1`` one past the last pixel (our convention).

    ``inclusive=False``: COCO's ``w`` = number of columns, so ``x1 = x + w``. ``inclusive=True``: SAM's
    automatic mask generator (so SA-1B) writes ``w`` = last column − first column (its box comes from
    the first and last mask pixel), so ``x + w`` is the last pixel and ``x1 = x + w + 1``
    (docs/sources.md, "SA-1B"). Raises ValueError on a malformed box.
    """
    if not (isinstance(box, (list, tuple)) and len(box) == 4):
        raise ValueError(f"box {box!r} is not [x, y, w, h]")
    x, y, w, h = (float(v) for v in box)
    if w < 0 or h < 0:
        raise ValueError(f"box {box!r} has a negative width or height")
    extra = 1.0 if inclusive else 0.0
    return (x, y, x + w + extra, y + h + extra)


def as_xyxy(box: Any) -> Box:
    """Validate an ``[x0, y0, x1, y1]`` box (x1 > x0, y1 > y0) and return it as floats."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4):
        raise ValueError(f"box {box!r} is not [x0, y0, x1, y1]")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box {box!r} is empty or inverted (needs x1 > x0 and y1 > y0)")
    return (x0, y0, x1, y1)


class FsPath:
    """The part of ``pathlib.Path`` that readers use, over an fsspec URL (``s3://bucket/dir`` …).
    ``str()`` is the URL; ``relative_to`` gives a plain ``PurePosixPath``."""

    def __init__(self, url: str, fs: Any = None):
        import fsspec

        self.url = url.rstrip("/")
        self.protocol = url.split("://", 1)[0]
        self.fs = fs if fs is not None else fsspec.core.url_to_fs(url)[0]
        self._key = self.fs._strip_protocol(self.url)

    def _child(self, key: str) -> "FsPath":
        return FsPath(f"{self.protocol}://{key}", self.fs)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"FsPath({self.url!r})"

    def __fspath__(self) -> str:
        return self.url

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FsPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: "FsPath") -> bool:
        return self.url < other.url

    def __truediv__(self, name: str) -> "FsPath":
        return self._child(f"{self._key}/{name}")

    @property
    def name(self) -> str:
        return self._key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def parent(self) -> "FsPath":
        return self._child(self._key.rsplit("/", 1)[0])

    @property
    def parts(self) -> tuple[str, ...]:
        return PurePosixPath(self._key).parts

    def with_suffix(self, suffix: str) -> "FsPath":
        return self._child(str(PurePosixPath(self._key).with_suffix(suffix)))

    def relative_to(self, other: "FsPath") -> PurePosixPath:
        return PurePosixPath(self._key).relative_to(other._key)

    def expanduser(self) -> "FsPath":
        return self

    def exists(self) -> bool:
        return self.fs.exists(self._key)

    def is_dir(self) -> bool:
        return self.fs.isdir(self._key)

    def is_file(self) -> bool:
        return self.fs.isfile(self._key)

    def glob(self, pattern: str) -> list["FsPath"]:
        return [self._child(k) for k in sorted(self.fs.glob(f"{self._key}/{pattern}"))]

    def rglob(self, pattern: str) -> list["FsPath"]:
        return [self._child(k) for k in sorted(self.fs.glob(f"{self._key}/**/{pattern}"))]

    def open(self, mode: str = "rb", **kw: Any):
        return self.fs.open(self._key, mode, **kw)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self._key)

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)


def source_path(root: Any) -> Any:
    """A source root as a path object: ``pathlib.Path`` for a local path, or ``FsPath`` for an
    fsspec URL (``s3://…``, ``gs://…``, ``file://…``), whose ``str()`` is the URL that
    ``ImageRef.path`` carries to the decode stage. Credentials come from the environment or the
    usual config files, never from the recipe."""
    text = str(root)
    if "://" in text:
        return FsPath(text)
    return Path(text).expanduser()


def check_not_empty(kind: str, name: str, value: Any) -> None:
    """ValueError (one line) when the option ``source.<name>`` is given but means nothing: a text with no
    word (``pipeline.recipe.has_word``), an empty list (selects nothing) or a list entry that says nothing. Such a value
    would run to the end and reject every input, or write an empty dataset, so it fails when the
    recipe loads. None (the key left out) is fine: the reader's default applies."""
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(
                f"{kind} source: source.{name} is an empty list, which selects nothing; "
                "name at least one or leave the key out"
            )
        for i, item in enumerate(value):
            if isinstance(item, str) and not has_word(item):
                raise ValueError(
                    f"{kind} source: source.{name}[{i}] = {item!r} names nothing; give a word or drop the entry"
                )
    elif isinstance(value, str) and not has_word(value):
        raise ValueError(f"{kind} source: source.{name} = {value!r} names nothing; give a word or leave the key out")


def read_options(cfg: Any, options_cls: type, kind: str) -> Any:
    """A reader's typed ``Options`` from its source section: a ``pipeline.recipe.SourceConfig``, a
    mapping (``{"root": ..., "top_k": 4}``) or an ``Options`` instance (returned as is). Unknown keys
    and wrongly typed values fail in one line, through the same loader as the recipe
    (dynaip/configs.py; docs/ARCHITECTURE.md, "Configuration")."""
    from pipeline.recipe import source_options_mapping

    if isinstance(cfg, options_cls):
        return cfg
    return build(options_cls, source_options_mapping(options_cls, cfg), where=f"{kind} source", at="source.")


def image_column_problem(arrow_type: Any) -> str | None:
    """None when a Parquet column of ``arrow_type`` can hold image bytes (binary, or the Hugging Face
    ``Image`` struct ``{bytes, path}``), else what it is instead. Readers check a file's schema once with
    this, so a column of the wrong type rejects its rows without reading them."""
    import pyarrow as pa

    def binary(t: Any) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    if binary(arrow_type):
        return None
    if pa.types.is_struct(arrow_type):
        idx = arrow_type.get_field_index("bytes")
        if idx >= 0 and binary(arrow_type.field(idx).type):
            return None
        return f"a struct without binary 'bytes' ({arrow_type})"
    return str(arrow_type)


class SelectedRecords:
    """A reader's record iterator that also says what the source section selected and what the files
    held (``selection``, a JSON-able dict). ``pipeline.orchestrate.check_source`` returns it and the run
    records it in manifest.json as ``source_selection``, so a dataset built from part of a release says so."""

    def __init__(self, records: Any, selection: dict[str, Any]):
        self._it = iter(records)
        self.selection = selection

    def __iter__(self) -> SelectedRecords:
        return self

    def __next__(self) -> Any:
        return next(self._it)
