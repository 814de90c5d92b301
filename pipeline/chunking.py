"""How one input chunk is cut into model batches and put back together — shared by the local and
the Ray executor, so both see identical batches and produce byte-identical shards.

A chunk is ``shards.inputs_per_shard`` consecutive reader outputs. Its reader rejects are final at
once; its records are wrapped as items and cut into batches of ``executor.batch_size`` in reader
order. Each batch runs through the stages (anywhere), then ``batch_outcome`` encodes its samples;
``assemble`` restores input order and turns duplicate keys into rejects.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

from pipeline.records import Reject, SourceRecord
from pipeline.sample import Item, make_items
from pipeline.writer import encode_sample

Outcome = list[tuple[int, Any]]  # (position in chunk, Encoded | Reject)
INPUT_STAGES = ("generate", "decode")
"""The leading stages that produce a batch's pixels; ``executor.prefetch`` runs them ahead on a thread."""


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


def plan_chunk(
    chunk: int, part: list[SourceRecord | Reject], start: int, batch_size: int
) -> tuple[Outcome, list[BatchTask]]:
    """The chunk's reader rejects (final) and its batches (to run through the stages)."""
    rejects: Outcome = [(i, r) for i, r in enumerate(part) if isinstance(r, Reject)]
    positions = [i for i, r in enumerate(part) if isinstance(r, SourceRecord)]
    items = make_items([part[i] for i in positions], start)
    tasks = [
        BatchTask(chunk, b // batch_size, positions[b : b + batch_size], items[b : b + batch_size])
        for b in range(0, len(items), batch_size)
    ]
    return rejects, tasks


def batch_outcome(
    items: list[Item], positions: list[int], jpeg_quality: int = 95, hash_size: int | None = 8, thumbs: bool = False
) -> Outcome:
    """Encodes a processed batch: each item becomes ``Encoded`` (tar members + perceptual hashes,
    none when ``hash_size`` is None) or a Reject."""
    from pipeline.dedup import image_hash, image_thumb

    out: Outcome = []
    for pos, item in zip(positions, items):
        if item.reject is not None:
            out.append((pos, item.reject))
        elif not item.samples:
            out.append(
                (pos, Reject(source=item.record.source, id=item.record.id, stage="pair", reason="no sample produced"))
            )
        else:
            try:
                members = [encode_sample(s, jpeg_quality) for s in item.samples]
                hashes, thumb = [], []
                views = [v for v in (item.target, item.reference) if v is not None]
                if hash_size is not None:
                    hashes = [image_hash(v.image, hash_size) for v in views]
                    thumb = [image_thumb(v.image) for v in views] if thumbs else []
                out.append((pos, Encoded(members, item.record.pair, hashes, item.record.source, item.record.id, thumb)))
            except Exception as e:
                out.append(
                    (
                        pos,
                        Reject(
                            source=item.record.source,
                            id=item.record.id,
                            stage="write",
                            reason=f"cannot encode the sample: {type(e).__name__}: {e}",
                        ),
                    )
                )
    for item in items:  # free pixels early
        item.target = item.reference = item.ref_image = item.pixels = item.twin = None
        item.samples = []
    return out


def assemble(
    part: list[SourceRecord | Reject], outcome: Outcome
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
                x = Reject(
                    source=r.source,
                    id=r.id,
                    stage="write",
                    reason=f"duplicate sample key {keys[0]} (the source repeats this id)",
                )
        if isinstance(x, Reject):
            rejects.append(x)
            ledger["rejected"].append([pos, x.to_json()])
        else:
            seen.update(keys)
            encoded.extend(x.members)
            ledger["accepted"].append([pos, keys[0], x.kind, x.hashes, x.source, x.id, x.thumbs])
    return encoded, rejects, ledger


def split_input_stages(stages: list) -> tuple[list, list]:
    """``(input stages, model stages)``: the leading stages named in ``INPUT_STAGES``, and the rest."""
    k = 0
    while k < len(stages) and getattr(stages[k], "name", None) in INPUT_STAGES:
        k += 1
    return stages[:k], stages[k:]


def prepared_batches(
    tasks: list[BatchTask], head: list, depth: int, timings: dict[str, float] | None
) -> Iterator[tuple[BatchTask, list[Item]]]:
    """``(task, items after the ``head`` stages)`` in task order. With ``depth`` > 0 the head runs on one
    background thread up to ``depth`` batches ahead of the batch the caller is working on (so reading
    and decoding overlap the models); the head's stage times are added to ``timings`` as usual. One
    thread only: the decode stage's open tar files and Parquet row group are not shared between threads,
    and batches are prepared in order, so the stages see exactly the calls of the plain loop."""
    from pipeline.stages import run_stages

    if depth <= 0 or not head:
        for task in tasks:
            yield task, run_stages(task.items, head, timings)
        return

    def run(task: BatchTask) -> tuple[list[Item], dict[str, float]]:
        own: dict[str, float] = {}  # merged by the caller's thread: no dict shared between threads
        return run_stages(task.items, head, own), own

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
    try:
        ahead = deque(pool.submit(run, t) for t in tasks[: depth + 1])
        for n, task in enumerate(tasks):
            items, own = ahead.popleft().result()
            if n + depth + 1 < len(tasks):
                ahead.append(pool.submit(run, tasks[n + depth + 1]))
            if timings is not None:
                for k, v in own.items():
                    timings[k] = timings.get(k, 0.0) + v
            yield task, items
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def process_chunk(
    part: list[SourceRecord | Reject],
    start: int,
    stages: list,
    batch_size: int,
    jpeg_quality: int = 95,
    timings: dict[str, float] | None = None,
    hash_size: int | None = 8,
    thumbs: bool = False,
    prefetch: int = 0,
) -> tuple[list[list[tuple[str, bytes]]], list[Reject], dict[str, list]]:
    """Runs one chunk's records through ``stages`` in batches of ``batch_size``; returns
    ``(encoded samples, rejects, ledger)`` in input order. Samples are encoded right after their batch, so
    decoded pixels never pile up for a whole chunk. The batches are ``plan_chunk``'s, exactly as
    the Ray executor forms them. ``prefetch`` > 0 prepares (reads, decodes) up to that many batches
    ahead on a thread (``prepared_batches``); the bytes written are the same."""
    from pipeline.stages import run_stages  # the stages' model code loads only where chunks are built

    outcome, tasks = plan_chunk(-1, part, start, batch_size)
    head, tail = split_input_stages(stages)
    for task, items in prepared_batches(tasks, head, prefetch, timings):
        items = run_stages(items, tail, timings)
        outcome.extend(batch_outcome(items, task.positions, jpeg_quality, hash_size, thumbs))
    return assemble(part, outcome)
