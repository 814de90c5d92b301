"""`dynaip demo`: the whole chain on embedded defaults, on one machine.

1. tiny random-weight checkpoints in the real release formats (or real ones with ``--models``);
2. the bundled sample photos (scikit-image) curated with ``manifests/demo.yaml`` on an embedded
   local Ray (Grounding DINO → SAM → white-background references → intra/cross pairs → shards);
3. the manifest summary and a contact sheet;
4. a short training run of ``jobs/configs/tiny.yaml`` on two Ray Train workers, streaming the shards;
5. single-subject, two-subject (given masks) and automatic-mask generations with the trained adapter;
6. a list of every artefact.

With tiny random weights every stage runs for real, but detections are arbitrary and the pictures
are noise: the demo shows the plumbing, not quality.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "manifests" / "demo.yaml"
TINY_TRAIN_CONFIG = REPO / "jobs" / "configs" / "tiny.yaml"


def _step(n: int, total: int, text: str) -> float:
    print(f"\n[{n}/{total}] {text}", flush=True)
    return time.perf_counter()


def run_demo(
    out: str | Path, models: str | Path | None = None, *, small: bool = False, size: int = 128, steps: int | None = None
) -> dict[str, list[str]]:
    """Runs the demo into ``out``; returns ``{artefact kind: [paths]}``. ``small`` = fewer photos
    and training steps (what the test runs)."""
    import numpy as np
    import ray
    from PIL import Image

    from dynaip.console import progress_bars
    from dynaip.inference import DynaIPFluxPipeline
    from dynaip.models import ModelsConfig
    from dynaip.models.tiny import write_tiny_checkpoints
    from dynaip.train.config import TrainConfig
    from dynaip.train.trainer import RunSpec, run_training
    from dynaip.dataset.inspect import grid, iter_sample_json, show, verify
    from pipeline.executor_ray import run_ray
    from pipeline.recipe import Recipe
    from pipeline.demo_photos import write_sample_photos

    for needed in (DEMO_RECIPE, TINY_TRAIN_CONFIG):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{needed} is missing: run the demo from a source checkout "
                "(pip install -e .), which has manifests/ and jobs/configs/"
            )
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    total, started = 6, time.perf_counter()
    artefacts: dict[str, list[str]] = {}

    t = _step(1, total, "checkpoints")
    if models is None:
        models_yaml = write_tiny_checkpoints(out / "checkpoints")
        print(f"  tiny random-weight checkpoints: {models_yaml.parent}")
    else:
        models_yaml = Path(models).resolve()
    artefacts["models"] = [str(models_yaml)]
    mcfg = ModelsConfig.from_yaml(models_yaml)

    t = _step(2, total, "curating the sample photos on an embedded local Ray")
    photos = out / "photos"
    if small:
        write_sample_photos(photos, faces=1, names=["astronaut", "chelsea", "coffee"])
    else:
        write_sample_photos(photos)
    recipe = Recipe.from_yaml(DEMO_RECIPE, source_root=str(photos))
    dataset = out / "dataset"
    manifest = run_ray(recipe, dataset, mcfg, num_cpus=2)
    problems = verify(dataset)
    if problems:
        raise RuntimeError(f"the demo dataset failed verification: {problems[:3]}")
    print(f"  done in {time.perf_counter() - t:.0f}s; {len(manifest['shards'])} shards verified")
    artefacts["dataset"] = [
        str(dataset / "manifest.json"),
        *(str(dataset / s["path"]) for s in manifest["shards"]),
        str(dataset / "rejects.jsonl"),
    ]

    t = _step(3, total, "inspecting the dataset")
    print(show(dataset))
    sheet = grid(dataset, out / "dataset_grid.png", n=8)
    artefacts["contact sheet"] = [str(sheet)]
    if manifest["totals"]["samples"] == 0:
        raise RuntimeError("the demo curated no samples; see dataset/rejects.jsonl")

    t = _step(4, total, "training the tiny config on two Ray Train workers, streaming the shards")
    cfg = TrainConfig.from_yaml(TINY_TRAIN_CONFIG)
    pairs = {m.get("pair") for m in iter_sample_json(dataset)}  # the strict reader (dynaip/dataset/reader.py)
    if "cross" not in pairs:  # a dataset without cross pairs: the second stage trains on everything
        cfg = replace(cfg, stages=[replace(s, pair=None) if s.pair == "cross" else s for s in cfg.stages])
    run_dir = out / "run"
    if run_dir.is_dir():  # the demo's own run of an earlier demo: train afresh (run_training refuses old checkpoints)
        import shutil

        print(f"  replacing the earlier demo run in {run_dir}")
        shutil.rmtree(run_dir)
    spec = RunSpec(
        config=cfg.to_dict(),
        data=[str(dataset)],
        out=str(run_dir),
        models=str(models_yaml),
        max_steps=steps if steps is not None else (2 if small else None),
    )
    reported = run_training(cfg, spec) or {}
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    if not ckpts:
        raise RuntimeError(f"training wrote no checkpoint under {run_dir / 'checkpoints'}")
    ckpt = ckpts[-1]
    if reported:
        print(
            f"  {reported.get('step', 0):.0f} steps, loss {reported.get('loss', float('nan')):.4f}, "
            f"{reported.get('skipped', 0):.0f} undecodable samples skipped (reported through Ray Train)"
        )
    print(f"  done in {time.perf_counter() - t:.0f}s; adapter checkpoint {ckpt}")
    artefacts["checkpoint"] = [str(ckpt)]
    artefacts["metrics"] = [str(run_dir / "metrics.jsonl")]

    t = _step(5, total, "generating with the trained adapter")
    pipe = DynaIPFluxPipeline.from_local(mcfg, ckpt, with_auto_mask=True)
    progress_bars(pipe.flux)
    from pipeline.sources.folder import list_images

    images = list_images(photos)
    by_name = {p.stem: p for p in images}
    picks = [by_name[n] for n in ("chelsea", "astronaut") if n in by_name] or images[:2]
    refs = [Image.open(p).convert("RGB") for p in picks]
    gen = out / "generated"
    gen.mkdir(exist_ok=True)
    call = dict(num_inference_steps=4, height=size, width=size, max_sequence_length=32, seed=0)
    made = []
    single = pipe("a photo of a cat on the beach", references=refs[:1], **call)
    made.append(_save(single.images[0], gen / "single.png", single.settings))
    left = np.zeros((size, size), np.uint8)
    left[:, : size // 2] = 255
    two = pipe("a cat next to an astronaut", references=refs[:2], masks=[left, 255 - left], **call)
    made.append(_save(two.images[0], gen / "two_subjects.png", two.settings))
    try:  # tiny random detector: thresholds at 0 so it returns boxes (real runs keep 0.35 / 0.25)
        auto = pipe(
            "a cat next to a person",
            references=refs[:2],
            auto_mask=["cat", "person"],
            box_threshold=0.0,
            text_threshold=0.0,
            **call,
        )
        made.append(_save(auto.images[0], gen / "two_subjects_auto_mask.png", auto.settings))
    except ValueError as e:
        print(f"  automatic masks skipped: {e}")
    artefacts["generated"] = made
    print(f"  done in {time.perf_counter() - t:.0f}s")

    _step(6, total, f"finished in {time.perf_counter() - started:.0f}s; artefacts:")
    for kind, paths in artefacts.items():
        for p in paths:
            print(f"  {kind:14s} {p}")
    if ray.is_initialized():
        ray.shutdown()
    return artefacts


def _save(image, path: Path, settings: dict) -> str:
    from dynaip.atomic import atomic_save_image, atomic_write_text

    atomic_save_image(image, path)
    atomic_write_text(path.with_suffix(".json"), json.dumps(settings, indent=2, default=str))
    return str(path)


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole chain on tiny models and bundled photos (CPU, minutes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--models", default=None, help="models.yaml of real checkpoints (default: write tiny ones)")
    p.add_argument("--small", action="store_true", help="fewer photos and steps (a quick check)")
    p.add_argument("--size", type=int, default=128, help="generated image side in pixels (multiple of 16)")
    p.set_defaults(func=lambda a: (run_demo(a.out, a.models, small=a.small, size=a.size), 0)[1])
