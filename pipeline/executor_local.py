"""Runs reader → stages → writer on one machine.

Inputs are cut into chunks of ``shards.inputs_per_shard`` records in reader order; chunk i becomes
shard i. Chunks already finished in ``out`` (marker + intact shards, same input fingerprint) are
skipped, so re-running resumes and gives byte-identical output. Model batches never span chunks.
"""

from __future__ import annotations

import importlib.metadata as md
import itertools
import platform
from pathlib import Path
from typing import Any, Iterable, Iterator

from pipeline.recipe import Recipe
from pipeline.records import Reject, SourceRecord
from pipeline.chunking import assemble, batch_outcome, plan_chunk
from pipeline.sources import get_reader
from pipeline.stages import build_stages, run_stages
from pipeline.writer import ChunkResult, DatasetWriter, fingerprint, sha256_file

TOOLS = ("dynaip", "torch", "groundingdino-py", "segment-anything", "transformers", "webdataset", "pillow",
         "numpy", "scipy", "pycocotools", "av")


def chunked(records: Iterable[SourceRecord | Reject], size: int) -> Iterator[tuple[int, list[SourceRecord | Reject]]]:
    """``(chunk index, records)`` of ``size`` consecutive reader outputs (the last may be shorter)."""
    it = iter(records)
    for i in itertools.count():
        part = list(itertools.islice(it, size))
        if not part:
            return
        yield i, part


def input_fingerprint(part: list[SourceRecord | Reject]) -> str:
    return fingerprint(f"{r.source}/{r.id}" for r in part)


def process_chunk(part: list[SourceRecord | Reject], start: int, stages: list, batch_size: int,
                  jpeg_quality: int = 95, timings: dict[str, float] | None = None
                  ) -> tuple[list[list[tuple[str, bytes]]], list[Reject]]:
    """Runs one chunk's records through ``stages`` in batches of ``batch_size``; returns
    ``(encoded samples, rejects)`` in input order. Samples are encoded right after their batch, so
    decoded pixels never pile up for a whole chunk. The batches are ``plan_chunk``'s, exactly as
    the Ray executor forms them."""
    outcome, tasks = plan_chunk(-1, part, start, batch_size)
    for task in tasks:
        items = run_stages(task.items, stages, timings)
        outcome.extend(batch_outcome(items, task.positions, jpeg_quality))
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
    return {"recipe": recipe.to_dict(), "source": {"kind": recipe.source.kind, "root": recipe.source.root},
            "versions": versions, "models": model_info}


def run_local(recipe: Recipe, out: str | Path, models: Any = None, *, limit: int | None = None,
              progress: bool = True, stages: list | None = None) -> dict[str, Any]:
    """Builds (or resumes) the dataset in ``out``; returns the manifest dict.

    ``models`` is a ``ModelsConfig`` (needed unless every record brings its own boxes and masks);
    ``limit`` keeps only the first N reader records; ``stages`` overrides ``build_stages``.
    """
    from tqdm import tqdm

    # The reader checks its source first: a root / glob / split that matches nothing stops the run here,
    # before the output folder is touched or any model loads.
    records: Iterable = get_reader(recipe.source.kind)(recipe.source)
    writer = DatasetWriter(out, recipe.recipe_hash, jpeg_quality=recipe.shards.jpeg_quality,
                           max_bytes=recipe.shards.max_bytes)
    writer.prepare(recipe.to_dict())
    stages = stages if stages is not None else build_stages(recipe, models)
    if limit is not None:
        records = itertools.islice(records, limit)
    k = recipe.shards.inputs_per_shard
    results: list[ChunkResult] = []
    bar = tqdm(total=limit, unit="input", desc="curate", disable=not progress)
    accepted = rejected = 0
    for chunk, part in chunked(records, k):
        fp = input_fingerprint(part)
        res = writer.done(chunk, fp)
        if res is None:
            timings: dict[str, float] = {}
            encoded, rejects = process_chunk(part, chunk * k, stages, recipe.executor.batch_size,
                                              recipe.shards.jpeg_quality, timings)
            res = writer.write_chunk(chunk, fp, len(part), encoded, rejects, timings)
        results.append(res)
        accepted, rejected = accepted + res.accepted, rejected + res.rejected
        bar.update(len(part))
        bar.set_postfix(accepted=accepted, rejected=rejected)
    bar.close()
    return writer.finalize(results, run_info(recipe, models))
