"""Stage 7 — captions: the source's caption, else a local transformers image-to-text model (when
``captioning.model`` names a directory), else the template with the subject phrase. The sample json
records which (``caption_source``: provided | model | template)."""

from __future__ import annotations

from typing import Any

from PIL import Image

from pipeline.recipe import Recipe
from pipeline.sample import Item
from pipeline.stages.common import LazyModel, SetupError, resolve_device


def template_caption(template: str, phrase: str | None) -> str:
    """``template`` with ``{phrase}`` filled (first phrase of a ' . '-joined prompt)."""
    first = (phrase or "subject").split(".")[0].strip() or "subject"
    return template.format(phrase=first)


class CaptionStage(LazyModel):
    """``__call__(items) -> items``: sets ``item.caption`` and ``item.caption_source``."""

    name = "caption"
    _model_attrs = ("_captioner",)

    def __init__(self, recipe: Recipe, models: Any = None, captioner: Any = None):
        self.recipe = recipe
        self._captioner = captioner

    @property
    def captioner(self):
        """A transformers ``image-to-text`` pipeline from the local ``captioning.model`` directory."""
        if self._captioner is None:
            from pathlib import Path

            from transformers import pipeline

            path = self.recipe.captioning.model
            if not path or not Path(path).is_dir():
                raise SetupError(f"captioning.model {path!r} is not a local directory; point it at a "
                                 "transformers image-to-text checkpoint (e.g. a BLIP folder) or set it to null")
            device = resolve_device(self.recipe.executor.device)
            try:
                self._captioner = pipeline("image-to-text", model=path, device=device, local_files_only=True)
            except Exception as e:
                raise SetupError(f"cannot load the captioning model {path}: {e}") from e
        return self._captioner

    def _model_captions(self, items: list[Item]) -> dict[int, str]:
        out: dict[int, str] = {}
        if not items:
            return out
        images = [Image.fromarray(it.target.image) for it in items]
        gen = {"max_new_tokens": self.recipe.captioning.max_new_tokens}
        captioner = self.captioner  # loads once; a setup failure stops the job
        try:
            results = captioner(images, generate_kwargs=gen)
        except Exception:
            results = []
            for im in images:
                try:
                    results.append(captioner(im, generate_kwargs=gen))
                except Exception:
                    results.append(None)
        for item, res in zip(items, results):
            if res:
                text = (res[0] if isinstance(res, list) else res).get("generated_text", "").strip()
                if text:
                    out[id(item)] = text
        return out

    def __call__(self, items: list[Item]) -> list[Item]:
        c = self.recipe.captioning
        live = [it for it in items if it.ok]
        todo = list(live)
        for source in c.order:
            if source == "provided":
                for it in todo:
                    if it.record.caption and it.record.caption.strip():
                        it.caption, it.caption_source = it.record.caption.strip(), "provided"
            elif source == "model" and c.model:
                got = self._model_captions(todo)
                for it in todo:
                    if id(it) in got:
                        it.caption, it.caption_source = got[id(it)], "model"
            elif source == "template":
                for it in todo:
                    phrase = it.target.primary.phrase if it.target and it.target.primary else it.record.phrase
                    it.caption, it.caption_source = template_caption(c.template, it.record.phrase or phrase), "template"
            todo = [it for it in todo if it.caption is None]
        for it in todo:
            it.fail(self.name, f"no caption: none of captioning.order={c.order} applied")
        return items
