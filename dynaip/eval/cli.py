"""``dynaip eval ...``: benchmark construction, generation, scoring and reports.

Wire into the main CLI with ``add_eval_parser(subparsers)``; each subcommand sets ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dynaip.models import sampling

log = logging.getLogger("dynaip.eval")


def _bench_single(args: argparse.Namespace) -> int:
    from .bench_single import SingleBenchConfig, read_single_pool
    from .cases import write_cases

    pool = read_single_pool(
        SingleBenchConfig(pool=args.pool, seed=args.seed, strict=args.strict, allow_partial=args.allow_partial)
    )
    n = write_cases(args.out, pool.cases)
    cats = {}
    for c in pool.cases:
        cats[c.category] = cats.get(c.category, 0) + 1
    print(
        f"{n} DreamBench++ cases written to {args.out} ({', '.join(f'{k}: {v}' for k, v in cats.items())}; "
        f"{pool.layout} layout)"
    )
    if pool.problems:
        print(f"partial pool ({pool.describe()}): {'; '.join(pool.problems)}")
    return 0


def _bench_multi(args: argparse.Namespace) -> int:
    from .bench_multi import MultiBenchConfig, build_multi_cases
    from .cases import write_cases

    cases = build_multi_cases(MultiBenchConfig(pool=args.pool, seed=args.seed))
    n = write_cases(args.out, cases)
    two = sum(1 for c in cases if len(c.subjects) == 2)
    print(
        f"{n} DynaIP-Bench cases written to {args.out} ({two} two-subject, {n - two} three-subject, "
        f"{len({c.category for c in cases})} combination types)"
    )
    return 0


def _granularity(text: str | None) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--granularity {text!r}: expected three numbers like 1,0,0") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--granularity {text!r}: expected three numbers (low,mid,high)")
    return parts  # type: ignore[return-value]


def _generate(args: argparse.Namespace) -> int:
    from .cases import read_cases
    from .generate import GenerateSettings, real_pipe_factory, run_generation

    cases = read_cases(args.cases)
    if args.limit is not None:
        cases = cases[: args.limit]
    settings = GenerateSettings(
        steps=args.steps,
        height=args.height,
        width=args.width,
        guidance=args.guidance,
        scale=args.scale,
        granularity=args.granularity,
        auto_mask=args.auto_mask,
    )
    adapter = str(Path(args.adapter).resolve())
    summary = run_generation(
        cases,
        args.out,
        settings=settings,
        pipe_factory=real_pipe_factory(str(Path(args.models).resolve()), adapter, args.device, args.auto_mask),
        ray_address=args.ray_address,
        num_workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        adapter=adapter,
    )
    print(
        f"generate: {summary.generated} generated, {summary.skipped} already done, {summary.total} cases → {args.out}"
    )
    return 0


def _score(args: argparse.Namespace) -> int:
    from .cases import read_cases
    from .judge import EvalConfig
    from .score import ALL_METRICS, ScoreSettings, score_method

    cases = read_cases(args.cases)
    cfg = EvalConfig.from_yaml(args.config) if args.config else EvalConfig()
    metrics = tuple(m.strip() for m in args.metrics.split(",")) if args.metrics else ALL_METRICS
    clip_paths = None
    if args.models:
        from dynaip.models import ModelsConfig

        clip_paths = ModelsConfig.from_yaml(args.models).clip_vision
    images = Path(args.images)
    out = Path(args.out) if args.out else images / "scores"
    settings = ScoreSettings(
        method=args.method or images.resolve().name,
        metrics=metrics,
        concurrency=args.concurrency,
        device=args.device,
        runs=args.runs,
    )
    s = score_method(
        cases, images, out, cfg, settings, clip_paths=clip_paths, cases_file=str(Path(args.cases).resolve())
    )
    o = s["groups"]["overall"]
    fmt = lambda v, sd=None: "–" if v is None else f"{v:.4f}" + ("" if sd is None else f" ± {sd:.4f}")  # noqa: E731
    print(
        f"{s['method']} on {s['benchmark']}: CP {fmt(o['cp'], o['cp_std'])}  PF {fmt(o['pf'], o['pf_std'])}  "
        f"CP·PF {fmt(o['cp_pf'])}  CLIP-I {fmt(o['clip-i'])}  CLIP-T {fmt(o['clip-t'])}  DINO {fmt(o['dino'])}  "
        f"({s['n_images']}/{s['n_cases']} images; protocol {s['protocol']}, {s['runs']} judging run(s), "
        f"{s['failed_items']} items left out; summary in {out / 'summary.json'})"
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    for p in write_report(args.scores, args.out, n=args.n):
        print(p)
    return 0


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``eval`` with subcommands bench-single, bench-multi, generate, score, report."""
    p = subparsers.add_parser(
        "eval",
        help="benchmarks: build cases, generate, judge (CP/PF, CLIP, DINO), report",
        description="DreamBench++ and DynaIP-Bench evaluation. Typical order: bench-single / "
        "bench-multi → generate → score → report.",
    )
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="STEP")

    b = sub.add_parser("bench-single", help="DreamBench++ cases (150 subjects × 9 prompts = 1,350)")
    b.add_argument(
        "--pool",
        required=True,
        help="DreamBench++ root: images/live_subject/{animal,human}/NN.jpg, "
        "images/{object,style}/NN.jpg, captions/ mirrored (or the flat "
        "images/<category>/ layout)",
    )
    b.add_argument("--out", required=True, help="cases file to write (JSON Lines)")
    b.add_argument("--seed", type=int, default=0, help="base seed of the per-case generation seeds")
    check = b.add_mutually_exclusive_group()
    check.add_argument(
        "--strict",
        action="store_true",
        help="also require the release's exact shape: live_subject/ nesting, NN.jpg, captions of "
        "1 + 9 lines, no stray files",
    )
    check.add_argument(
        "--allow-partial",
        action="store_true",
        help="accept a pool that is not the full 150 × 9 (default: an error); the counts are printed",
    )
    b.set_defaults(func=_bench_single)

    m = sub.add_parser("bench-multi", help="DynaIP-Bench cases (642 two-subject + 246 three-subject = 888)")
    m.add_argument("--pool", required=True, help="typed pool: POOL/<type>/<name>.{jpg,png} [+ <name>.txt]")
    m.add_argument("--out", required=True, help="cases file to write (JSON Lines)")
    m.add_argument("--seed", type=int, default=0, help="seeds the subject draws and generation seeds")
    m.set_defaults(func=_bench_multi)

    g = sub.add_parser("generate", help="generate every case (resumable; Ray workers with --ray-address)")
    g.add_argument("--cases", required=True, help="cases file from bench-single / bench-multi")
    g.add_argument("--models", required=True, help="models.yaml with local checkpoint paths")
    g.add_argument("--adapter", required=True, help="adapter checkpoint directory")
    g.add_argument("--out", required=True, help="output directory (images/<case_id>.png + sidecars)")
    g.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster (auto, ray://host:10001, or local); without it cases run in this process",
    )
    g.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per cluster GPU)")
    g.add_argument("--gpus-per-worker", type=float, default=1.0, help="GPUs per Ray worker (default 1)")
    g.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    g.add_argument("--steps", type=int, default=sampling.STEPS)
    g.add_argument("--height", type=int, default=sampling.SIZE)
    g.add_argument("--width", type=int, default=sampling.SIZE)
    g.add_argument("--guidance", type=float, default=sampling.GUIDANCE)
    g.add_argument("--scale", type=float, default=1.0, help="image cross-attention weight λ")
    g.add_argument("--granularity", type=_granularity, default=None, help="HMoE weights low,mid,high, e.g. 1,0,0")
    g.add_argument(
        "--auto-mask",
        action="store_true",
        help="multi-subject masks from Grounding DINO + SAM on subject names instead of preset bands",
    )
    g.add_argument("--limit", type=int, default=None, help="only the first N cases (smoke runs)")
    g.set_defaults(func=_generate)

    s = sub.add_parser("score", help="CP / PF by VLM judges, CLIP-I, CLIP-T, DINO (resumable)")
    s.add_argument("--cases", required=True, help="the cases file the images were generated from")
    s.add_argument("--images", required=True, help="a generate --out directory")
    s.add_argument(
        "--config", default=None, help="eval config YAML: judges (+ optional dino); see jobs/configs/eval_judges.yaml"
    )
    s.add_argument("--models", default=None, help="models.yaml; its clip_vision weights give CLIP-I / CLIP-T")
    s.add_argument("--out", default=None, help="score directory (default IMAGES/scores)")
    s.add_argument("--method", default=None, help="method name in reports (default: the images directory name)")
    s.add_argument("--metrics", default=None, help="comma list from cp,pf,clip-i,clip-t,dino (default: all available)")
    s.add_argument("--concurrency", type=int, default=4, help="judge requests in flight")
    s.add_argument(
        "--runs",
        type=int,
        default=None,
        help="independent judging runs, each stored in OUT/judge_runN.jsonl and resumable; reported as "
        "mean ± sample std (default: 3 with protocol dreambench, 1 with open)",
    )
    s.add_argument("--device", default=None, help="torch device for CLIP / DINO")
    s.set_defaults(func=_score)

    r = sub.add_parser("report", help="Markdown + CSV tables (benchmark and paper layouts) and contact sheets")
    r.add_argument("--scores", required=True, nargs="+", help="score directories, one per method")
    r.add_argument("--out", required=True, help="report directory")
    r.add_argument("--n", type=int, default=12, help="cases per contact sheet")
    r.set_defaults(func=_report)
