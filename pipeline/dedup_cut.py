"""How one dedup reducer cuts its big buckets (``pipeline.dedup``): by thumbnail, all buckets at once,
and by the pHash bits a bucket's members do not share, one bucket at a time — so no bucket compares
thousands of members whatever the skew of the data (BENCHMARKS.md, "Ten-million scale"). Also the bucket
keys' building blocks both modules use."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SPLIT_ABOVE = 64
"""A bucket with more members is split into sub-buckets (module docstring)."""
SPLIT_MIN_BITS = 8
"""A bucket is split only when each sub-band gets at least this many bits (else it cannot shrink)."""
SPLIT_PROBE = 512
"""Members of a larger bucket whose sub-bands are tried first: when they show the bucket alike on every cut
(a cluster of copies), the whole bucket is not (its bits are read once per member)."""
MAX_SPLIT_DEPTH = 4
"""Splits nested at most this deep; a bucket still larger is compared whole."""
THUMB_SPLIT_ABOVE = 16
"""A bucket with more members is split by thumbnail when the second check is on (cheap: all at once)."""
THUMB_CELL_WIDE = 4
"""Thumbnail split cells span this many times ``max_thumb_diff + 1`` levels (wider cells: fewer guests)."""
THUMB_CUT_VALUES = 3
"""Thumbnail values a bucket is cut by at once (a grid over them: fewer rounds of splitting)."""
THUMB_SAMPLE = 8
"""Members of a bucket whose thumbnails choose the values it is cut by (those of largest range among them)."""
THUMB_BLOCK = 1 << 12
"""Buckets whose sampled values are held at once (``THUMB_SAMPLE`` × ``THUMB_VARIED`` bytes each)."""
MAX_ROUNDS = 8
"""Rounds of splitting at most (the hash split, a loop over buckets, only in the first ``MAX_SPLIT_DEPTH``)."""
THUMB_VARIED = 64
"""Thumbnail values a cut chooses from (those that vary most: ``varied_values``)."""
THUMB_RANK_SAMPLE = 4096
"""Rows whose thumbnails rank the values by variance."""


def band_columns(columns: np.ndarray, n: int) -> list[np.ndarray]:
    """``columns`` dealt into ``n`` non-empty bands, one column to each in turn (the first ones one column
    wider). Any partition keeps the pigeonhole; dealing mixes pHash's frequencies into every band: its
    bits are DCT signs, low frequencies first, and consecutive ones (an object's position and size) are
    alike across objects on white — consecutive bands put 10^5 such inputs in buckets of up to 1,052,
    dealt ones in buckets of up to 47, with a 34 times smaller sum of squared bucket sizes (BENCHMARKS.md,
    #34)."""
    return [columns[b::n] for b in range(n)]


_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def mix(h: np.ndarray, v: np.ndarray | int) -> np.ndarray:
    """splitmix64 of ``h ^ v``: a stable 64-bit bucket key (collisions only cost extra comparisons)."""
    with np.errstate(over="ignore"):
        z = (np.asarray(h, np.uint64) ^ np.asarray(v, np.uint64)) + _GOLD
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def bits_of(words: np.ndarray, bits: int) -> np.ndarray:
    """(n, bits) 0/1 of the target hash (the first ``words_per_hash`` words), most significant first."""
    w = (bits + 63) // 64
    raw = np.ascontiguousarray(words[:, :w].astype(">u8")).view(np.uint8).reshape(len(words), 8 * w)
    return np.unpackbits(raw, axis=1)[:, 64 * w - bits :]


def value_key(bitmat: np.ndarray) -> np.ndarray:
    """A uint64 per row from its 0/1 columns: up to 64 columns, their value (the last column the lowest
    bit, so the low bits vary); beyond, a hash of them."""
    if bitmat.shape[1] <= 64:
        value = np.zeros(len(bitmat), np.uint64)
        packed = np.packbits(bitmat, axis=1)
        for byte in range(packed.shape[1]):
            value = (value << np.uint64(8)) | packed[:, byte]
        return value >> np.uint64(-bitmat.shape[1] % 8)
    packed = np.packbits(bitmat, axis=1)
    pad = (-packed.shape[1]) % 8
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    chunks = np.ascontiguousarray(packed).view(">u8").astype(np.uint64)
    key = chunks[:, 0]
    for c in range(1, chunks.shape[1]):
        key = mix(key, chunks[:, c])
    return key


def varied_columns(thumbs: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` thumbnail columns (ascending) whose values vary most over a sample of rows: where
    thumbnails of different images differ (on objects on white: where the objects are), so they cut
    buckets and reject pairs best."""
    sample = thumbs[np.linspace(0, len(thumbs) - 1, min(len(thumbs), THUMB_RANK_SAMPLE)).astype(np.int64)]
    ranked = np.argsort(-sample.astype(np.float32).var(axis=0), kind="stable")
    return np.sort(ranked[:count])


def varied_values(thumbs: np.ndarray, count: int) -> np.ndarray:
    """A contiguous ``(n, count)`` copy of the ``varied_columns``: a fraction of the bytes of whole thumbnails."""
    return np.take(thumbs, varied_columns(thumbs, count), axis=1)  # take: several times faster than indexing


# a split's result: rows, keys and specs of the sub-buckets replacing the buckets it cut, and per input
# position whether its bucket stays whole (no cut leaves fewer pairs)
Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def select(mask: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """``a[mask]`` of each of ``arrays``, the positions found once: indexing by a mask that is neither
    sparse nor dense costs several times as much (a mispredicted branch per element)."""
    at = np.flatnonzero(mask)
    return tuple(np.take(a, at, axis=0) for a in arrays)


SCRAMBLE = np.uint64(0x9E3779B97F4A7C15)
"""Odd: multiplying a uint64 by it is a bijection that spreads every bit of a key into the top ones."""


def group_order(keys: np.ndarray) -> np.ndarray:
    """An order of uint64 ``keys`` that makes equal ones contiguous (ascending): stable radix sorts of 16
    bits each, least significant first, over the 16-bit digits that are not the same in every key (the
    keys of one band differ only in its value's bits). About twice as fast as a comparison sort of 10^5
    keys, and the bucket loops sort little else."""
    varying = int(np.bitwise_or.reduce(keys ^ keys[0])) if len(keys) else 0
    order = np.arange(len(keys))
    for shift in range(0, 64, 16):
        if varying >> shift & 0xFFFF:
            digit = (np.take(keys, order) >> np.uint64(shift)).astype(np.uint16)  # the cast keeps 16 bits
            order = np.take(order, np.argsort(digit, kind="stable"))
    return order


def runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of each run of equal values in ``keys`` (equal values contiguous)."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return starts, np.diff(np.r_[starts, len(keys)])


def _split(
    words: np.ndarray,
    rows: np.ndarray,
    keys: np.ndarray,
    spec: np.ndarray,
    masks: list[np.ndarray],
    max_distance: int,
    hash_size: int,
) -> Split:
    """The hash split of every bucket (``rows``/``keys``/``spec`` with equal keys contiguous; ``masks[spec]``: the
    bit columns a bucket's members share): its members go into ``max_distance + 1`` sub-bands of the
    bits they do not all share (a near pair agrees exactly on one of them), when that leaves fewer
    pairs to compare; ``masks`` grows by the new specs. One bucket at a time, so only for buckets
    above ``SPLIT_ABOVE``."""
    bits = hash_size * hash_size
    out_rows, out_keys, out_spec = [], [], []
    whole = np.ones(len(keys), bool)
    starts, sizes = runs(keys)
    for s, t in zip(starts, starts + sizes):
        members = rows[s:t]
        if t - s > SPLIT_PROBE:  # a cluster shows itself in a sample: no need to read every member's bits
            probe = members[np.linspace(0, t - s - 1, SPLIT_PROBE).astype(np.int64)]
            if _sub_bands(bits_of(words[probe], bits), masks[spec[s]], max_distance) is None:
                continue
        bitmat = bits_of(words[members], bits)
        found = _sub_bands(bitmat, masks[spec[s]], max_distance)
        if found is None:
            continue  # alike on every cut (a cluster of near copies), or too few bits to cut: compared whole
        whole[s:t] = False
        for q, (sub, value) in enumerate(found):
            masks.append(sub)
            out_rows.append(members)
            out_keys.append(mix(mix(mix(keys[s:t], 0), q + 1), value))
            out_spec.append(np.full(t - s, len(masks) - 1, np.int64))
    if not out_rows:
        return rows[:0], keys[:0], spec[:0], whole
    return np.concatenate(out_rows), np.concatenate(out_keys), np.concatenate(out_spec), whole


def _sub_bands(bitmat: np.ndarray, shared: np.ndarray, max_distance: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The ``max_distance + 1`` sub-bands of the bits that the members (rows of ``bitmat``) do not all share
    (``shared``: the bit columns they share already), as (the mask of a sub-bucket, each member's value in
    it), when cutting by them leaves fewer pairs to compare; else None."""
    mask = shared | (bitmat == bitmat[0]).all(axis=0)  # bits every member has alike add no distance
    free = np.flatnonzero(~mask)
    if len(free) < SPLIT_MIN_BITS * (max_distance + 1):  # narrower sub-bands would not spread the members
        return None
    found = []
    pairs = 0
    for cols in band_columns(free, max_distance + 1):
        sub = mask.copy()
        sub[cols] = True
        value = value_key(bitmat[:, cols])
        found.append((sub, value))
        pairs += int((np.unique(value, return_counts=True)[1].astype(np.int64) ** 2).sum())
    return found if pairs < len(bitmat) ** 2 else None


def _thumb_split(
    thumbs: np.ndarray,
    varied: np.ndarray,
    rows: np.ndarray,
    keys: np.ndarray,
    spec: np.ndarray,
    max_thumb_diff: float,
) -> Split:
    """Every bucket (equal ``keys`` contiguous) cut by the ``THUMB_CUT_VALUES`` thumbnail values that vary
    most among its members (of the ``varied`` columns of ``thumbs``), all buckets at once: a near pair differs in each by at
    most ``max_thumb_diff``, so in each it either shares a cell of a grid ``THUMB_CELL_WIDE`` times wider,
    or straddles an edge, and then the upper member lies within ``max_thumb_diff`` of its cell's lower
    edge — such a member is also a guest of the cell below (in that value, and in every combination of
    such values), where the pair meets. A bucket is replaced by its cells only when they leave fewer pairs
    to compare (a cluster of near copies stays whole). Objects on white are alike on every pHash band but
    not in their thumbnails: this keeps their buckets small without a loop over buckets, and a cut
    copies only the members near an edge (a quarter per value), not all of them (BENCHMARKS.md, #34).
    The cells come out grouped: a stable radix sort by cell code keeps each bucket's members of a cell
    together."""
    starts, sizes = runs(keys)
    bucket = np.repeat(np.arange(len(starts)), sizes)
    cut = min(THUMB_CUT_VALUES, len(varied))
    # the values of largest range among THUMB_SAMPLE members spread through each bucket
    sample = starts[:, None] + (np.arange(THUMB_SAMPLE)[None, :] * sizes[:, None]) // THUMB_SAMPLE
    columns = np.empty((len(starts), cut), np.int64)
    for b in range(0, len(starts), THUMB_BLOCK):
        members = np.take(rows, sample[b : b + THUMB_BLOCK].reshape(-1))
        block = np.take(np.take(thumbs, members, axis=0), varied, axis=1).reshape(-1, THUMB_SAMPLE, len(varied))
        spread = (block.max(axis=1) - block.min(axis=1)).astype(np.int16)  # (buckets, values)
        columns[b : b + THUMB_BLOCK] = varied[np.argpartition(-spread, cut - 1, axis=1)[:, :cut]]
    width = min(THUMB_CELL_WIDE * (int(max_thumb_diff) + 1), 256)
    per = 255 // width + 1  # cells per value
    level = np.arange(256)
    cell_of = (level // width).astype(np.int64)  # by table: no division per member
    guest_of = (level % width <= int(max_thumb_diff)) & (cell_of > 0)
    place = rows * thumbs.shape[1]
    flat, code, guest = np.ravel(thumbs), np.zeros(len(rows), np.int64), []
    for d in range(cut):
        value = flat[place + columns[:, d][bucket]]
        code += cell_of[value] * per**d
        guest.append(guest_of[value])
    # a member is in its cell, and a guest of the cell one lower in every combination of the values where
    # it lies near its cell's lower edge: (member, combination) pairs in member order
    combos = 1 << cut
    lower = np.array([sum(per**d for d in range(cut) if c >> d & 1) for c in range(combos)], np.int64)
    within = np.ones((len(rows), combos), bool)
    for c in range(1, combos):
        within[:, c] = np.logical_and.reduce([guest[d] for d in range(cut) if c >> d & 1])
    member, combo = np.divmod(np.flatnonzero(within), combos)
    cell = code[member] - lower[combo]
    # a stable sort by cell (a radix sort of small integers) leaves each bucket's members of a cell together
    order = np.argsort(cell.astype(np.uint8 if per**cut <= 256 else np.uint16), kind="stable")
    member, cell = member[order], cell[order]
    parent = bucket[member]
    group_start = np.flatnonzero(np.r_[True, (cell[1:] != cell[:-1]) | (parent[1:] != parent[:-1])])
    run_len = np.diff(np.r_[group_start, len(member)])
    pairs = np.bincount(parent[group_start], weights=run_len.astype(np.float64) ** 2, minlength=len(starts))
    whole = (pairs >= sizes.astype(np.float64) ** 2)[bucket]
    moved = ~whole[member]
    member, cell = member[moved], cell[moved]
    base = mix(keys, 0xD1B54A32D192ED03)  # scrambled first: parents differing in low bits stay apart
    return rows[member], mix(base[member], cell), spec[member], whole


def split_buckets(
    words: np.ndarray,
    rows: np.ndarray,
    keys: np.ndarray,
    spec: np.ndarray,
    masks: list[np.ndarray],
    max_distance: int,
    hash_size: int,
    max_thumb_diff: float | None,
    varied: Callable[[], tuple[np.ndarray, np.ndarray]] | None,
    sizes: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rounds of splitting (equal ``keys`` contiguous). With thumbnails, each round cuts every bucket above
    ``THUMB_SPLIT_ABOVE`` by thumbnail (vectorised); the hash split (a loop over buckets, ``max_distance
    + 1`` rows per row) takes what that leaves whole above ``SPLIT_ABOVE``, in the first
    ``MAX_SPLIT_DEPTH`` rounds. Buckets small enough, or that no cut shrinks, are set aside. ``varied``
    (None without thumbnails) gives the thumbnails and the columns cuts choose from; it is called only when
    a bucket needs a cut. ``sizes``: the bucket sizes when the caller has them. Returns the final buckets as
    ``(rows, keys)`` pieces, equal keys contiguous in each (only the hash split's output is sorted): the
    buckets no cut touched (most of them, not copied again), then the rest."""
    thumbs = varied is not None
    limit = THUMB_SPLIT_ABOVE if thumbs else SPLIT_ABOVE
    final_rows, final_keys = [], []
    sizes = runs(keys)[1] if sizes is None else sizes
    if not len(sizes) or sizes.max() <= limit:
        return [(rows, keys)]  # nothing to cut (varied inputs)
    for k in range(MAX_ROUNDS if thumbs else MAX_SPLIT_DEPTH):
        if k:
            _, sizes = runs(keys)
        small = np.repeat(sizes <= limit, sizes)
        rows_small, keys_small = select(small, rows, keys)
        final_rows.append(rows_small)
        final_keys.append(keys_small)
        rows, keys, spec = select(~small, rows, keys, spec)
        if not len(keys):
            break
        new = []
        if thumbs:  # what the thumbnail split cuts goes on; what it leaves whole is stuck
            *cut, whole = _thumb_split(*varied(), rows, keys, spec, max_thumb_diff)
            new.append(cut)
            rows, keys, spec = rows[whole], keys[whole], spec[whole]
        _, sizes = runs(keys)
        # the hash split (a loop over buckets) only where the thumbnail split could not cut
        big = np.repeat(sizes > SPLIT_ABOVE, sizes) if k < MAX_SPLIT_DEPTH else np.zeros(len(keys), bool)
        if big.any():
            sub_rows, sub_keys, sub_spec, whole = _split(
                words, rows[big], keys[big], spec[big], masks, max_distance, hash_size
            )
            order = group_order(sub_keys)
            new.append((sub_rows[order], sub_keys[order], sub_spec[order]))
            final_rows.append(rows[big][whole])
            final_keys.append(keys[big][whole])
        final_rows.append(rows[~big])
        final_keys.append(keys[~big])
        rows, keys, spec = (
            np.concatenate([c[i] for c in new]) if new else a[:0] for i, a in enumerate((rows, keys, spec))
        )
    return [
        (final_rows[0], final_keys[0]),
        (np.concatenate([*final_rows[1:], rows]), np.concatenate([*final_keys[1:], keys])),
    ]
