"""Stage 7 — captions: the source's caption, else a local transformers image-to-text model
(``captioning.model``, else models.yaml's ``captioner``), else the template with the subject phrase.
The sample json records which (``caption_source``: provided | model | template), the model's name
(``caption_model``) and the prompt (``caption_prompt``: the model's text prompt, "" for none, or the
template). Model captions are greedy with ``captioning.max_new_tokens``: the same target gives the same
caption in any batch (``dynaip.models.captioner``)."""

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
    """``__call__(items) -> items``: sets ``item.caption`` / ``caption_source`` / ``caption_model`` /
    ``caption_prompt``. The model runs where the stage runs: in each Ray chunk worker (loaded once per
    actor) or in the local process."""

    name = "caption"
    _model_attrs = ("_captioner",)

    def __init__(self, recipe: Recipe, models: Any = None, captioner: Any = None):
        self.recipe = recipe
        self.model_path: str | None = recipe.captioning.model or getattr(models, "captioner", None)
        self._captioner = captioner

    @property
    def captioner(self):
        """``dynaip.models.captioner.Captioner`` from the local model directory, on first use."""
        if self._captioner is None:
            from dynaip.models.captioner import Captioner

            device = resolve_device(self.recipe.executor.device)
            try:
                self._captioner = Captioner(
                    self.model_path, device=device, max_new_tokens=self.recipe.captioning.max_new_tokens
                )
            except Exception as e:
                raise SetupError(f"cannot load the captioning model: {e}") from e
        return self._captioner

    @property
    def model_name(self) -> str:
        from dynaip.models.captioner import captioner_name

        return getattr(self._captioner, "name", None) or captioner_name(self.model_path or "")

    def _model_captions(self, items: list[Item]) -> dict[int, str]:
        """Captions of the items' targets, one batch; an image the batch fails on is retried alone."""
        if not items:
            return {}
        captioner = self.captioner  # loads once; a setup failure stops the job
        prompt = self.recipe.captioning.prompt
        images = [Image.fromarray(it.target.image) for it in items]
        try:
            texts: list[str | None] = list(captioner.captions(images, prompt))
        except Exception:
            texts = []
            for im in images:
                try:
                    texts.append(captioner.captions([im], prompt)[0])
                except Exception:
                    texts.append(None)
        return {id(it): t for it, t in zip(items, texts) if t}

    def __call__(self, items: list[Item]) -> list[Item]:
        c = self.recipe.captioning
        live = [d for it in items if it.ok for d in it.directions()]  # a diptych: a caption per target panel
        todo = list(live)
        for source in c.order:
            if source == "provided":
                for it in todo:
                    given = it.provided_caption
                    if given and given.strip():
                        it.caption, it.caption_source = given.strip(), "provided"
            elif source == "model" and self.model_path:
                got = self._model_captions(todo)
                for it in todo:
                    if id(it) in got:
                        it.caption, it.caption_source = got[id(it)], "model"
                        it.caption_model, it.caption_prompt = self.model_name, c.prompt or ""
            elif source == "template":
                for it in todo:
                    phrase = it.target.primary.phrase if it.target and it.target.primary else it.record.phrase
                    it.caption, it.caption_source = template_caption(c.template, it.record.phrase or phrase), "template"
                    it.caption_prompt = c.template
            todo = [it for it in todo if it.caption is None]
        for it in todo:
            why = (
                ""
                if self.model_path or "model" not in c.order
                else " (no captioning model: set captioning.model or models.yaml captioner)"
            )
            it.fail(self.name, f"no caption: none of captioning.order={c.order} applied{why}")
        for it in items:
            it.adopt_twin_reject()
        return items
