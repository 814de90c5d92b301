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
from pipeline.sample import make_items
from pipeline.sources import get_reader
from pipeline.stages import build_stages, run_stages
from pipeline.writer import ChunkResult, DatasetWriter, encode_sample, fingerprint, sha256_file

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
    decoded pixels never pile up for a whole chunk."""
    outcome: list[tuple[int, Any]] = [(i, r) for i, r in enumerate(part) if isinstance(r, Reject)]
    positions = [i for i, r in enumerate(part) if isinstance(r, SourceRecord)]
    items = make_items([part[i] for i in positions], start)
    for b in range(0, len(items), batch_size):
        batch = run_stages(items[b:b + batch_size], stages, timings)
        for pos, item in zip(positions[b:b + batch_size], batch):
            if item.reject is not None:
                outcome.append((pos, item.reject))
            elif not item.samples:
                outcome.append((pos, Reject(source=item.record.source, id=item.record.id, stage="pair",
                                            reason="no sample produced")))
            else:
                try:
                    outcome.append((pos, [(s.key, encode_sample(s, jpeg_quality)) for s in item.samples]))
                except Exception as e:
                    outcome.append((pos, Reject(source=item.record.source, id=item.record.id, stage="write",
                                                reason=f"cannot encode the sample: {type(e).__name__}: {e}")))
        for item in items[b:b + batch_size]:  # free pixels
            item.target = item.reference = item.ref_image = None
            item.samples = []
    encoded, rejects, seen = [], [], set()
    for pos, x in sorted(outcome, key=lambda t: t[0]):
        if isinstance(x, Reject):
            rejects.append(x)
        elif any(key in seen for key, _ in x):  # a source repeating an id must not repeat a key
            r = part[pos]
            rejects.append(Reject(source=r.source, id=r.id, stage="write",
                                  reason=f"duplicate sample key {x[0][0]} (the source repeats this id)"))
        else:
            seen.update(key for key, _ in x)
            encoded.extend(members for _, members in x)
    return encoded, rejects


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

    writer = DatasetWriter(out, recipe.recipe_hash, jpeg_quality=recipe.shards.jpeg_quality,
                           max_bytes=recipe.shards.max_bytes)
    writer.prepare(recipe.to_dict())
    stages = stages if stages is not None else build_stages(recipe, models)
    records: Iterable = get_reader(recipe.source.kind)(recipe.source)
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
