"""Inspecting a finished dataset directory: ``show`` (summary text, quality quantiles per source),
``verify`` (re-hash and re-count every shard), ``grid`` (contact sheet PNG: reference | target |
mask overlay, caption underneath), the sample iterators and ``quality_sort_key`` (the order of
``grid --sort-by`` and the browser's sort). The manifest is read by ``dynaip/dataset/manifest.py``."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from dynaip.dataset.format import DatasetError
from dynaip.dataset.manifest import load_dataset, load_manifest
from dynaip.dataset.reader import read_shard


def show(root: str | Path) -> str:
    """Summary: sources, samples, shards, bytes, rejects by reason."""
    m = load_manifest(root)
    t = m["totals"]
    # descriptive fields are shown as found: a manifest from elsewhere may lack or mistype them
    recipe, source = _obj(m.get("recipe")), _obj(m.get("source"))
    lines = [
        f"dataset {root}  ({m['format']}, recipe {recipe.get('name') or '-'} #{m.get('recipe_hash', '-')})",
        f"source   {source.get('kind', '-')}  {source.get('root', '-')}",
        f"inputs   {t.get('inputs')}  accepted {t.get('accepted')}  rejected {t.get('rejected')}",
        f"samples  {t.get('samples')}  in {len(m['shards'])} shards, {t.get('bytes')} bytes",
    ]
    reasons = _obj(t.get("rejected_by_reason"))
    if reasons:
        lines.append("rejects by reason:")
        lines += [f"  {n!s:>6}  {reason}" for reason, n in reasons.items()]
    lines += decontamination_lines(m)
    lines += quality_lines(root)
    return "\n".join(lines)


def decontamination_lines(m: dict[str, Any]) -> list[str]:
    """The benchmarks the dataset was checked against (docs/decontamination.md), or a line saying it was not."""
    entry = _obj(m.get("decontamination"))
    benchmarks = [_obj(b) for b in entry.get("benchmarks", [])] if isinstance(entry.get("benchmarks"), list) else []
    if not benchmarks:
        return ["decontamination: none (no benchmark was checked; see `dynaip manifest contamination`)"]
    lines = ["decontaminated against:"]
    lines += [
        f"  {b.get('path', '-')}  ({b.get('layout', '-')}, {b.get('files', '-')} images, "
        f"sha256 {str(b.get('sha256', '-'))[:16]}): {b.get('removed', '-')} inputs removed"
        for b in benchmarks
    ]
    return lines


def _obj(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


QUALITY_KEYS = ("aesthetic", "sharpness", "subject_pixels", "det_score", "mask_score")
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def quality_quantiles(root: str | Path) -> dict[str, dict[str, tuple[int, list[float]]]]:
    """``{source: {score: (n, [min, p10, median, p90, max])}}`` over every sample's json ``quality``
    (scores a sample lacks, e.g. ``aesthetic`` without a head, are left out of its source's n)."""
    return quantiles_of(iter_sample_json(root))


def quantiles_of(metas: Iterable[dict[str, Any]]) -> dict[str, dict[str, tuple[int, list[float]]]]:
    """``quality_quantiles`` over the sample jsons ``metas``."""
    values: dict[str, dict[str, list[float]]] = {}
    for meta in metas:
        q = meta.get("quality") or {}
        per = values.setdefault(str(meta.get("source", "?")), {})
        for k in QUALITY_KEYS:
            if isinstance(q.get(k), (int, float)):
                per.setdefault(k, []).append(float(q[k]))
    return {
        src: {k: (len(v), [float(x) for x in np.quantile(np.asarray(v), QUANTILES)]) for k, v in per.items() if v}
        for src, per in sorted(values.items())
    }


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
    with tarfile.open(path, "r:") if isinstance(path, (str, Path)) else tarfile.open(fileobj=path, mode="r:") as tf:
        for member in tf:
            if member.isfile():
                key = member.name.split("/")[-1].split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    return len(keys)


DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
"""What PIL and UTF-8 decoding raise on bad bytes (PIL raises SyntaxError for some broken PNGs)."""


def decode_member(key: str, ext: str, data: bytes) -> None:
    """Decodes one member as the trainer and the web app would (images fully, text as UTF-8); a
    one-line ValueError naming the member when it does not decode."""
    try:
        if ext in ("ref.png", "tgt.jpg", "mask.png"):
            with Image.open(io.BytesIO(data)) as im:
                want = "PNG" if ext.endswith("png") else "JPEG"
                if im.format != want:
                    raise ValueError(f"is {im.format}, not {want}")
                im.load()
        elif ext == "txt":
            data.decode("utf-8")
    except DECODE_ERRORS as e:  # a decoder failure is the member's fault; say which member
        raise ValueError(f"{key}.{ext} does not decode ({type(e).__name__}: {e})") from None


def verify(root: str | Path) -> list[str]:
    """Checks every promise of docs/datasets.md: the manifest's entries (one-line error when it breaks a
    rule), and per shard its size, sha256, members (regular files, shard member names, every sample
    complete, json objects), every member decoded, and its sample count; then the totals. One line
    per problem (empty = ok)."""
    ds = load_dataset(root)
    problems = []
    for ref in ds.shards:

        def decode(key: str, ext: str, data: bytes, ref=ref) -> None:
            try:
                decode_member(key, ext, data)
            except ValueError as e:
                raise DatasetError(f"shard {ref.url}: {e}") from None

        try:
            n = len(read_shard(ref, keep=lambda ext: False, each=decode))
        except DatasetError as e:
            problems.append(f"{ref.path}: {str(e).split('; ', 1)[0]}")
            continue
        if n != ref.samples:
            problems.append(f"{ref.path}: {n} samples, manifest says {ref.samples}")
    t = ds.manifest["totals"]
    if t.get("inputs") != (t.get("accepted") or 0) + (t.get("rejected") or 0):
        problems.append(
            f"totals: inputs {t.get('inputs')} != accepted {t.get('accepted')} + rejected {t.get('rejected')}"
        )
    if sum(s.samples for s in ds.shards) != t.get("samples"):
        problems.append("totals: samples do not add up over the shards")
    return problems


def iter_samples(root: str | Path) -> Iterator[dict[str, Any]]:
    """Samples in shard order as ``{key, ref.png, tgt.jpg, mask.png, txt, json}`` (raw bytes); each shard
    is read whole and checked (size, sha256, members) before its samples come (dynaip/dataset/reader.py)."""
    for ref in load_dataset(root).shards:
        for key, members in read_shard(ref):
            yield {"key": key, **members}


def iter_sample_json(root: str | Path) -> Iterator[dict[str, Any]]:
    """Every sample's json (a JSON object, checked) in shard order; the other members are checked and
    hashed but not kept."""
    for ref in load_dataset(root).shards:
        for _, members in read_shard(ref, keep=lambda ext: ext == "json"):
            yield json.loads(members["json"])


def grid(
    root: str | Path, out: str | Path, n: int = 8, cell: int = 192, sort_by: str | None = None, descending: bool = False
) -> Path:
    """Contact sheet of the first ``n`` samples (or, with ``sort_by`` a quality score, the ``n`` lowest —
    highest with ``descending``): one row each — reference | target | mask overlay — with the caption
    underneath. Writes a PNG to ``out``."""
    samples: Iterator[dict[str, Any]] = iter_samples(root)
    if sort_by:  # the json of every sample decides which n images are read
        order = sorted(enumerate(iter_sample_json(root)), key=lambda im: quality_sort_key(im[1], sort_by, descending))
        wanted = {i: rank for rank, (i, _) in enumerate(order[:n])}
        picked = sorted(((wanted[i], s) for i, s in enumerate(iter_samples(root)) if i in wanted), key=lambda x: x[0])
        samples = iter(s for _, s in picked)
    sheet = contact_sheet(samples, n, cell, root)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def contact_sheet(samples: Iterable[dict[str, Any]], n: int, cell: int, where: Any) -> Image.Image:
    """The first ``n`` of ``samples`` (``iter_samples`` dicts) as one RGB image: a row each — reference |
    target | mask overlay — with the caption underneath. ValueError (one line, naming ``where`` and the
    sample) when an image does not decode or there is no sample."""
    rows = []
    for sample in samples:
        if len(rows) >= n:
            break
        try:
            ref = Image.open(io.BytesIO(sample["ref.png"])).convert("RGB")
            tgt = Image.open(io.BytesIO(sample["tgt.jpg"])).convert("RGB")
            mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"])).convert("L").resize(tgt.size)) > 127
        except DECODE_ERRORS as e:  # an undecodable member: one line naming it (run `manifest verify` for all)
            raise ValueError(
                f"{where}: sample {sample['key']!r} has an image that does not decode "
                f"({type(e).__name__}: {e}); run `dynaip manifest verify` on it"
            ) from None
        over = np.asarray(tgt).copy()
        over[mask] = (0.5 * over[mask] + 0.5 * np.array([255, 0, 0])).astype(np.uint8)
        rows.append(([ref, tgt, Image.fromarray(over)], sample["txt"].decode("utf-8", "replace")))
    if not rows:
        raise ValueError(f"{where} has no samples to show")
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
    return sheet
