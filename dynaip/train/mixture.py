"""Weighted dataset mixtures: one consumer's samples drawn from several datasets by weight.

A stage whose ``data`` names weights (``{path: DIR, weight: W}``) streams a mixture instead of
the concatenation described in ``dynaip.train.data``. Per consumer c (rank × workers + worker):

    slot t = 0, 1, 2, ... picks dataset d(t) with probability W_d / sum(W), from a generator keyed
    by (seed, c, t // SCHEDULE_CHUNK) — so a slot's pick depends on nothing but its index
      └─ the slot takes the next usable sample of dataset d's own stream for consumer c: exactly
         the plain stream of ``dynaip.train.data`` over that one dataset (its own shard order,
         contiguous consumer ranges, block shuffle, per-dataset seed), which moves to its next
         epoch (new shard order, new permutation) when its range is used up, independently of
         the other datasets

Why this layout: each dataset keeps the plain stream's guarantees — within one of its epochs the
C consumers' ranges cover every sample, none twice (up to the ceil(N / C) wrap-around) — and its
sequential reads; the mixture only decides which stream the next sample comes from. Skipped or
filtered samples do not use up slots, so the emitted samples follow the weights exactly in
expectation (a binomial count per dataset; tests/test_train_mixture.py asserts it).

The consumer's position is the slot count plus every dataset's own ``WorkerPosition``; resuming
rebuilds each dataset stream from its position and the schedule from the slot, so the resumed
sequence is identical. The cost: one shuffle block of undecoded samples per dataset per loader
worker (instead of one per worker).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

from .stream import Decoded, StreamSpec, WorkerPosition

PlainStream = Callable[["StreamSpec", int, int, "WorkerPosition"], Iterator["Decoded"]]


def _rng(*key: int) -> np.random.Generator:
    """The same keyed generator as ``dynaip.train.data``'s (a list seed: every key part counts)."""
    return np.random.default_rng([int(k) for k in key])


SCHEDULE_CHUNK = 4096
"""Slots drawn per generator call; any value works, it is part of the sequence (changing it changes the order)."""


def dataset_spec(spec: StreamSpec, dataset: int) -> StreamSpec:
    """The plain stream of one dataset of the mixture, with its own seed."""
    seed = int(np.random.SeedSequence([spec.seed, dataset, 0x313]).generate_state(1)[0])
    return replace(spec, shards=[s for s in spec.shards if s.dataset == dataset], seed=seed, weights=None)


def schedule_chunk(spec: StreamSpec, consumer: int, chunk: int) -> np.ndarray:
    """Dataset index of slots ``chunk * SCHEDULE_CHUNK ...`` of one consumer."""
    assert spec.weights is not None
    w = np.asarray(spec.weights, dtype=np.float64)
    return _rng(spec.seed, consumer, chunk, 0x313C).choice(len(w), size=SCHEDULE_CHUNK, p=w / w.sum())


def mixture_samples(
    spec: StreamSpec, consumer: int, consumers: int, pos: WorkerPosition, plain: PlainStream
) -> Iterator[Decoded]:
    """Infinite usable samples of one consumer of a mixture, advancing ``pos`` in place; ``plain`` is
    ``dynaip.train.data.consumer_samples``, the one-dataset stream each dataset follows."""
    position = type(pos)
    assert spec.weights is not None
    n = len(spec.weights)
    if not pos.sources:
        pos.sources = [position() for _ in range(n)]
    pos.sources = [p if isinstance(p, position) else position(**p) for p in pos.sources]
    if len(pos.sources) != n:
        raise ValueError(
            f"data position holds {len(pos.sources)} dataset positions, the stage mixes {n} datasets; "
            "resume with the stage's data list it was saved with"
        )
    streams = [plain(dataset_spec(spec, d), consumer, consumers, pos.sources[d]) for d in range(n)]
    chunk, picks = -1, np.empty(0, dtype=np.int64)
    while True:
        if pos.slot // SCHEDULE_CHUNK != chunk:
            chunk = pos.slot // SCHEDULE_CHUNK
            picks = schedule_chunk(spec, consumer, chunk)
        sample = next(streams[int(picks[pos.slot % SCHEDULE_CHUNK])])
        pos.slot += 1
        _sum_counters(pos)
        yield sample


def _sum_counters(pos: WorkerPosition) -> None:
    """The consumer's counters = the sums of its datasets' (what the trainer logs)."""
    pos.skipped = sum(p.skipped for p in pos.sources)
    pos.filtered = sum(p.filtered for p in pos.sources)
    pos.corrupt_shards = sum(p.corrupt_shards for p in pos.sources)
    pos.dropped, pos.seen = {}, {}
    for p in pos.sources:
        for total, part in ((pos.dropped, p.dropped), (pos.seen, p.seen)):
            for k, v in part.items():
                total[k] = total.get(k, 0) + v
