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

from pipeline.chunking import assemble, batch_outcome, plan_chunk
from pipeline.orchestrate import (ChunkWorker, LocalPool, Progress, check_source, chunked, curate,  # noqa: F401
                                 input_fingerprint)
from pipeline.recipe import Recipe
from pipeline.records import Reject, SourceRecord
from pipeline.stages import run_stages
from pipeline.store import redact_url
from pipeline.writer import sha256_file

TOOLS = ("dynaip", "torch", "groundingdino-py", "segment-anything", "transformers", "webdataset", "pillow",
         "numpy", "scipy", "pycocotools", "av", "imagehash")


def process_chunk(part: list[SourceRecord | Reject], start: int, stages: list, batch_size: int,
                  jpeg_quality: int = 95, timings: dict[str, float] | None = None, hash_size: int | None = 8
                  ) -> tuple[list[list[tuple[str, bytes]]], list[Reject], dict[str, list]]:
    """Runs one chunk's records through ``stages`` in batches of ``batch_size``; returns
    ``(encoded samples, rejects, ledger)`` in input order. Samples are encoded right after their batch, so
    decoded pixels never pile up for a whole chunk. The batches are ``plan_chunk``'s, exactly as
    the Ray executor forms them."""
    outcome, tasks = plan_chunk(-1, part, start, batch_size)
    for task in tasks:
        items = run_stages(task.items, stages, timings)
        outcome.extend(batch_outcome(items, task.positions, jpeg_quality, hash_size))
    return assemble(part, outcome)


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
    if recipe.captioning.model:
        model_info["captioner"] = {"path": recipe.captioning.model}
    d = recipe.to_dict()
    d["source"]["root"] = redact_url(d["source"]["root"])
    return {"recipe": d, "source": {"kind": recipe.source.kind, "root": redact_url(recipe.source.root)},
            "versions": versions, "models": model_info}


def run_local(recipe: Recipe, out: str | Path, models: Any = None, *, limit: int | None = None,
              progress: bool = True, stages: list | None = None, progress_every: float = 5.0) -> dict[str, Any]:
    """Builds (or resumes) the dataset in ``out`` (a path or fsspec URL); returns the manifest dict.

    ``models`` is a ``ModelsConfig`` (needed unless every record brings its own boxes and masks);
    ``limit`` keeps only the first N reader records; ``stages`` overrides ``build_stages``.
    """
    check_source(recipe)  # before the stages (and their models) are built
    pool = LocalPool(ChunkWorker(recipe, models, str(out), stages=stages))
    prog = Progress(recipe, limit, enabled=progress, every=progress_every, desc="curate")
    return curate(recipe, str(out), pool, run_info(recipe, models), limit=limit, progress=prog)
