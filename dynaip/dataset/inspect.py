"""Inspecting a finished dataset directory: ``show`` (summary text, quality quantiles per source),
``verify`` (re-hash and re-count every shard), ``grid`` (contact sheet PNG: reference | target |
mask overlay, caption underneath), the sample iterators and ``quality_sort_key`` (the order of
``grid --sort-by`` and the browser's sort). The manifest is read by ``dynaip/dataset/manifest.py``."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

from dynaip.dataset.manifest import load_manifest
from dynaip.dataset.store import Store


def show(root: str | Path) -> str:
    """Summary: sources, samples, shards, bytes, rejects by reason."""
    m = load_manifest(root)
    t = m["totals"]
    lines = [
        f"dataset {root}  ({m['format']}, recipe {m.get('recipe', {}).get('name') or '-'} #{m['recipe_hash']})",
        f"source   {m['source']['kind']}  {m['source']['root']}",
        f"inputs   {t['inputs']}  accepted {t['accepted']}  rejected {t['rejected']}",
        f"samples  {t['samples']}  in {len(m['shards'])} shards, {t['bytes']:,} bytes",
    ]
    if t["rejected_by_reason"]:
        lines.append("rejects by reason:")
        lines += [f"  {n:6d}  {reason}" for reason, n in t["rejected_by_reason"].items()]
    lines += quality_lines(root)
    return "\n".join(lines)


QUALITY_KEYS = ("aesthetic", "sharpness", "subject_pixels", "det_score", "mask_score")
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def quality_quantiles(root: str | Path) -> dict[str, dict[str, tuple[int, list[float]]]]:
    """``{source: {score: (n, [min, p10, median, p90, max])}}`` over every sample's json ``quality``
    (scores a sample lacks, e.g. ``aesthetic`` without a head, are left out of its source's n)."""
    values: dict[str, dict[str, list[float]]] = {}
    for meta in iter_sample_json(root):
        q = meta.get("quality") or {}
        per = values.setdefault(str(meta.get("source", "?")), {})
        for k in QUALITY_KEYS:
            if isinstance(q.get(k), (int, float)):
                per.setdefault(k, []).append(float(q[k]))
    return {src: {k: (len(v), [float(x) for x in np.quantile(np.asarray(v), QUANTILES)])
                  for k, v in per.items() if v} for src, per in sorted(values.items())}


def quality_sort_key(meta: dict[str, Any], key: str, descending: bool = False) -> tuple[int, float]:
    """Sort key ordering samples by ``meta["quality"][key]``; samples without a number for it go last."""
    v = (meta.get("quality") or {}).get(key)
    if not isinstance(v, (int, float)):
        return (1, 0.0)
    return (0, -float(v) if descending else float(v))


def quality_lines(root: str | Path) -> list[str]:
    """``show``'s quality section (reads the json of every sample; the images are skipped)."""
    table = quality_quantiles(root)
    if not any(table.values()):
        return []
    lines = ["quality per source (n, min / p10 / median / p90 / max):"]
    for src, scores in table.items():
        for k in QUALITY_KEYS:
            if k in scores:
                n, q = scores[k]
                lines.append(f"  {src:10s} {k:15s} {n:6d}  " + " / ".join(f"{v:.4g}" for v in q))
    return lines


def count_samples(path: Path | io.BytesIO) -> int:
    """Distinct sample keys in a tar (a path or an open file; raises tarfile.ReadError on a broken tar)."""
    keys = []
    with (tarfile.open(path, "r:") if isinstance(path, (str, Path)) else tarfile.open(fileobj=path, mode="r:")) as tf:
        for member in tf:
            if member.isfile():
                key = member.name.split("/")[-1].split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    return len(keys)


def verify(root: str | Path) -> list[str]:
    """Re-hashes and re-counts every shard in the manifest; returns one line per mismatch (empty = ok)."""
    store = Store(root)
    m = load_manifest(root)
    problems = []
    for s in m["shards"]:
        size = store.size(s["path"])
        if size is None:
            problems.append(f"{s['path']}: missing")
            continue
        if size != s["bytes"]:
            problems.append(f"{s['path']}: {size} bytes, manifest says {s['bytes']}")
        data = store.read_bytes(s["path"])
        h = hashlib.sha256(data).hexdigest()
        if h != s["sha256"]:
            problems.append(f"{s['path']}: sha256 {h[:12]}…, manifest says {s['sha256'][:12]}…")
        try:
            n = count_samples(io.BytesIO(data))
        except (tarfile.TarError, OSError) as e:
            problems.append(f"{s['path']}: unreadable tar ({e})")
            continue
        if n != s["samples"]:
            problems.append(f"{s['path']}: {n} samples, manifest says {s['samples']}")
    t = m["totals"]
    if t.get("inputs") != (t.get("accepted") or 0) + (t.get("rejected") or 0):
        problems.append(f"totals: inputs {t.get('inputs')} != accepted {t.get('accepted')} + rejected {t.get('rejected')}")
    if sum(s["samples"] for s in m["shards"]) != t.get("samples"):
        problems.append("totals: samples do not add up over the shards")
    return problems


def iter_samples(root: str | Path) -> Iterator[dict[str, Any]]:
    """Samples in shard order as ``{key, ref.png, tgt.jpg, mask.png, txt, json}`` (raw bytes)."""
    store = Store(root)
    for s in load_manifest(root)["shards"]:
        with store.open(s["path"]) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            cur: dict[str, Any] = {}
            for member in tf:
                if not member.isfile():  # a shard of this tool holds regular files only
                    raise ValueError(f"shard {s['path']} holds {member.name!r}, which is not a regular file "
                                     "(a link or a folder); the shard is not from this tool — rebuild it with `dynaip curate`")
                key, ext = member.name.split(".", 1)
                if cur and cur["key"] != key:
                    yield cur
                    cur = {}
                cur["key"] = key
                cur[ext] = tf.extractfile(member).read()
            if cur:
                yield cur


def iter_sample_json(root: str | Path) -> Iterator[dict[str, Any]]:
    """Every sample's json in shard order; tar members of other files are skipped, not read."""
    store = Store(root)
    for s in load_manifest(root)["shards"]:
        with store.open(s["path"]) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for member in tf:
                if member.isfile() and member.name.endswith(".json"):
                    yield json.loads(tf.extractfile(member).read())


def grid(root: str | Path, out: str | Path, n: int = 8, cell: int = 192, sort_by: str | None = None,
         descending: bool = False) -> Path:
    """Contact sheet of the first ``n`` samples (or, with ``sort_by`` a quality score, the ``n`` lowest —
    highest with ``descending``): one row each — reference | target | mask overlay — with the caption
    underneath. Writes a PNG to ``out``."""
    rows = []
    samples: Iterator[dict[str, Any]] = iter_samples(root)
    if sort_by:  # the json of every sample decides which n images are read
        order = sorted(enumerate(iter_sample_json(root)), key=lambda im: quality_sort_key(im[1], sort_by, descending))
        wanted = {i: rank for rank, (i, _) in enumerate(order[:n])}
        picked = sorted(((wanted[i], s) for i, s in enumerate(iter_samples(root)) if i in wanted), key=lambda x: x[0])
        samples = iter(s for _, s in picked)
    for sample in samples:
        if len(rows) >= n:
            break
        ref = Image.open(io.BytesIO(sample["ref.png"])).convert("RGB")
        tgt = Image.open(io.BytesIO(sample["tgt.jpg"])).convert("RGB")
        mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"])).convert("L")) > 127
        over = np.asarray(tgt).copy()
        over[mask] = (0.5 * over[mask] + 0.5 * np.array([255, 0, 0])).astype(np.uint8)
        rows.append(([ref, tgt, Image.fromarray(over)], sample["txt"].decode("utf-8", "replace")))
    if not rows:
        raise ValueError(f"{root} has no samples to show")
    text_h = 28
    sheet = Image.new("RGB", (3 * cell, len(rows) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (images, caption) in enumerate(rows):
        y = r * (cell + text_h)
        for c, im in enumerate(images):
            im = im.copy()
            im.thumbnail((cell, cell))
            sheet.paste(im, (c * cell + (cell - im.width) // 2, y + (cell - im.height) // 2))
        draw.text((4, y + cell + 6), caption[: 3 * cell // 6], fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
