"""Stage 0 — generate: renders the diptych of every record whose ``diptych.generate`` holds settings
(``synth``), with FLUX.1-dev from models.yaml ``flux`` (a local diffusers directory,
``dynaip.models.flux.load_flux_pipeline``). Records that name an existing image pass untouched and
never load the model. The image lands in ``item.pixels`` for the decode stage, which splits it.

Determinism: each diptych is generated on its own (batch of one) with a CPU ``torch.Generator`` seeded
by its record's seed, so its pixels depend only on the settings, never on which other records share the
batch; with the same device and dtype a re-submitted job re-creates identical bytes (docs/sources.md).
On CUDA the model runs in bfloat16, on the CPU in float32. A failed generation rejects its record
(stage 'generate') with the error.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.recipe import Recipe
from pipeline.sample import Item
from pipeline.stages.common import LazyModel, SetupError, resolve_device


class GenerateStage(LazyModel):
    """``__call__(items) -> items``: sets ``item.pixels`` ``(H, W, 3) uint8`` for generated diptychs."""

    name = "generate"
    _model_attrs = ("_pipe",)

    def __init__(self, recipe: Recipe, models: Any = None, pipe: Any = None):
        self.recipe = recipe
        self.flux = getattr(models, "flux", None)
        self._pipe = pipe

    @property
    def pipe(self):
        """The diffusers ``FluxPipeline`` on the executor's device, on first use."""
        if self._pipe is None:
            if self.flux is None:
                raise SetupError(
                    "generated diptychs need models.yaml 'flux' (a FLUX.1-dev directory); pass --models M.yaml"
                )
            import torch

            from dynaip.models.flux import load_flux_pipeline

            device = resolve_device(self.recipe.executor.device)
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
            try:
                pipe = load_flux_pipeline(self.flux, dtype=dtype).to(device)
            except Exception as e:
                raise SetupError(f"cannot load FLUX for diptych generation: {e}") from e
            pipe.set_progress_bar_config(disable=True)
            self._pipe = pipe
        return self._pipe

    def render(self, settings: dict[str, Any]) -> np.ndarray:
        """One diptych ``(height, width, 3) uint8`` from its settings."""
        import torch

        out = self.pipe(
            prompt=settings["prompt"],
            width=int(settings["width"]),
            height=int(settings["height"]),
            num_inference_steps=int(settings["steps"]),
            guidance_scale=float(settings["guidance"]),
            generator=torch.Generator("cpu").manual_seed(int(settings["seed"])),
            output_type="np",
        )
        image = np.asarray(out.images[0], dtype=np.float32)
        return (image.clip(0.0, 1.0) * 255.0).round().astype(np.uint8)

    def __call__(self, items: list[Item]) -> list[Item]:
        todo = [
            it for it in items if it.ok and it.record.diptych is not None and it.record.diptych.generate is not None
        ]
        if todo:
            self.pipe  # loads once; a setup failure stops the job
        for item in todo:
            try:
                item.pixels = self.render(item.record.diptych.generate)
            except Exception as e:  # a bad prompt or size rejects its record, not the job
                item.fail(self.name, f"generation failed ({type(e).__name__}: {e})")
        return items
