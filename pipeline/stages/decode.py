"""Stage 1 — read and validate images: bytes → ``(H, W, 3) uint8`` RGB.

Reads a file path (or fsspec URL), a tar member (``ImageRef.member``) or a video frame
(``ImageRef.frame``, PyAV; with ``member`` the video is that member of a tar or split tar). Still images: the declared size is checked against
``filters.max_image_pixels`` *before* pixels are decoded (decompression-bomb guard), EXIF
orientation is applied, any mode becomes RGB (transparency is flattened onto white), and the
shorter side must reach ``filters.min_image_side``.
"""

from __future__ import annotations

import io
import os
import tarfile
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from pipeline.image_formats import register_plugins
from pipeline.recipe import Recipe
from pipeline.records import ImageRef
from pipeline.sample import Candidate, Item, View


class DecodeError(ValueError):
    """An input that cannot become an image; the message is the reject reason."""


def decode_image(data: bytes, *, max_pixels: int = 89_478_485, min_side: int = 1) -> np.ndarray:
    """Encoded image bytes → ``(H, W, 3) uint8`` RGB. Raises ``DecodeError`` with the reason.

    Only the header is parsed before the size check; PIL's own guard (2 × ``Image.MAX_IMAGE_PIXELS``)
    still applies above ``max_pixels`` settings larger than that."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    register_plugins()  # HEIC/HEIF: pillow-heif's opener, registered once per process (Ray workers too)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DecodeError(f"declared size too large (decompression-bomb guard): {e}") from None
    except Exception as e:  # UnidentifiedImageError, struct errors on garbage headers ...
        raise DecodeError(f"not a readable image ({type(e).__name__}: {e})") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise DecodeError(f"declared size {w}x{h} is empty")
    if w * h > max_pixels:
        raise DecodeError(
            f"declared size {w}x{h} = {w * h} pixels exceeds filters.max_image_pixels={max_pixels} "
            "(decompression-bomb guard); raise the limit if such images are expected"
        )
    if min(w, h) < min_side:
        raise DecodeError(f"image too small: {w}x{h}, shorter side below filters.min_image_side={min_side}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except Exception as e:  # truncated data, broken EXIF, decoder errors
        raise DecodeError(f"image data is corrupt or truncated ({type(e).__name__}: {e})") from None


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode → ``(H, W, 3) uint8`` RGB; alpha (RGBA, LA, palette transparency) goes onto white."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        return np.repeat(a.round().astype(np.uint8)[..., None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def decode_mask(data: bytes) -> np.ndarray:
    """A mask image (e.g. VITON cloth-mask) → ``(H, W) bool`` (gray > 127)."""
    if not data:
        raise DecodeError("mask file is empty (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:
        raise DecodeError(f"mask is not a readable image ({type(e).__name__}: {e})") from None
    if im.mode in ("RGBA", "LA"):
        im = (
            im.getchannel("A")
            if np.asarray(im.convert("L")).min() == np.asarray(im.convert("L")).max()
            else im.convert("L")
        )
    return np.asarray(im.convert("L")) > 127


class ByteReader:
    """Reads the bytes behind an ``ImageRef`` (file, fsspec URL, tar member, Parquet cell). Keeps a
    few tar files open and the last Parquet row group read (a chunk's records are consecutive rows,
    so one row group serves many of them); the handles are dropped when pickled."""

    def __init__(self, max_open_tars: int = 4, max_bytes: int | None = None):
        self.max_open_tars = max_open_tars
        self.max_bytes = max_bytes
        self._tars: OrderedDict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = OrderedDict()
        self._parquet = ParquetCells()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "max_open_tars": self.max_open_tars,
            "max_bytes": self.max_bytes,
            "_tars": OrderedDict(),
            "_parquet": ParquetCells(),
        }

    def _check_size(self, size: int, where: str) -> None:
        if self.max_bytes is not None and size > self.max_bytes:
            raise DecodeError(
                f"file too large: {where} is {size} bytes, above filters.max_file_bytes={self.max_bytes}; "
                "raise the limit if such files are expected"
            )

    def read(self, ref: ImageRef) -> bytes:
        if ref.column is not None:
            data = self._parquet.read(ref.path, ref.column, ref.row)
            self._check_size(len(data), f"{ref.path.rsplit('/', 1)[-1]} row {ref.row} column {ref.column}")
            return data
        if ref.member is not None:
            return self._read_member(ref.path, ref.member)
        name = ref.path.rsplit("/", 1)[-1]
        try:
            if "://" in ref.path:
                import fsspec

                fs, key = fsspec.core.url_to_fs(ref.path)
                self._check_size(int(fs.size(key)), name)  # object info, before any byte is fetched
                with fs.open(key, "rb") as f:
                    return f.read()
            with open(ref.path, "rb") as f:
                self._check_size(os.fstat(f.fileno()).st_size, name)  # the opened file itself: no race
                return f.read()
        except OSError as e:
            raise DecodeError(f"cannot read {ref.path}: {e.strerror or e}") from None

    def _read_member(self, path: str, member: str) -> bytes:
        if path not in self._tars:
            try:
                if "://" in path:  # a tar in an object store: read through fsspec
                    import fsspec

                    tf = tarfile.open(fileobj=fsspec.open(path, "rb").open(), mode="r:*")
                else:
                    tf = tarfile.open(path, "r:*")
                index = {m.name: m for m in tf.getmembers()}
            except (OSError, tarfile.TarError) as e:
                raise DecodeError(f"cannot open tar {path}: {e}") from None
            self._tars[path] = (tf, index)
            while len(self._tars) > self.max_open_tars:
                self._tars.popitem(last=False)[1][0].close()
        self._tars.move_to_end(path)
        tf, index = self._tars[path]
        info = index.get(member) or index.get(member.lstrip("./"))
        if info is None:
            raise DecodeError(f"tar {path} has no member {member!r}")
        if not info.isfile():
            raise DecodeError(f"tar member {member!r} of {path} is not a regular file")
        self._check_size(info.size, f"tar member {member}")
        return tf.extractfile(info).read()


class ParquetCells:
    """Reads single cells of Parquet files, one row group at a time (pyarrow). Holds the open file and,
    of the row group read last, each column asked for so far: a record's cells (target, reference and
    their masks) are four columns of one row, and the next records are the next rows, so every column
    of a row group is read once while memory stays at one row group's cells of those columns. (Keeping
    only the last column read made every cell re-read its whole row group: 200 rows × 4 columns of a
    210 MB file in 100-row groups took 800 row-group reads and 255 s, against 8 reads and 2 s.)"""

    def __init__(self) -> None:
        self._path: str | None = None
        self._file: Any = None
        self._handle: Any = None  # the binary file under ``_file`` (pyarrow leaves a handle it was given open)
        self._starts: list[int] = []
        self._group: int | None = None
        self._cells: dict[str, list[Any]] = {}

    def _open(self, path: str) -> None:
        import pyarrow.parquet as pq

        if self._handle is not None:  # one file at a time: the previous one's handle is closed here
            self._handle.close()
            self._path, self._file, self._handle = None, None, None
        try:
            if "://" in path:
                import fsspec

                fh = fsspec.open(path, "rb").open()
            else:
                fh = open(path, "rb")
            self._handle = fh
            pf = pq.ParquetFile(fh)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for unreadable files
            raise DecodeError(f"cannot open Parquet file {path}: {e}") from None
        starts, n = [], 0
        for g in range(pf.metadata.num_row_groups):
            starts.append(n)
            n += pf.metadata.row_group(g).num_rows
        starts.append(n)
        self._path, self._file, self._starts, self._group, self._cells = path, pf, starts, None, {}

    def read(self, path: str, column: str, row: int) -> bytes:
        import bisect

        if path != self._path:
            self._open(path)
        if not 0 <= row < self._starts[-1]:
            raise DecodeError(f"Parquet file {path} has no row {row} (it has {self._starts[-1]})")
        group = bisect.bisect_right(self._starts, row) - 1
        if self._group != group:
            self._group, self._cells = group, {}
        if column not in self._cells:
            if column not in self._file.schema_arrow.names:
                raise DecodeError(f"Parquet file {path} has no column {column!r}")
            try:
                table = self._file.read_row_group(group, columns=[column])
            except Exception as e:
                raise DecodeError(f"cannot read row group {group} of {path}: {e}") from None
            self._cells[column] = table.column(0).to_pylist()
        return cell_bytes(self._cells[column][row - self._starts[group]], f"column {column} of {path} row {row}")


def cell_bytes(cell: Any, where: str) -> bytes:
    """The image bytes of one Parquet cell: raw binary, or a Hugging Face ``Image`` struct
    ``{"bytes": ..., "path": ...}`` (``datasets`` writes images that way). Errors name the problem
    first and the cell (``where``) last, so the manifest's ``rejected_by_reason`` groups them."""
    if isinstance(cell, dict):
        data = cell.get("bytes")
        if data is None:
            hint = f" (only a path, {cell.get('path')!r}, is stored)" if cell.get("path") else ""
            raise DecodeError(f"no image bytes{hint}: {where}")
        cell = data
    if cell is None:
        raise DecodeError(f"no image bytes (the cell is null): {where}")
    if not isinstance(cell, (bytes, bytearray)):
        raise DecodeError(f"expected image bytes, found {type(cell).__name__}: {where}")
    if not cell:
        raise DecodeError(f"no image bytes (empty): {where}")
    return bytes(cell)


def _check_frame(frame: np.ndarray, recipe: Recipe, where: str) -> np.ndarray:
    h, w = frame.shape[:2]
    if min(h, w) < recipe.filters.min_image_side:
        raise DecodeError(
            f"image too small: {w}x{h} ({where}), shorter side below filters.min_image_side={recipe.filters.min_image_side}"
        )
    return np.ascontiguousarray(frame, dtype=np.uint8)


class DecodeStage:
    """Decodes every item's target (and cross-pair reference + its mask) and attaches provided
    boxes/masks as candidates (a target mask image, ``record.image_mask``, becomes the target's
    ``given_mask`` and its box the one candidate, like a reference mask). ``__call__(items) -> items``;
    failures become rejects (stage 'decode')."""

    name = "decode"

    def __init__(self, recipe: Recipe, models: object = None):  # models: the stages' common signature
        self.recipe = recipe
        self.reader = ByteReader(max_bytes=recipe.filters.max_file_bytes)

    def load(self, ref: ImageRef, crop: Any = None) -> np.ndarray:
        """``ImageRef`` → ``(H, W, 3) uint8`` RGB, validated against the recipe's filters."""
        f = self.recipe.filters
        if ref.frame is not None:
            from pipeline.sources.video import read_frame

            try:
                frame = read_frame(ref.path, ref.frame, crop, member=ref.member, max_pixels=f.max_image_pixels)
            except Exception as e:
                raise DecodeError(f"video frame {ref.frame} of {ref.path}: {e}") from None
            return _check_frame(frame, self.recipe, f"frame {ref.frame}")
        image = decode_image(self.reader.read(ref), max_pixels=f.max_image_pixels, min_side=f.min_image_side)
        if crop is not None:
            x0, y0, x1, y1 = (int(round(float(v))) for v in crop)
            image = _check_frame(image[max(0, y0) : y1, max(0, x0) : x1], self.recipe, f"crop {tuple(crop)}")
        return image

    def _target(self, item: Item) -> View:
        rec = self.recipe
        r = item.record
        view = View(ref=r.image, crop=r.extra.get("crop_xyxy"))
        view.image = self.load(view.ref, view.crop)
        h, w = view.shape
        phrase = r.phrase or rec.detection.prompt
        face = r.extra.get("face_box")
        if face is not None:  # e.g. FFHQ: the face box is not a subject box
            view.face_box = _clip_box(face, w, h)
        elif r.boxes and rec.detection.provided_boxes == "face":
            view.face_box = _clip_box(r.boxes[0], w, h)
        subject_boxes = rec.detection.provided_boxes == "use" and not (face is not None and len(r.boxes) == 1)
        scores = provided_scores(r.extra, max(len(r.boxes), len(r.masks)))
        if r.image_mask is not None and rec.segmentation.use_provided_masks:
            # a mask image of the subject (AnyInsertion tar_mask): it is the target's mask, its box the subject box
            view.given_mask = self._given_mask(r.image_mask, h, w, "target")
            view.candidates = [Candidate(_mask_box(view.given_mask, "target"), 1.0, phrase)]
            view.searched = True
        elif r.masks and rec.segmentation.use_provided_masks:
            from pipeline.stages.segment import rle_box

            for i, rle in enumerate(r.masks):
                box = r.boxes[i] if i < len(r.boxes) and subject_boxes else rle_box(rle, h, w)
                if box is not None:
                    view.candidates.append(Candidate(_clip_box(box, w, h), scores[i], phrase, rle))
            view.searched = True
        elif r.boxes and subject_boxes:
            view.candidates = [Candidate(_clip_box(b, w, h), scores[i], phrase) for i, b in enumerate(r.boxes)]
            view.searched = True
        return view

    def _diptych(self, item: Item) -> tuple[View, View]:
        """The two panels of a diptych record as (left, right) views, each with its own pixels; the
        source's image (or the ``generate`` stage's) must be two square panels wide (``records.Diptych``)."""
        r = item.record
        d = r.diptych
        assert d is not None
        if item.pixels is not None:
            image, item.pixels = item.pixels, None
        elif d.generate is not None:
            raise DecodeError("diptych was never generated (the recipe has no generate stage for it)")
        else:
            image = decode_image(self.reader.read(r.image), max_pixels=self.recipe.filters.max_image_pixels)
        h, w = image.shape[:2]
        if w != 2 * h:
            raise DecodeError(
                f"not a diptych: the image is {w}x{h}, but two square panels side by side are {2 * h}x{h}"
            )
        p = d.padding
        side = h - 2 * p
        if side < 1:
            raise DecodeError(f"diptych padding {p} leaves no panel in a {w}x{h} image")
        views = []
        for x0 in (p, side + 2 * p):
            crop = (x0, p, x0 + side, p + side)
            view = View(ref=r.image, crop=crop)
            view.image = _check_frame(image[p : p + side, x0 : x0 + side], self.recipe, f"panel {crop}")
            views.append(view)
        return views[0], views[1]

    def _reference(self, item: Item) -> View:
        r = item.record
        assert r.reference is not None
        view = View(ref=r.reference, crop=r.extra.get("reference_crop_xyxy"))
        view.image = self.load(view.ref, view.crop)
        h, w = view.shape
        phrase = r.phrase or self.recipe.detection.prompt
        m = r.reference_mask
        if isinstance(m, ImageRef):
            view.given_mask = self._given_mask(m, h, w, "reference")
        elif isinstance(m, dict):
            from pipeline.stages.segment import decode_rle

            view.given_mask = decode_rle(m, h, w)
        if view.given_mask is not None:
            view.candidates = [Candidate(_mask_box(view.given_mask, "reference"), 1.0, phrase)]
            view.searched = True
        elif r.reference_box is not None:
            view.candidates = [Candidate(_clip_box(r.reference_box, w, h), 1.0, phrase)]
            view.searched = True
        return view

    def _given_mask(self, ref: ImageRef, h: int, w: int, what: str) -> np.ndarray:
        """A mask image (white = subject) as ``(h, w) bool``; DecodeError when unreadable or of another
        size than the image it belongs to."""
        try:
            mask = decode_mask(self.reader.read(ref))
        except DecodeError as e:
            raise DecodeError(f"{what} mask: {e}") from None
        if mask.shape != (h, w):
            raise DecodeError(f"{what} mask is {mask.shape[1]}x{mask.shape[0]} but the {what} is {w}x{h}")
        return mask

    def __call__(self, items: list[Item]) -> list[Item]:
        for item in items:
            if not item.ok:
                continue
            if item.record.pair not in self.recipe.pairing.kinds:  # before any decoding or model work
                item.fail("pair", f"{item.record.pair} pairs are disabled (pairing.kinds={self.recipe.pairing.kinds})")
                continue
            try:
                if item.record.diptych is not None:
                    item.target, item.reference = self._diptych(item)
                    item.panel = 0
                    continue
                item.target = self._target(item)
                if item.record.reference is not None:
                    item.reference = self._reference(item)
            except DecodeError as e:
                item.fail(self.name, str(e))
            except Exception as e:  # a bad input never kills the job
                item.fail(self.name, f"{type(e).__name__}: {e}")
        return items


def _mask_box(mask: np.ndarray, what: str) -> tuple[float, float, float, float]:
    from dynaip.geometry import mask_box

    box = mask_box(mask)
    if box is None:
        raise DecodeError(f"{what} mask is empty")
    return box


def _clip_box(box: Any, w: int, h: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = max(0.0, min(x0, w)), max(0.0, min(x1, w))
    y0, y1 = max(0.0, min(y0, h)), max(0.0, min(y1, h))
    if not (x1 > x0 and y1 > y0):
        raise DecodeError(f"provided box {tuple(box)} is empty inside the {w}x{h} image")
    return (x0, y0, x1, y1)


def provided_scores(extra: dict[str, Any], n: int) -> list[float]:
    """Scores of provided boxes/masks from ``extra['scores']`` or ``extra['mask_scores']`` (SA-1B's
    ranking score), scaled so the best is at most 1; 1.0 each when the source gives none."""
    for key in ("scores", "mask_scores"):
        s = extra.get(key)
        if isinstance(s, list) and len(s) >= n and all(isinstance(v, (int, float)) for v in s[:n]):
            vals = [float(v) for v in s[:n]]
            top = max(vals, default=1.0)
            return [v / top for v in vals] if top > 1.0 else vals
    return [1.0] * n
