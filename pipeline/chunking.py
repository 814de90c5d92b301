"""How one input chunk is cut into model batches and put back together — shared by the local and
the Ray executor, so both see identical batches and produce byte-identical shards.

A chunk is ``shards.inputs_per_shard`` consecutive reader outputs. Its reader rejects are final at
once; its records are wrapped as items and cut into batches of ``executor.batch_size`` in reader
order. Each batch runs through the stages (anywhere), then ``batch_outcome`` encodes its samples;
``assemble`` restores input order and turns duplicate keys into rejects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.records import Reject, SourceRecord
from pipeline.sample import Item, make_items
from pipeline.writer import encode_sample

Outcome = list[tuple[int, Any]]  # (position in chunk, encoded sample members | Reject)


@dataclass
class BatchTask:
    """One model batch of a chunk: ``positions[i]`` is the chunk position of ``items[i]``."""

    chunk: int
    batch: int
    positions: list[int]
    items: list[Item]


def plan_chunk(chunk: int, part: list[SourceRecord | Reject], start: int, batch_size: int
               ) -> tuple[Outcome, list[BatchTask]]:
    """The chunk's reader rejects (final) and its batches (to run through the stages)."""
    rejects: Outcome = [(i, r) for i, r in enumerate(part) if isinstance(r, Reject)]
    positions = [i for i, r in enumerate(part) if isinstance(r, SourceRecord)]
    items = make_items([part[i] for i in positions], start)
    tasks = [BatchTask(chunk, b // batch_size, positions[b:b + batch_size], items[b:b + batch_size])
             for b in range(0, len(items), batch_size)]
    return rejects, tasks


def batch_outcome(items: list[Item], positions: list[int], jpeg_quality: int = 95) -> Outcome:
    """Encodes a processed batch: each item becomes its samples' tar members or a Reject."""
    out: Outcome = []
    for pos, item in zip(positions, items):
        if item.reject is not None:
            out.append((pos, item.reject))
        elif not item.samples:
            out.append((pos, Reject(source=item.record.source, id=item.record.id, stage="pair",
                                    reason="no sample produced")))
        else:
            try:
                out.append((pos, [(s.key, encode_sample(s, jpeg_quality)) for s in item.samples]))
            except Exception as e:
                out.append((pos, Reject(source=item.record.source, id=item.record.id, stage="write",
                                        reason=f"cannot encode the sample: {type(e).__name__}: {e}")))
    for item in items:  # free pixels early
        item.target = item.reference = item.ref_image = None
        item.samples = []
    return out


def assemble(part: list[SourceRecord | Reject], outcome: Outcome) -> tuple[list[list[tuple[str, bytes]]], list[Reject]]:
    """Input-ordered ``(encoded samples, rejects)`` of a chunk from all of its outcomes."""
    if sorted(pos for pos, _ in outcome) != list(range(len(part))):
        raise RuntimeError("chunk outcome does not account for every input exactly once")
    encoded, rejects, seen = [], [], set()
    for pos, x in sorted(outcome, key=lambda t: t[0]):
        if isinstance(x, Reject):
            rejects.append(x)
        elif any(key in seen for key, _ in x):  # a source repeating an id must not repeat a key
            r = part[pos]
            rejects.append(Reject(source=r.source, id=r.id, stage="write",
                                  reason=f"duplicate sample key {x[0][0]} (the source repeats this id)"))
        else:
            seen.update(key for key, _ in x)
            encoded.extend(members for _, members in x)
    return encoded, rejects
