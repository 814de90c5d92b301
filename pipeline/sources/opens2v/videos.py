"""Frames: where a clip's video is (``_Videos``): an extracted file under ``Videos/``, else a member of
the part's published (split) tar, indexed from the tar headers one part at a time.

Part of the OpenS2V-5M reader (``pipeline.sources.opens2v``; docs/sources.md, "OpenS2V-5M")."""

from __future__ import annotations

import os
from pathlib import Path


class _Videos:
    """Finds a clip's video: an extracted file, else a member of the part's (split) tar.

    The member index is built for one part at a time (parts are read in order), from the headers only.
    """

    def __init__(self, root: Path, videos: Path):
        self.root, self.videos = root, videos
        self._part: str | None = None
        self._index: dict[str, list[tuple[str, str]]] = {}
        self._archives: list[str] = []
        self._errors: list[str] = []

    def _archives_of(self, part: str) -> list[Path]:
        from pipeline.sources.video import SPLIT_RE

        found: list[Path] = []
        for folder, prefix in ((self.videos / part, ""), (self.videos, part)):
            if not folder.is_dir():
                continue
            first_piece: dict[str, tuple[int, Path]] = {}
            for p in sorted(folder.iterdir()):
                if prefix and not p.name.startswith(prefix + "."):
                    continue
                m = SPLIT_RE.match(p.name)
                if m is not None:
                    n = int(m["num"])
                    if m["stem"] not in first_piece or n < first_piece[m["stem"]][0]:
                        first_piece[m["stem"]] = (n, p)
                elif p.name.endswith(".tar") and p.is_file():
                    found.append(p)
            found.extend(p for _, p in sorted(first_piece.values(), key=lambda t: t[1]))
        return found

    def _load(self, part: str) -> None:
        from pipeline.sources.video import iter_tar_members, member_key

        self._part, self._index, self._archives, self._errors = part, {}, [], []
        for archive in self._archives_of(part):
            rel = archive.relative_to(self.root).as_posix()
            self._archives.append(rel)
            try:
                for name, _, _ in iter_tar_members(archive):
                    key = member_key(name)
                    self._index.setdefault(os.path.basename(key), []).append((key, str(archive)))
            except Exception as e:  # a broken / incomplete archive: its clips become rejects saying so
                self._errors.append(f"{rel}: {type(e).__name__}: {e}")

    def find(self, part: str, rel: str) -> tuple[str, str | None] | str:
        """``(path, member or None)``, or the reason it was not found."""
        from pipeline.sources.video import member_key

        for candidate in (self.videos / part / rel, self.videos / rel, self.root / rel):
            if candidate.is_file():
                return str(candidate), None
        if self._part != part:
            self._load(part)
        key = member_key(rel)
        for member, archive in self._index.get(os.path.basename(key), []):
            if member == key or member.endswith("/" + key):
                return archive, member
        where = f"not under {self.videos / part}, {self.videos} or {self.root}"
        if self._archives:
            where += f", nor in the archive(s) {', '.join(self._archives)}"
        if self._errors:
            where += f" (unreadable: {'; '.join(self._errors)})"
        return f"video {rel} {where}"
