"""Argparse wiring for ``dynaip curate``, ``dynaip synth`` and ``dynaip manifest show|verify|grid|contamination``.

``add_curate_parser(subparsers)`` / ``add_manifest_parser(subparsers)`` add the sub-commands; each
sets ``func`` to a handler ``(args) -> int`` (the exit code).
"""

from __future__ import annotations

import argparse
import sys


def add_curate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("curate", help="build (or resume) a dataset from a curation recipe")
    p.add_argument("--recipe", required=True, help="recipe YAML (see manifests/)")
    p.add_argument("--out", required=True, help="dataset directory (re-running resumes)")
    p.add_argument("--limit", type=int, default=None, help="only the first N input records")
    p.add_argument("--source-root", default=None, help="overrides source.root of the recipe")
    p.add_argument("--models", default=None, help="models.yaml with local checkpoint paths")
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (auto | host:port); default: an embedded local Ray "
        "(inside `ray job submit`, the job's cluster)",
    )
    p.add_argument(
        "--executor",
        choices=("ray", "local"),
        default="ray",
        help="ray (default; chunk workers on a Ray cluster write the shards) or local (one process, no Ray)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar and no progress lines")
    p.add_argument(
        "--progress-every",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="without a terminal (a Ray job's log), a progress line this often (default 5)",
    )
    p.set_defaults(func=run_curate)
    return p


def add_synth_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "synth",
        help="generate diptych cross pairs with FLUX.1-dev (a synth recipe), "
        "curate them into a dataset; re-running resumes",
    )
    p.add_argument("recipe", help="a recipe with source.kind: synth (see manifests/synth.yaml)")
    p.add_argument("--out", required=True, help="dataset directory (re-running resumes)")
    p.add_argument("--models", default=None, help="models.yaml with local checkpoint paths (flux, clip_vision, ...)")
    p.add_argument("--limit", type=int, default=None, help="only the first N diptychs")
    p.add_argument(
        "--ray-address", default=None, help="Ray cluster to join (auto | host:port); default: an embedded local Ray"
    )
    p.add_argument(
        "--executor",
        choices=("ray", "local"),
        default="ray",
        help="ray (default; GPU chunk workers generate, curate and write) or local (one process)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar and no progress lines")
    p.add_argument(
        "--progress-every",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="without a terminal (a Ray job's log), a progress line this often (default 5)",
    )
    p.set_defaults(func=run_synth, source_root=None)
    return p


def run_synth(args: argparse.Namespace) -> int:
    """``dynaip synth``: ``dynaip curate`` for a recipe whose source generates its diptychs."""
    from pipeline.recipe import Recipe

    kind = Recipe.from_yaml(args.recipe).source.kind
    if kind != "synth":
        raise ValueError(
            f"recipe {args.recipe} reads source.kind {kind!r}; `dynaip synth` runs synth recipes "
            "(manifests/synth.yaml), use `dynaip curate` for the others"
        )
    return run_curate(args)


def run_curate(args: argparse.Namespace) -> int:
    from pipeline.executor_local import run_local
    from pipeline.recipe import Recipe

    if args.limit is not None and args.limit < 0:
        raise SystemExit(f"--limit {args.limit}: must be >= 0")
    if args.progress_every <= 0:
        raise SystemExit(f"--progress-every {args.progress_every}: must be > 0")
    recipe = Recipe.from_yaml(args.recipe, source_root=args.source_root)
    models = None
    if args.models:
        from dynaip.models import ModelsConfig

        models = ModelsConfig.from_yaml(args.models)
    if args.executor == "local":
        if args.ray_address:
            raise ValueError("--ray-address needs --executor ray")
        manifest = run_local(
            recipe,
            args.out,
            models,
            limit=args.limit,
            progress=not args.no_progress,
            progress_every=args.progress_every,
        )
    else:
        from dynaip.cluster import ray_address_from_env
        from pipeline.executor_ray import run_ray

        manifest = run_ray(
            recipe,
            args.out,
            models,
            limit=args.limit,
            progress=not args.no_progress,
            address=ray_address_from_env(args.ray_address),
            progress_every=args.progress_every,
        )
    t = manifest["totals"]
    print(
        f"{args.out}: {t['inputs']} inputs, {t['accepted']} accepted, {t['rejected']} rejected, "
        f"{t['samples']} samples in {len(manifest['shards'])} shards"
    )
    return 0


def add_manifest_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("manifest", help="inspect a dataset directory")
    sub = p.add_subparsers(dest="manifest_command", required=True)
    s = sub.add_parser("show", help="summary: sources, samples, shards, bytes, rejects by reason")
    s.add_argument("dir")
    s.set_defaults(func=run_show)
    v = sub.add_parser("verify", help="re-hash and re-count every shard; exit 1 on any mismatch")
    v.add_argument("dir")
    v.set_defaults(func=run_verify)
    g = sub.add_parser("grid", help="contact sheet PNG: reference | target | mask overlay, caption")
    g.add_argument("dir")
    g.add_argument("--out", required=True, help="PNG to write")
    g.add_argument("--n", type=int, default=8, help="number of samples")
    g.add_argument(
        "--sort-by",
        default=None,
        choices=("aesthetic", "sharpness", "subject_pixels", "det_score", "mask_score"),
        help="show the samples lowest in this quality score first (docs/curation_quality.md)",
    )
    g.add_argument("--descending", action="store_true", help="with --sort-by: highest first")
    g.set_defaults(func=run_grid)
    c = sub.add_parser(
        "contamination", help="samples whose target or reference copies a benchmark image; exit 1 when any does"
    )
    c.add_argument("dir")
    c.add_argument(
        "--against",
        action="append",
        required=True,
        metavar="ROOT",
        help="a benchmark root (DreamBench++, a DynaIP-Bench pool or a folder of images); repeatable",
    )
    c.add_argument(
        "--recipe",
        default=None,
        help="take the thresholds from this recipe's decontamination section (default: its defaults)",
    )
    c.add_argument("--models", default=None, help="models.yaml: its clip_vision runs the embedding check")
    c.set_defaults(func=run_contamination)
    return p


def run_contamination(args: argparse.Namespace) -> int:
    """Exit 0 when no sample matches, 1 when some do (one CONTAMINATED line each), 2 on errors."""
    from pipeline.contamination import contamination
    from pipeline.recipe import DecontaminationConfig, Recipe

    cfg = Recipe.from_yaml(args.recipe).decontamination if args.recipe else DecontaminationConfig()
    embed = None
    if args.models and cfg.min_similarity is not None:
        from dynaip.models import ModelsConfig
        from pipeline.decontam import clip_embedder

        embed = clip_embedder(ModelsConfig.from_yaml(args.models).clip_vision)
    report = contamination(args.dir, args.against, cfg, embed)
    for f in report.findings:
        print(f.line())
    print(report.summary(args.dir, cfg))
    return 1 if report.findings else 0


def run_show(args: argparse.Namespace) -> int:
    from dynaip.dataset.inspect import show

    print(show(args.dir))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from dynaip.dataset.inspect import verify
    from dynaip.dataset.manifest import load_manifest

    problems = verify(args.dir)
    for line in problems:
        print(f"MISMATCH {line}")
    if problems:
        return 1
    print(f"{args.dir}: {len(load_manifest(args.dir)['shards'])} shards verified")
    return 0


def run_grid(args: argparse.Namespace) -> int:
    from dynaip.dataset.inspect import grid

    print(grid(args.dir, args.out, n=args.n, sort_by=args.sort_by, descending=args.descending))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m pipeline.cli``) until ``dynaip/cli.py`` wires these in."""
    parser = argparse.ArgumentParser(prog="dynaip")
    sub = parser.add_subparsers(dest="command", required=True)
    add_curate_parser(sub)
    add_synth_parser(sub)
    add_manifest_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
