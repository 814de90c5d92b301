"""Decode one frame of a video file with PyAV (used for OpenS2V clips).

``read_frame(path, index, crop)`` returns ``(H, W, 3) uint8 RGB``. ``index`` is the 0-based frame
number in decode order (what OpenS2V's ``ann_frame_idx`` / decord's ``vr[i]`` mean). ``crop`` is
XYXY pixels of the full frame, ``(x0, y0, x1, y1)`` → ``frame[y0:y1, x0:x1]`` (OpenS2V stores its crop as
``[x0, x1, y0, y1]``; the reader converts it to XYXY before it reaches here).

Seeking: we seek to the nearest keyframe at or before the frame's timestamp (computed from the
stream's average rate and time base) and decode forward, counting frames by their presentation time.
When the stream gives no usable timing we decode from the start and count frames.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


class VideoReadError(RuntimeError):
    """A frame could not be read: unreadable file, no video stream, or an index past the end."""


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


def read_frame(path: str | os.PathLike, index: int, crop: Sequence[float] | None = None) -> np.ndarray:
    """Frame ``index`` (0-based) of the video at ``path`` as ``(H, W, 3) uint8 RGB``, cropped to XYXY ``crop``.

    Raises ``VideoReadError`` for a negative index, an index past the last frame, or a file PyAV cannot
    open or decode.
    """
    import av

    path = os.fspath(path)
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
        raise VideoReadError(f"frame index {index!r} for {path} must be an integer >= 0")
    index = int(index)
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise VideoReadError(f"cannot open video {path}: {e}; check the file exists and is a complete video") from None
    with container:
        if not container.streams.video:
            raise VideoReadError(f"{path} has no video stream")
        stream = container.streams.video[0]
        try:
            frame = _frame_by_time(container, stream, index) if index > 0 else None
            if frame is None:
                frame = _frame_by_count(container, stream, index)
        except (av.error.FFmpegError, OSError) as e:
            raise VideoReadError(f"cannot decode {path} at frame {index}: {e}") from None
        total = stream.frames or "unknown"
    if frame is None:
        raise VideoReadError(
            f"frame index {index} is past the end of {path} ({total} frames); "
            "use an index below the clip's num_frames"
        )
    return _crop(frame, crop, path)
