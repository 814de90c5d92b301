"""Dataset-wide near-duplicate removal — a second pass after every chunk is built.

Each accepted input carries perceptual hashes (pHash from ``imagehash``; its target's, and for a
cross pair also its reference image's) and, when ``dedup.max_thumb_diff`` is set, an 8×8 RGB
thumbnail of each of those images, in its chunk's ledger. Two accepted inputs of the same pair kind
are near-duplicates when every hash differs in at most ``dedup.max_distance`` bits and — the second,
stronger check — no value of their thumbnails differs by more than ``max_thumb_diff`` levels (pHash
is grey and coarse: it calls many distinct low-detail objects on white near copies; BENCHMARKS.md).
The copy kept is the one first in input order; every later one is rejected as ``duplicate of <key of
the earliest near copy>``, whatever the chunk or source.

Buckets: the target hash's bits are dealt into ``max_distance + 1`` bands, so two hashes within the distance
agree exactly on at least one band (pigeonhole). Bucket = (pair kind, number of hashes, band number,
band value). A bucket larger than ``THUMB_SPLIT_ABOVE`` (skewed data: objects on white share many
bits) is split again (``pipeline.dedup_cut``): with thumbnails, all big buckets at once, each by the
``THUMB_CUT_VALUES`` thumbnail values that vary most among its members (cells of a coarse grid;
members near a cell's lower edge also join the cell below, so a near pair always meets), and what
that cannot cut, above ``SPLIT_ABOVE``, one bucket at a time, the same way as the bands over the bits
its members do not already share — a near pair still agrees exactly on one of those sub-bands — so
buckets stay small at any skew. Inputs with identical hashes and thumbnails collapse onto their
earliest one before any pair is compared. Buckets go through this a block of about ``BUCKET_BLOCK``
memberships at a time — one band per block, so the map side's band-major output needs no sort to be
cut into blocks and a block's keys are sorted over its band's value bits only — so each block's arrays
stay in the processor's caches. With thumbnails, pairs are checked first by an 8-value thumbnail
summary copied into member order (compared over slices), then by pHash and whole thumbnails; a near
pair turns up in most of its bands, so the pairs that pass the summary and pHash are confirmed once,
not once per shared band (BENCHMARKS.md, "Ten-million scale").

Distributed as a shuffle by bucket: map task ``m`` reads its share of the chunks' ledgers and writes,
per reducer ``r``, the entries owning a bucket of ``r`` (``.progress/dedup/``: ``npz`` files, loaded
without pickle; ``pipeline.dedup_shuffle``); reducer ``r`` reads only those ``M`` files, compares the pairs inside its buckets
with numpy (hashes as ``uint64`` words, ``numpy.bitwise_count``) and reports, per later input, the
earliest near copy it saw. The driver takes the minimum over reducers. The answer does not depend
on ``R``, on the order of chunks or on which worker ran what.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pipeline.dedup_cut import (
    SCRAMBLE,
    THUMB_VARIED,
    band_columns,
    bits_of,
    group_order,
    mix,
    runs,
    select,
    split_buckets,
    value_key,
    varied_columns,
    varied_values,
)

Entry = tuple[int, str, str, list[int]]  # (global input index, sample key, pair kind, hashes as ints)

THUMB = 8
"""Side of the second check's thumbnail (RGB, box-averaged): 192 bytes per image."""
PAIRS_PER_STEP = 1 << 20
"""Pairs compared per numpy step (bounds the temporary arrays)."""
PENDING_PAIRS = 1 << 21
"""Pairs deferred to be confirmed once at most (``_Pairs.defer``): 8 bytes each."""
THUMB_PAIRS_PER_STEP = 1 << 12
"""Pairs whose whole thumbnails are compared per numpy step (their temporaries stay in the caches)."""
EARLIEST_FIRST_ABOVE = 64
"""Buckets with more members (clusters no cut shrinks) compare each member earliest first and stop at its
first near copy; smaller ones compare every pair at once, which costs less per pair."""
BUCKET_BLOCK = 1 << 17
"""Bucket memberships compared at once (whole buckets): the arrays of a block stay in the processor's caches."""
PREFILTER_FROM = 1 << 14
"""Memberships above which buckets of one are dropped by counting before any sort."""
PREFILTER_SLOTS = 1 << 24
"""Rows whose bucket key's low bits (at most 24, about one more than the memberships need) no other row
shares are alone in their bucket (one counting pass)."""


def image_hash(image: np.ndarray, hash_size: int = 8) -> str:
    """pHash of an ``(H, W, 3) uint8`` image as hex (``hash_size``² bits)."""
    import imagehash
    from PIL import Image

    return str(imagehash.phash(Image.fromarray(image), hash_size=hash_size))


def image_thumb(image: np.ndarray) -> str:
    """The second check's fingerprint of an ``(H, W, 3) uint8`` image: its ``THUMB``×``THUMB`` RGB
    box average (aspect ignored), as hex."""
    from PIL import Image

    small = Image.fromarray(image).convert("RGB").resize((THUMB, THUMB), Image.BOX)
    return np.asarray(small, dtype=np.uint8).tobytes().hex()


# ----------------------------------------------------------------------------- entries as arrays


@dataclass
class Entries:
    """Comparable inputs as arrays, one row each (rows in any order unless said otherwise)."""

    index: np.ndarray
    """Global input index (int64)."""
    keys: np.ndarray
    """Sample key (numpy unicode)."""
    group: np.ndarray
    """(pair kind, number of hashes) as a stable uint64: only one group's rows are compared."""
    words: np.ndarray
    """(n, hashes × W) uint64: each hash as W big-endian words (the target's first)."""
    thumbs: np.ndarray
    """(n, hashes × 192) uint8 thumbnails, or (n, 0) without the second check."""

    def __len__(self) -> int:
        return len(self.index)

    def take(self, rows: np.ndarray) -> Entries:
        # np.take copies whole rows, several times faster than indexing for the wide words and thumbnails
        return Entries(
            *(np.take(a, rows, axis=0) for a in (self.index, self.keys, self.group, self.words, self.thumbs))
        )

    @staticmethod
    def concat(parts: list[Entries]) -> Entries:
        """The rows of ``parts`` together. Map tasks pad ``words``/``thumbs`` only to their own widest row, so
        one whose chunks hold no cross pair (one hash a row) is narrower than one that does (two): narrower
        parts are padded with zeros, as ``entries_from`` pads rows (their group keeps such rows apart)."""

        def widen(a: np.ndarray, width: int) -> np.ndarray:
            return a if a.shape[1] == width else np.pad(a, ((0, 0), (0, width - a.shape[1])))

        if len(parts) == 1:
            return parts[0]
        ww, tw = max(p.words.shape[1] for p in parts), max(p.thumbs.shape[1] for p in parts)
        return Entries(
            np.concatenate([p.index for p in parts]),
            np.concatenate([p.keys for p in parts]),
            np.concatenate([p.group for p in parts]),
            np.concatenate([widen(p.words, ww) for p in parts]),
            np.concatenate([widen(p.thumbs, tw) for p in parts]),
        )


def words_per_hash(hash_size: int) -> int:
    return (hash_size * hash_size + 63) // 64


def _group_code(kind: str, hashes: int) -> int:
    return zlib.crc32(f"{kind}/{hashes}".encode())


def entries_from(
    rows: Iterable[tuple[int, str, str, list[str | int], list[str] | None]], hash_size: int, thumbs: bool
) -> Entries:
    """Arrays of ``(index, key, kind, hashes as hex or int, thumbnails as hex or None)`` rows. Rows
    with fewer hashes than the widest are padded (their group keeps them apart)."""
    w = words_per_hash(hash_size)
    index, keys, group, hs, ts = [], [], [], [], []
    for i, key, kind, hashes, th in rows:
        index.append(i)
        keys.append(key)
        group.append(_group_code(kind, len(hashes)))
        hs.append(b"".join((h if isinstance(h, int) else int(h, 16)).to_bytes(8 * w, "big") for h in hashes))
        ts.append(bytes.fromhex("".join(th)) if thumbs and th else b"")
    n = len(index)
    width = max((len(b) for b in hs), default=8 * w)
    words = np.frombuffer(b"".join(b.ljust(width, b"\0") for b in hs), dtype=">u8").reshape(n, width // 8)
    twidth = max((len(b) for b in ts), default=0)
    if thumbs and any(len(b) != 3 * THUMB * THUMB * len(h) // (8 * w) for b, h in zip(ts, hs)):
        raise ValueError(
            "an accepted input of the ledger has no thumbnail for each of its hashes; "
            "re-run the curation (the ledger predates dedup.max_thumb_diff)"
        )
    tarr = np.frombuffer(b"".join(b.ljust(twidth, b"\0") for b in ts), dtype=np.uint8).reshape(n, twidth)
    return Entries(
        np.asarray(index, np.int64),
        np.asarray(keys, dtype=str) if keys else np.zeros(0, "U1"),
        np.asarray(group, np.uint64),
        words.astype(np.uint64),
        tarr,
    )


def ledger_rows(ledger: dict[str, list], chunk: int, inputs_per_chunk: int) -> Iterable[tuple]:
    """The comparable inputs of one chunk's ledger as ``entries_from`` rows."""
    for row in ledger["accepted"]:
        pos, key, kind, hashes = row[:4]
        if hashes and pos is not None:
            yield chunk * inputs_per_chunk + pos, key, kind, hashes, (row[6] if len(row) > 6 else None)


# ----------------------------------------------------------------------------- bucket keys


def band_keys(e: Entries, max_distance: int, hash_size: int) -> np.ndarray:
    """(n, max_distance + 1) bucket keys of every row: one per band of its target hash (``band_columns``;
    a band of up to 64 bits is its exact value, a wider one is hashed down to 64 bits)."""
    bits = hash_size * hash_size
    cols = band_columns(np.arange(bits), max_distance + 1)
    out = np.empty((len(e), len(cols)), np.uint64)
    one, off = np.uint64(1), 64 * words_per_hash(hash_size) - bits  # the hash sits at the end of its words
    words = [np.ascontiguousarray(e.words[:, w]) for w in range(words_per_hash(hash_size))]
    for b, c in enumerate(cols):
        if len(c) <= 64:  # the band's bits, shifted in one by one
            value = np.zeros(len(e), np.uint64)
            for col in c + off:
                value = (value << one) | ((words[col // 64] >> np.uint64(63 - col % 64)) & one)
        else:  # wide bands (a small max_distance): hashed down to 64 bits
            value = value_key(bits_of(e.words, bits)[:, c])
        out[:, b] = mix(e.group, b + 1) ^ value  # a random 64-bit constant per (group, band): no collisions
    return out


def owner(keys: np.ndarray, reducers: int) -> np.ndarray:
    """The reducer of each bucket key."""
    if reducers == 1:
        return np.zeros(keys.shape, np.int64)
    return (keys % np.uint64(reducers)).astype(np.int64)


# ----------------------------------------------------------------------------- one reducer


def _collapse(e: Entries) -> np.ndarray:
    """For rows sorted by index: the row of each one's earliest identical twin (itself when none).
    Identical rows (same group, hashes and thumbnails) are near everything the earliest is near."""
    n = len(e)
    fp = mix(e.group, 0)
    for c in range(e.words.shape[1]):
        fp = mix(fp, e.words[:, c])
    if e.thumbs.shape[1]:
        pad = e.thumbs if e.thumbs.shape[1] % 8 == 0 else np.pad(e.thumbs, ((0, 0), (0, -e.thumbs.shape[1] % 8)))
        fp = mix(fp, np.bitwise_xor.reduce(np.ascontiguousarray(pad).view(np.uint64), axis=1))
    order = group_order(fp)
    sfp = fp[order]
    starts = np.flatnonzero(np.r_[True, sfp[1:] != sfp[:-1]])
    twin = np.empty(n, np.int64)
    twin[order] = np.repeat(np.minimum.reduceat(order, starts), np.diff(np.r_[starts, n]))
    same = np.flatnonzero(twin != np.arange(n))  # a fingerprint collision is not a twin: check the data
    t = twin[same]
    real = (
        (e.group[t] == e.group[same])
        & (e.words[t] == e.words[same]).all(axis=1)
        & (e.thumbs[t] == e.thumbs[same]).all(axis=1)
    )
    twin[same[~real]] = same[~real]
    return twin


_SUM_OF_FOUR = np.uint64(0x0001000100010001)


@dataclass
class _Pairs:
    """Compares pairs of rows of ``e`` and lowers ``best[j]`` to ``i`` for each near pair ``i < j``."""

    e: Entries
    best: np.ndarray
    max_distance: int
    w: int
    max_thumb_diff: float | None
    stats: dict[str, int]

    def __post_init__(self) -> None:
        self.checked = self.max_thumb_diff is not None and self.e.thumbs.shape[1] > 0
        # values are whole levels: "differs by more than max_thumb_diff" is "by more than its floor", and an
        # integer compares bytes as bytes (a float would widen every one)
        self.level_limit = int(np.clip(np.floor(self.max_thumb_diff), -1, 255)) if self.checked else 0
        # one contiguous array per hash word: gathering 1-D columns costs a third of gathering rows
        self.columns = [np.ascontiguousarray(self.e.words[:, c]) for c in range(self.e.words.shape[1])]
        self.target = np.ascontiguousarray(self.e.words[:, : self.w])
        self._varied: np.ndarray | None = None
        self._pending: list[np.ndarray] = []
        self._pending_count = 0
        # the 8 thumbnail values that vary most, as one word per row: most pairs pHash passes (objects on
        # white) differ there, and one word is cheap to gather and to copy into member order
        self.summary = (
            varied_values(self.e.thumbs, 8).view(np.uint64).reshape(-1) if self.checked else np.zeros(0, np.uint64)
        )

    def _alike(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether two arrays of ``summary`` words are within ``max_thumb_diff`` in each of their 8 values
        (over the bytes as one flat array, and one word per pair tested: no reduction along a short axis)."""
        a, b = x.view(np.uint8), y.view(np.uint8)
        diff = np.maximum(a, b)
        diff -= np.minimum(a, b)
        return (diff > self.level_limit).view(np.uint64) == 0

    def varied(self) -> tuple[np.ndarray, np.ndarray]:
        """The thumbnails and their ``varied_columns``, ranked on first use (inputs whose buckets are small
        need none)."""
        if self._varied is None:
            self._varied = varied_columns(self.e.thumbs, THUMB_VARIED)
        return self.e.thumbs, self._varied

    def _within(self, columns: list[np.ndarray], x: np.ndarray | slice, y: np.ndarray | slice) -> np.ndarray:
        """Whether the hashes held in ``columns`` (one hash's words) at ``x`` and ``y`` are within the distance."""
        dist = None
        for c in columns:
            bits = np.bitwise_count(c[x] ^ c[y])
            dist = bits.astype(np.uint16) if dist is None else dist + bits
        return dist <= self.max_distance

    def _near_rows(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """``_within`` of the target hashes of rows ``i`` and ``j``, read a whole hash at a time: scattered
        pairs cost a cache miss per read, and a hash's words share one line."""
        x = np.take(self.target, i, axis=0)
        x ^= np.take(self.target, j, axis=0)
        counts = np.bitwise_count(x)
        if self.w == 4:  # four counts of at most 64 as one word: their sum is its top 16 bits times 1+2^16+...
            dist = (counts.astype(np.uint16).view(np.uint64)[:, 0] * _SUM_OF_FOUR) >> np.uint64(48)
        else:
            dist = counts.sum(axis=1, dtype=np.uint16)
        return dist <= self.max_distance

    def confirm(self, i: np.ndarray, j: np.ndarray, summarised: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Of the pairs of rows ``(i, j)`` whose target hashes are within the distance, the near ones: every
        other hash within it too and, when checked, every thumbnail value within ``max_thumb_diff``
        (``summarised``: the caller already checked the summary words)."""
        keep = (np.take(self.e.group, i) == np.take(self.e.group, j)) & (i != j)  # a bucket key collision
        i, j = select(keep, i, j)
        for h in range(1, len(self.columns) // self.w):
            i, j = select(self._within(self.columns[h * self.w : (h + 1) * self.w], i, j), i, j)
        if self.checked:
            # few of pHash's survivors are near copies: the summary rejects most of them, and whole
            # thumbnails are read only for those left
            if not summarised:
                i, j = select(self._alike(np.take(self.summary, i), np.take(self.summary, j)), i, j)
            keep = np.empty(len(i), bool)
            for s in range(0, len(i), THUMB_PAIRS_PER_STEP):  # temporaries that stay in the caches
                x = np.take(self.e.thumbs, i[s : s + THUMB_PAIRS_PER_STEP], axis=0)  # take: rows at a time
                y = np.take(self.e.thumbs, j[s : s + THUMB_PAIRS_PER_STEP], axis=0)
                diff = np.maximum(x, y)
                diff -= np.minimum(x, y)
                keep[s : s + THUMB_PAIRS_PER_STEP] = ~(diff > self.level_limit).any(axis=1)
            i, j = select(keep, i, j)
        return i, j

    def lower(self, i: np.ndarray, j: np.ndarray, compared: int) -> None:
        """``best`` after the near pairs ``(i, j)`` (in either order) of ``compared`` pairs."""
        self.stats["pairs_compared"] = self.stats.get("pairs_compared", 0) + compared
        np.minimum.at(self.best, np.maximum(i, j), np.minimum(i, j))

    def defer(self, i: np.ndarray, j: np.ndarray, compared: int) -> None:
        """Pairs ``(i, j)`` of ``compared`` that passed the target hash and the summary, confirmed at the next
        ``flush``: a near pair shares most bands, so it turns up in many buckets (at 10^5 objects on white,
        eight times on average), and is confirmed once."""
        self.stats["pairs_compared"] = self.stats.get("pairs_compared", 0) + compared
        n = np.uint64(len(self.best))  # one code per pair: (earlier row) × n + (later row), below n² < 2^64
        self._pending.append(np.minimum(i, j).astype(np.uint64) * n + np.maximum(i, j).astype(np.uint64))
        self._pending_count += len(i)
        if self._pending_count >= PENDING_PAIRS:
            self.flush()

    def flush(self) -> None:
        """Confirm the deferred pairs, each once, and lower ``best`` by the near ones."""
        if not self._pending:
            return
        code = np.concatenate(self._pending)
        self._pending, self._pending_count = [], 0
        code = np.take(code, group_order(code))  # radix: faster than np.unique's sort
        code = code[np.r_[True, code[1:] != code[:-1]]]
        i, j = np.divmod(code, np.uint64(len(self.best)))
        i, j = i.astype(np.int64), j.astype(np.int64)
        self.lower(*self.confirm(i, j, summarised=True), 0)

    def compare(self, i: np.ndarray, j: np.ndarray) -> None:
        """Pairs of rows in either order."""
        for s in range(0, len(i), PAIRS_PER_STEP):
            a, b = i[s : s + PAIRS_PER_STEP], j[s : s + PAIRS_PER_STEP]
            k = self._within(self.columns[: self.w], a, b)
            self.lower(*self.confirm(a[k], b[k]), len(a))

    def every_pair(self, rows: np.ndarray, keys: np.ndarray) -> None:
        """Every pair inside one bucket (equal ``keys`` contiguous), all buckets at once: the pairs of
        positions ``(p, p + d)`` for d = 1, 2, ... (the small buckets). The target hash and the thumbnail
        summary are copied into member order, so a pair reads two nearby places. Positions are ordered by
        how many partners follow them in their bucket, most first, so those with a partner ``d`` further
        are a prefix of that order (no search per ``d``); while they are most positions, the first check
        runs over whole slices (no gather). With thumbnails the first check is the summary: one word, and
        it rejects more pairs than pHash's four; pHash and whole thumbnails follow for what it passes."""
        n = len(rows)
        # the first check's words in member order: the summary with thumbnails (pHash is then read only for
        # the pairs it passes, at their rows), else the target hash
        summary = np.take(self.summary, rows) if self.checked else None
        columns = [] if self.checked else [np.take(c, rows) for c in self.columns[: self.w]]
        starts, sizes = runs(keys)
        after = np.repeat(starts + sizes, sizes) - 1 - np.arange(n)  # partners after each position
        most = int(after.max(initial=0))
        order = np.argsort((most - after).astype(np.uint8 if most < 256 else np.int64), kind="stable")
        with_partner = n - np.cumsum(np.bincount(after, minlength=most + 1))  # [d - 1]: positions with d after
        for d in range(1, most + 1):
            at = order[: with_partner[d - 1]]
            dense = 2 * len(at) >= n - d
            if dense:
                first = self._first_check(columns, summary, slice(0, n - d), slice(d, n))
            for s in range(0, len(at), PAIRS_PER_STEP):
                a = at[s : s + PAIRS_PER_STEP]
                near = first[a] if dense else self._first_check(columns, summary, a, a + d)
                p = np.compress(near, a)
                i, j = np.take(rows, p), np.take(rows, p + d)
                if summary is not None:
                    i, j = select(self._near_rows(i, j), i, j)
                self.defer(i, j, len(a))

    def _first_check(
        self, columns: list[np.ndarray], summary: np.ndarray | None, x: np.ndarray | slice, y: np.ndarray | slice
    ) -> np.ndarray:
        """``every_pair``'s first check of the pairs of member positions ``(x, y)``: the summary words when
        thumbnails are checked, else the target hash."""
        return self._alike(summary[x], summary[y]) if summary is not None else self._within(columns, x, y)

    def earliest_near(self, rows: np.ndarray, keys: np.ndarray) -> None:
        """The large buckets (equal ``keys`` contiguous), which no cut could shrink: each member is compared with the
        members before it in row order, earliest first, all buckets at once, and stops at its first near
        copy, or as soon as the next candidate is no earlier than the copy ``best`` already holds. A
        cluster of m mutual near copies costs about m comparisons instead of m²/2, and a member whose
        earliest copy another bucket already found skips the rest (BENCHMARKS.md, #34).

        Candidates come in rounds of k per member, k doubling while the members left are few (at most
        ``PAIRS_PER_STEP`` pairs a round): a member near nothing in a bucket of m — a distinct input whose
        band value a cluster of copies shares by chance — takes log₂ m rounds, not m, and one that stops
        at candidate t has compared fewer than 2t + 1."""
        order = np.lexsort((rows, keys))  # within a bucket, rows ascend
        rows, keys = rows[order], keys[order]
        starts, sizes = runs(keys)
        start = np.repeat(starts, sizes)
        active = np.flatnonzero(np.arange(len(rows)) > start)  # positions with an earlier member in their bucket
        first = start[active]  # each active member's next candidate
        k = 1
        while len(active):
            # an earlier candidate could still beat the copy found so far (rows ascend: else none can)
            alive = np.take(rows, first) < np.take(self.best, np.take(rows, active))
            active, first = select(alive, active, first)
            if not len(active):
                break
            span = np.minimum(active - first, k)
            ends = np.cumsum(span)
            cand = np.repeat(first - ends + span, span) + np.arange(int(ends[-1]))
            self.compare(np.take(rows, cand), np.take(rows, np.repeat(active, span)))
            first = first + span
            active, first = select(first < active, active, first)
            k = min(2 * k, max(1, PAIRS_PER_STEP // max(len(active), 1)))


def _note_largest(stats: dict[str, int], name: str, sizes: np.ndarray) -> None:
    """``stats[name]``: the largest of the bucket ``sizes`` so far."""
    stats[name] = max(stats.get(name, 0), int(sizes.max(initial=0)))


def _compare_block(
    pairs: _Pairs,
    rows: np.ndarray,
    keys: np.ndarray,
    band: np.ndarray,
    rep: np.ndarray,
    masks: list[np.ndarray],
    hash_size: int,
) -> None:
    """Every near pair inside the buckets of ``(rows, keys, band)`` (whole buckets) into ``pairs``, of the
    rows ``rep`` marks (the earliest of identical ones)."""
    order = group_order(keys)  # members of a bucket in any order: each pair is compared as (min, max)
    keys, rows = np.take(keys, order), np.take(rows, order)
    same = keys[1:] == keys[:-1]
    keep = (np.r_[same, False] | np.r_[False, same]) & np.take(rep, rows)  # a bucket of one compares nothing
    order, keys, rows = select(keep, order, keys, rows)
    spec = np.take(band, order).astype(np.int64)
    _, sizes = runs(keys)
    _note_largest(pairs.stats, "largest_bucket", sizes)
    varied = pairs.varied if pairs.checked else None
    pieces = split_buckets(
        pairs.e.words, rows, keys, spec, masks, pairs.max_distance, hash_size, pairs.max_thumb_diff, varied, sizes
    )
    for rows, keys in pieces:
        sizes = sizes if len(pieces) == 1 else runs(keys)[1]
        _note_largest(pairs.stats, "largest_compared", sizes)
        if not (sizes > EARLIEST_FIRST_ABOVE).any():
            pairs.every_pair(rows, keys)
            continue
        large = np.repeat(sizes > EARLIEST_FIRST_ABOVE, sizes)
        pairs.every_pair(*select(~large, rows, keys))
        pairs.flush()  # the earliest-first loop stops at the copies ``best`` already holds
        pairs.earliest_near(*select(large, rows, keys))


def _not_alone(keys: np.ndarray) -> np.ndarray:
    """Whether each key may share its bucket: no other key has its low bits (about one more than the keys
    need, so that the counts of a block stay in the processor's caches) — a cheap pass before any sort."""
    slots = min(PREFILTER_SLOTS, 1 << (2 * len(keys) - 1).bit_length())
    low = (keys & np.uint64(slots - 1)).astype(np.int64)
    return np.bincount(low, minlength=slots)[low] > 1


def reduce_entries(
    e: Entries,
    rows: np.ndarray,
    keys: np.ndarray,
    band: np.ndarray,
    max_distance: int,
    hash_size: int,
    max_thumb_diff: float | None = None,
    stats: dict[str, int] | None = None,
) -> np.ndarray:
    """One reducer: ``e`` sorted by index, ``(rows, keys, band)`` the (row, bucket, band number)
    triples it owns. Returns per row the row of its earliest near copy in these buckets, or -1.
    ``stats`` (optional) gets ``largest_bucket`` (before splitting), ``largest_compared`` (after) and
    ``pairs_compared``, each the maximum / sum with what it already holds."""
    stats = {} if stats is None else stats
    n, w = len(e), words_per_hash(hash_size)
    best = np.full(n, n, np.int64)
    if n == 0:
        return best - n - 1
    # buckets are compared a block of them at a time (a bucket's members all in one block: by band, then by
    # a hash of the key), so that a block's arrays stay in the processor's caches; the keys of a band
    # differ only in the bits of its value (one group), which is all a block's sort then reads
    bounds = np.array([0, len(keys)])
    order = None
    bands = max_distance + 1
    per = min(-(-len(keys) // (bands * BUCKET_BLOCK)), (1 << 16) // bands)  # blocks per band
    if len(keys) > BUCKET_BLOCK and per == 1 and (band[1:] >= band[:-1]).all():  # band-major (``partition``)
        bounds = np.r_[0, np.cumsum(np.bincount(band, minlength=bands))]
    elif len(keys) > BUCKET_BLOCK:
        with np.errstate(over="ignore"):  # multiply-shift: the key's top 16 bits, scrambled, scaled to per
            sub = (((keys * SCRAMBLE) >> np.uint64(48)) * np.uint64(per)) >> np.uint64(16)
        block = (band.astype(np.uint64) * np.uint64(per) + sub).astype(np.uint16)
        order = np.argsort(block, kind="stable")  # a radix sort
        keys = np.take(keys, order)
        bounds = np.r_[0, np.cumsum(np.bincount(block, minlength=bands * per))]
    if len(keys) > PREFILTER_FROM:  # most buckets may hold one row: drop those before sorting
        maybe = [_not_alone(keys[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
        bounds = np.r_[0, np.cumsum([int(m.sum()) for m in maybe])]
        at = np.flatnonzero(np.concatenate(maybe))
        keys, order = np.take(keys, at), at if order is None else np.take(order, at)
    if order is not None:  # rows and bands follow: only the memberships kept are moved
        rows, band = np.take(rows, order), np.take(band, order)
    # identical rows share every bucket: only the earliest of each is compared (``_compare_block``), the
    # others take its answer below. Over every row: a pass in place costs less than copying those in buckets
    twin = _collapse(e) if len(rows) else np.arange(n)
    rep = twin == np.arange(n)
    bits = hash_size * hash_size
    masks = []
    for cols in band_columns(np.arange(bits), max_distance + 1):
        masks.append(np.zeros(bits, bool))
        masks[-1][cols] = True
    pairs = _Pairs(e, best, max_distance, w, max_thumb_diff, stats)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi - lo < 2:
            continue  # no bucket of two
        _compare_block(pairs, rows[lo:hi], keys[lo:hi], band[lo:hi], rep, masks, hash_size)
    pairs.flush()
    # twins: the earliest twin, or an earlier copy of it
    has = best < n
    out = np.where(has, best, -1)
    later = ~rep
    out[later] = np.where(has[twin[later]], np.minimum(best[twin[later]], twin[later]), twin[later])
    return out


# ----------------------------------------------------------------------------- shuffle by bucket


def partition(e: Entries, max_distance: int, hash_size: int, reducers: int) -> list[dict[str, np.ndarray]]:
    """Map side: per reducer, the rows owning one of its buckets and their (row, bucket key) pairs."""
    keys = band_keys(e, max_distance, hash_size)
    own = owner(keys, reducers)
    out = []
    for r in range(reducers):
        # band-major (a band's memberships together, rows ascending within it): the reducer's blocks of
        # buckets go by band, and need no sort to be found
        if reducers == 1:
            cc, rr = np.divmod(np.arange(keys.size), len(e))
        else:
            cc, rr = np.nonzero((own == r).T)
        present = np.zeros(len(e), bool)
        present[rr] = True
        rows = np.flatnonzero(present)
        local = (np.cumsum(present) - 1)[rr]
        part = e if len(rows) == len(e) else e.take(rows)
        out.append(
            {
                "index": part.index,
                "keys": part.keys,
                "group": part.group,
                "words": part.words,
                "thumbs": part.thumbs,
                "pair_row": local.astype(np.int64),
                "pair_key": np.ravel(keys, order="F") if reducers == 1 else keys[rr, cc],
                "pair_band": cc.astype(np.int16),
            }
        )
    return out


def reduce_parts(
    parts: list[dict[str, np.ndarray]],
    max_distance: int,
    hash_size: int,
    max_thumb_diff: float | None = None,
    stats: dict[str, int] | None = None,
) -> dict[int, tuple[int, str, str]]:
    """Reduce side over the map outputs for one reducer: ``index → (earliest index, its key, own key)``."""
    parts = [p for p in parts if len(p["index"])]
    if not parts:
        return {}
    offsets = np.cumsum([0] + [len(p["index"]) for p in parts[:-1]])
    e = Entries.concat([Entries(p["index"], p["keys"], p["group"], p["words"], p["thumbs"]) for p in parts])
    rows = np.concatenate([p["pair_row"] + o for p, o in zip(parts, offsets)])
    keys = np.concatenate([p["pair_key"] for p in parts])
    band = np.concatenate([p["pair_band"] for p in parts])
    if (np.diff(e.index) < 0).any():  # rows in input order (ledgers are read in chunk order: usually already)
        order = np.argsort(e.index, kind="stable")
        e = e.take(order)
        rows = np.argsort(order)[rows]
    found = reduce_entries(e, rows, keys, band, max_distance, hash_size, max_thumb_diff, stats)
    hit = np.flatnonzero(found >= 0)
    return {int(e.index[j]): (int(e.index[found[j]]), str(e.keys[found[j]]), str(e.keys[j])) for j in hit}


def dedup_arrays(
    e: Entries,
    max_distance: int,
    hash_size: int,
    reducers: int = 1,
    max_thumb_diff: float | None = None,
    stats: dict[str, int] | None = None,
) -> dict[int, tuple[int, str, str]]:
    """The whole pass in one process (every reducer in turn), merged like ``plan`` does."""
    best: dict[int, tuple[int, str, str]] = {}
    for part in partition(e, max_distance, hash_size, reducers):
        for j, v in reduce_parts([part], max_distance, hash_size, max_thumb_diff, stats).items():
            if j not in best or v[0] < best[j][0]:
                best[j] = v
    return best


def reduce_buckets(
    entries: Iterable[Entry],
    max_distance: int,
    hash_size: int,
    reducer: int = 0,
    reducers: int = 1,
    max_thumb_diff: float | None = None,
) -> dict[int, tuple[int, str]]:
    """Reducer ``reducer`` of ``reducers`` over in-memory entries: for each input that has an earlier
    near copy in one of this reducer's buckets, ``index → (index, key)`` of the earliest such copy."""
    e = entries_from(((i, k, kind, h, None) for i, k, kind, h in entries), hash_size, False)
    part = partition(e, max_distance, hash_size, reducers)[reducer]
    return {j: (i, key) for j, (i, key, _) in reduce_parts([part], max_distance, hash_size, max_thumb_diff).items()}
