"""Ten-million-scale costs on the CPU: the dataset-wide near-duplicate pass and the trainer's reader.

Dedup (``pipeline.dedup``, the whole pass in one process: map + reduce): generated inputs at each
size, three kinds —

- ``varied``: uniformly random 256-bit hashes and thumbnails (photos whose pHashes spread evenly);
- ``repeated_image``: ``varied``, where one image recurs — 20 % of the inputs are exact and 10 % near
  copies of the first (1–6 hash bits flipped, thumbnail ± 2 levels), spread through the set: the
  placeholder a web scrape gets thousands of times, one cluster growing with the data;
- ``object_on_white``: 64×64 images of one small ellipse or rectangle (10–30 % of the side, a random
  colour, centred ± 20 %) on white — what product catalogs look like — hashed with a numpy batch
  pHash equal to ``imagehash.phash(hash_size=16)`` on 64×64 images (the agreement on a sample is
  reported) and box-averaged into the 8×8 thumbnails of the second check;

with 2.5 % planted exact copies and 2.5 % planted near copies of earlier inputs (varied: 1–6 hash
bits flipped, thumbnail ± 2 levels; objects: the image brightened by up to 4 levels and given
Gaussian noise σ = 2, then hashed again). Separately, 300 resized + JPEG-encoded copies go through
the real ``image_hash`` / ``image_thumb`` to show what the second check lets through. Reported per kind and size: time on one
core (single reducer; wall and CPU seconds, medians of ``--repeats`` runs after one untimed run), how many times it grows from
each size to the next (``dedup_growth``; and ``dedup_interleaved``: the two sizes of each step timed
alternately, so that the machine's drift falls on both alike), peak traced memory (a second, traced run), largest bucket, exact and near copies found, distinct
inputs wrongly flagged — with the second check and with pHash alone; for objects up to 10^5, how alike
their full images are to what they were flagged against (``distinct_flagged_closeness``) — and, for 4
reducers, the entries each reducer reads.

Reader (``dynaip.train.data``): shards of generated samples; one epoch of one consumer in shuffle
blocks, the old per-block pattern (each block re-opens its shard and walks it up to its first
sample) and one sequential pass, each with decoding, timed and with the bytes read counted.

    python benchmarks/bench_scale.py --out benchmarks/results_scale.json [--sizes 10000 100000 1000000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import dedup
from pipeline.recipe import DedupConfig

SIDE = 64
HASH_SIZE, MAX_DISTANCE = 16, 12
BATCH = 2000
THUMB_DIFF = DedupConfig().max_thumb_diff
PHASH_ONLY_UP_TO = 100_000


# ----------------------------------------------------------------------------- generated inputs


def _dct_rows() -> np.ndarray:
    k, x = np.arange(HASH_SIZE)[:, None], np.arange(SIDE)[None, :]
    return np.cos(np.pi * k * (2 * x + 1) / (2 * SIDE))


DCT = _dct_rows()


def objects(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 64, 64, 3) uint8: one small ellipse or rectangle of a random colour on white."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] + 0.5
    cx, cy = rng.uniform(0.3, 0.7, (2, n)) * SIDE
    rx, ry = rng.uniform(0.1, 0.3, (2, n)) * SIDE / 2
    colour = rng.uniform(0, 230, (n, 3)).astype(np.float32)
    dx = (xx[None] - cx[:, None, None]) / rx[:, None, None]
    dy = (yy[None] - cy[:, None, None]) / ry[:, None, None]
    ellipse = rng.integers(0, 2, n).astype(bool)[:, None, None]
    inside = np.where(ellipse, dx**2 + dy**2 <= 1, (np.abs(dx) <= 1) & (np.abs(dy) <= 1))
    img = np.where(inside[..., None], colour[:, None, None, :], np.float32(255))
    return np.round(img).astype(np.uint8)


def near_objects(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Near copies as a re-encode leaves them: brightened up to 4 levels, Gaussian noise σ = 2."""
    out = img.astype(np.float32) + rng.uniform(0, 4, (len(img), 1, 1, 1)) + rng.normal(0, 2, img.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def resized_copies(rng: np.random.Generator, n: int = 300) -> dict:
    """Real-path near copies (``image_hash`` / ``image_thumb``): objects drawn at 160 px, copies
    resized to 60–90 % and JPEG-encoded at quality 60–90. How many each check passes."""
    from PIL import Image

    hd, td = [], []
    for a in objects(rng, n):
        big = np.asarray(Image.fromarray(a).resize((160, 160), Image.BICUBIC))
        side = int(160 * rng.uniform(0.6, 0.9))
        buf = io.BytesIO()
        Image.fromarray(big).resize((side, side), Image.BICUBIC).save(buf, "JPEG", quality=int(rng.integers(60, 91)))
        copy = np.asarray(Image.open(buf).convert("RGB"))
        hd.append((int(dedup.image_hash(big, HASH_SIZE), 16) ^ int(dedup.image_hash(copy, HASH_SIZE), 16)).bit_count())
        ta, tb = (np.frombuffer(bytes.fromhex(dedup.image_thumb(x)), np.uint8).astype(int) for x in (big, copy))
        td.append(int(np.abs(ta - tb).max()))
    hd_a, td_a = np.array(hd), np.array(td)
    return {
        "copies": n,
        "phash_within": int((hd_a <= MAX_DISTANCE).sum()),
        "both_checks": int(((hd_a <= MAX_DISTANCE) & (td_a <= THUMB_DIFF)).sum()),
        "thumb_max_diff_percentiles_50_90_99_100": np.percentile(td_a, [50, 90, 99, 100]).tolist(),
    }


def phash_words(img: np.ndarray) -> np.ndarray:
    """(n, 4) uint64: imagehash.phash(hash_size=16) of 64×64 images (PIL's L conversion, DCT-II)."""
    rgb = img.astype(np.int64)
    g = (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114 + 500) // 1000
    c = (DCT @ g.astype(np.float64) @ DCT.T).reshape(len(img), -1)
    bits = c > np.median(c, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64)


def thumbs(img: np.ndarray) -> np.ndarray:
    """(n, 192) uint8: the 8×8 RGB box average (``pipeline.dedup.image_thumb`` on 64×64 images)."""
    t = img.reshape(len(img), 8, SIDE // 8, 8, SIDE // 8, 3).astype(np.float32).mean(axis=(2, 4))
    return np.round(t).astype(np.uint8).reshape(len(img), -1)


def phash_agreement(rng: np.random.Generator, n: int = 200) -> float:
    """Share of bits where ``phash_words`` equals imagehash's pHash on generated objects."""
    img = objects(rng, n)
    ours = np.unpackbits(phash_words(img).astype(">u8").view(np.uint8), axis=1)
    theirs = np.array([[int(b) for b in bin(int(dedup.image_hash(a, HASH_SIZE), 16))[2:].zfill(256)] for a in img])
    return float((ours == theirs).mean())


def generate(
    kind: str, n: int, seed: int = 0, images: list[np.ndarray] | None = None
) -> tuple[dedup.Entries, np.ndarray, np.ndarray]:
    """``n`` inputs: distinct ones first, then planted copies (2.5 % exact, 2.5 % near) of earlier ones.
    Returns the entries, the original of each input (-1 for a distinct one) and whether a copy is exact.
    For objects, ``images`` (when given) receives the distinct inputs' images, batch by batch."""
    rng = np.random.default_rng(seed)
    n_exact = n_near = n // 40
    distinct = n - n_exact - n_near
    words, th = np.zeros((n, 4), np.uint64), np.zeros((n, 192), np.uint8)
    source = rng.integers(0, distinct, n_near)
    for s in range(0, distinct, BATCH):
        m = min(BATCH, distinct - s)
        if kind != "object_on_white":
            words[s : s + m] = rng.integers(0, 2**63, (m, 4), dtype=np.uint64) * np.uint64(2) + rng.integers(
                0, 2, (m, 4), dtype=np.uint64
            )
            th[s : s + m] = rng.integers(0, 256, (m, 192), dtype=np.uint8)
        else:
            img = objects(rng, m)
            words[s : s + m], th[s : s + m] = phash_words(img), thumbs(img)
            if images is not None:
                images.append(img)
            here = np.flatnonzero((source >= s) & (source < s + m))
            if len(here):  # near copies made from the very images they copy
                copy = near_objects(rng, img[source[here] - s])
                words[distinct + here], th[distinct + here] = phash_words(copy), thumbs(copy)
    if kind != "object_on_white":
        words[distinct : distinct + n_near] = words[source]
        th[distinct : distinct + n_near] = np.clip(th[source].astype(int) + rng.integers(-2, 3, (n_near, 192)), 0, 255)
        for k in range(n_near):
            for b in rng.choice(256, int(rng.integers(1, 7)), replace=False):
                words[distinct + k, b // 64] ^= np.uint64(1 << (b % 64))
    exact_src = rng.integers(0, distinct, n_exact)
    words[distinct + n_near :], th[distinct + n_near :] = words[exact_src], th[exact_src]
    original = np.r_[np.full(distinct, -1), source, exact_src]
    exact = np.r_[np.zeros(distinct + n_near, bool), np.ones(n_exact, bool)]
    if kind == "repeated_image":
        repeat_first_image(rng, words, th, original, exact)
    entries = dedup.Entries(
        np.arange(n, dtype=np.int64),
        np.char.add("k", np.arange(n).astype(str)),
        np.full(n, dedup._group_code("intra", 1), np.uint64),
        words,
        th,
    )
    return entries, original, exact


def repeat_first_image(
    rng: np.random.Generator, words: np.ndarray, th: np.ndarray, original: np.ndarray, exact: np.ndarray
) -> None:
    """Makes 20 % of the inputs exact and 10 % near copies of input 0 (in place), taken from distinct
    inputs that no planted copy copies, spread through the set."""
    n = len(words)
    free = np.ones(n, bool)
    free[0] = False
    free[original >= 0] = False  # planted copies keep their originals
    free[original[original >= 0]] = False
    pos = rng.permutation(np.flatnonzero(free))
    n_exact, n_near = n // 5, n // 10
    ex, near = np.sort(pos[:n_exact]), np.sort(pos[n_exact : n_exact + n_near])
    words[ex], th[ex] = words[0], th[0]
    flips = rng.integers(1, 7, len(near))
    chosen = np.argpartition(rng.random((len(near), 256)), 6, axis=1)[:, :6]  # six distinct bits per copy
    bit = np.zeros((len(near), 256), bool)
    np.put_along_axis(bit, chosen, np.arange(6)[None, :] < flips[:, None], axis=1)
    flip = np.packbits(bit, axis=1).view(">u8").astype(np.uint64)  # bit k of the hash: MSB first, as words
    words[near] = words[0] ^ flip
    th[near] = np.clip(th[0].astype(int) + rng.integers(-2, 3, (len(near), th.shape[1])), 0, 255)
    original[ex], original[near] = 0, 0
    exact[ex] = True


# ----------------------------------------------------------------------------- dedup figures


def closeness(img: np.ndarray, pairs: np.ndarray) -> dict:
    """How alike the full 64×64 images of each pair (rows of ``pairs``: two indices into ``img``) are:
    the share of pixels where a channel differs by more than 40 levels (where the shapes do not
    overlap) and the mean absolute difference in levels; medians and maxima over the pairs."""
    if not len(pairs):
        return {"pairs": 0}
    a, b = img[pairs[:, 0]].astype(np.int16), img[pairs[:, 1]].astype(np.int16)
    diff = np.abs(a - b)
    shape_pct = 100 * (diff.max(axis=3) > 40).mean(axis=(1, 2))
    mean_abs = diff.mean(axis=(1, 2, 3))
    return {
        "pairs": len(pairs),
        "pixels_apart_pct_median_max": [round(float(np.median(shape_pct)), 2), round(float(shape_pct.max()), 2)],
        "mean_abs_diff_median_max": [round(float(np.median(mean_abs)), 2), round(float(mean_abs.max()), 2)],
    }


Generated = tuple[dedup.Entries, np.ndarray, np.ndarray]


def run_dedup(
    kind: str, n: int, repeats: int = 1, data: Generated | None = None, images: np.ndarray | None = None
) -> dict:
    """The figures of one set. With ``images`` (the distinct inputs' images, objects only), also how
    alike the distinct inputs wrongly flagged are to the input they were flagged against, next to
    random pairs of distinct inputs."""
    e, original, exact = generate(kind, n) if data is None else data
    out: dict = {
        "kind": kind,
        "inputs": n,
        "planted_exact": int(exact.sum()),
        "planted_near": int(((original >= 0) & ~exact).sum()),
    }
    # pHash alone on objects is quadratic in its huge buckets (the reason for the second check): up to 10^5
    runs = (("checked", THUMB_DIFF), ("phash_only", None)) if n <= PHASH_ONLY_UP_TO else (("checked", THUMB_DIFF),)
    for label, diff in runs:
        walls, cpus = [], []
        if label == "checked":  # one untimed run first: the first call of a process pays for its page mappings
            dedup.dedup_arrays(e, MAX_DISTANCE, HASH_SIZE, 1, diff)
        for _ in range(repeats if label == "checked" else 1):  # the machine is shared: medians of repeats
            stats: dict[str, int] = {}
            t0, c0 = time.perf_counter(), time.process_time()
            found = dedup.dedup_arrays(e, MAX_DISTANCE, HASH_SIZE, 1, diff, stats)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        seconds, cpu = float(np.median(walls)), float(np.median(cpus))
        peak = 0
        if label == "checked":  # memory in a second run: tracing slows numpy's many small allocations
            tracemalloc.start()
            dedup.dedup_arrays(e, MAX_DISTANCE, HASH_SIZE, 1, diff)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        flagged = np.zeros(n, bool)
        flagged[list(found)] = True
        distinct = original < 0
        out[label] = {
            "seconds": round(seconds, 4),
            "cpu_seconds": round(cpu, 4),  # four places: a 10^4 run takes about 0.01 s, and growth divides by it
            "cpu_seconds_each": [round(c, 4) for c in cpus],
            "peak_mib": round(peak / 2**20, 1),
            **stats,
            "exact_found": int((flagged & exact).sum()),
            "near_found": int((flagged & (original >= 0) & ~exact).sum()),
            "distinct_flagged": int((flagged & distinct).sum()),
            "distinct_flagged_pct": round(100 * float((flagged & distinct).sum()) / max(1, int(distinct.sum())), 4),
        }
        print(f"dedup {kind} n={n} {label}: {out[label]}", flush=True)
        if label == "checked" and images is not None:
            wrong = np.array([(j, v[0]) for j, v in sorted(found.items()) if original[j] < 0], np.int64)
            rng = np.random.default_rng(3)
            out["distinct_flagged_closeness"] = {
                "flagged_vs_their_match": closeness(images, wrong.reshape(-1, 2)),
                "random_distinct_pairs": closeness(images, rng.integers(0, len(images), (1000, 2))),
            }
            print(f"dedup {kind} n={n} closeness: {out['distinct_flagged_closeness']}", flush=True)
    parts = dedup.partition(e, MAX_DISTANCE, HASH_SIZE, 4)
    out["r4_entries_read_per_reducer"] = [len(p["index"]) for p in parts]
    t0 = time.perf_counter()
    times = []
    for p in parts:
        t1 = time.perf_counter()
        dedup.reduce_parts([p], MAX_DISTANCE, HASH_SIZE, THUMB_DIFF)
        times.append(round(time.perf_counter() - t1, 3))
    out["r4_reduce_seconds"] = times
    out["r4_total_seconds"] = round(time.perf_counter() - t0, 3)
    return out


def interleaved_growth(kind: str, sets: dict[int, Generated], repeats: int) -> dict:
    """The growth again, each step from one size to the next timed alternately (``repeats`` runs of each,
    one of the smaller, one of the larger, and so on): a shared machine's speed drifts over minutes, and
    this way the drift falls on both sizes of a step alike. Per step, the two sizes' median CPU seconds
    and their ratio."""
    out = {}
    sizes = sorted(sets)
    for n0, n1 in zip(sizes, sizes[1:]):
        cpus: dict[int, list[float]] = {n0: [], n1: []}
        for _ in range(repeats):
            for n in (n0, n1):
                c0 = time.process_time()
                dedup.dedup_arrays(sets[n][0], MAX_DISTANCE, HASH_SIZE, 1, THUMB_DIFF)
                cpus[n].append(time.process_time() - c0)
        t0, t1 = float(np.median(cpus[n0])), float(np.median(cpus[n1]))
        out[f"{kind} {n0}->{n1}"] = {
            "cpu_seconds": [round(t0, 4), round(t1, 4)],
            "growth": round(t1 / max(t0, 1e-9), 1),
        }
    return out


def growth(runs: list[dict]) -> dict[str, float]:
    """Per kind, how many times the median CPU time grows from each size to the next one measured
    (``"object_on_white 10000->100000": 19.8``): the issue's figure of near-linearity is 10× data ≤ 15× time."""
    out = {}
    for kind in sorted({r["kind"] for r in runs}):
        sizes = sorted((r["inputs"], r["checked"]["cpu_seconds"]) for r in runs if r["kind"] == kind)
        for (n0, t0), (n1, t1) in zip(sizes, sizes[1:]):
            out[f"{kind} {n0}->{n1}"] = round(t1 / max(t0, 1e-9), 1)
    return out


# ----------------------------------------------------------------------------- reader figures


class CountingFS:
    """Stands in for ``fsspec`` in the shard guard: counts the bytes every open file returns."""

    def __init__(self):
        import fsspec

        self.fsspec, self.bytes, self.opens = fsspec, 0, 0

    def open(self, url: str, mode: str = "rb"):
        outer = self

        class Opened:
            def open(self):
                outer.opens += 1
                return Counted(outer.fsspec.open(url, mode).open())

        return Opened()


class Counted(io.RawIOBase):
    def __init__(self, raw):
        super().__init__()
        self.raw = raw

    def readable(self):
        return True

    def seekable(self):
        return True

    def read(self, n=-1):
        data = self.raw.read(n)
        CountingFS.current.bytes += len(data)
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, offset, whence=0):
        return self.raw.seek(offset, whence)

    def tell(self):
        return self.raw.tell()

    def close(self):
        self.raw.close()
        super().close()


def write_shard(path: Path, samples: int, seed: int = 0) -> int:
    """A WebDataset shard of ``samples`` generated samples (the dataset's members); returns its bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = objects(rng, 64)

    def enc(a: np.ndarray, fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format=fmt)
        return buf.getvalue()

    pool = [(enc(a, "PNG"), enc(a, "JPEG"), enc(((a < 255).any(axis=2) * 255).astype(np.uint8), "PNG")) for a in img]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(samples):
            ref, tgt, mask = pool[i % len(pool)]
            meta = json.dumps({"pair": "intra", "source_id": str(i)}).encode()
            members = (
                ("ref.png", ref),
                ("tgt.jpg", tgt),
                ("mask.png", mask),
                ("txt", f"sample {i}".encode()),
                ("json", meta),
            )
            for ext, data in members:
                info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path.stat().st_size


def run_reader(samples: int, block: int, old_pattern: bool) -> dict:
    from dynaip.train import data, shard_integrity

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    shard = tmp / "000000.tar"
    size = write_shard(shard, samples)
    spec = data.StreamSpec(
        shards=[data.ShardInfo(str(shard), samples)], batch_size=1, shuffle_block=block, ref_size=28, buckets=[(32, 32)]
    )
    counting = CountingFS()
    CountingFS.current = counting
    real = shard_integrity.fsspec
    shard_integrity.fsspec = counting  # type: ignore[assignment]
    out = {"samples": samples, "shard_bytes": size, "block": block}
    try:

        def measure(name: str, run) -> None:
            counting.bytes = counting.opens = 0
            t0 = time.perf_counter()
            n = run()
            out[name] = {
                "seconds": round(time.perf_counter() - t0, 3),
                "bytes_read": counting.bytes,
                "bytes_per_dataset_byte": round(counting.bytes / size, 2),
                "opens": counting.opens,
                "samples": n,
            }

        def sequential() -> int:
            return sum(1 for raw in data.iter_tar(str(shard)) if data.decode_sample(raw, 28) is not None)

        def epoch() -> int:
            pos = data.WorkerPosition()
            return sum(1 for _ in itertools.islice(data.consumer_samples(spec, 0, 1, pos), samples))

        def old_epoch() -> int:  # each block re-opens its shard and walks it to the block's first sample
            shards, starts = data.epoch_order(spec, 0)
            n = 0
            for b0 in range(0, samples, block):
                raws = list(data.iter_positions(shards, starts, b0, min(samples, b0 + block)))
                n += sum(1 for raw in raws if data.decode_sample(raw, 28) is not None)
            return n

        measure("sequential_pass", sequential)
        measure("epoch", epoch)
        if old_pattern:
            measure("epoch_old_pattern", old_epoch)
        out["epoch_over_sequential"] = round(out["epoch"]["seconds"] / out["sequential_pass"]["seconds"], 2)
    finally:
        shard_integrity.fsspec = real  # type: ignore[assignment]
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    print(f"reader {out}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="report JSON path")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    kinds = ["varied", "object_on_white", "repeated_image"]
    ap.add_argument("--kinds", nargs="+", default=kinds, choices=kinds)
    ap.add_argument("--repeats", type=int, default=5, help="dedup runs per size and kind (the median is reported)")
    ap.add_argument(
        "--reader",
        nargs="+",
        default=["2048:64:old", "2048:256", "8192:64"],
        help="SAMPLES:BLOCK[:old] per reader run (old = also time the per-block pattern)",
    )
    args = ap.parse_args()
    report: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "phash_bit_agreement": round(phash_agreement(np.random.default_rng(1)), 4),
        "resized_copies": resized_copies(np.random.default_rng(2)),
        "dedup": [],
        "reader": [],
    }
    runs = [(kind, n) for n in sorted(args.sizes) for kind in args.kinds]
    big = [r for r in runs if r[1] > PHASH_ONLY_UP_TO]
    sets: dict[tuple[str, int], Generated] = {}  # generated once, timed again interleaved at the end
    for kind, n in [r for r in runs if r not in big]:
        images: list[np.ndarray] | None = [] if kind == "object_on_white" else None  # only up to 10^5: 1.2 GB there
        sets[kind, n] = generate(kind, n, images=images)
        report["dedup"].append(
            run_dedup(kind, n, args.repeats, sets[kind, n], np.concatenate(images) if images else None)
        )
        del images
        report["dedup_growth"] = growth(report["dedup"])
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for spec in args.reader:
        parts = spec.split(":")
        report["reader"].append(run_reader(int(parts[0]), int(parts[1]), parts[2:] == ["old"]))
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for kind, n in big:  # the longest last: the report holds everything else already
        sets[kind, n] = generate(kind, n)
        report["dedup"].append(run_dedup(kind, n, args.repeats, sets[kind, n]))
        report["dedup_growth"] = growth(report["dedup"])
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    report["dedup_interleaved"] = {
        step: figures
        for kind in args.kinds
        for step, figures in interleaved_growth(
            kind, {n: d for (k, n), d in sets.items() if k == kind}, args.repeats
        ).items()
    }
    print(f"dedup interleaved: {report['dedup_interleaved']}", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
