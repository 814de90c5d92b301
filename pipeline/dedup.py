"""Dataset-wide near-duplicate removal — a second pass after every chunk is built.

Each accepted input carries perceptual hashes (pHash from ``imagehash``; its target's, and for a
cross pair also its reference image's) in its chunk's ledger. Two accepted inputs of the same pair
kind are near-duplicates when every hash differs in at most ``dedup.max_distance`` bits. The copy
kept is the one first in input order; every later one is rejected as ``duplicate of <key of the
earliest near copy>``, whatever the chunk or source.

Distributed as a grouping by hash band: the target hash is cut into ``max_distance + 1`` bands, so
two hashes within the distance agree exactly on at least one band (pigeonhole). Bucket = (pair kind,
band number, band value); reducer ``r`` of ``R`` owns the buckets whose stable hash is ``r`` mod
``R``, reads every chunk's ledger, compares the inputs inside its buckets and reports, per later
input, the earliest near copy it saw. The driver takes the minimum over reducers. The answer does
not depend on ``R``, on the order of chunks or on which worker ran what.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from typing import Any, Iterable

import numpy as np

Entry = tuple[int, str, str, list[int]]  # (global input index, sample key, pair kind, hashes as ints)


def image_hash(image: np.ndarray, hash_size: int = 8) -> str:
    """pHash of an ``(H, W, 3) uint8`` image as hex (``hash_size``² bits)."""
    import imagehash
    from PIL import Image

    return str(imagehash.phash(Image.fromarray(image), hash_size=hash_size))


def bands(value: int, bits: int, n: int) -> list[int]:
    """``value`` (``bits`` wide) cut into ``n`` consecutive bands (the first ones one bit wider)."""
    out, shift = [], bits
    for b in range(n):
        width = bits // n + (1 if b < bits % n else 0)
        shift -= width
        out.append((value >> shift) & ((1 << width) - 1))
    return out


def ledger_entries(ledger: dict[str, list], chunk: int, inputs_per_chunk: int) -> Iterable[Entry]:
    """The comparable inputs of one chunk's ledger."""
    for pos, key, kind, hashes, *_ in ledger["accepted"]:
        if hashes and pos is not None:
            yield chunk * inputs_per_chunk + pos, key, kind, [int(h, 16) for h in hashes]


def _bucket_owner(kind: str, band: int, value: int, reducers: int) -> int:
    return zlib.crc32(f"{kind}/{band}/{value}".encode()) % reducers


def reduce_buckets(entries: Iterable[Entry], max_distance: int, hash_size: int, reducer: int = 0,
                   reducers: int = 1) -> dict[int, tuple[int, str]]:
    """Reducer ``reducer`` of ``reducers``: for each input that has an earlier near copy in one of
    this reducer's buckets, ``index → (index, key)`` of the earliest such copy."""
    bits, n = hash_size * hash_size, max_distance + 1
    buckets: dict[tuple[str, int, int], list[Entry]] = defaultdict(list)
    for e in entries:
        for b, v in enumerate(bands(e[3][0], bits, n)):
            if _bucket_owner(e[2], b, v, reducers) == reducer:
                buckets[(e[2], b, v)].append(e)
    best: dict[int, tuple[int, str]] = {}
    for members in buckets.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda e: e[0])
        for j in range(1, len(members)):
            later = members[j]
            if later[0] in best and best[later[0]][0] < members[0][0]:
                continue  # already has a copy earlier than anything in this bucket
            for i in range(j):
                early = members[i]
                if early[0] == later[0] or len(early[3]) != len(later[3]):
                    continue
                if all(bin(a ^ b).count("1") <= max_distance for a, b in zip(early[3], later[3])):
                    if later[0] not in best or early[0] < best[later[0]][0]:
                        best[later[0]] = (early[0], early[1])
                    break  # members are in input order: the first hit is this bucket's earliest
    return best


def run_reducer(writer: Any, chunks: list[int], inputs_per_chunk: int, max_distance: int, hash_size: int,
                reducer: int, reducers: int) -> dict[int, tuple[int, str, str]]:
    """One reducer over the ledgers of ``chunks`` (read from ``writer``'s store). Returns
    ``index → (earliest index, its key, this input's key)``."""
    keys: dict[int, str] = {}

    def entries() -> Iterable[Entry]:
        for c in chunks:
            for e in ledger_entries(writer.read_ledger(c), c, inputs_per_chunk):
                keys[e[0]] = e[1]
                yield e

    found = reduce_buckets(entries(), max_distance, hash_size, reducer, reducers)
    return {j: (i, key, keys[j]) for j, (i, key) in found.items()}


def plan(parts: Iterable[dict[int, tuple[int, str, str]]], inputs_per_chunk: int) -> dict[int, dict[str, str]]:
    """Merges reducer outputs into ``chunk → {removed key: kept key}``."""
    best: dict[int, tuple[int, str, str]] = {}
    for part in parts:
        for j, (i, key, own) in part.items():
            if j not in best or i < best[j][0]:
                best[j] = (i, key, own)
    out: dict[int, dict[str, str]] = defaultdict(dict)
    for j, (_, key, own) in sorted(best.items()):
        out[j // inputs_per_chunk][own] = key
    return dict(out)
