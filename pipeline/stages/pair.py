"""Stage 6 — pairs: intra (reference cut from the target itself) or cross (reference cut from
``record.reference``; target = ``record.image``). Builds the finished ``Sample`` with its json."""

from __future__ import annotations

from typing import Any

from pipeline.recipe import Recipe
from pipeline.sample import Item, Sample


def sample_meta(item: Item, recipe_hash: str) -> dict[str, Any]:
    """The sample json: every field named by the dataset contract, plus provenance."""
    r, t = item.record, item.target
    h, w = t.shape
    meta: dict[str, Any] = {
        "source": r.source,
        "source_id": r.id,
        "pair": r.pair,
        "phrase": t.primary.phrase if r.phrase is None else r.phrase,
        "box": [round(float(v), 2) for v in t.primary.box],
        "det_score": round(float(t.primary.score), 4),
        "mask_area": int(t.mask.sum()),
        "width": int(w),
        "height": int(h),
        "recipe": recipe_hash,
        "caption": item.caption or "",
        "caption_source": item.caption_source,
        "crop_mode": item.crop_mode,
        "ref_box": [int(v) for v in item.ref_box],
        "ref_from": "reference" if item.reference is not None else "target",
    }
    if item.caption_model is not None:
        meta["caption_model"] = item.caption_model
    if item.caption_prompt is not None:
        meta["caption_prompt"] = item.caption_prompt
    if item.quality is not None:
        meta["quality"] = dict(item.quality)
    if item.face_fallback:
        meta["face_fallback"] = True
    if r.group is not None:
        meta["group"] = r.group
    if r.extra:
        meta["extra"] = r.extra
    if r.diptych is not None:
        meta["diptych"] = {
            "target_panel": "left" if item.panel == 0 else "right",
            "consistency": item.consistency,
            "padding": r.diptych.padding,
        }
    return meta


class PairStage:
    """``__call__(items) -> items``: fills ``item.samples`` (one per accepted input; two for a diptych,
    keys ``…-0`` with the left panel as target and ``…-1`` with the right). Pair kinds
    not in ``pairing.kinds`` are rejected with stage 'pair'."""

    name = "pair"

    def __init__(self, recipe: Recipe, models: object = None):
        self.recipe = recipe
        self.recipe_hash = recipe.recipe_hash

    def __call__(self, items: list[Item]) -> list[Item]:
        for item in items:
            if not item.ok:
                continue
            kind = item.record.pair
            if kind not in self.recipe.pairing.kinds:
                item.fail(self.name, f"{kind} pairs are disabled (pairing.kinds={self.recipe.pairing.kinds})")
                continue
            try:
                item.samples = [
                    Sample(
                        key=item.key(n),
                        ref=d.ref_image,
                        tgt=d.target.image,
                        mask=d.target.mask,
                        caption=d.caption or "",
                        meta=sample_meta(d, self.recipe_hash),
                    )
                    for n, d in enumerate(item.directions())
                ]  # a diptych: both directions
            except Exception as e:
                item.fail(self.name, f"cannot build the sample: {type(e).__name__}: {e}")
        return items
