"""Tables for DreamBench++ (the benchmark's own layout next to ours) and DynaIP-Bench (the paper's Table 2
layout), plus contact sheets.

Input: one or more score directories (``summary.json`` written by ``eval score``), one per method.
Output directory::

    OUT/report.md                      # Markdown tables, one section per benchmark
    OUT/report.csv                     # long format, one row per method and group (see ``write_csv``)
    OUT/contact_<benchmark>.png        # rows of cases: reference(s) | one generated image per method, prompt below

DreamBench++, the benchmark's layout: CP per category (animal, human, object, style) and overall, PF
per prompt type (photorealistic, style transfer, imaginative) and overall, each as mean ± sample std
over the judging runs rounded to 3 decimals, and CP·PF = the product of the two rounded overall means
(``published_cp_pf``). Ours: CP, PF and CP·PF per category and overall (unrounded means, CP·PF their
product). DynaIP-Bench (paper Table 2 layout): two-subject, three-subject and overall CP, PF, CP·PF, then
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

from .bench_single import CATEGORIES, PROMPT_TYPES
from .cases import atomic_write_bytes, read_cases
from .generate import image_path

log = logging.getLogger(__name__)
EMBED_COLUMNS = (("clip-i", "CLIP-I"), ("clip-t", "CLIP-T"), ("dino", "DINO"))
SUMMARY_FORMAT = "dynaip-eval-summary/2"


def load_summary(path: str | Path) -> dict:
    """``summary.json`` from a score directory (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    if not p.is_file():
        raise FileNotFoundError(f"no score summary at '{p}'; run `dynaip eval score` for that method first")
    try:
        summary = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"'{p}' is not JSON ({e}); rerun `dynaip eval score` to rewrite it") from None
    if summary.get("format") == "dynaip-eval-summary/1":
        raise ValueError(
            f"'{p}' was written before judging runs existed; rerun `dynaip eval score` on that directory "
            "(rename its scores.jsonl to judge_run1.jsonl first to keep its judge scores as run 1)"
        )
    if summary.get("format") != SUMMARY_FORMAT:
        raise ValueError(
            f"'{p}' is not an eval summary (format {summary.get('format')!r}); pass an `eval score` --out dir"
        )
    return summary


def _fmt(v: float | None, sd: float | None = None) -> str:
    """3 decimals, with ``± sd`` when there is a spread (two runs or more)."""
    return "–" if v is None else f"{v:.3f}" + ("" if sd is None else f" ± {sd:.3f}")


def _published(v: float | None, sd: float | None = None) -> str:
    """The benchmark's rounding: mean and std each rounded to 3 decimals."""
    return "–" if v is None else f"{round(v, 3):.3f}" + ("" if sd is None else f" ± {round(sd, 3):.3f}")


def published_cp_pf(cp: float | None, pf: float | None) -> float | None:
    """The benchmark's CP·PF: the product of the overall CP and PF means, each first rounded to 3 decimals."""
    return None if cp is None or pf is None else round(cp, 3) * round(pf, 3)


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


def dreambench_benchmark_table(summaries: Sequence[dict]) -> str:
    """The DreamBench++ table as the benchmark reports it (CP by category, PF by prompt type, CP·PF overall)."""
    types = [name for name, _ in PROMPT_TYPES]
    header = (
        ["Method"]
        + [f"CP {c.title()}" for c in CATEGORIES]
        + ["CP Overall"]
        + [f"PF {t[0].upper() + t[1:]}" for t in types]
        + ["PF Overall", "CP·PF"]
    )
    rows = []
    for s in summaries:
        g, pt, o = s["groups"], s.get("prompt_types", {}), s["groups"]["overall"]
        cp_pf = published_cp_pf(o.get("cp"), o.get("pf"))
        rows.append(
            [s["method"]]
            + [_published(g.get(c, {}).get("cp"), g.get(c, {}).get("cp_std")) for c in CATEGORIES]
            + [_published(o.get("cp"), o.get("cp_std"))]
            + [_published(pt.get(t, {}).get("pf"), pt.get(t, {}).get("pf_std")) for t in types]
            + [_published(o.get("pf"), o.get("pf_std")), "–" if cp_pf is None else f"{cp_pf:.3f}"]
        )
    return _md_table(header, rows)


def _ours_cells(st: dict) -> list[str]:
    return [_fmt(st.get("cp"), st.get("cp_std")), _fmt(st.get("pf"), st.get("pf_std")), _fmt(st.get("cp_pf"))]


def benchmark_markdown(summaries: Sequence[dict]) -> str:
    """The Markdown section of one benchmark (all summaries share it)."""
    bench = summaries[0]["benchmark"]
    headline, combos = _main_groups(summaries)
    parts: list[str] = []
    if bench == "dreambench++":
        parts += [
            "## DreamBench++ (single subject)",
            "",
            "The benchmark's own table: CP per category, PF per prompt type (prompts 0–3 photorealistic, 4–6 "
            "style transfer, 7–8 imaginative), mean ± sample std over the judging runs rounded to 3 decimals; "
            "CP·PF is the product of the rounded overall means.",
            "",
            dreambench_benchmark_table(summaries),
            "",
            "Ours (paper Table 1 layout): CP, PF and CP·PF per image category.",
            "",
        ]
    else:
        parts += [f"## {bench} (multi-subject; paper Table 2 layout)", ""]
    header = ["Method"] + [
        f"{g.title() if g != 'overall' else 'Overall'} {m}" for g in headline for m in ("CP", "PF", "CP·PF")
    ]
    rows = [[s["method"]] + [cell for g in headline for cell in _ours_cells(s["groups"].get(g, {}))] for s in summaries]
    parts += [_md_table(header, rows), ""]
    if combos:
        header = ["Method"] + [f"{g} CP·PF" for g in combos]
        rows = [[s["method"]] + [_fmt(s["groups"].get(g, {}).get("cp_pf")) for g in combos] for s in summaries]
        parts += ["CP·PF per combination type:", "", _md_table(header, rows), ""]
    if any(s["groups"]["overall"].get(k) is not None for s in summaries for k, _ in EMBED_COLUMNS):
        header = ["Method"] + [label for _, label in EMBED_COLUMNS]
        rows = [[s["method"]] + [_fmt(s["groups"]["overall"].get(k)) for k, _ in EMBED_COLUMNS] for s in summaries]
        parts += ["Embedding similarities (overall):", "", _md_table(header, rows), ""]
    counts = ", ".join(
        f"{s['method']}: {s['n_images']}/{s['n_cases']} images, protocol {s['protocol']}, "
        f"{s['runs']} judging run(s), {s['failed_items']} judge items left out"
        for s in summaries
    )
    judges = sorted({j for s in summaries for j in s["judges"]})
    parts += [f"Judges averaged: {', '.join(judges) or 'none'}. Coverage — {counts}.", ""]
    return "\n".join(parts)


CSV_COLUMNS = (
    "benchmark",
    "method",
    "split",
    "group",
    "n",
    "runs",
    "cp",
    "cp_std",
    "pf",
    "pf_std",
    "cp_pf",
    "cp_pf_published",
    "clip_i",
    "clip_t",
    "dino",
)


def write_csv(summaries: Sequence[dict]) -> str:
    """One row per method and group: ``split`` is ``group`` (categories / combinations, subjects, overall) or
    ``prompt_type`` (DreamBench++); values unrounded, ``cp_pf_published`` as the benchmark rounds it."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    num = lambda v: "" if v is None else f"{v:.6f}"  # noqa: E731
    for s in summaries:
        for split, groups in (("group", s["groups"]), ("prompt_type", s.get("prompt_types", {}))):
            for g, st in groups.items():
                w.writerow(
                    [s["benchmark"], s["method"], split, g, st["n"], s["runs"]]
                    + [num(st.get(k)) for k in ("cp", "cp_std", "pf", "pf_std", "cp_pf")]
                    + [num(published_cp_pf(st.get("cp"), st.get("pf")))]
                    + [num(st.get(k)) for k in ("clip-i", "clip-t", "dino")]
                )
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
        raise ValueError(
            f"two score directories report the same (benchmark, method) {methods}; "
            "score them with distinct --method names"
        )
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
