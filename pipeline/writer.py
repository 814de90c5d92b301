"""Writes the dataset directory (the binding contract in DESIGN.md)::

    DIR/shards/000000.tar ...   WebDataset shards, one per input chunk (parts 000000_01.tar ... past max_bytes)
    DIR/rejects.jsonl           {source, id, stage, reason} per rejected input, in input order
    DIR/manifest.json           written last, atomically
    DIR/.progress/              resume state: recipe.json + one marker per finished chunk

Determinism: input chunk i (reader records [i*K, (i+1)*K)) → shard i, samples in input order, tar
members in a fixed order with fixed mtime/uid/gid/uname/mode, PNG/JPEG encoded with fixed settings,
json with sorted keys. Every file is written to a temporary name and renamed into place, so a
crash never leaves a half-written shard under its final name. A chunk counts as finished only when
its marker exists and its shards have the recorded sizes; markers carry the input fingerprint
(hash of the chunk's source/id list), so changed inputs are rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from dynaip.atomic import atomic_write_bytes
from pipeline.records import Reject, safe_key
from pipeline.sample import Sample

FORMAT = "dynaip-dataset/1"
TAR_MTIME = 0
"""Fixed member mtime (with uid/gid 0, empty uname/gname, mode 0644) so rebuilt shards are byte-identical."""
MEMBER_ORDER = ("ref.png", "tgt.jpg", "mask.png", "txt", "json")
PROGRESS = ".progress"


class OutputDirError(ValueError):
    """The output directory holds something this run must not touch."""


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temporary sibling + fsync + rename."""
    atomic_write_bytes(path, data)


def dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False, default=str) + "\n").encode()


def encode_png(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=None).convert(mode).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_sample(sample: Sample, jpeg_quality: int = 95) -> list[tuple[str, bytes]]:
    """``[(member name, bytes)]`` in ``MEMBER_ORDER``: ref.png (RGB), tgt.jpg (RGB), mask.png (L, 0/255),
    txt (UTF-8 caption), json (sorted keys). Member names are ``{key}.{ext}``."""
    key = sample.key
    if safe_key(key) != key or not key:
        raise ValueError(f"sample key {key!r} has characters outside [A-Za-z0-9_-]; build it with safe_key")
    tgt = io.BytesIO()
    Image.fromarray(sample.tgt).save(tgt, format="JPEG", quality=jpeg_quality)
    files = {
        "ref.png": encode_png(sample.ref, "RGB"),
        "tgt.jpg": tgt.getvalue(),
        "mask.png": encode_png(sample.mask.astype(np.uint8) * 255, "L"),
        "txt": sample.caption.encode("utf-8"),
        "json": json.dumps(sample.meta, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"),
    }
    return [(f"{key}.{ext}", files[ext]) for ext in MEMBER_ORDER]


def sample_pair(members: Iterable[tuple[str, bytes]]) -> str:
    """The ``pair`` field (intra | cross) of one encoded sample's json member."""
    for name, data in members:
        if name.endswith(".json"):
            return str(json.loads(data).get("pair", "unknown"))
    return "unknown"


def pair_totals(shards: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Samples per pair type over manifest shard entries."""
    total: dict[str, int] = {}
    for s in shards:
        for kind, n in s.get("pairs", {}).items():
            total[kind] = total.get(kind, 0) + int(n)
    return dict(sorted(total.items()))


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> dict[str, Any]:
    """Writes a deterministic tar atomically; returns ``{path, bytes, sha256}`` of the final file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(data))
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def reason_class(reason: str) -> str:
    """A reject reason without its details ("subject box too small: 0.01 ..." → "subject box too small")."""
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip() or reason


def fingerprint(keys: Iterable[str]) -> str:
    """Hash of a chunk's input identities (``source/id`` in reader order)."""
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


@dataclass(kw_only=True)
class ChunkResult:
    """What one finished input chunk produced (stored as its marker ``.progress/{chunk:06d}.json``)."""

    chunk: int
    fingerprint: str
    recipe_hash: str
    inputs: int
    accepted: int
    rejects: list[dict[str, str]] = field(default_factory=list)
    shards: list[dict[str, Any]] = field(default_factory=list)
    """[{path (relative to DIR), samples, bytes, sha256}]."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall seconds per stage for this chunk (informational; kept out of the manifest)."""

    @property
    def rejected(self) -> int:
        return len(self.rejects)


class DatasetWriter:
    """Owns one output directory for one recipe. Use ``prepare()`` once, ``done(chunk, fp)`` /
    ``write_chunk(...)`` per chunk (any order, any process), then ``finalize(results, info)``."""

    def __init__(self, out: str | Path, recipe_hash: str, *, jpeg_quality: int = 95, max_bytes: int | None = None):
        self.out = Path(out)
        self.recipe_hash = recipe_hash
        self.jpeg_quality = jpeg_quality
        self.max_bytes = max_bytes

    # ---- directory state ---------------------------------------------------------------------

    def prepare(self, recipe: dict[str, Any]) -> None:
        """Creates the directory, or checks an existing one was built with this recipe hash."""
        state = self.out / PROGRESS / "recipe.json"
        if self.out.exists() and any(self.out.iterdir()):
            found = None
            if state.is_file():
                found = json.loads(state.read_text()).get("recipe_hash")
            elif (self.out / "manifest.json").is_file():
                found = json.loads((self.out / "manifest.json").read_text()).get("recipe_hash")
            if found != self.recipe_hash:
                what = f"a dataset built with recipe hash {found}" if found else "files that are not a dataset of this tool"
                raise OutputDirError(
                    f"output directory {self.out} holds {what}, but this recipe's hash is {self.recipe_hash}; "
                    "pass a new --out directory (or delete the old one) — resuming needs the same recipe")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "shards").mkdir(exist_ok=True)
        if not state.is_file():
            atomic_write(state, dump_json({"recipe_hash": self.recipe_hash, "recipe": recipe}))

    def marker(self, chunk: int) -> Path:
        return self.out / PROGRESS / f"{chunk:06d}.json"

    def done(self, chunk: int, fp: str) -> ChunkResult | None:
        """The finished result of ``chunk`` when its marker matches ``fp`` and its shards are intact."""
        path = self.marker(chunk)
        if not path.is_file():
            return None
        try:
            res = ChunkResult(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            return None
        if res.fingerprint != fp or res.recipe_hash != self.recipe_hash:
            return None
        for s in res.shards:
            p = self.out / s["path"]
            if not p.is_file() or p.stat().st_size != s["bytes"]:
                return None
        return res

    # ---- writing -----------------------------------------------------------------------------

    def shard_name(self, chunk: int, part: int) -> str:
        return f"shards/{chunk:06d}.tar" if part == 0 else f"shards/{chunk:06d}_{part:02d}.tar"

    def write_chunk(self, chunk: int, fp: str, inputs: int, encoded: list[list[tuple[str, bytes]]],
                    rejects: list[Reject], seconds: dict[str, float] | None = None) -> ChunkResult:
        """Writes the chunk's encoded samples (``encode_sample`` outputs, in input order) into its
        shard(s), then its marker. A chunk without samples writes no shard."""
        parts: list[list[tuple[str, bytes]]] = []
        counts: list[int] = []
        pairs: list[dict[str, int]] = []
        size = 0
        for members in encoded:
            nbytes = sum(512 + (len(d) + 511) // 512 * 512 for _, d in members)
            if not parts or (self.max_bytes is not None and size + nbytes > self.max_bytes and counts[-1] > 0):
                parts.append([])
                counts.append(0)
                pairs.append({})
                size = 0
            parts[-1].extend(members)
            counts[-1] += 1
            kind = sample_pair(members)
            pairs[-1][kind] = pairs[-1].get(kind, 0) + 1
            size += nbytes
        shards = []
        for p, (members, n, kinds) in enumerate(zip(parts, counts, pairs)):
            name = self.shard_name(chunk, p)
            info = write_tar(self.out / name, members)
            # pair counts per shard let the trainer check a stage's data before it loads any model
            shards.append({"path": name, "samples": n, "pairs": dict(sorted(kinds.items())), **info})
        keep = {s["path"] for s in shards}
        for old in (self.out / "shards").glob(f"{chunk:06d}*.tar"):  # parts of an earlier, different build
            if f"shards/{old.name}" not in keep:
                old.unlink()
        res = ChunkResult(chunk=chunk, fingerprint=fp, recipe_hash=self.recipe_hash, inputs=inputs,
                          accepted=inputs - len(rejects), rejects=[r.to_json() for r in rejects], shards=shards,
                          seconds={k: round(v, 4) for k, v in (seconds or {}).items()})
        atomic_write(self.marker(chunk), dump_json(asdict(res)))
        return res

    def finalize(self, results: list[ChunkResult], info: dict[str, Any]) -> dict[str, Any]:
        """Writes rejects.jsonl, then manifest.json (last). ``info`` adds recipe/versions/models.
        Returns the manifest."""
        results = sorted(results, key=lambda r: r.chunk)
        rejects = [rj for r in results for rj in r.rejects]
        atomic_write(self.out / "rejects.jsonl",
                     "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rejects).encode())
        by_reason: dict[str, int] = {}
        for rj in rejects:
            k = f"{rj['stage']}: {reason_class(rj['reason'])}"
            by_reason[k] = by_reason.get(k, 0) + 1
        inputs = sum(r.inputs for r in results)
        accepted = sum(r.accepted for r in results)
        assert inputs == accepted + len(rejects), "every input must be accepted or rejected"
        shards = []
        for r in results:
            for s in r.shards:
                shards.append({**s, "chunk": r.chunk})
        manifest = {
            "format": FORMAT,
            **info,
            "recipe_hash": self.recipe_hash,
            "shards": shards,
            "chunks": [{"chunk": r.chunk, "inputs": r.inputs, "accepted": r.accepted, "rejected": r.rejected,
                        "samples": sum(s["samples"] for s in r.shards)} for r in results],
            "totals": {"inputs": inputs, "accepted": accepted, "rejected": len(rejects),
                       "samples": sum(s["samples"] for s in shards),
                       "pairs": pair_totals(shards),
                       "bytes": sum(s["bytes"] for s in shards),
                       "rejected_by_reason": dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])))},
        }
        atomic_write(self.out / "manifest.json", dump_json(manifest))
        return manifest
