"""The cross-pair clip store: an on-disk SQLite index (in a temp dir, removed afterwards) of the clips
the pair files name, filled during the intra pass, so cross records can look any clip up without
holding annotation files in memory.

Part of the OpenS2V-5M reader (``pipeline.sources.opens2v``; docs/sources.md, "OpenS2V-5M")."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from typing import Any

from pipeline.sources.opens2v.clips import _Clip


class _Store:
    """On-disk index (SQLite in a temp dir) of the clips cross pairs name: kept across the intra pass so
    that cross records can look up any clip without holding annotation files in memory."""

    def __init__(self, work_dir: str | None):
        self.dir = tempfile.mkdtemp(prefix="opens2v-", dir=work_dir)
        self.db = sqlite3.connect(os.path.join(self.dir, "clips.sqlite"))
        self.db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16384;"
            "CREATE TABLE wanted (id TEXT PRIMARY KEY);"
            "CREATE TABLE clips (id TEXT PRIMARY KEY, key TEXT, data TEXT);"
            "CREATE INDEX clips_key ON clips (key);"
            "CREATE TABLE seen (rid TEXT PRIMARY KEY, first TEXT);"
        )

    def want(self, ids: list[str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", [(i,) for i in ids])

    def wanted(self, clip: _Clip) -> bool:
        row = self.db.execute("SELECT 1 FROM wanted WHERE id IN (?, ?) LIMIT 1", (clip.id, clip.key)).fetchone()
        return row is not None

    def put(self, clip: _Clip) -> None:
        self.db.execute("INSERT OR REPLACE INTO clips VALUES (?, ?, ?)", (clip.id, clip.key, clip.to_json()))

    def find(self, cid: Any) -> _Clip | str:
        """The clip a pair names (``<part>/<key>`` or a bare key), or why it cannot be used."""
        if not isinstance(cid, str) or not cid:
            return "is not a clip id string"
        row = self.db.execute("SELECT data FROM clips WHERE id = ?", (cid,)).fetchone()
        if row is not None:
            return _Clip.from_json(row[0])
        rows = self.db.execute("SELECT id, data FROM clips WHERE key = ?", (cid.rsplit("/", 1)[-1],)).fetchall()
        if "/" in cid or not rows:
            return "is not a readable clip (not in the annotation files, or rejected there)"
        if len(rows) > 1:
            return f"is a bare clip key found in several parts: {', '.join(sorted(r[0] for r in rows))}"
        return _Clip.from_json(rows[0][1])

    def first_seen(self, rid: str, where: str) -> str | None:
        """None the first time ``rid`` is seen (and records ``where``); else where it was first seen."""
        row = self.db.execute("SELECT first FROM seen WHERE rid = ?", (rid,)).fetchone()
        if row is not None:
            return row[0]
        self.db.execute("INSERT INTO seen VALUES (?, ?)", (rid, where))
        return None

    def close(self) -> None:
        self.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)
