"""The dataset-wide near-duplicate pass as a shuffle by bucket over the dataset's store: map tasks
write per-reducer partition files (``npz``, loaded without pickle), reducers read only their own, the
driver merges their answers into a per-chunk plan. The comparisons themselves: ``pipeline.dedup``."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from pipeline.dedup import entries_from, ledger_rows, partition, reduce_parts

DEDUP_DIR = ".progress/dedup"


def _part_path(reducers: int, mapper: int, reducer: int) -> str:
    return f"{DEDUP_DIR}/r{reducers}/m{mapper:05d}-r{reducer:05d}.npz"


def run_mapper(
    writer: Any,
    chunks: list[int],
    inputs_per_chunk: int,
    max_distance: int,
    hash_size: int,
    max_thumb_diff: float | None,
    mapper: int,
    reducers: int,
) -> int:
    """Map task ``mapper``: reads the ledgers of ``chunks`` and writes one partition file per reducer
    (atomically, into the dataset's store). Returns the entries it read."""
    rows = [r for c in chunks for r in ledger_rows(writer.read_ledger(c), c, inputs_per_chunk)]
    e = entries_from(rows, hash_size, max_thumb_diff is not None)
    for r, part in enumerate(partition(e, max_distance, hash_size, reducers)):
        buf = io.BytesIO()
        np.savez(buf, **part)
        writer.store.write_bytes(_part_path(reducers, mapper, r), buf.getvalue())
    return len(e)


def run_reducer(
    writer: Any,
    mappers: int,
    max_distance: int,
    hash_size: int,
    max_thumb_diff: float | None,
    reducer: int,
    reducers: int,
) -> dict[int, tuple[int, str, str]]:
    """Reducer ``reducer``: reads only its ``mappers`` partition files. Returns ``index → (earliest
    index, its key, this input's key)``."""
    parts = []
    for m in range(mappers):
        with np.load(io.BytesIO(writer.store.read_bytes(_part_path(reducers, m, reducer))), allow_pickle=False) as z:
            parts.append({k: z[k] for k in z.files})
    return reduce_parts(parts, max_distance, hash_size, max_thumb_diff)


def clean(writer: Any, mappers: int, reducers: int) -> None:
    """Removes the partition files of a finished pass."""
    for m in range(mappers):
        for r in range(reducers):
            writer.store.remove(_part_path(reducers, m, r))


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
