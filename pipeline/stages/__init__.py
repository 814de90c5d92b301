"""Curation stages. Each is ``stage(items: list[Item]) -> list[Item]`` over one batch, built from
``(recipe, models_config)``, picklable (models load lazily on first call in the process that runs
it), and never raises for a bad input: per-record failures become ``item.reject``.

Order (``STAGE_ORDER``): decode → detect → filter (select) → segment → compose → quality → consistency →
decontamination → caption → pair, after ``generate`` (FLUX renders the diptychs of ``synth`` records; a no-op for others).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from pipeline.recipe import Recipe
from pipeline.sample import Item
from pipeline.stages.caption import CaptionStage
from pipeline.stages.common import SetupError
from pipeline.stages.compose import ComposeStage
from pipeline.stages.consistency import ConsistencyStage
from pipeline.stages.decontaminate import DecontaminationStage
from pipeline.stages.decode import DecodeStage
from pipeline.stages.detect import DetectStage
from pipeline.stages.generate import GenerateStage
from pipeline.stages.pair import PairStage
from pipeline.stages.quality import QualityStage
from pipeline.stages.segment import SegmentStage
from pipeline.stages.select import SelectStage

STAGE_ORDER = (
    GenerateStage,
    DecodeStage,
    DetectStage,
    SelectStage,
    SegmentStage,
    ComposeStage,
    QualityStage,
    ConsistencyStage,
    DecontaminationStage,
    CaptionStage,
    PairStage,
)
"""The one list of curation stages, in order. Every stage is built as ``cls(recipe, models)``; both
executors run ``build_stages`` inside their chunk worker (in process, or one per Ray actor), so
neither keeps a list of its own. Resources are the chunk worker's (``executor.cpus_per_worker``,
``gpus_per_actor``): each worker holds every stage and its models (docs/ARCHITECTURE.md)."""
Stage = Callable[[list[Item]], list[Item]]


def build_stages(recipe: Recipe, models: Any) -> list[Stage]:
    """One instance of every stage of ``STAGE_ORDER``. ``models`` is a ``ModelsConfig`` (may be None when
    no record needs a model)."""
    return [cls(recipe, models) for cls in STAGE_ORDER]


def run_stages(items: list[Item], stages: list[Stage], timings: dict[str, float] | None = None) -> list[Item]:
    """Runs ``items`` through ``stages``; adds each stage's wall seconds to ``timings[stage.name]``.
    An exception escaping a stage (a bug, not a bad input) rejects the still-live items of the batch
    with the stage's name instead of killing the job."""
    for stage in stages:
        t0 = time.perf_counter()
        try:
            items = stage(items)
        except SetupError:
            raise
        except Exception as e:
            for item in items:
                if item.ok:
                    item.fail(getattr(stage, "name", type(stage).__name__), f"stage error: {type(e).__name__}: {e}")
        if timings is not None:
            name = getattr(stage, "name", type(stage).__name__)
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
    return items


__all__ = [
    "SetupError",
    "build_stages",
    "run_stages",
    "STAGE_ORDER",
    "GenerateStage",
    "DecodeStage",
    "DetectStage",
    "SelectStage",
    "SegmentStage",
    "ComposeStage",
    "QualityStage",
    "ConsistencyStage",
    "DecontaminationStage",
    "CaptionStage",
    "PairStage",
]
