"""The numpy de-duplication pass against its definition, its shuffle by bucket, the thumbnail check,
the writer's part-wise duplicate removal and the reader's one-read-per-shard stream — all in process."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import dedup, dedup_cut, dedup_shuffle


def earliest_copies(entries, max_distance, thumbs=None, max_diff=None) -> dict[int, str]:
    """The definition, pair by pair: per input, the earliest earlier input of its pair kind whose every
    hash is within ``max_distance`` bits (and, with ``max_diff``, every thumbnail value within it)."""
    out = {}
    ordered = sorted(range(len(entries)), key=lambda k: entries[k][0])
    for b, j in enumerate(ordered):
        for i in ordered[:b]:
            (_, ki, gi, hi), (ij, _, gj, hj) = entries[i], entries[j]
            if gi != gj or len(hi) != len(hj) or any((x ^ y).bit_count() > max_distance for x, y in zip(hi, hj)):
                continue
            if max_diff is not None:
                a, c = (np.frombuffer(bytes.fromhex("".join(thumbs[k])), np.uint8).astype(int) for k in (i, j))
                if np.abs(a - c).max() > max_diff:
                    continue
            out[ij] = ki
            break
    return out


def skewed(rng, n, bits, max_distance):
    """``n`` inputs like objects on white: most share every bit of the first quarter of the bands (one
    huge bucket per band there, far above SPLIT_ABOVE), a third are variants of an earlier input (near or
    just past the distance), every fifth a cross pair."""
    rand = lambda: int.from_bytes(rng.bytes(bits // 8), "big")
    shared = np.concatenate(dedup_cut.band_columns(np.arange(bits), max_distance + 1)[: (max_distance + 1 + 3) // 4])
    common, mask = rand(), sum(1 << (bits - 1 - int(c)) for c in shared)  # column 0: the highest bit
    entries = []
    for k in range(n):
        if k > 10 and rng.random() < 0.3:
            h = entries[int(rng.integers(k))][3][0]
            for b in rng.choice(bits, int(rng.integers(0, max_distance + 3)), replace=False):
                h ^= 1 << int(b)
        else:
            h = rand()
            h = (h & ~mask) | (common & mask) if rng.random() < 0.7 else h
        kind = "intra" if k % 5 else "cross"
        entries.append((3 * k + 1, f"k{k}", kind, [h] if kind == "intra" else [h, common ^ int(rng.integers(2))]))
    return entries


def merged(entries, max_distance, hash_size, reducers):
    out: dict = {}
    for r in range(reducers):
        for j, v in dedup.reduce_buckets(entries, max_distance, hash_size, r, reducers).items():
            out[j] = min(out.get(j, v), v)
    return {j: key for j, (_, key) in out.items()}


@pytest.mark.parametrize("hash_size,max_distance,splits", [(8, 3, True), (8, 6, False), (16, 12, True)])
def test_numpy_pass_finds_the_earliest_near_copy_for_any_reducers_and_order(
    hash_size, max_distance, splits, monkeypatch
):
    monkeypatch.setattr(dedup_cut, "SPLIT_ABOVE", 8)  # small sets, big buckets: split as a large run would
    monkeypatch.setattr(dedup_cut, "SPLIT_PROBE", 16)  # and a sample of a big bucket tried first
    rng = np.random.default_rng(hash_size + max_distance)
    entries = skewed(rng, 300, hash_size * hash_size, max_distance)
    entries += [(5000 + k, f"x{k}", "intra", list(entries[k * 7 + 1][3])) for k in range(20)]  # exact copies
    want = earliest_copies(entries, max_distance)
    assert len(want) > 50  # a fifth or more of the inputs have a near copy
    e = dedup.entries_from([(*x, None) for x in entries], hash_size, False)
    split, whole = {}, {}
    dedup.dedup_arrays(e, max_distance, hash_size, 1, None, split)
    with monkeypatch.context() as m:
        m.setattr(dedup_cut, "SPLIT_ABOVE", 10**9)
        dedup.dedup_arrays(e, max_distance, hash_size, 1, None, whole)
    # big buckets split, unless the bands leave too few bits (8-bit sub-bands for 7 bands: 64 bits do not suffice)
    assert split["largest_bucket"] == whole["largest_bucket"] > dedup_cut.SPLIT_ABOVE
    assert (split["largest_compared"] < whole["largest_compared"]) == splits
    for reducers in (1, 2, 5):
        order = rng.permutation(len(entries))
        assert merged([entries[k] for k in order], max_distance, hash_size, reducers) == want
    monkeypatch.setattr(dedup_cut, "SPLIT_ABOVE", 10**9)  # unsplit buckets: the same answer
    assert merged(entries, max_distance, hash_size, 3) == want


def test_thumbnail_check_skips_hash_twins_that_look_different():
    h = 0x0123456789ABCDEF
    white, red = "ff" * 192, ("ff0000" * 64)
    grey = "fe" * 192
    rows = [
        (0, "a", "intra", [h], [red]),  # same hash, another picture: not a copy of c
        (1, "b", "intra", [h ^ 1], [white]),  # one bit off, same picture up to 1 level
        (2, "c", "intra", [h ^ 3], [grey]),
    ]
    e = dedup.entries_from(rows, 8, True)
    assert {j: v[1] for j, v in dedup.dedup_arrays(e, 4, 8, 2, 10.0).items()} == {2: "b"}
    assert {j: v[1] for j, v in dedup.dedup_arrays(e, 4, 8, 2, None).items()} == {1: "a", 2: "a"}
    thumbs = [r[4] for r in rows]
    assert earliest_copies([r[:4] for r in rows], 4, thumbs, 10.0) == {2: "b"}
    with pytest.raises(ValueError, match="no thumbnail"):
        dedup.entries_from([(0, "a", "intra", [h], None)], 8, True)


def test_a_cluster_alike_in_hash_is_split_by_thumbnail_with_the_same_answer(monkeypatch):
    monkeypatch.setattr(dedup_cut, "SPLIT_ABOVE", 8)
    monkeypatch.setattr(dedup_cut, "THUMB_SPLIT_ABOVE", 4)
    rng = np.random.default_rng(11)
    base = int(rng.integers(0, 2**62))
    rows, entries, thumbs = [], [], []
    for k in range(150):  # one pHash cluster (all within 2 bits), pictures in five colours ± noise
        h = base ^ (1 << int(rng.integers(64))) ^ (1 << int(rng.integers(64)))
        cell = np.clip(rng.normal(40 + 45 * (k % 5), 1.5, 192), 0, 255).astype(np.uint8)
        thumbs.append([cell.tobytes().hex()])
        entries.append((k, f"k{k}", "intra", [h]))
        rows.append((k, f"k{k}", "intra", [h], thumbs[-1]))
    want = earliest_copies(entries, 4, thumbs, 10.0)
    assert 0 < len(want) < 150
    e = dedup.entries_from(rows, 8, True)
    split, whole = {}, {}
    for reducers in (1, 3):
        assert {j: v[1] for j, v in dedup.dedup_arrays(e, 4, 8, reducers, 10.0, split).items()} == want
    monkeypatch.setattr(dedup_cut, "SPLIT_ABOVE", 10**9)
    monkeypatch.setattr(dedup_cut, "THUMB_SPLIT_ABOVE", 10**9)
    assert {j: v[1] for j, v in dedup.dedup_arrays(e, 4, 8, 1, 10.0, whole).items()} == want
    assert split["largest_compared"] < whole["largest_compared"] / 2


@pytest.mark.parametrize(
    "max_diff,cut_values,block", [(10.0, 3, 1 << 17), (6.5, 3, 1 << 17), (10.0, 1, 64), (10.0, 3, 512)]
)
def test_thumbnail_split_finds_near_pairs_across_cell_edges(monkeypatch, max_diff, cut_values, block):
    """Objects on white: one pHash cluster whose thumbnails spread evenly over every level, so many near
    pairs straddle a cell edge of the thumbnail split (they must meet as guests of the cell below, in
    every combination of the values cut at once), whether buckets go through in one block, in one block
    per band (2,000 memberships in blocks of 512: the map output's band-major order, no sort) or in
    several per band."""
    monkeypatch.setattr(dedup_cut, "SPLIT_ABOVE", 8)
    monkeypatch.setattr(dedup_cut, "THUMB_SPLIT_ABOVE", 4)
    monkeypatch.setattr(dedup_cut, "THUMB_CUT_VALUES", cut_values)
    monkeypatch.setattr(dedup, "BUCKET_BLOCK", block)
    rng = np.random.default_rng(5)
    base = int(rng.integers(0, 2**62))
    rows, entries, thumbs, values = [], [], [], []
    for k in range(400):
        h = base ^ (1 << int(rng.integers(64)))
        if k > 20 and rng.random() < 0.4:  # a variant of an earlier input: within the check, or just past it
            v = values[int(rng.integers(k))] + rng.integers(-int(max_diff), int(max_diff) + 1, 192)
            if rng.random() < 0.3:
                v[int(rng.integers(192))] += int(max_diff) + 1
        else:
            v = np.full(192, 255) - rng.integers(0, 2, 192) * rng.integers(0, 256, 192)  # white, some cells not
        values.append(np.clip(v, 0, 255))
        thumbs.append([values[-1].astype(np.uint8).tobytes().hex()])
        entries.append((k, f"k{k}", "intra", [h]))
        rows.append((k, f"k{k}", "intra", [h], thumbs[-1]))
    want = earliest_copies(entries, 4, thumbs, max_diff)
    assert 20 < len(want) < 300
    e = dedup.entries_from(rows, 8, True)
    stats: dict[str, int] = {}
    for reducers in (1, 4):
        assert {j: v[1] for j, v in dedup.dedup_arrays(e, 4, 8, reducers, max_diff, stats).items()} == want
    assert stats["largest_compared"] < stats["largest_bucket"] / 4


@pytest.mark.parametrize("thumbs", [False, True])
def test_every_pair_of_buckets_of_any_size_is_compared_once(thumbs: bool):
    """The pair loop against brute force: buckets of 1 to 90 members (dense slices while most positions
    have a partner d further, gathers past that), hashes close enough that many pairs are near, one key
    per bucket in no particular order; with thumbnails (checked first by their summary, pairs confirmed
    once at the flush), in four classes of which neighbours only are within the limit."""
    rng = np.random.default_rng(7)
    sizes = np.r_[rng.integers(1, 6, 300), rng.integers(6, 20, 40), [35, 60, 90]]
    rng.shuffle(sizes)
    n = int(sizes.sum())
    h = rng.integers(0, 2**63, dtype=np.uint64)
    flips = rng.integers(0, 64, (n, 3)).astype(np.uint64)
    words = (h ^ (np.uint64(1) << flips[:, 0]) ^ (np.uint64(1) << flips[:, 1]) ^ (np.uint64(1) << flips[:, 2]))[:, None]
    level = rng.integers(0, 4, n)  # classes 4 levels apart, noise of 1: only neighbouring classes are within 5
    thumb = (100 + 4 * level[:, None] + rng.integers(0, 2, (n, 192))).astype(np.uint8)
    thumb = thumb if thumbs else np.zeros((n, 0), np.uint8)
    e = dedup.Entries(np.arange(n), np.arange(n).astype(str), np.zeros(n, np.uint64), words, thumb)
    rows = rng.permutation(n)
    keys = np.repeat(rng.permutation(len(sizes)).astype(np.uint64) * np.uint64(7919), sizes)
    stats: dict[str, int] = {}
    pairs = dedup._Pairs(e, np.full(n, n, np.int64), 4, 1, 5.0 if thumbs else None, stats)
    pairs.every_pair(rows, keys)
    pairs.flush()
    want = np.full(n, n, np.int64)
    start = 0
    for m in sizes:
        members = rows[start : start + m]
        start += m
        for a in members:
            for b in members:
                alike = not thumbs or abs(int(level[a]) - int(level[b])) <= 1
                if a < b and bin(int(words[a, 0] ^ words[b, 0])).count("1") <= 4 and alike:
                    want[b] = min(want[b], a)
    assert (pairs.best == want).all() and (want < n).sum() > 100
    assert stats["pairs_compared"] == int((sizes * (sizes - 1) // 2).sum())


def test_a_cluster_of_mutual_near_copies_costs_about_one_comparison_per_member_and_band():
    """m distinct inputs all within both checks of each other (no hash or thumbnail cut can separate them:
    their buckets are compared whole): in each band's bucket a member meets the bucket's first member at its
    first comparison and stops there — about m comparisons per band, not the m²/2 of each bucket."""
    rng = np.random.default_rng(3)
    base, m = int(rng.integers(0, 2**62)), 300
    rows, entries, thumbs = [], [], []
    for k in range(m):
        h = base ^ (1 << int(rng.integers(64)))
        thumbs.append([np.clip(128 + rng.integers(-2, 3, 192), 0, 255).astype(np.uint8).tobytes().hex()])
        entries.append((k, f"k{k}", "intra", [h]))
        rows.append((k, f"k{k}", "intra", [h], thumbs[-1]))
    want = earliest_copies(entries, 4, thumbs, 10.0)
    assert set(want.values()) == {"k0"} and len(want) == m - 1
    e = dedup.entries_from(rows, 8, True)
    for reducers in (1, 3):
        stats: dict[str, int] = {}
        assert {j: v[1] for j, v in dedup.dedup_arrays(e, 4, 8, reducers, 10.0, stats).items()} == want
        assert stats["largest_compared"] > m // 2  # a clique: compared whole
        assert (
            stats["pairs_compared"] < 10 * m
        )  # 5 bands (and small buckets pair by pair); all pairs: 5 × m²/2 ≈ 225,000


def test_an_input_near_nothing_in_a_cluster_bucket_costs_rounds_logarithmic_in_the_bucket(monkeypatch):
    """Real data has clusters of copies (a placeholder image a scrape got thousands of times), and a distinct
    input can share one band value with them by chance. It is near nothing there, so it meets every
    earlier member of that bucket: candidates come in rounds that double, so that costs about log₂ m
    numpy rounds (one per candidate before: m rounds, 18 s of 10^6 inputs with 30 % copies of one image)."""
    rng = np.random.default_rng(7)
    base, m, bits, max_distance = int.from_bytes(rng.bytes(32), "big"), 2000, 256, 12
    entries = []
    for k in range(m):  # distinct copies (identical rows would be collapsed first)
        h = base
        for c in rng.choice(bits, int(rng.integers(1, 4)), replace=False):
            h ^= 1 << int(c)
        entries.append((k, f"k{k}", "intra", [h]))
    band0 = set(int(c) for c in dedup_cut.band_columns(np.arange(bits), max_distance + 1)[0])
    others = [c for c in range(bits) if c not in band0]  # the outlier agrees with the cluster on band 0 only
    outlier = base
    for c in rng.choice(others, 40, replace=False):
        outlier ^= 1 << (bits - 1 - int(c))
    entries.append((m, f"k{m}", "intra", [outlier]))
    want = earliest_copies(entries, max_distance)
    assert f"k{m}" not in [f"k{j}" for j in want] and len(want) == m - 1
    rounds = []
    compare = dedup._Pairs.compare
    monkeypatch.setattr(dedup._Pairs, "compare", lambda self, i, j: (rounds.append(len(i)), compare(self, i, j)))
    e = dedup.entries_from([(*x, None) for x in entries], 16, False)
    stats: dict[str, int] = {}
    assert {j: v[1] for j, v in dedup.dedup_arrays(e, max_distance, 16, 1, None, stats).items()} == want
    assert stats["largest_compared"] > m // 2  # the cluster's buckets are compared whole
    # all buckets go round together: about log₂ 2000 ≈ 11 rounds (one per candidate: 1,282 rounds)
    assert len(rounds) < 16
    assert rounds[0] < 13 * m  # the first round: each member of a cluster bucket meets its first member
    assert sum(rounds[1:]) < 2 * m  # then what is left (the outlier, near nothing): fewer than 2t + 1 for t candidates


def test_shuffle_by_bucket_reads_only_each_reducers_partition(tmp_path):
    from pipeline.writer import DatasetWriter

    rng = np.random.default_rng(3)
    entries = skewed(rng, 240, 64, 4)
    writer = DatasetWriter(tmp_path / "ds", "h")
    k = 40  # inputs per chunk: ledgers of 6 chunks, written in a shuffled order
    for c in map(int, rng.permutation(6)):
        acc = [
            [e[0] - c * k * 3, e[1], e[2], [f"{h:016x}" for h in e[3]], "src", e[1], []]
            for e in entries
            if c * k * 3 <= e[0] < (c + 1) * k * 3
        ]
        writer.store.write_bytes(writer.ledger_path(c), json.dumps({"rejected": [], "accepted": acc}).encode())
    want = earliest_copies(entries, 4)
    for mappers, reducers in ((1, 1), (2, 3), (3, 4)):
        chunks = [list(range(6))[m::mappers] for m in range(mappers)]
        read = sum(dedup_shuffle.run_mapper(writer, ch, k * 3, 4, 8, None, m, reducers) for m, ch in enumerate(chunks))
        assert read == len(entries)
        parts, sizes = [], []
        for r in range(reducers):
            parts.append(dedup_shuffle.run_reducer(writer, mappers, 4, 8, None, r, reducers))
            sizes.append(
                sum(
                    len(np.load(tmp_path / "ds" / dedup_shuffle._part_path(reducers, m, r))["index"])
                    for m in range(mappers)
                )
            )
        if reducers > 1:
            assert max(sizes) < len(entries)  # no reducer reads every entry
        got = {own_key: kept for c in dedup_shuffle.plan(parts, k * 3).values() for own_key, kept in c.items()}
        assert got == {next(e[1] for e in entries if e[0] == j): key for j, key in want.items()}
        dedup_shuffle.clean(writer, mappers, reducers)
        assert not list((tmp_path / "ds" / dedup_shuffle.DEDUP_DIR).rglob("*.npz"))


def test_max_thumb_diff_is_checked_and_recorded_in_the_ledger():
    from pipeline.chunking import Encoded, assemble
    from pipeline.recipe import Recipe

    with pytest.raises(ValueError, match=r"dedup.max_thumb_diff.*\[0, 255\]"):
        Recipe.from_dict({"source": {"kind": "folder", "root": "."}, "dedup": {"max_thumb_diff": -1}})
    assert Recipe.from_dict({"source": {"kind": "folder", "root": "."}}).dedup.max_thumb_diff == 10.0
    img = np.full((40, 60, 3), 255, np.uint8)
    img[10:30, 20:40] = (200, 10, 10)
    thumb = dedup.image_thumb(img)
    cells = np.frombuffer(bytes.fromhex(thumb), np.uint8).reshape(8, 8, 3)
    assert cells[0, 0].tolist() == [255, 255, 255] and cells[4, 4].tolist() == [200, 10, 10]
    enc = Encoded([[("s-x-0.json", b"{}")]], "intra", ["00"], "s", "x", [thumb])
    _, _, ledger = assemble([None], [(0, enc)])  # the record is looked at only for a repeated key
    assert ledger["accepted"][0][6] == [thumb]


def _chunk(i: int) -> list[tuple[str, bytes]]:
    return [(f"s-{i:03d}-0.json", json.dumps({"pair": "intra"}).encode()), (f"s-{i:03d}-0.txt", b"x" * 1500)]


def test_duplicate_removal_rewrites_only_the_parts_holding_one(tmp_path, monkeypatch):
    from pathlib import Path

    from pipeline.writer import DatasetWriter, read_tar_members, sha256_file

    def no_listing(*_a, **_k):
        raise AssertionError("shards/ listed")

    monkeypatch.setattr(Path, "glob", no_listing)
    w = DatasetWriter(tmp_path / "ds", "h", max_bytes=7000)  # two samples per part
    ledger = {"rejected": [], "accepted": [[i, f"s-{i:03d}-0", "intra", ["00"], "src", str(i), []] for i in range(12)]}
    res = w.write_chunk(0, "fp", 12, [_chunk(i) for i in range(12)], [], ledger=ledger)
    assert [s["samples"] for s in res.shards] == [2] * 6
    parts = tmp_path / "ds" / "shards"
    before = {p.name: p.stat().st_ino for p in parts.iterdir()}
    res = w.apply_duplicates(0, {"s-003-0": "s-001-0"})
    after = {p.name: p.stat().st_ino for p in parts.iterdir()}
    assert [n for n in before if before[n] != after[n]] == ["000000_01.tar"]  # only the part that held s-003
    assert [s["samples"] for s in res.shards] == [2, 1, 2, 2, 2, 2] and res.accepted == 11
    assert all(sha256_file(tmp_path / "ds" / s["path"]) == s["sha256"] for s in res.shards)
    with open(parts / "000000_01.tar", "rb") as f:
        assert [n for n, _ in read_tar_members(f)] == ["s-002-0.json", "s-002-0.txt"]
    more = {"s-003-0": "s-001-0", "s-004-0": "s-000-0", "s-005-0": "s-000-0"}  # part 2 empties: removed
    res = w.apply_duplicates(0, more)
    assert [s["path"] for s in res.shards] == [f"shards/000000{p}.tar" for p in ("", "_01", "_03", "_04", "_05")]
    assert not (parts / "000000_02.tar").exists() and res.accepted == 9
    assert [r["reason"] for r in res.rejects] == [
        "duplicate of s-001-0",
        "duplicate of s-000-0",
        "duplicate of s-000-0",
    ]
    assert w.apply_duplicates(0, more) == res  # idempotent
    assert w.apply_duplicates(0, {"s-004-0": "s-000-0"}) is None  # lost a sample no longer a duplicate: rebuild
    # a rebuild with fewer parts removes the old ones without listing shards/, and so does a build
    # after a crash that left parts but no marker
    w.write_chunk(0, "fp", 4, [_chunk(i) for i in range(4)], [], ledger=ledger)
    assert sorted(p.name for p in parts.iterdir()) == ["000000.tar", "000000_01.tar"]
    w.forget(0)
    for p in ("_02", "_03"):
        (parts / f"000000{p}.tar").write_bytes(b"left by a crashed build")
    w.write_chunk(0, "fp", 4, [_chunk(i) for i in range(4)], [], ledger=ledger)
    assert sorted(p.name for p in parts.iterdir()) == ["000000.tar", "000000_01.tar"]
