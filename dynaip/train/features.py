"""Which stages of a run train on precomputed features (``TrainConfig.data.features``), and what that implies.

``resolve_run`` is called by the driver (``dynaip train``, so a missing or stale feature set is a
one-line error before any worker starts) and again by every training worker (the authority: it
decides which frozen models are loaded). See ``dynaip.features`` for the files themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from dynaip.features.format import FeatureError
from dynaip.features.layout import encoders_fingerprint, list_feature_sets
from dynaip.features.store import StageFeatures, resolve_stage

from .config import TrainConfig


@dataclass
class RunFeatures:
    """Per stage: its feature sets, or None where it encodes on the fly."""

    stages: list[StageFeatures | None]
    notes: list[str] = field(default_factory=list)
    """One line per stage saying which path it takes (the callers log them)."""
    _empty: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def encoders(self) -> bool:
        """Whether the training ranks need T5, CLIP text and the VAE encoder (some stage encodes on the fly)."""
        return any(s is None for s in self.stages)

    def modes(self) -> list[str]:
        return ["precomputed" if s is not None else "on-the-fly" for s in self.stages]

    def attach(self, stage_index: int, shards: Sequence[Any]) -> list[Any]:
        """The stage's ``ShardInfo``s with their feature shards attached (unchanged when it encodes on the fly)."""
        stage = self.stages[stage_index]
        if stage is None:
            return list(shards)
        refs = stage.refs()
        missing = [s.url for s in shards if s.url not in refs]
        if missing:
            raise FeatureError(
                f"the feature sets {stage.describe()} list no features for data shard {missing[0]}; "
                "re-run `dynaip precompute` for its dataset"
            )
        return [replace(s, features=refs[s.url]) for s in shards]

    def empty_prompt(self, stage_index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stage's stored empty prompt (T5 (1, L, D), pooled (1, D)) for text CFG dropout; None on the fly."""
        stage = self.stages[stage_index]
        if stage is None:
            return None
        if stage_index not in self._empty:
            self._empty[stage_index] = stage.empty_prompt()
        return self._empty[stage_index]


def stage_datasets(cfg: TrainConfig, data: Sequence[str], stage_index: int) -> list[str]:
    stage = cfg.stages[stage_index]
    return list(stage.paths or data)


def resolve_run(cfg: TrainConfig, data: Sequence[str], flux_dir: str) -> RunFeatures:
    """Resolves ``cfg.data.features`` for every stage (``FeatureError`` for missing/stale sets, see ``resolve_stage``)."""
    n = len(cfg.stages)
    if cfg.data.features == "off":
        return RunFeatures([None] * n, [f"stage '{s.name}': encoding on the fly (features: off)" for s in cfg.stages])
    datasets = [stage_datasets(cfg, data, i) for i in range(n)]
    if cfg.data.features == "auto" and not any(list_feature_sets(d) for ds in datasets for d in ds):
        return RunFeatures(
            [None] * n,
            [
                f"stage '{s.name}': encoding on the fly (no precomputed features in {ds})"
                for s, ds in zip(cfg.stages, datasets)
            ],
        )
    fingerprint = encoders_fingerprint(flux_dir)
    stages, notes = [], []
    for s, ds in zip(cfg.stages, datasets):
        found = resolve_stage(
            s.name,
            ds,
            cfg.data.features,
            fingerprint=fingerprint,
            max_sequence_length=cfg.loss.max_sequence_length,
            buckets=cfg.data.buckets,
        )
        stages.append(found)
        notes.append(
            f"stage '{s.name}': precomputed features from {found.describe()}"
            if found is not None
            else f"stage '{s.name}': encoding on the fly (not every dataset has precomputed features: {ds})"
        )
    run = RunFeatures(stages, notes)
    if not run.encoders and cfg.logging.sample_every and cfg.logging.validation_prompts:
        raise ValueError(
            "validation_prompts need the text encoders, which a run on precomputed features does not "
            "load; drop validation_prompts (samples then use the validation batch's stored captions) "
            "or set features: off"
        )
    return run
