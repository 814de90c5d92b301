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
import logging
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dynaip.dataset.format import DatasetError
from dynaip.dataset.inspect import quality_sort_key
from dynaip.dataset.manifest import open_dataset
from dynaip.dataset.reader import check_member, dataset_root, read_shard

log = logging.getLogger(__name__)


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
        """Reads the manifest, rejects.jsonl and every shard's index (captions and metadata, not images)
        through the strict dataset reader: each shard is read whole, its members checked and its size and
        sha256 matched before its index is kept (dynaip/dataset/reader.py)."""
        root = dataset_root(root)
        if not is_url(root):
            root = str(Path(root).resolve())
        if not _exists(_join(root, "manifest.json")):
            raise FileNotFoundError(
                f"{root} is not a finished dataset: manifest.json not found at {_join(root, 'manifest.json')}"
            )
        ds = open_dataset(root)
        view = cls(root=root, manifest=ds.manifest)
        rejects = _read_text(_join(root, "rejects.jsonl"), what="rejects.jsonl", missing_ok=True) or ""
        view.reject_rows = _reject_rows(rejects, _join(root, "rejects.jsonl"))
        for ref in ds.shards:
            for key, files in read_shard(ref, keep=lambda ext: ext in ("json", "txt")):
                meta = json.loads(files["json"])  # a JSON object: checked by the reader
                view.entries.append(
                    SampleEntry(
                        shard=ref.path,
                        key=key,
                        source=str(meta.get("source", "?")),
                        pair=str(meta.get("pair", "?")),
                        caption=files["txt"].decode("utf-8", "replace"),
                        meta=meta,
                    )
                )
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
            "inputs": t.get("inputs", 0),
            "accepted": t.get("accepted", 0),
            "rejected": t.get("rejected", 0),
            "samples": t.get("samples", len(self.entries)),
            "shards": len(self.manifest.get("shards", [])),
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
    def samples(
        self, source: str | None = None, pair: str | None = None, sort_by: str | None = None, descending: bool = False
    ) -> list[SampleEntry]:
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
        return entries[(page - 1) * size : page * size], page, pages

    def render(self, entry: SampleEntry) -> RenderedSample:
        """The sample's images; ValueError (one line naming shard and key) when one does not decode."""
        files = _read_sample(self.root, entry.shard, entry.key)
        missing = [f for f in ("ref.png", "tgt.jpg", "mask.png") if f not in files]
        if missing:
            raise ValueError(f"{entry.shard} :: {entry.key} lacks {', '.join(missing)}")
        try:
            ref = Image.open(io.BytesIO(files["ref.png"])).convert("RGB")
            tgt = Image.open(io.BytesIO(files["tgt.jpg"])).convert("RGB")
            mask = np.asarray(Image.open(io.BytesIO(files["mask.png"])).convert("L").resize(tgt.size)) > 127
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise ValueError(
                f"{entry.shard} :: {entry.key} has an image that does not decode "
                f"({type(e).__name__}: {e}); run `dynaip manifest verify` on the dataset"
            ) from None
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
        return [
            r
            for r in self.reject_rows
            if (not reason or r.get("reason") == reason) and (not stage or r.get("stage") == stage)
        ]

    def reject_image(self, row: dict[str, str]) -> Image.Image | None:
        """The rejected input's image when the source is a local folder and the file is readable; else None.

        The row's ``id`` comes from the dataset (untrusted): only a relative id whose file lies inside the
        source root is looked up; an absolute id, a ``..`` segment, a glob character or a file resolving
        outside the root is refused (logged in one line, no image)."""
        src = self.manifest.get("source") or {}
        if not isinstance(src, dict) or src.get("kind") != "folder" or is_url(str(src.get("root", "://"))):
            return None
        base = Path(str(src["root"])).resolve()
        rid = str(row.get("id", "")).split("~")[0]
        parts = rid.replace("\\", "/").split("/")
        if (
            not rid
            or rid.startswith(("/", "~"))
            or any(p in ("", ".", "..") for p in parts)
            or any(c in rid for c in "*?[]\\:")
        ):
            log.warning(
                "rejects.jsonl of %s: id %r is not a relative path inside the source folder %s; its image is not shown",
                self.root,
                row.get("id"),
                base,
            )
            return None
        try:
            candidates = sorted(base.glob(f"{rid}.*"))
        except (OSError, ValueError):
            return None
        for candidate in candidates:
            if not candidate.resolve().is_relative_to(base):  # a link leading out of the source folder
                log.warning(
                    "rejects.jsonl of %s: %s resolves outside the source folder %s; not shown",
                    self.root,
                    candidate,
                    base,
                )
                return None
            try:
                with Image.open(candidate) as img:
                    img.load()
                    return img.convert("RGB")
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
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


def is_url(root: str) -> bool:
    return "://" in root


def _exists(path: str) -> bool:
    if is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return fs.exists(p)
    return Path(path).is_file()


def _reject_rows(text: str, where: str) -> list[dict[str, str]]:
    """The rows of rejects.jsonl; a line that is not a JSON object is a one-line ValueError naming it."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where} line {n} is not valid JSON ({e}); the dataset is damaged") from None
        if isinstance(row, dict):
            rows.append(row)
            continue
        raise ValueError(f"{where} line {n} is a {type(row).__name__}, not a JSON object; the dataset is damaged")
    return rows


def _read_sample(root: str, rel: str, key: str) -> dict[str, bytes]:
    """One sample's members, read with the member checks of the dataset reader (regular files, shard
    member names). The shard's size and hash were checked when the view opened; this later read is not
    hashed again (it stops at the sample)."""
    files: dict[str, bytes] = {}
    try:
        with _open(_join(root, rel)) as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for member in tf:
                k, ext = check_member(member, f"shard {_join(root, rel)}")
                if k == key:
                    files[ext] = tf.extractfile(member).read()
                elif files:
                    break
    except (tarfile.TarError, OSError, DatasetError) as e:
        raise ValueError(f"{rel} :: {key} cannot be read ({str(e).split('; ', 1)[0]})") from None
    return files
