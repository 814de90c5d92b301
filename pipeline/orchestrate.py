"""One curation run, shared by both executors; only *where* a chunk is built differs.

    reader (lazily, in the driver) → chunks of ``shards.inputs_per_shard`` records
      → finished chunks (marker + intact shards + same input fingerprint) are kept
      → ``ChunkWorker.build`` per remaining chunk: every stage over the chunk's model batches, then
        the chunk's ledger, shard(s) and marker are written *by the worker*
      → de-duplication: reducers over the ledgers (``pipeline.dedup``), then
        ``ChunkWorker.apply`` rewrites the chunks that hold a duplicate
      → manifest (driver, last)

The driver holds the records of the chunks in flight and one slim result per chunk (counts and shard
entries, no rejects, no sample bytes), so its memory does not grow with the number of inputs.
A pool is ``LocalPool`` (one worker in this process) or ``pipeline.executor_ray.RayPool``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import sys
import threading
import time
from typing import Any, Iterable, Iterator, Protocol

from pipeline.chunking import process_chunk
from pipeline.recipe import Recipe
from pipeline.records import Reject, SourceRecord
from pipeline.sources import get_license, get_reader
from pipeline.inputs import guard_records, input_fingerprint, source_identity
from dynaip.run_lock import RunLock
from pipeline.writer import ChunkResult, DatasetWriter, OutputDirError

log = logging.getLogger(__name__)


def chunked(records: Iterable[SourceRecord | Reject], size: int) -> Iterator[tuple[int, list[SourceRecord | Reject]]]:
    """``(chunk index, records)`` of ``size`` consecutive reader outputs (the last may be shorter)."""
    it = iter(records)
    for i in itertools.count():
        part = list(itertools.islice(it, size))
        if not part:
            return
        yield i, part


def read_records(recipe: Recipe, limit: int | None) -> Iterator[SourceRecord | Reject]:
    """The reader's records, with files that escape the source root through a symlink rejected."""
    records: Iterable = guard_records(get_reader(recipe.source.kind)(recipe.source), recipe.source.root)
    if limit is not None:
        records = itertools.islice(records, limit)
    return iter(records)


class ChunkWorker:
    """Builds whole chunks where it runs: the stages (models load on first use, once per worker),
    the chunk's ledger, shard(s) and marker. Returns slim results only."""

    def __init__(self, recipe: Recipe, models: Any, out: str, stages: list | None = None, threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(max(1, int(threads)))
        from pipeline.stages import build_stages

        self.recipe = recipe
        self.stages = stages if stages is not None else build_stages(recipe, models)
        self.writer = DatasetWriter(
            out, recipe.recipe_hash, jpeg_quality=recipe.shards.jpeg_quality, max_bytes=recipe.shards.max_bytes
        )
        self.node: str | None = None
        ray = sys.modules.get("ray")  # never imported here: the local executor runs without Ray
        if ray is not None and ray.is_initialized():
            self.node = ray.get_runtime_context().get_node_id()

    def build(self, chunk: int, part: list[SourceRecord | Reject], fp: str) -> ChunkResult:
        timings: dict[str, float] = {}
        r = self.recipe
        hash_size = r.dedup.hash_size if r.dedup.max_distance is not None else None
        encoded, rejects, ledger = process_chunk(
            part,
            chunk * r.shards.inputs_per_shard,
            self.stages,
            r.executor.batch_size,
            r.shards.jpeg_quality,
            timings,
            hash_size,
            r.dedup.max_thumb_diff is not None,
            r.executor.prefetch,
        )
        res = self.writer.write_chunk(chunk, fp, len(part), encoded, rejects, timings, ledger=ledger, node=self.node)
        return res.slim()

    def dedup_map(self, chunks: list[int], mapper: int, reducers: int) -> int:
        from pipeline.dedup_shuffle import run_mapper

        d = self.recipe.dedup
        self.writer.store.invalidate()
        return run_mapper(
            self.writer,
            chunks,
            self.recipe.shards.inputs_per_shard,
            d.max_distance,
            d.hash_size,
            d.max_thumb_diff,
            mapper,
            reducers,
        )

    def dedup(self, mappers: int, reducer: int, reducers: int) -> dict:
        from pipeline.dedup_shuffle import run_reducer

        d = self.recipe.dedup
        self.writer.store.invalidate()
        return run_reducer(self.writer, mappers, d.max_distance, d.hash_size, d.max_thumb_diff, reducer, reducers)

    def apply(self, chunk: int, duplicates: dict[str, str]) -> tuple[int, ChunkResult | None]:
        self.writer.store.invalidate()
        res = self.writer.apply_duplicates(chunk, duplicates, node=self.node)
        return chunk, (res.slim() if res is not None else None)

    def ping(self) -> str | None:
        return self.node

    def precision(self) -> str:
        """The precision this worker's model stages run at (``executor.precision`` with ``auto``
        resolved for the device the worker sees)."""
        from dynaip.models.precision import resolve_precision
        from pipeline.stages.common import resolve_device

        ex = self.recipe.executor
        return resolve_precision(ex.precision, resolve_device(ex.device))


class Pool(Protocol):
    size: int

    def submit(self, method: str, *args: Any) -> list[Any]: ...

    def drain(self) -> Iterator[Any]: ...

    def precisions(self) -> list[str]: ...

    def close(self) -> None: ...


class LocalPool:
    """One ``ChunkWorker`` in this process: ``submit`` runs the call at once."""

    size = 1

    def __init__(self, worker: ChunkWorker):
        self.worker = worker

    def submit(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args)]

    def drain(self) -> Iterator[Any]:
        return iter(())

    def precisions(self) -> list[str]:
        return [self.worker.precision()]

    def close(self) -> None:
        pass


def map_all(pool: Pool, method: str, calls: Iterable[tuple]) -> list[Any]:
    out = []
    for args in calls:
        out.extend(pool.submit(method, *args))
    out.extend(pool.drain())
    return out


class Progress:
    """Chunks done / total, images/s and rejects so far: a bar on a terminal, else a log line every
    ``every`` seconds (what a Ray job's log shows). The total comes from a second, counting pass
    over the reader in a background thread (it keeps no records)."""

    def __init__(
        self, recipe: Recipe, limit: int | None, *, enabled: bool = True, every: float = 5.0, desc: str = "curate"
    ):
        self.enabled, self.every, self.desc = enabled, every, desc
        self.k = recipe.shards.inputs_per_shard
        self.total: int | None = None
        self.chunks = self.inputs = self.rejected = self.kept = 0
        self.built_inputs = 0
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.bar = None
        if not enabled:
            return
        threading.Thread(target=self._count, args=(recipe, limit), daemon=True, name="curate-count").start()
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="chunk", desc=desc, file=sys.stderr)

    def _count(self, recipe: Recipe, limit: int | None) -> None:
        try:
            n = sum(1 for _ in read_records(recipe, limit))
        except Exception:  # the real pass reports reader errors
            return
        self.total = math.ceil(n / self.k)

    def update(self, res: ChunkResult, *, kept: bool = False) -> None:
        self.chunks += 1
        self.inputs += res.inputs
        self.rejected += res.rejected
        if kept:
            self.kept += 1
        else:
            self.built_inputs += res.inputs
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.bar is not None:
            if self.total is not None and self.bar.total != self.total:
                self.bar.total = self.total
            self.bar.set_postfix(images_s=f"{self.rate(now):.2f}", rejected=self.rejected, refresh=False)
            self.bar.update(1)
        elif now - self.last >= self.every:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def rate(self, now: float) -> float:
        return self.built_inputs / max(now - self.t0, 1e-9)

    def line(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        total = str(self.total) if self.total is not None else "?"
        pct = f" ({100 * self.chunks / self.total:.0f}%)" if self.total else ""
        kept = f", {self.kept} kept from an earlier run" if self.kept else ""
        return (
            f"{self.desc}: chunks {self.chunks}/{total}{pct}, {self.inputs} inputs, "
            f"{self.rate(now):.2f} images/s, {self.rejected} rejected so far{kept}, {now - self.t0:.0f} s"
        )

    def close(self, note: str = "") -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(self.line() + (f"; {note}" if note else ""), file=sys.stderr, flush=True)


def check_source(recipe: Recipe) -> dict[str, Any] | None:
    """The reader checks its source when called: a root / glob / split that matches nothing raises here,
    before the output folder is touched, Ray starts or any model loads (docs/sources.md). Returns what the
    source section selected, for readers that say (``SelectedRecords``), else None."""
    return getattr(get_reader(recipe.source.kind)(recipe.source), "selection", None)


def check_out(out: str) -> None:
    """``--out`` must name a directory (or nothing yet): one line before anything starts."""
    from dynaip.dataset.store import is_url
    from pipeline.writer import OutputDirError

    if not is_url(out) and os.path.exists(out) and not os.path.isdir(out):
        raise OutputDirError(f"--out {out} is a file, not a directory; pass a directory for the dataset")


def curate(
    recipe: Recipe,
    out: str,
    pool: Pool,
    info: dict[str, Any],
    *,
    limit: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Builds (or resumes) the dataset in ``out`` with ``pool``'s workers; returns the manifest.
    The whole run holds ``out``'s ``RunLock``: a second run into the same directory is refused."""
    selection = check_source(recipe)
    if selection is not None:  # e.g. the categories a partial download holds: the manifest says what was read
        info = {**info, "source_selection": selection}
    info = {**info, **decontamination_info(recipe)}  # a benchmark that is not there fails here, before --out
    check_out(out)
    writer = DatasetWriter(
        out, recipe.recipe_hash, jpeg_quality=recipe.shards.jpeg_quality, max_bytes=recipe.shards.max_bytes
    )
    fresh = not writer.store.exists()
    with RunLock(writer.store, what="curation run", error=OutputDirError):
        try:
            return _curate(recipe, writer, pool, info, limit, progress)
        except BaseException:
            if fresh:  # e.g. no --models: a run that wrote no chunk leaves no directory behind
                remove_if_pristine(writer)
            raise


def decontamination_info(recipe: Recipe) -> dict[str, Any]:
    """The manifest's ``decontamination`` entry (empty when off): the checks and, per benchmark, its path,
    layout, image count and content hash; ``removed`` is counted when the rejects are written. Lists (and
    hashes) every benchmark now, so one that is missing or holds a link out of it fails before anything runs."""
    c = recipe.decontamination
    if not c.against:
        return {}
    from pipeline.decontam import benchmarks_fingerprint, list_benchmarks

    benchmarks = list_benchmarks(c.against)
    return {
        "decontamination": {
            "fingerprint": benchmarks_fingerprint(benchmarks),
            "checks": {
                "max_distance": c.max_distance,
                "hash_size": c.hash_size,
                "max_thumb_diff": c.max_thumb_diff,
                "min_similarity": c.min_similarity,
            },
            "benchmarks": [{**b.describe(), "removed": 0} for b in benchmarks],
        }
    }


def count_removed(info: dict[str, Any]):
    """``on_reject`` for ``DatasetWriter.finalize``: counts each ``decontamination`` reject against the
    benchmark its reason names, in ``info``'s manifest entry (None when decontamination is off)."""
    entry = info.get("decontamination")
    if not entry:
        return None
    from pipeline.decontam import matched_root

    by_root = {b["path"]: b for b in entry["benchmarks"]}

    def on_reject(rj: dict[str, Any]) -> None:
        if rj.get("stage") == "decontamination":
            b = by_root.get(matched_root(str(rj.get("reason", ""))) or "")
            if b is not None:
                b["removed"] += 1

    return on_reject


def remove_if_pristine(writer: DatasetWriter) -> None:
    """Deletes a local output directory holding only what ``prepare`` and the lock create (no
    chunk was written), so a run that failed at setup leaves nothing behind."""
    import shutil

    st = writer.store
    if not st.local or not st.exists():
        return
    root = st.local_path()
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}
    if files <= {".dynaip.lock", ".progress/recipe.json"}:
        shutil.rmtree(root, ignore_errors=True)


def _curate(
    recipe: Recipe,
    writer: DatasetWriter,
    pool: Pool,
    info: dict[str, Any],
    limit: int | None,
    progress: Progress | None,
) -> dict[str, Any]:
    source = source_identity(recipe.source.kind, recipe.source.root)
    precision = run_precision(pool)
    writer.prepare(info.get("recipe", recipe.to_dict()), source, precision)
    # the dataset's identity: what it is (recipe hash), what it was built from (source) and, when not
    # fp32 (every dataset before executor.precision existed was fp32: their ids stay), at which precision
    ident = f"{recipe.recipe_hash}|{source}" + ("" if precision == "fp32" else f"|{precision}")
    info = {**info, "precision": precision, "dataset_id": hashlib.sha256(ident.encode()).hexdigest()[:16]}
    writer.check_no_shrink(limit)  # fail fast; finalize checks again with the real count
    progress = progress or Progress(recipe, limit, enabled=False)
    k = recipe.shards.inputs_per_shard
    results: dict[int, ChunkResult] = {}
    bench = info.get("decontamination", {}).get("fingerprint")

    def collect(done: Iterable[ChunkResult]) -> None:
        for res in done:
            results[res.chunk] = res
            progress.update(res)

    def build(only: set[int] | None = None) -> None:
        for chunk, part in chunked(read_records(recipe, limit), k):
            if only is not None and chunk not in only:
                continue
            fp = input_fingerprint(part)
            if bench:  # the benchmarks' content is an input of every chunk: other benchmarks, chunks rebuilt
                fp = hashlib.sha256(f"{fp}|{bench}".encode()).hexdigest()[:16]
            done = writer.done(chunk, fp) if only is None else None
            if done is not None:
                results[chunk] = done.slim()
                progress.update(done, kept=True)
                continue
            collect(pool.submit("build", chunk, part, fp))
        collect(pool.drain())

    build()
    if progress.kept:  # printed, not logged: Ray reconfigures logging in the driver of a job
        print(
            f"resuming: {progress.kept} finished chunk(s) kept, {len(results) - progress.kept} built",
            file=sys.stderr,
            flush=True,
        )
    if recipe.dedup.max_distance is not None and results:
        for attempt in range(2):
            redo = deduplicate(recipe, pool, results, writer)
            if not redo:
                break
            if attempt == 1:
                raise RuntimeError(f"chunks {sorted(redo)} could not be de-duplicated; re-run to resume")
            for c in redo:
                writer.forget(c)
            build(set(redo))
    progress.close(
        f"{sum(len(r.duplicates) for r in results.values())} duplicates removed"
        if recipe.dedup.max_distance is not None
        else ""
    )
    return writer.finalize(
        list(results.values()), info, [get_license(recipe.source.kind).to_dict()], on_reject=count_removed(info)
    )


def run_precision(pool: Pool) -> str:
    """The one precision every worker of ``pool`` runs its models at; OutputDirError when ``auto``
    resolves differently on different workers (GPU and CPU nodes), since one dataset is built at one."""
    found = sorted(set(pool.precisions()))
    if len(found) != 1:
        raise OutputDirError(
            f"the chunk workers would run the models at different precisions ({', '.join(found)}); "
            "set executor.precision to one of them in the recipe"
        )
    return found[0]


def deduplicate(recipe: Recipe, pool: Pool, results: dict[int, ChunkResult], writer: DatasetWriter) -> list[int]:
    """The de-duplication pass; updates ``results``; returns chunks that must be built again."""
    from pipeline import dedup_shuffle

    chunks = sorted(results)
    reducers = max(1, pool.size)
    mappers = min(reducers, len(chunks))
    share = -(-len(chunks) // mappers)
    # shuffle by bucket: each map task partitions its chunks' ledgers, each reducer reads its partitions only
    map_all(pool, "dedup_map", [(chunks[m * share : (m + 1) * share], m, reducers) for m in range(mappers)])
    parts = map_all(pool, "dedup", [(mappers, r, reducers) for r in range(reducers)])
    plan = dedup_shuffle.plan(parts, recipe.shards.inputs_per_shard)
    dedup_shuffle.clean(writer, mappers, reducers)
    todo = [(c, plan.get(c, {})) for c in chunks if results[c].duplicates != plan.get(c, {})]
    redo = []
    for chunk, res in map_all(pool, "apply", todo):
        if res is None:
            redo.append(chunk)
        else:
            results[chunk] = res
    return redo
