"""Decode one frame of a video with PyAV (used for OpenS2V clips); videos may sit inside tar archives.

``read_frame(path, index, crop, member=None)`` returns ``(H, W, 3) uint8 RGB``. ``index`` is the 0-based
frame number in decode order (what OpenS2V's ``ann_frame_idx`` / decord's ``vr[i]`` mean). ``crop`` is
XYXY pixels of the full frame, ``(x0, y0, x1, y1)`` → ``frame[y0:y1, x0:x1]`` (OpenS2V stores its crop as
``[x0, x1, y0, y1]``; the reader converts it to XYXY before it reaches here).

Where the bytes come from (docs/sources.md, "OpenS2V-5M"):

- ``member`` None: ``path`` is a video file;
- ``member`` given: ``path`` is a tar archive (``X.tar``) or any part of one published as split pieces
  (``X.tar.split.000``, ``X.tar.split.001``, …, byte pieces whose concatenation is the tar). The pieces
  are read in place as one stream (nothing is extracted to disk); ``member`` is the video's name inside
  the tar. The member index of an archive is built once per process (headers only, skipping the data)
  and kept for the few most recent archives.

Container metadata is decoded leniently: real clips carry tags such as ``handler_name`` in a legacy
code page (not UTF-8), which makes a strict ``av.open`` raise ``UnicodeDecodeError``; undecodable
bytes become U+FFFD and the pixels are unaffected.

Seeking: we seek to the nearest keyframe at or before the frame's timestamp (computed from the
stream's average rate and time base) and decode forward, counting frames by their presentation time.
When the stream gives no usable timing we decode from the start and count frames.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np

SPLIT_RE = re.compile(r"^(?P<stem>.+\.tar)\.split\.(?P<num>\d+)$")
"""A piece of a split tar: ``<name>.tar.split.<NNN>``."""


class VideoReadError(RuntimeError):
    """A frame could not be read: unreadable file, no video stream, or an index past the end."""


# ------------------------------------------------------------------------------------ tar pieces


def archive_pieces(path: str | os.PathLike) -> list[str]:
    """The files that make up the archive ``path``: ``[path]`` for a plain tar, else every sibling
    ``<name>.tar.split.NNN`` piece in numeric order (``path`` may name any of them)."""
    path = os.fspath(path)
    m = SPLIT_RE.match(os.path.basename(path))
    if m is None:
        return [path]
    folder = os.path.dirname(path) or "."
    prefix = m["stem"] + ".split."
    pieces = []
    for name in os.listdir(folder):
        pm = SPLIT_RE.match(name)
        if pm is not None and name.startswith(prefix):
            pieces.append((int(pm["num"]), os.path.join(folder, name)))
    pieces.sort()
    nums = [n for n, _ in pieces]
    if not pieces or nums != list(range(nums[0], nums[0] + len(nums))):
        raise VideoReadError(
            f"split archive {prefix}NNN in {folder} has pieces {nums}, not a consecutive run; "
            "a piece is missing (re-download it)"
        )
    return [p for _, p in pieces]


class _SeekableRaw(io.RawIOBase):
    """Read-only raw stream of known ``size`` with a position ``pos``: subclasses give ``readinto``."""

    pos: int
    size: int

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos


class ConcatReader(_SeekableRaw):
    """Read-only, seekable view of several files as one byte stream (the pieces of a split tar)."""

    def __init__(self, paths: Sequence[str]):
        super().__init__()
        self.paths = list(paths)
        self.sizes = [os.path.getsize(p) for p in self.paths]
        self.starts = np.cumsum([0] + self.sizes).tolist()
        self.size = self.starts[-1]
        self.pos = 0
        self._open: tuple[int, io.BufferedReader] | None = None

    def _file(self, i: int) -> io.BufferedReader:
        if self._open is None or self._open[0] != i:
            if self._open is not None:
                self._open[1].close()
            self._open = (i, open(self.paths[i], "rb"))
        return self._open[1]

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self.pos < self.size:
            i = int(np.searchsorted(self.starts, self.pos, side="right")) - 1
            f = self._file(i)
            f.seek(self.pos - self.starts[i])
            want = min(len(view) - done, self.starts[i + 1] - self.pos)
            n = f.readinto(view[done : done + want])
            if not n:
                break
            done += n
            self.pos += n
        return done

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None
        super().close()


class WindowReader(_SeekableRaw):
    """Read-only, seekable window ``[offset, offset + size)`` of another seekable raw stream."""

    def __init__(self, raw: io.RawIOBase, offset: int, size: int):
        super().__init__()
        self.raw, self.offset, self.size, self.pos = raw, offset, size, 0

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self.size - self.pos)
        if want <= 0:
            return 0
        self.raw.seek(self.offset + self.pos)
        n = self.raw.readinto(view[:want]) or 0
        self.pos += n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def open_archive(path: str | os.PathLike) -> io.RawIOBase:
    """The (possibly split) tar at ``path`` as one seekable raw stream."""
    pieces = archive_pieces(path)
    return ConcatReader(pieces) if len(pieces) > 1 else io.FileIO(pieces[0], "rb")


def iter_tar_members(path: str | os.PathLike) -> Iterator[tuple[str, int, int]]:
    """``(name, data offset, size)`` of every regular file in the (possibly split) tar at ``path``.

    Reads only the headers (the stream is seekable, so tarfile skips over the data). Memory stays
    flat however many members there are. Raises ``tarfile.TarError`` / ``OSError`` on a broken archive.
    """
    raw = open_archive(path)
    with io.BufferedReader(raw, buffer_size=1 << 16) as buffered:
        tar = tarfile.open(fileobj=buffered, mode="r:")
        try:
            while True:
                info = tar.next()
                if info is None:
                    return
                tar.members.clear()  # tarfile keeps every header otherwise
                if info.isfile():
                    yield info.name, info.offset_data, info.size
        finally:
            tar.close()


def member_key(name: str) -> str:
    """A tar member name as looked up: without a leading ``./`` or ``/``."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


_INDEX_LOCK = threading.Lock()
_INDEXES: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
_MAX_INDEXES = 4


def _archive_index(path: str) -> dict[str, tuple[int, int]]:
    key = archive_pieces(path)[0]
    with _INDEX_LOCK:
        if key in _INDEXES:
            _INDEXES.move_to_end(key)
            return _INDEXES[key]
    index = {member_key(name): (offset, size) for name, offset, size in iter_tar_members(key)}
    with _INDEX_LOCK:
        _INDEXES[key] = index
        while len(_INDEXES) > _MAX_INDEXES:
            _INDEXES.popitem(last=False)
    return index


def open_member(path: str | os.PathLike, member: str) -> io.BufferedReader:
    """A seekable file object over ``member`` of the (possibly split) tar at ``path``; nothing is extracted."""
    path = os.fspath(path)
    try:
        index = _archive_index(path)
    except (OSError, tarfile.TarError) as e:
        raise VideoReadError(f"cannot read archive {path}: {e}") from None
    hit = index.get(member_key(member))
    if hit is None:
        raise VideoReadError(f"archive {path} has no member {member!r}")
    offset, size = hit
    return io.BufferedReader(WindowReader(open_archive(path), offset, size), buffer_size=1 << 16)


# ------------------------------------------------------------------------------------- decoding


def open_container(source):
    """``av.open`` on a video path or file object, tolerating non-UTF-8 container metadata."""
    import av

    return av.open(source, metadata_errors="replace")


def _crop(frame: np.ndarray, crop: Sequence[float] | None, path: str) -> np.ndarray:
    if crop is None:
        return frame
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = (int(round(float(v))) for v in crop)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        raise VideoReadError(
            f"crop {tuple(crop)} (XYXY) leaves nothing of the {w}x{h} frame of {path}; "
            "check the clip's metadata.crop ([x0, x1, y0, y1] in OpenS2V order)"
        )
    return frame[y0:y1, x0:x1]


def _frame_by_time(container, stream, index: int) -> np.ndarray | None:
    """Seek to the keyframe before frame ``index`` and decode forward; None when timing is unusable."""
    rate, tb = stream.average_rate, stream.time_base
    if not rate or not tb:
        return None
    start = stream.start_time or 0
    target_pts = start + int(round(index / float(rate) / float(tb)))
    container.seek(target_pts, stream=stream, backward=True, any_frame=False)
    for frame in container.decode(stream):
        if frame.pts is None:
            return None
        n = int(round((frame.pts - start) * float(tb) * float(rate)))  # frame number from its timestamp
        if n == index:
            return frame.to_ndarray(format="rgb24")
        if n > index:
            return None  # landed past the target (odd keyframe index): fall back to counting
    return None


def _frame_by_count(container, stream, index: int) -> np.ndarray | None:
    """Decode from the start and count frames; None when the video has fewer than ``index + 1``."""
    container.seek(0, stream=stream, backward=True, any_frame=False)
    for n, frame in enumerate(container.decode(stream)):
        if n == index:
            return frame.to_ndarray(format="rgb24")
    return None


def read_frame(
    path: str | os.PathLike,
    index: int,
    crop: Sequence[float] | None = None,
    member: str | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Frame ``index`` (0-based) of the video at ``path`` (or of its tar ``member``) as ``(H, W, 3) uint8
    RGB``, cropped to XYXY ``crop``.

    Raises ``VideoReadError`` for a negative index, an index past the last frame, a stream whose
    declared W*H exceeds ``max_pixels`` (checked before any frame is decoded: the decompression-bomb
    guard still images get), or a file / archive member PyAV cannot open or decode.
    """
    path = os.fspath(path)
    where = f"{path}:{member}" if member is not None else path
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
        raise VideoReadError(f"frame index {index!r} for {where} must be an integer >= 0")
    index = int(index)
    fileobj = open_member(path, member) if member is not None else None
    try:
        return _read(fileobj if fileobj is not None else path, index, crop, where, max_pixels)
    finally:
        if fileobj is not None:
            fileobj.close()


def _read(source, index: int, crop: Sequence[float] | None, where: str, max_pixels: int | None = None) -> np.ndarray:
    import av

    try:
        container = open_container(source)
    except (av.error.FFmpegError, OSError) as e:
        raise VideoReadError(f"cannot open video {where}: {e}; check the file exists and is a complete video") from None
    with container:
        if not container.streams.video:
            raise VideoReadError(f"{where} has no video stream")
        stream = container.streams.video[0]
        w, h = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if max_pixels is not None and w * h > max_pixels:
            raise VideoReadError(
                f"declared frame size {w}x{h} = {w * h} pixels exceeds filters.max_image_pixels="
                f"{max_pixels} (decompression-bomb guard); raise the limit if such videos are expected"
            )
        try:
            frame = _frame_by_time(container, stream, index) if index > 0 else None
            if frame is None:
                frame = _frame_by_count(container, stream, index)
        except (av.error.FFmpegError, OSError) as e:
            raise VideoReadError(f"cannot decode {where} at frame {index}: {e}") from None
        total = stream.frames or "unknown"
    if frame is None:
        raise VideoReadError(
            f"frame index {index} is past the end of {where} ({total} frames); use an index below the clip's num_frames"
        )
    return _crop(frame, crop, where)
