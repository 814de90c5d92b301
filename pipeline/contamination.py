"""``dynaip manifest contamination DIR --against ROOT``: which samples of an already-curated dataset copy a
benchmark image, found by the matcher the curation's ``decontamination`` stage uses (pipeline/decontam.py).

The dataset is read through the one strict reader (dynaip/dataset/reader.py: every shard verified
before its samples are used); each sample's target (``tgt.jpg``) and reference (``ref.png``) are compared
with every benchmark image. A cross pair's reference *source* image is not in the dataset, so unlike the
stage the report cannot compare it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.decontam import Benchmark, BenchmarkIndex, Embed, Match, list_benchmarks
from pipeline.recipe import DecontaminationConfig

MEMBERS = ("tgt.jpg", "ref.png")
BATCH = 32
"""Samples compared per step (bounds the decoded images held)."""


@dataclass(frozen=True)
class Finding:
    key: str
    """The sample's key."""
    member: str
    """``tgt.jpg`` or ``ref.png``."""
    source_id: str | None
    """The input's id in its source (the sample json's ``source_id``)."""
    match: Match

    def line(self) -> str:
        sid = f" (source id {self.source_id})" if self.source_id is not None else ""
        return f"CONTAMINATED {self.key} {self.member}{sid}: {self.match.rel} of {self.match.root} ({self.match.how})"


@dataclass
class Report:
    benchmarks: list[Benchmark]
    findings: list[Finding]
    samples: int
    embedding: bool
    """Whether the embedding check ran."""

    def summary(self, root: str, cfg: DecontaminationConfig) -> str:
        keys = {f.key for f in self.findings}
        per = {b.root: len({f.key for f in self.findings if f.match.root == b.root}) for b in self.benchmarks}
        checks = []
        if cfg.max_distance is not None:
            checks.append(
                f"pHash <= {cfg.max_distance} of {cfg.hash_size**2} bits"
                + (f" and thumbnails within {cfg.max_thumb_diff:g}" if cfg.max_thumb_diff is not None else "")
            )
        if self.embedding:
            checks.append(f"embedding cosine >= {cfg.min_similarity:g}")
        elif cfg.min_similarity is not None:
            checks.append("no embedding check (pass --models for it)")
        n_images = sum(len(b.files) for b in self.benchmarks)
        return (
            f"{root}: {len(keys)} of {self.samples} samples match benchmark images ("
            + ", ".join(f"{r}: {n}" for r, n in per.items())
            + f"); {n_images} benchmark images of "
            f"{len(self.benchmarks)} benchmark(s) checked with " + "; ".join(checks)
        )


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _batches(root: str) -> Iterator[list[dict[str, Any]]]:
    from dynaip.dataset.inspect import iter_samples

    batch: list[dict[str, Any]] = []
    for s in iter_samples(root):
        batch.append(s)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def contamination(
    root: str, against: Sequence[str], cfg: DecontaminationConfig | None = None, embed: Embed | None = None
) -> Report:
    """Every sample of the dataset at ``root`` compared with the benchmarks ``against`` (thresholds of
    ``cfg``; the embedding check only when ``embed`` is given)."""
    cfg = cfg or DecontaminationConfig()
    benchmarks = list_benchmarks(against)
    use_embed = embed if cfg.min_similarity is not None else None
    index = BenchmarkIndex.build(
        benchmarks,
        max_distance=cfg.max_distance,
        hash_size=cfg.hash_size,
        max_thumb_diff=cfg.max_thumb_diff,
        min_similarity=cfg.min_similarity if use_embed is not None else None,
        embed=use_embed,
    )
    findings: list[Finding] = []
    samples = 0
    for batch in _batches(root):
        samples += len(batch)
        rows = [(s, m) for s in batch for m in MEMBERS]
        matches = index.match([_decode(s[m]) for s, m in rows], use_embed)
        for (s, m), hit in zip(rows, matches):
            if hit is not None:
                findings.append(Finding(s["key"], m, json.loads(s["json"]).get("source_id"), hit))
    return Report(benchmarks, findings, samples, use_embed is not None)
