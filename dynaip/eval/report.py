"""Tables in the layout of the paper (Table 1: single-subject; Tables 2/3: multi-subject) and contact sheets.

Input: one or more score directories (``summary.json`` written by ``eval score``), one per method.
Output directory::

    OUT/report.md                      # Markdown tables, one section per benchmark
    OUT/report.csv                     # long format: benchmark, method, group, n, cp, pf, cp_pf, clip_i, clip_t, dino
    OUT/contact_<benchmark>.png        # rows of cases: reference(s) | one generated image per method, prompt below

Single-subject (Table 1): per category (animal, human, object, style) and overall, CP, PF and CP·PF
per method. Multi-subject (Tables 2/3): two-subject, three-subject and overall CP, PF, CP·PF, then
CP·PF per combination type. Embedding metrics (CLIP-I, CLIP-T, DINO) get their own table when present.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import textwrap
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from .cases import atomic_write_bytes, read_cases
from .generate import image_path

log = logging.getLogger(__name__)
EMBED_COLUMNS = (("clip-i", "CLIP-I"), ("clip-t", "CLIP-T"), ("dino", "DINO"))


def load_summary(path: str | Path) -> dict:
    """``summary.json`` from a score directory (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    if not p.is_file():
        raise FileNotFoundError(f"no score summary at '{p}'; run `dynaip eval score` for that method first")
    summary = json.loads(p.read_text())
    if summary.get("format") != "dynaip-eval-summary/1":
        raise ValueError(f"'{p}' is not an eval summary (format {summary.get('format')!r}); pass an `eval score` --out dir")
    return summary


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _main_groups(summaries: Sequence[dict]) -> tuple[list[str], list[str]]:
    """(groups for the headline table, combination groups for the per-type table)."""
    names: list[str] = []
    for s in summaries:  # summary.json sorts its keys; group_order keeps the table order
        names += [g for g in s.get("group_order", sorted(s["groups"])) if g not in names]
    tail = sorted(g for g in names if g.endswith(" subjects")) + ["overall"]
    names = [g for g in names if g not in tail]
    if summaries[0]["benchmark"] == "dreambench++":
        return names + tail, []
    return tail, names


def benchmark_markdown(summaries: Sequence[dict]) -> str:
    """The Markdown section of one benchmark (all summaries share it)."""
    bench = summaries[0]["benchmark"]
    headline, combos = _main_groups(summaries)
    title = ("DreamBench++ (single subject; paper Table 1 layout)" if bench == "dreambench++"
             else f"{bench} (multi-subject; paper Tables 2/3 layout)")
    header = ["Method"] + [f"{g.title() if g != 'overall' else 'Overall'} {m}" for g in headline for m in ("CP", "PF", "CP·PF")]
    rows = [[s["method"]] + [_fmt(s["groups"].get(g, {}).get(k)) for g in headline for k in ("cp", "pf", "cp_pf")]
            for s in summaries]
    parts = [f"## {title}", "", _md_table(header, rows), ""]
    if combos:
        header = ["Method"] + [f"{g} CP·PF" for g in combos]
        rows = [[s["method"]] + [_fmt(s["groups"].get(g, {}).get("cp_pf")) for g in combos] for s in summaries]
        parts += ["CP·PF per combination type:", "", _md_table(header, rows), ""]
    if any(s["groups"]["overall"].get(k) is not None for s in summaries for k, _ in EMBED_COLUMNS):
        header = ["Method"] + [label for _, label in EMBED_COLUMNS]
        rows = [[s["method"]] + [_fmt(s["groups"]["overall"].get(k)) for k, _ in EMBED_COLUMNS] for s in summaries]
        parts += ["Embedding similarities (overall):", "", _md_table(header, rows), ""]
    counts = ", ".join(f"{s['method']}: {s['n_images']}/{s['n_cases']} images, {s['failed_items']} unparsed judge items"
                       for s in summaries)
    judges = sorted({j for s in summaries for j in s["judges"]})
    parts += [f"Judges averaged: {', '.join(judges) or 'none'}. Coverage — {counts}.", ""]
    return "\n".join(parts)


def write_csv(summaries: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["benchmark", "method", "group", "n", "cp", "pf", "cp_pf", "clip_i", "clip_t", "dino"])
    for s in summaries:
        for g, st in s["groups"].items():
            w.writerow([s["benchmark"], s["method"], g, st["n"]] +
                       ["" if st.get(k) is None else f"{st[k]:.6f}" for k in ("cp", "pf", "cp_pf", "clip-i", "clip-t", "dino")])
    return buf.getvalue()


def _fit(path: str | Path, cell: int) -> Image.Image:
    canvas = Image.new("RGB", (cell, cell), "white")
    try:
        im = Image.open(path).convert("RGB")
    except (OSError, FileNotFoundError):
        ImageDraw.Draw(canvas).text((8, cell // 2), "missing", fill=(200, 0, 0))
        return canvas
    f = cell / max(im.size)  # fit the cell, up or down
    im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.BICUBIC)
    canvas.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2))
    return canvas


def contact_sheet(summaries: Sequence[dict], n: int = 12, cell: int = 192) -> Image.Image | None:
    """``n`` evenly spaced cases: reference(s) | each method's image, the prompt underneath each row."""
    cases_file = summaries[0].get("cases_file")
    if not cases_file or not Path(cases_file).is_file():
        log.warning("report: cases file %r of %s not found: no contact sheet", cases_file, summaries[0]["method"])
        return None
    cases = read_cases(cases_file)
    if not cases:
        return None
    step = max(1, len(cases) // n)
    chosen = cases[::step][:n]
    n_refs = max(len(c.subjects) for c in chosen)
    cols = n_refs + len(summaries)
    font = ImageFont.load_default()
    text_h, pad = 34, 4
    header_h = 18
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, header_h + len(chosen) * (cell + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for j in range(cols):
        label = f"reference {j + 1}" if j < n_refs else summaries[j - n_refs]["method"]
        draw.text((pad + j * (cell + pad), 3), label[:30], fill=(0, 0, 0), font=font)
    for i, case in enumerate(chosen):
        y = header_h + i * (cell + text_h + pad)
        tiles = [s.path for s in case.subjects] + [None] * (n_refs - len(case.subjects))
        tiles += [image_path(s["images_dir"], case.id) for s in summaries]
        for j, t in enumerate(tiles):
            if t is not None:
                sheet.paste(_fit(t, cell), (pad + j * (cell + pad), y))
        chars = max(20, (cols * (cell + pad)) // 6)
        lines = textwrap.wrap(f"[{case.id}] {case.prompt}", chars)[:2]
        draw.text((pad, y + cell + 2), "\n".join(lines), fill=(0, 0, 0), font=font)
    return sheet


def write_report(score_dirs: Sequence[str | Path], out_dir: str | Path, *, n: int = 12) -> list[Path]:
    """Writes report.md, report.csv and one contact sheet per benchmark; returns the written paths."""
    summaries = [load_summary(d) for d in score_dirs]
    if not summaries:
        raise ValueError("no score directories given; pass --scores DIR [DIR ...]")
    methods = [(s["benchmark"], s["method"]) for s in summaries]
    if len(set(methods)) != len(methods):
        raise ValueError(f"two score directories report the same (benchmark, method) {methods}; "
                         "score them with distinct --method names")
    out_dir = Path(out_dir)
    by_bench: dict[str, list[dict]] = {}
    for s in summaries:
        by_bench.setdefault(s["benchmark"], []).append(s)
    md = ["# DynaIP evaluation", ""] + [benchmark_markdown(v) for v in by_bench.values()]
    written = [out_dir / "report.md", out_dir / "report.csv"]
    atomic_write_bytes(written[0], "\n".join(md).encode("utf-8"))
    atomic_write_bytes(written[1], write_csv(summaries).encode("utf-8"))
    for bench, group in by_bench.items():
        sheet = contact_sheet(group, n=n)
        if sheet is not None:
            buf = io.BytesIO()
            sheet.save(buf, format="PNG")
            path = out_dir / f"contact_{bench.replace('+', 'p')}.png"
            atomic_write_bytes(path, buf.getvalue())
            written.append(path)
    return written
