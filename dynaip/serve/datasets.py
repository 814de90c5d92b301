"""What the *Datasets* page shows, without any UI: one curated dataset directory (local path or fsspec
URL) read through its manifest, rejects.jsonl and shards.

    view = DatasetView.open("out/demo/dataset")
    view.summary()                 # totals, per source, per pair type, rejects by stage and reason
    view.samples(pair="intra")     # index entries (shard, key, source, pair, caption, meta), in shard order
    view.samples(sort_by="sharpness")  # ... ordered by a quality score (docs/curation_quality.md)
    view.render(entry)             # reference | target | mask overlay images + caption + metadata
    view.rejects(reason=...)       # rejected inputs with their stage, reason and input image (when readable)
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dynaip.dataset.format import shard_path
from dynaip.dataset.inspect import quality_sort_key
from dynaip.dataset.manifest import parse_manifest


@dataclass
class SampleEntry:
    shard: str
    """The shard's path relative to the dataset (as in the manifest)."""
    key: str
    source: str
    pair: str
    caption: str
    meta: dict[str, Any]


@dataclass
class RenderedSample:
    entry: SampleEntry
    reference: Image.Image
    target: Image.Image
    overlay: Image.Image
    """The target with the subject mask tinted red."""


@dataclass
class DatasetView:
    root: str
    manifest: dict[str, Any]
    entries: list[SampleEntry] = field(default_factory=list)
    reject_rows: list[dict[str, str]] = field(default_factory=list)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, root: str | Path) -> "DatasetView":
        """Reads the manifest, rejects.jsonl and every shard's index (captions and metadata, not images)."""
        root = str(root).strip()
        if not root:
            raise ValueError("give a dataset directory or URL (the folder that holds manifest.json)")
        if "://" not in root:
            root = str(Path(root).expanduser().resolve())
        text = _read_text(_join(root, "manifest.json"), what=f"{root} is not a finished dataset: manifest.json")
        manifest = parse_manifest(text, _join(root, "manifest.json"))  # the format checked as everywhere
        view = cls(root=root, manifest=manifest)
        rejects = _read_text(_join(root, "rejects.jsonl"), what="rejects.jsonl", missing_ok=True) or ""
        view.reject_rows = [json.loads(line) for line in rejects.splitlines() if line.strip()]
        for shard in manifest.get("shards", []):  # never a path outside the dataset
            view.entries.extend(_index_shard(root, shard_path(shard.get("path"), _join(root, "manifest.json"))))
        return view

    # ------------------------------------------------------------------ summary
    def summary(self) -> dict[str, Any]:
        t = self.manifest.get("totals", {})
        by_stage: dict[str, dict[str, int]] = {}
        for r in self.reject_rows:
            by_stage.setdefault(r.get("stage", "?"), Counter())[r.get("reason", "?")] += 1
        return {
            "root": self.root,
            "recipe": (self.manifest.get("recipe") or {}).get("name"),
            "inputs": t.get("inputs", 0), "accepted": t.get("accepted", 0), "rejected": t.get("rejected", 0),
            "samples": t.get("samples", len(self.entries)), "shards": len(self.manifest.get("shards", [])),
            "bytes": t.get("bytes", 0),
            "per_source": dict(sorted(Counter(e.source for e in self.entries).items())),
            "per_pair": dict(sorted(Counter(e.pair for e in self.entries).items())),
            "rejects_by_stage": {s: dict(sorted(c.items())) for s, c in sorted(by_stage.items())},
        }

    def sources(self) -> list[str]:
        return sorted({e.source for e in self.entries})

    def pairs(self) -> list[str]:
        return sorted({e.pair for e in self.entries})

    def reasons(self) -> list[str]:
        return sorted({r.get("reason", "?") for r in self.reject_rows})

    # ------------------------------------------------------------------ samples
    def samples(self, source: str | None = None, pair: str | None = None, sort_by: str | None = None,
                descending: bool = False) -> list[SampleEntry]:
        """Entries filtered by source / pair type; ``sort_by`` a quality score (``aesthetic``, ``sharpness``,
        ``subject_pixels``, ...) orders them by it (stable; samples without that score last)."""
        out = [e for e in self.entries if (not source or e.source == source) and (not pair or e.pair == pair)]
        if sort_by:
            out = sorted(out, key=lambda e: quality_sort_key(e.meta, sort_by, descending))
        return out

    def page(self, entries: list[SampleEntry], page: int, size: int) -> tuple[list[SampleEntry], int, int]:
        """(entries of 1-based ``page`` clamped to the range, the page shown, the number of pages)."""
        pages = max(1, -(-len(entries) // size))
        page = min(max(1, int(page)), pages)
        return entries[(page - 1) * size: page * size], page, pages

    def render(self, entry: SampleEntry) -> RenderedSample:
        files = _read_sample(self.root, entry.shard, entry.key)
        missing = [f for f in ("ref.png", "tgt.jpg", "mask.png") if f not in files]
        if missing:
            raise ValueError(f"{entry.shard} :: {entry.key} lacks {', '.join(missing)}")
        ref = Image.open(io.BytesIO(files["ref.png"])).convert("RGB")
        tgt = Image.open(io.BytesIO(files["tgt.jpg"])).convert("RGB")
        mask = np.asarray(Image.open(io.BytesIO(files["mask.png"])).convert("L").resize(tgt.size)) > 127
        over = np.asarray(tgt).copy()
        over[mask] = (0.5 * over[mask] + 0.5 * np.array([255, 0, 0])).astype(np.uint8)
        return RenderedSample(entry, ref, tgt, Image.fromarray(over))

    def sample_files(self, shard: str, key: str) -> dict[str, bytes]:
        """The raw files of one sample (the shard link's target)."""
        if shard not in {s["path"] for s in self.manifest.get("shards", [])}:
            raise ValueError(f"{shard} is not a shard of {self.root}")
        files = _read_sample(self.root, shard, key)
        if not files:
            raise ValueError(f"{shard} has no sample {key!r}")
        return files

    def shard_location(self, shard: str) -> str:
        return _join(self.root, shard)

    # ------------------------------------------------------------------ rejects
    def rejects(self, reason: str | None = None, stage: str | None = None) -> list[dict[str, str]]:
        return [r for r in self.reject_rows
                if (not reason or r.get("reason") == reason) and (not stage or r.get("stage") == stage)]

    def reject_image(self, row: dict[str, str]) -> Image.Image | None:
        """The rejected input's image when the source is a local folder and the file is readable; else None."""
        src = self.manifest.get("source") or {}
        if src.get("kind") != "folder" or "://" in str(src.get("root", "://")):
            return None
        base = Path(src["root"])
        rid = str(row.get("id", "")).split("~")[0]
        for candidate in sorted(base.glob(f"{rid}.*")):
            try:
                img = Image.open(candidate)
                img.load()
                return img.convert("RGB")
            except Exception:
                return None
        return None


# ---------------------------------------------------------------------- file access (local or fsspec)
def _join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if "://" in root else str(Path(root) / rel)


def _open(path: str):
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def _read_text(path: str, what: str, missing_ok: bool = False) -> str | None:
    try:
        with _open(path) as f:
            return f.read().decode("utf-8")
    except FileNotFoundError:
        if missing_ok:
            return None
        raise FileNotFoundError(f"{what} not found at {path}") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _index_shard(root: str, rel: str) -> list[SampleEntry]:
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with _open(_join(root, rel)) as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, _, ext = member.name.split("/")[-1].partition(".")
                if ext in ("json", "txt"):
                    groups.setdefault(key, {})[ext] = tf.extractfile(member).read()
                else:
                    groups.setdefault(key, {})
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"shard {rel} of {root} is unreadable ({e}); run `dynaip manifest verify`") from None
    out = []
    for key, files in groups.items():
        meta = json.loads(files.get("json", b"{}") or b"{}")
        out.append(SampleEntry(shard=rel, key=key, source=str(meta.get("source", "?")), pair=str(meta.get("pair", "?")),
                               caption=files.get("txt", b"").decode("utf-8", "replace"), meta=meta))
    return out


def _read_sample(root: str, rel: str, key: str) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    with _open(_join(root, rel)) as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for member in tf:
            k, _, ext = member.name.split("/")[-1].partition(".")
            if k == key and member.isfile():
                files[ext] = tf.extractfile(member).read()
            elif files:
                break
    return files
