"""Runs reader → stages → writer in this process (no Ray).

Inputs are cut into chunks of ``shards.inputs_per_shard`` records in reader order; chunk i becomes
shard i. Chunks already finished in ``out`` (marker + intact shards, same input fingerprint) are
skipped, so re-running resumes and gives byte-identical output. Model batches never span chunks.
The run itself is ``pipeline.orchestrate.curate`` with one in-process worker — the Ray executor runs
the same code with a pool of workers, so both write the same bytes.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
from pathlib import Path
from typing import Any

from pipeline.chunking import process_chunk  # noqa: F401  (re-exported: callers and tests import it from here)
from pipeline.orchestrate import (  # noqa: F401  (re-exported: callers and tests import these from here)
    ChunkWorker,
    LocalPool,
    Progress,
    check_out,
    check_source,
    chunked,
    curate,
    input_fingerprint,
)
from pipeline.recipe import Recipe
from dynaip.dataset.store import redact_url
from pipeline.writer import sha256_file

TOOLS = (
    "dynaip",
    "torch",
    "groundingdino-py",
    "segment-anything",
    "transformers",
    "webdataset",
    "pillow",
    "numpy",
    "scipy",
    "pycocotools",
    "av",
    "imagehash",
)


def run_info(recipe: Recipe, models: Any) -> dict[str, Any]:
    """Recipe, tool versions and model checkpoint hashes for the manifest."""
    versions = {}
    for name in TOOLS:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    model_info: dict[str, Any] = {}
    if models is not None:
        for name in ("grounding_dino", "sam"):
            paths = getattr(models, name, None)
            if paths is None:
                continue
            entry = {k: v for k, v in vars(paths).items()}
            ckpt = Path(paths.checkpoint)
            entry["checkpoint_sha256"] = sha256_file(ckpt) if ckpt.is_file() else None
            model_info[name] = entry
    captioner = recipe.captioning.model or getattr(models, "captioner", None)
    if captioner and any(o == "model" for o in recipe.captioning.order):
        weights = sorted(Path(captioner).glob("*.safetensors")) if Path(captioner).is_dir() else []
        model_info["captioner"] = {
            "path": captioner,
            "prompt": recipe.captioning.prompt,
            "weights_sha256": {w.name: sha256_file(w) for w in weights},
        }
    aesthetic = getattr(models, "aesthetic", None)
    if aesthetic is not None:
        head = Path(aesthetic.path)
        clip = aesthetic.clip or models.clip_vision
        model_info["aesthetic"] = {
            "path": aesthetic.path,
            "clip": clip.path,
            "checkpoint_sha256": sha256_file(head) if head.is_file() else None,
        }
    dc = recipe.decontamination
    if dc.against and dc.min_similarity is not None and models is not None:  # the embedding check's model
        model_info["decontamination"] = {"clip_vision": models.clip_vision.path}
    d = recipe.to_dict()
    d["source"]["root"] = redact_url(d["source"]["root"])
    return {
        "recipe": d,
        "source": {"kind": recipe.source.kind, "root": redact_url(recipe.source.root)},
        "versions": versions,
        "models": model_info,
    }


def run_local(
    recipe: Recipe,
    out: str | Path,
    models: Any = None,
    *,
    limit: int | None = None,
    progress: bool = True,
    stages: list | None = None,
    progress_every: float = 5.0,
) -> dict[str, Any]:
    """Builds (or resumes) the dataset in ``out`` (a path or fsspec URL); returns the manifest dict.

    ``models`` is a ``ModelsConfig`` (needed unless every record brings its own boxes and masks);
    ``limit`` keeps only the first N reader records; ``stages`` overrides ``build_stages``.
    """
    check_source(recipe)  # before the stages (and their models) are built
    check_out(str(out))
    pool = LocalPool(ChunkWorker(recipe, models, str(out), stages=stages))
    prog = Progress(recipe, limit, enabled=progress, every=progress_every, desc="curate")
    return curate(recipe, str(out), pool, run_info(recipe, models), limit=limit, progress=prog)
