"""Stage 5d — decontamination: an input whose target or reference copies a benchmark image (recipe
``decontamination.against``) is rejected with stage ``decontamination`` and a reason naming the benchmark
image by its path relative to the benchmark root (pipeline/decontam.py has the matcher).

It runs after every filter (so only inputs that would be accepted are compared) and before captioning
(so a contaminated input costs no caption). Compared per input: the target, a cross pair's reference
image, and the composed reference (for a diptych, those of both directions). The benchmarks are
indexed once per worker, on first use; with ``against`` empty the stage passes every item untouched
and loads nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.recipe import Recipe
from pipeline.sample import Item
from pipeline.stages.common import LazyModel, SetupError, resolve_device


def item_images(item: Item) -> list[tuple[str, np.ndarray]]:
    """``(what, image)`` for every image of ``item`` that training would see or that it was cut from."""
    out: list[tuple[str, np.ndarray]] = []
    if item.target is not None and item.target.image is not None:
        out.append(("target", item.target.image))
    if item.reference is not None and item.reference.image is not None:
        out.append(("reference image", item.reference.image))
    for n, d in enumerate(item.directions()):
        if d.ref_image is not None:
            out.append(("reference" if n == 0 else "second direction's reference", d.ref_image))
    return out


class DecontaminationStage(LazyModel):
    """``__call__(items) -> items``: rejects live items that match a benchmark image."""

    name = "decontamination"
    _model_attrs = ("_index", "_embed")

    def __init__(self, recipe: Recipe, models: Any = None):
        self.recipe = recipe
        self.cfg = recipe.decontamination
        self.clip = getattr(models, "clip_vision", None)
        self._index = None
        self._embed = None

    def embedder(self):
        if self._embed is None and self.cfg.min_similarity is not None:
            if self.clip is None:
                raise SetupError(
                    "decontamination.min_similarity needs models.yaml 'clip_vision' (pass --models "
                    "M.yaml), or set decontamination.min_similarity: null for the pHash check only"
                )
            from pipeline.decontam import clip_embedder

            try:
                self._embed = clip_embedder(self.clip, resolve_device(self.recipe.executor.device))
            except Exception as e:
                raise SetupError(f"cannot load the OpenCLIP image tower for decontamination: {e}") from e
        return self._embed

    @property
    def index(self):
        """The benchmarks' ``BenchmarkIndex``, built on first use (once per worker)."""
        if self._index is None:
            from dynaip.configs import ConfigError
            from pipeline.decontam import BenchmarkIndex, list_benchmarks

            c = self.cfg
            embed = self.embedder()
            try:
                self._index = BenchmarkIndex.build(
                    list_benchmarks(c.against),
                    max_distance=c.max_distance,
                    hash_size=c.hash_size,
                    max_thumb_diff=c.max_thumb_diff,
                    min_similarity=c.min_similarity,
                    embed=embed,
                )
            except ConfigError as e:  # a benchmark that changed under the run: stop it, it cannot be checked
                raise SetupError(str(e)) from None
        return self._index

    def __call__(self, items: list[Item]) -> list[Item]:
        if not self.cfg.against:
            return items
        live = [(it, what, im) for it in items if it.ok for what, im in item_images(it)]
        if not live:
            return items
        matches = self.index.match([im for _, _, im in live], self.embedder())
        for (item, what, _), m in zip(live, matches):
            if m is not None and item.ok:
                item.fail(self.name, m.reason(what))
        return items
