"""How one input chunk is cut into model batches and put back together — shared by the local and
the Ray executor, so both see identical batches and produce byte-identical shards.

A chunk is ``shards.inputs_per_shard`` consecutive reader outputs. Its reader rejects are final at
once; its records are wrapped as items and cut into batches of ``executor.batch_size`` in reader
order. Each batch runs through the stages (anywhere), then ``batch_outcome`` encodes its samples;
``assemble`` restores input order and turns duplicate keys into rejects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.records import Reject, SourceRecord
from pipeline.sample import Item, make_items
from pipeline.writer import encode_sample

Outcome = list[tuple[int, Any]]  # (position in chunk, Encoded | Reject)


@dataclass
class Encoded:
    """An accepted input: its samples' tar members and what de-duplication compares."""

    members: list[list[tuple[str, bytes]]]
    """Per sample, ``[(member name, bytes)]``."""
    kind: str
    """Pair kind (intra | cross): only inputs of one kind are compared."""
    hashes: list[str]
    """Perceptual hashes (hex) of the target (and, for cross pairs, the reference's source image)."""
    source: str
    id: str
    thumbs: list[str] = field(default_factory=list)
    """The de-duplication's second check: 8×8 RGB thumbnails (hex) of the same images, when enabled."""


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


def batch_outcome(items: list[Item], positions: list[int], jpeg_quality: int = 95,
                  hash_size: int | None = 8, thumbs: bool = False) -> Outcome:
    """Encodes a processed batch: each item becomes ``Encoded`` (tar members + perceptual hashes,
    none when ``hash_size`` is None) or a Reject."""
    from pipeline.dedup import image_hash, image_thumb

    out: Outcome = []
    for pos, item in zip(positions, items):
        if item.reject is not None:
            out.append((pos, item.reject))
        elif not item.samples:
            out.append((pos, Reject(source=item.record.source, id=item.record.id, stage="pair",
                                    reason="no sample produced")))
        else:
            try:
                members = [encode_sample(s, jpeg_quality) for s in item.samples]
                hashes, thumb = [], []
                views = [v for v in (item.target, item.reference) if v is not None]
                if hash_size is not None:
                    hashes = [image_hash(v.image, hash_size) for v in views]
                    thumb = [image_thumb(v.image) for v in views] if thumbs else []
                out.append((pos, Encoded(members, item.record.pair, hashes, item.record.source, item.record.id,
                                         thumb)))
            except Exception as e:
                out.append((pos, Reject(source=item.record.source, id=item.record.id, stage="write",
                                        reason=f"cannot encode the sample: {type(e).__name__}: {e}")))
    for item in items:  # free pixels early
        item.target = item.reference = item.ref_image = item.pixels = item.twin = None
        item.samples = []
    return out


def assemble(part: list[SourceRecord | Reject], outcome: Outcome
             ) -> tuple[list[list[tuple[str, bytes]]], list[Reject], dict[str, list]]:
    """Input-ordered ``(encoded samples, rejects, ledger)`` of a chunk from all of its outcomes (the
    ledger: see ``pipeline.writer.Ledger``)."""
    if sorted(pos for pos, _ in outcome) != list(range(len(part))):
        raise RuntimeError("chunk outcome does not account for every input exactly once")
    encoded, rejects, seen = [], [], set()
    ledger: dict[str, list] = {"rejected": [], "accepted": []}
    for pos, x in sorted(outcome, key=lambda t: t[0]):
        if not isinstance(x, Reject):
            keys = [m[0][0].split(".", 1)[0] for m in x.members]
            if any(k in seen for k in keys):  # a source repeating an id must not repeat a key
                r = part[pos]
                x = Reject(source=r.source, id=r.id, stage="write",
                           reason=f"duplicate sample key {keys[0]} (the source repeats this id)")
        if isinstance(x, Reject):
            rejects.append(x)
            ledger["rejected"].append([pos, x.to_json()])
        else:
            seen.update(keys)
            encoded.extend(x.members)
            ledger["accepted"].append([pos, keys[0], x.kind, x.hashes, x.source, x.id, x.thumbs])
    return encoded, rejects, ledger


def process_chunk(part: list[SourceRecord | Reject], start: int, stages: list, batch_size: int,
                  jpeg_quality: int = 95, timings: dict[str, float] | None = None, hash_size: int | None = 8,
                  thumbs: bool = False) -> tuple[list[list[tuple[str, bytes]]], list[Reject], dict[str, list]]:
    """Runs one chunk's records through ``stages`` in batches of ``batch_size``; returns
    ``(encoded samples, rejects, ledger)`` in input order. Samples are encoded right after their batch, so
    decoded pixels never pile up for a whole chunk. The batches are ``plan_chunk``'s, exactly as
    the Ray executor forms them."""
    from pipeline.stages import run_stages  # the stages' model code loads only where chunks are built

    outcome, tasks = plan_chunk(-1, part, start, batch_size)
    for task in tasks:
        items = run_stages(task.items, stages, timings)
        outcome.extend(batch_outcome(items, task.positions, jpeg_quality, hash_size, thumbs))
    return assemble(part, outcome)
