"""Writes the dataset directory (the binding contract in docs/ARCHITECTURE.md, "Dataset directory")::

    DIR/shards/000000.tar ...   WebDataset shards, one per input chunk (parts 000000_01.tar ... past max_bytes)
    DIR/rejects.jsonl           {source, id, stage, reason} per rejected input, in input order
    DIR/README.md, preview.png  the dataset card (dynaip/dataset/card.py), just before the manifest
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
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable

import numpy as np
from PIL import Image

from dynaip.atomic import clean_temp_files
from dynaip.dataset.card import write_card
from dynaip.dataset.format import FORMAT, MEMBER_ORDER, shard_name
from dynaip.dataset.manifest import read_store_manifest
from dynaip.dataset.store import Store
from pipeline.records import Reject, safe_key
from pipeline.sample import Sample

TAR_MTIME = 0
"""Fixed member mtime (with uid/gid 0, empty uname/gname, mode 0644) so rebuilt shards are byte-identical."""
PROGRESS = ".progress"
DUPLICATE_OF = "duplicate of "


class OutputDirError(ValueError):
    """The output directory holds something this run must not touch."""


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


def _tar_stream(f, members: Iterable[tuple[str, bytes]]) -> None:
    with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(data))


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> dict[str, Any]:
    """Writes a deterministic tar atomically; returns ``{bytes, sha256}`` of the final file."""
    path = Path(path)
    store = Store(path.parent)
    with store.writer(path.name) as f:
        _tar_stream(f, members)
    return {"bytes": f.size, "sha256": f.sha.hexdigest()}


def read_tar_members(data: IO[bytes]) -> list[tuple[str, bytes]]:
    """``[(member name, bytes)]`` of a tar in file order."""
    out = []
    with tarfile.open(fileobj=data, mode="r:") as tf:
        for member in tf:
            if member.isfile():
                out.append((member.name, tf.extractfile(member).read()))
    return out


def member_key(name: str) -> str:
    return name.split("/")[-1].split(".", 1)[0]


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def reason_class(reason: str) -> str:
    """A reject reason without its details ("subject box too small: 0.01 ..." → "subject box too small",
    "duplicate of folder-x-0" → "duplicate")."""
    if reason.startswith(DUPLICATE_OF):
        return "duplicate"
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
    rejects: list[dict[str, str]] | None = field(default_factory=list)
    """Rejected inputs in input order; None in the driver's slim copy (read back from the marker)."""
    shards: list[dict[str, Any]] = field(default_factory=list)
    """[{path (relative to DIR), samples, pairs, bytes, sha256}]."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall seconds per stage for this chunk (informational; kept out of the manifest)."""
    duplicates: dict[str, str] = field(default_factory=dict)
    """Sample key → the key it duplicates, for the inputs the dataset-wide de-duplication removed."""
    node: str | None = None
    """Where the chunk was written (a Ray node id; informational)."""

    @property
    def rejected(self) -> int:
        return self.inputs - self.accepted

    def slim(self) -> "ChunkResult":
        """A copy without the reject list: what a driver keeps per chunk (its memory stays flat)."""
        return ChunkResult(
            chunk=self.chunk,
            fingerprint=self.fingerprint,
            recipe_hash=self.recipe_hash,
            inputs=self.inputs,
            accepted=self.accepted,
            rejects=None,
            shards=self.shards,
            seconds={},
            duplicates=self.duplicates,
            node=self.node,
        )


Ledger = dict[str, list]
"""A chunk's per-input outcome, ``.progress/{chunk:06d}.ledger.json``: ``{"rejected": [[position,
reject json], ...], "accepted": [[position, sample key, pair kind, [perceptual hash hex, ...], source,
id, [8×8 thumbnail hex, ...]], ...]}``
(positions within the chunk). It is written before the chunk's shards and marker; the
de-duplication pass reads the hashes from it, and rebuilds the reject list from it."""


class DatasetWriter:
    """Owns one output directory (a path or fsspec URL) for one recipe. Use ``prepare()`` once,
    ``done(chunk, fp)`` / ``write_chunk(...)`` per chunk (any order, any process), optionally
    ``apply_duplicates``, then ``finalize(results, info)``."""

    def __init__(self, out: str | Path, recipe_hash: str, *, jpeg_quality: int = 95, max_bytes: int | None = None):
        self.store = Store(out)
        self.out: Path | str = self.store.local_path() if self.store.local else self.store.url
        self.recipe_hash = recipe_hash
        self.jpeg_quality = jpeg_quality
        self.max_bytes = max_bytes

    # ---- directory state ---------------------------------------------------------------------

    def prepare(self, recipe: dict[str, Any], source: str | None = None, precision: str | None = None) -> None:
        """Creates the directory, or checks an existing one was built with this recipe hash, from
        this ``source`` (``source_identity``: data of two roots never mix in one dataset) and at this
        model ``precision`` (resolved ``executor.precision``: bf16 masks differ from fp32 ones in a few
        edge pixels, so one dataset is built at one precision; a directory without the entry was built
        before the switch existed, in fp32). Removes temporary files a crashed run left behind; call it
        while holding the ``RunLock``."""
        st, state = self.store, f"{PROGRESS}/recipe.json"
        if st.exists() and not st.is_empty():
            found, found_source, found_precision = None, None, None
            if st.is_file(state):
                saved = json.loads(st.read_bytes(state))
                found, found_source = saved.get("recipe_hash"), saved.get("source")
                found_precision = saved.get("precision", "fp32")
            elif st.is_file("manifest.json"):
                found = read_store_manifest(st).get("recipe_hash")
            if found != self.recipe_hash:
                what = (
                    f"a dataset built with recipe hash {found}"
                    if found
                    else "files that are not a dataset of this tool"
                )
                raise OutputDirError(
                    f"output directory {self.out} holds {what}, but this recipe's hash is {self.recipe_hash}; "
                    "pass a new --out directory (or delete the old one) — resuming needs the same recipe"
                )
            if source is not None and found_source is not None and found_source != source:
                raise OutputDirError(
                    f"output directory {self.out} holds a dataset built from source {found_source}, not {source}; "
                    "pass a new --out directory for another source (datasets never mix sources)"
                )
            if precision is not None and found_precision is not None and found_precision != precision:
                raise OutputDirError(
                    f"output directory {self.out} holds a dataset built at model precision {found_precision}, but this "
                    f"run's executor.precision resolves to {precision}; set executor.precision: {found_precision} to "
                    "resume it, or pass a new --out directory"
                )
        st.makedirs("shards")
        if st.local:  # leftovers of a crashed run (nobody else writes here: the caller holds the lock)
            for sub in ("", "shards", PROGRESS):
                clean_temp_files(st.local_path(sub))
        if not st.is_file(state):
            st.write_bytes(
                state,
                dump_json(
                    {"recipe_hash": self.recipe_hash, "recipe": recipe, "source": source, "precision": precision}
                ),
            )

    def check_no_shrink(self, inputs: int | None, chunks: int | None = None) -> None:
        """Refuses to replace a finished manifest with one covering fewer inputs (a ``--limit`` run
        into a larger dataset would otherwise leave shards on disk that no manifest lists).
        ``inputs`` None = unknown yet (nothing to check)."""
        if inputs is None or not self.store.is_file("manifest.json"):
            return
        try:
            old = read_store_manifest(self.store)
        except ValueError:
            return
        have = int(old.get("totals", {}).get("inputs", 0))
        if inputs < have:
            raise OutputDirError(
                f"output directory {self.out} holds a finished dataset of {have} inputs; this run covers only "
                f"{inputs}, which would shrink its manifest — drop --limit (or raise it to >= {have}) or pass a new --out"
            )

    def marker(self, chunk: int) -> str:
        """The marker's path relative to the dataset root."""
        return f"{PROGRESS}/{chunk:06d}.json"

    def ledger_path(self, chunk: int) -> str:
        return f"{PROGRESS}/{chunk:06d}.ledger.json"

    def read_marker(self, chunk: int) -> ChunkResult | None:
        try:
            return ChunkResult(**json.loads(self.store.read_bytes(self.marker(chunk))))
        except (OSError, ValueError, TypeError):
            return None

    def read_ledger(self, chunk: int) -> Ledger:
        return json.loads(self.store.read_bytes(self.ledger_path(chunk)))

    def done(self, chunk: int, fp: str) -> ChunkResult | None:
        """The finished result of ``chunk`` when its marker matches ``fp`` and its shards are intact."""
        res = self.read_marker(chunk)
        if res is None or res.fingerprint != fp or res.recipe_hash != self.recipe_hash:
            return None
        if self.store.size(self.ledger_path(chunk)) is None:
            return None
        for s in res.shards:
            if self.store.size(s["path"]) != s["bytes"]:
                return None
        return res

    def forget(self, chunk: int) -> None:
        """Drops the chunk's marker: the next run builds the chunk again."""
        self.store.remove(self.marker(chunk))

    # ---- writing -----------------------------------------------------------------------------

    def _write_shards(
        self, chunk: int, encoded: list[list[tuple[str, bytes]]], previous: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """Writes the samples (input order) into the chunk's shard parts; removes parts of an
        earlier, different build. Returns the manifest entries."""
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
            name = shard_name(chunk, p)
            with self.store.writer(name) as f:
                _tar_stream(f, members)
            # pair counts per shard let the trainer check a stage's data before it loads any model
            shards.append(
                {
                    "path": name,
                    "samples": n,
                    "pairs": dict(sorted(kinds.items())),
                    "bytes": f.size,
                    "sha256": f.sha.hexdigest(),
                }
            )
        keep = {s["path"] for s in shards}
        # no listing of shards/ per chunk (chunks² at scale): the parts the last build recorded, and
        # the part names after ours (what a build that crashed before its marker left behind)
        stale = [s["path"] for s in previous or []]
        p = len(shards)
        while self.store.size(shard_name(chunk, p)) is not None:
            stale.append(shard_name(chunk, p))
            p += 1
        for old in stale:
            if old not in keep:
                self.store.remove(old)
        return shards

    def write_chunk(
        self,
        chunk: int,
        fp: str,
        inputs: int,
        encoded: list[list[tuple[str, bytes]]],
        rejects: list[Reject],
        seconds: dict[str, float] | None = None,
        *,
        ledger: Ledger | None = None,
        node: str | None = None,
    ) -> ChunkResult:
        """Writes the chunk's ledger, its encoded samples (``encode_sample`` outputs, in input order)
        into its shard(s), then its marker. A chunk without samples writes no shard."""
        if ledger is None:  # no positions known: such a chunk takes no part in de-duplication
            ledger = {"rejected": [[None, r.to_json()] for r in rejects], "accepted": []}
        self.store.write_bytes(self.ledger_path(chunk), (json.dumps(ledger, sort_keys=True) + "\n").encode())
        previous = self.read_marker(chunk)
        shards = self._write_shards(chunk, encoded, previous.shards if previous else None)
        res = ChunkResult(
            chunk=chunk,
            fingerprint=fp,
            recipe_hash=self.recipe_hash,
            inputs=inputs,
            accepted=inputs - len(rejects),
            rejects=[r.to_json() for r in rejects],
            shards=shards,
            seconds={k: round(v, 4) for k, v in (seconds or {}).items()},
            node=node,
        )
        self.store.write_bytes(self.marker(chunk), dump_json(asdict(res)))
        return res

    def apply_duplicates(self, chunk: int, duplicates: dict[str, str], node: str | None = None) -> ChunkResult | None:
        """Removes the samples of ``duplicates`` (key → key of the copy kept) from the chunk's shards
        and records each as a reject ``duplicate of <key>``, in input order with the chunk's other
        rejects. Only the shard parts holding a sample to remove are rewritten (in place, streamed
        member by member); the others keep their bytes. Idempotent. Returns the updated result, or
        None when the chunk must be built again (it already lost a sample that is no longer a duplicate)."""
        res = self.read_marker(chunk)
        if res is None:
            return None
        if res.duplicates == duplicates:
            return res
        if not set(res.duplicates) <= set(duplicates):
            return None
        ledger = self.read_ledger(chunk)
        # an input's samples share the key up to ``-{n}`` (a diptych writes two): all of them go
        dropped = {k.rsplit("-", 1)[0] for k in set(duplicates) - set(res.duplicates)}
        shards = []
        for s in res.shards:
            with self.store.open(s["path"]) as f, tarfile.open(fileobj=f, mode="r:") as tf:  # headers; seeks over data
                hit = any(member_key(m.name).rsplit("-", 1)[0] in dropped for m in tf)
            entry = self._rewrite_without(s, dropped) if hit else s
            if entry is not None:
                shards.append(entry)
        by_pos: list[tuple[int, dict[str, str]]] = [
            (pos if pos is not None else -1, rj) for pos, rj in ledger["rejected"]
        ]
        for pos, key, _kind, _hashes, source, sid, *_ in ledger["accepted"]:
            if key in duplicates:
                by_pos.append(
                    (pos, {"source": source, "id": sid, "stage": "dedup", "reason": f"{DUPLICATE_OF}{duplicates[key]}"})
                )
        rejects = [rj for _, rj in sorted(by_pos, key=lambda t: t[0])]
        new = ChunkResult(
            chunk=chunk,
            fingerprint=res.fingerprint,
            recipe_hash=self.recipe_hash,
            inputs=res.inputs,
            accepted=res.inputs - len(rejects),
            rejects=rejects,
            shards=shards,
            seconds=res.seconds,
            duplicates=dict(sorted(duplicates.items())),
            node=node or res.node,
        )
        self.store.write_bytes(self.marker(chunk), dump_json(asdict(new)))
        return new

    def _rewrite_without(self, shard: dict[str, Any], dropped: set[str]) -> dict[str, Any] | None:
        """Rewrites one shard part without the samples whose key (up to ``-{n}``) is in ``dropped``;
        returns its new manifest entry, or None (file removed) when no sample is left."""
        counts = {"samples": 0}
        pairs: dict[str, int] = {}

        def kept() -> Iterable[tuple[str, bytes]]:
            with self.store.open(shard["path"]) as f, tarfile.open(fileobj=f, mode="r|") as tf:
                for member in tf:
                    if not member.isfile() or member_key(member.name).rsplit("-", 1)[0] in dropped:
                        continue
                    data = tf.extractfile(member).read()  # type: ignore[union-attr]
                    if member.name.endswith(".json"):
                        counts["samples"] += 1
                        kind = str(json.loads(data).get("pair", "unknown"))
                        pairs[kind] = pairs.get(kind, 0) + 1
                    yield member.name, data

        with self.store.writer(shard["path"]) as out:  # the old bytes stay until the new ones are complete
            _tar_stream(out, kept())
        if not counts["samples"]:
            self.store.remove(shard["path"])
            return None
        return {
            "path": shard["path"],
            "samples": counts["samples"],
            "pairs": dict(sorted(pairs.items())),
            "bytes": out.size,
            "sha256": out.sha.hexdigest(),
        }

    def finalize(
        self,
        results: list[ChunkResult],
        info: dict[str, Any],
        licenses: list[dict[str, Any]] | None = None,
        on_reject: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Writes rejects.jsonl (streamed; slim results read their rejects back from the markers), the
        dataset card (README.md + preview.png, dynaip/dataset/card.py; ``licenses``: the sources' terms),
        then manifest.json (last). ``info`` adds recipe/versions/models; ``on_reject`` sees every reject
        as it is written (and may update ``info``). Returns the manifest."""
        results = sorted(results, key=lambda r: r.chunk)
        self.check_no_shrink(sum(r.inputs for r in results))  # before rejects.jsonl is touched
        by_reason: dict[str, int] = {}
        n_rejects = 0
        with self.store.writer("rejects.jsonl") as f:
            for r in results:
                rejects = r.rejects
                if rejects is None:
                    full = self.read_marker(r.chunk)
                    if full is None or full.rejects is None:
                        raise RuntimeError(f"chunk {r.chunk}: its marker is missing; re-run to rebuild it")
                    rejects = full.rejects
                for rj in rejects:
                    f.write((json.dumps(rj, sort_keys=True, ensure_ascii=False) + "\n").encode())
                    k = f"{rj['stage']}: {reason_class(rj['reason'])}"
                    if on_reject is not None:
                        on_reject(rj)
                    by_reason[k] = by_reason.get(k, 0) + 1
                n_rejects += len(rejects)
        inputs = sum(r.inputs for r in results)
        accepted = sum(r.accepted for r in results)
        assert inputs == accepted + n_rejects, "every input must be accepted or rejected"
        shards = []
        for r in results:
            for s in r.shards:
                shards.append({**s, "chunk": r.chunk})
        manifest = {
            "format": FORMAT,
            **info,
            "recipe_hash": self.recipe_hash,
            "shards": shards,
            "chunks": [
                {
                    "chunk": r.chunk,
                    "inputs": r.inputs,
                    "accepted": r.accepted,
                    "rejected": r.rejected,
                    "samples": sum(s["samples"] for s in r.shards),
                }
                for r in results
            ],
            "totals": {
                "inputs": inputs,
                "accepted": accepted,
                "rejected": n_rejects,
                "samples": sum(s["samples"] for s in shards),
                "pairs": pair_totals(shards),
                "bytes": sum(s["bytes"] for s in shards),
                "rejected_by_reason": dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
            },
        }
        write_card(self.store, manifest, licenses)  # before the manifest: a finished dataset always has its card
        self.store.write_bytes("manifest.json", dump_json(manifest))
        return manifest
