"""Quality scores and filters (pipeline/stages/quality.py), the aesthetic head and the tiny BLIP
captioner, on constructed cases (issue #20 items 1 and 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from scipy import ndimage

from pipeline.recipe import Recipe
from pipeline.records import ImageRef, SourceRecord
from pipeline.sample import Candidate, Item, View


def recipe(**filters) -> Recipe:
    return Recipe.from_dict(
        {
            "source": {"kind": "folder", "root": "/nowhere"},
            "filters": filters,
            "executor": {"device": "cpu", "batch_size": 4},
        }
    )


def texture(h: int = 96, w: int = 96, seed: int = 0) -> np.ndarray:
    """Detailed RGB pixels: noise smoothed a little, so a stronger blur clearly removes detail."""
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.uniform(0, 255, (h, w, 3)), sigma=(0.7, 0.7, 0))
    return img.clip(0, 255).astype(np.uint8)


def composed(image: np.ndarray, mask: np.ndarray, ref_box=None, score: float = 0.9, rid: str = "x") -> Item:
    """An item as the compose stage leaves it (intra pair: the reference is cut from the target)."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    view = View(
        ref=ImageRef(path=f"/{rid}.png"),
        image=image,
        primary=Candidate(box=box, score=score, phrase="object"),
        mask=mask,
        mask_score=0.75,
    )
    item = Item(record=SourceRecord(source="folder", id=rid, image=ImageRef(path=f"/{rid}.png")), target=view)
    item.ref_box = ref_box or (0, 0, w, h)
    item.ref_image = np.where(mask[..., None], image, np.uint8(255)).astype(np.uint8)
    return item


def test_a_blurred_copy_scores_lower_sharpness():
    from pipeline.stages.quality import QualityStage

    img = texture()
    mask = np.zeros(img.shape[:2], bool)
    mask[16:80, 20:76] = True
    blurred = ndimage.gaussian_filter(img.astype(float), sigma=(2, 2, 0)).astype(np.uint8)
    sharp, soft = composed(img, mask, rid="sharp"), composed(blurred, mask, rid="soft")
    QualityStage(recipe())([sharp, soft])
    assert sharp.ok and soft.ok
    assert soft.quality["sharpness"] < 0.25 * sharp.quality["sharpness"], (sharp.quality, soft.quality)
    # the white around the subject is not measured: the cut edge would count as detail
    flat = composed(np.full_like(img, 90), mask, rid="flat")
    QualityStage(recipe())([flat])
    assert flat.quality["sharpness"] == 0.0
    assert flat.quality["subject_pixels"] == int(mask.sum()) == 64 * 56
    assert flat.quality["det_score"] == 0.9 and flat.quality["mask_score"] == 0.75 and flat.quality["aesthetic"] is None

    stage = QualityStage(recipe(min_sharpness=0.5 * sharp.quality["sharpness"]))
    again, blur_again = composed(img, mask, rid="a"), composed(blurred, mask, rid="b")
    stage([again, blur_again])
    assert again.ok
    assert blur_again.reject.stage == "quality"
    assert f"sharpness {blur_again.quality['sharpness']:g}" in blur_again.reject.reason
    assert "filters.min_sharpness=" in blur_again.reject.reason


def test_a_tiny_subject_is_rejected_by_resolution_with_its_value():
    from pipeline.stages.quality import QualityStage

    img = texture(128, 128)
    big, tiny = np.zeros((128, 128), bool), np.zeros((128, 128), bool)
    big[10:110, 10:110] = True
    tiny[60:70, 60:72] = True  # 10 x 12 = 120 pixels
    a, b = composed(img, big, rid="big"), composed(img, tiny, ref_box=(55, 55, 77, 75), rid="tiny")
    QualityStage(recipe(min_subject_pixels=1024))([a, b])
    assert a.ok and a.quality["subject_pixels"] == 10_000
    assert b.reject.stage == "quality"
    assert b.reject.reason == (
        "subject too small: 120 subject pixels in the reference < filters.min_subject_pixels=1024"
    )
    # only the subject pixels inside the reference crop count
    c = composed(img, big, ref_box=(0, 0, 30, 20), rid="crop")
    QualityStage(recipe())([c])
    assert c.quality["subject_pixels"] == 20 * 10


def test_quality_thresholds_are_typed_recipe_fields():
    r = recipe(min_aesthetic=5, min_sharpness=10.0, min_subject_pixels=4096, min_mask_score=0.8)
    assert (r.filters.min_aesthetic, r.filters.min_subject_pixels) == (5.0, 4096)
    assert recipe().filters.min_aesthetic is None and recipe().filters.min_sharpness is None  # off by default
    with pytest.raises(ValueError, match=r"'filters.min_subject_pixels' = 'big': expected an integer"):
        recipe(min_subject_pixels="big")
    with pytest.raises(ValueError, match=r"unknown key 'filters\.min_sharpnes'; did you mean 'min_sharpness'?"):
        recipe(min_sharpnes=3.0)
    with pytest.raises(ValueError, match=r"'filters.min_mask_score' = 2.0: must be in \[0, 1\] or null"):
        recipe(min_mask_score=2.0)
    for name in ("ffhq", "sa1b", "vitonhd", "opens2v"):  # shipped recipes: the paper states no quality threshold
        f = Recipe.from_yaml(Path(__file__).resolve().parents[1] / "manifests" / f"{name}.yaml").filters
        assert (f.min_aesthetic, f.min_sharpness, f.min_subject_pixels, f.min_mask_score) == (None,) * 4


def test_min_aesthetic_without_a_head_stops_the_job_with_one_line():
    from pipeline.stages import SetupError
    from pipeline.stages.quality import QualityStage

    with pytest.raises(SetupError, match="filters.min_aesthetic is set but models.yaml has no 'aesthetic' entry"):
        QualityStage(recipe(min_aesthetic=4.0), None)([composed(texture(), np.ones((96, 96), bool))])


def _head_by_hand(x: np.ndarray, sd: dict, relu: bool = False) -> np.ndarray:
    """``layers.{i}`` applied in ascending ``i`` to ``x`` (rows), a ReLU between them if ``relu``."""
    idx = sorted({int(k.split(".")[1]) for k in sd})
    for n, i in enumerate(idx):
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
        if relu and n < len(idx) - 1:
            x = np.maximum(x, 0)
    return x[:, 0]


def test_aesthetic_head_output_equals_the_linear_head_by_hand(tiny_models, tmp_path):
    from dynaip.models import CheckpointError
    from dynaip.models.aesthetic import AestheticScorer, load_aesthetic_head

    scorer = AestheticScorer(tiny_models.aesthetic.path, tiny_models.clip_vision)
    images = [texture(80, 120, seed=1), texture(64, 64, seed=2)]
    emb = scorer.embeddings(images).double().numpy()
    # the tiny head is the improved-aesthetic-predictor's release form: a .pth of its Sequential's Linears
    sd = {k: v.double().numpy() for k, v in torch.load(tiny_models.aesthetic.path, weights_only=True).items()}
    assert sorted({int(k.split(".")[1]) for k in sd}) == [0, 2, 4, 6, 7] and scorer.head.activation == "none"
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_allclose(scorer.scores(images), _head_by_hand(x, sd), rtol=1e-5, atol=1e-6)

    # LAION v1 format (one linear layer: weight + bias)
    w, b = torch.randn(1, emb.shape[1]), torch.randn(1)
    save_file({"weight": w, "bias": b}, str(tmp_path / "linear.safetensors"))
    head = load_aesthetic_head(tmp_path / "linear.safetensors")
    e = torch.from_numpy(emb).float()
    expect = (e / e.norm(dim=1, keepdim=True)) @ w.T + b
    torch.testing.assert_close(head(e), expect[:, 0])
    save_file(
        {"layers.0.weight": torch.randn(4, 8), "layers.0.bias": torch.randn(4)}, str(tmp_path / "bad.safetensors")
    )
    with pytest.raises(CheckpointError, match="ends in 4 outputs, not 1") as err:
        load_aesthetic_head(tmp_path / "bad.safetensors")
    assert "\n" not in str(err.value)


def test_the_quality_stage_scores_aesthetic_on_the_target_and_filters_on_it(tiny_models):
    from dynaip.models.aesthetic import AestheticScorer
    from pipeline.stages.quality import QualityStage

    scorer = AestheticScorer(tiny_models.aesthetic.path, tiny_models.clip_vision)
    mask = np.zeros((96, 96), bool)
    mask[10:90, 10:90] = True
    items = [composed(texture(seed=s), mask, rid=f"i{s}") for s in range(3)]
    QualityStage(recipe(), tiny_models)(items)
    scores = [it.quality["aesthetic"] for it in items]
    assert scores == [round(s, 4) for s in scorer.scores([it.target.image for it in items])]
    cut = sorted(scores)[1]
    again = [composed(texture(seed=s), mask, rid=f"j{s}") for s in range(3)]
    QualityStage(recipe(min_aesthetic=cut), tiny_models)(again)
    low = [it for it in again if not it.ok]
    assert len(low) == 1 and low[0].reject.reason == (
        f"low aesthetic score: {min(scores):g} < filters.min_aesthetic={cut:g}"
    )


# ---- captions -------------------------------------------------------------------------------------


def photos(n: int = 4) -> list[Image.Image]:
    return [Image.fromarray(texture(48 + 8 * i, 64, seed=10 + i)) for i in range(n)]


def test_tiny_captioner_is_a_plain_transformers_blip(tiny_models):
    from transformers import AutoProcessor, BlipForConditionalGeneration

    path = Path(tiny_models.captioner)
    assert (path / "model.safetensors").is_file() and (path / "vocab.txt").is_file()
    assert json.loads((path / "config.json").read_text())["architectures"] == ["BlipForConditionalGeneration"]
    model = BlipForConditionalGeneration.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True, use_fast=False)
    out = model.generate(**processor(images=photos(1), return_tensors="pt"), max_new_tokens=4)
    assert processor.batch_decode(out, skip_special_tokens=True)[0].strip()


def test_captions_are_deterministic_and_batched_equals_one_by_one(tiny_models):
    from dynaip.models.captioner import Captioner

    images = photos()
    for prompt in (None, "a photo of"):
        cap = Captioner(tiny_models.captioner, max_new_tokens=8)
        batched = cap.captions(images, prompt)
        assert batched == [cap.captions([im], prompt)[0] for im in images]
        assert batched == Captioner(tiny_models.captioner, max_new_tokens=8).captions(images, prompt)  # a fresh load
        assert all(batched) and len(set(batched)) > 1, batched  # the tiny BLIP's words depend on the image
        if prompt:
            assert all(c.startswith(prompt) for c in batched)


def test_the_caption_stage_records_source_model_and_prompt(tiny_models):
    from pipeline.stages import CaptionStage
    from pipeline.stages.pair import sample_meta

    r = Recipe.from_dict(
        {
            "source": {"kind": "folder", "root": "/nowhere"},
            "executor": {"device": "cpu"},
            "captioning": {"order": ["provided", "model", "template"], "prompt": "a photo of", "max_new_tokens": 6},
        }
    )
    mask = np.ones((64, 64), bool)
    items = [composed(np.asarray(im.resize((64, 64))), mask, rid=f"c{i}") for i, im in enumerate(photos(3))]
    items[0].record.caption = "a cat on a mat"
    CaptionStage(r, tiny_models)(items)
    assert (items[0].caption, items[0].caption_source) == ("a cat on a mat", "provided")
    for it in items[1:]:
        assert it.caption_source == "model" and it.caption_model == "captioner" and it.caption_prompt == "a photo of"
    again = [composed(np.asarray(im.resize((64, 64))), mask, rid=f"c{i}") for i, im in enumerate(photos(3))]
    CaptionStage(r, tiny_models)(again[1:2])  # alone, in a fresh stage: the same caption
    assert again[1].caption == items[1].caption
    items[1].quality = {"aesthetic": 1.0, "sharpness": 2.0, "subject_pixels": 3, "det_score": 0.9, "mask_score": None}
    meta = sample_meta(items[1], "h")
    assert (meta["caption"], meta["caption_source"], meta["caption_model"], meta["caption_prompt"]) == (
        items[1].caption,
        "model",
        "captioner",
        "a photo of",
    )
    assert meta["quality"]["subject_pixels"] == 3

    # without any captioning model, 'model' is skipped and the template applies (and is recorded)
    t = CaptionStage(Recipe.from_dict({"source": {"kind": "folder", "root": "/x"}}), None)
    it = composed(np.asarray(photos(1)[0]), np.ones((48, 64), bool))
    t([it])
    assert (it.caption_source, it.caption_prompt, it.caption_model) == ("template", "a photo of a {phrase}", None)


# ---- manifest show ----------------------------------------------------------------------------------


class WholeImageSubject:
    """Stands in for detect + select + segment (no models): the subject is the image minus a border."""

    name = "segment"

    def __call__(self, items: list[Item]) -> list[Item]:
        for item in items:
            if item.ok:
                h, w = item.target.shape
                item.target.primary = Candidate(box=(4.0, 4.0, w - 4.0, h - 4.0), score=1.0, phrase="object")
                item.target.mask = np.zeros((h, w), bool)
                item.target.mask[4 : h - 4, 4 : w - 4] = True
        return items


def test_manifest_show_prints_quality_quantiles_per_source(tmp_path):
    from dynaip.dataset.inspect import iter_sample_json, show
    from pipeline.executor_local import run_local
    from pipeline.demo_photos import write_sample_photos
    from pipeline.stages import CaptionStage, ComposeStage, DecodeStage, PairStage
    from pipeline.stages.quality import QualityStage

    root = tmp_path / "photos"
    write_sample_photos(root, faces=0, names=["astronaut", "chelsea", "coffee", "rocket", "camera"])
    r = Recipe.from_dict(
        {
            "name": "q",
            "source": {"kind": "folder", "root": str(root)},
            "filters": {"min_image_side": 32, "min_reference_side": 16},
            "captioning": {"order": ["provided", "template"]},
            "shards": {"inputs_per_shard": 2},
            "executor": {"batch_size": 2, "device": "cpu"},
        }
    )
    stages = [DecodeStage(r), WholeImageSubject(), ComposeStage(r), QualityStage(r), CaptionStage(r), PairStage(r)]
    out = tmp_path / "ds"
    run_local(r, out, None, progress=False, stages=stages)
    sharp = [m["quality"]["sharpness"] for m in iter_sample_json(out)]
    assert len(sharp) == 5
    text = show(out)
    assert "quality per source (n, min / p10 / median / p90 / max):" in text
    line = next(ln for ln in text.splitlines() if "sharpness" in ln)
    expect = " / ".join(f"{v:.4g}" for v in np.quantile(sharp, [0, 0.1, 0.5, 0.9, 1]))
    assert line.split()[:3] == ["folder", "sharpness", "5"] and line.endswith(expect), (line, expect)
    assert any("subject_pixels" in ln for ln in text.splitlines())
    assert not any(" aesthetic " in ln for ln in text.splitlines())  # no head configured: nothing to show

    # the dataset view and the contact sheet order by a score
    from dynaip.dataset.inspect import grid
    from dynaip.serve.datasets import DatasetView

    view = DatasetView.open(out)
    got = [e.meta["quality"]["sharpness"] for e in view.samples(sort_by="sharpness", descending=True)]
    assert got == sorted(sharp, reverse=True)
    sheet = grid(out, tmp_path / "sheet.png", n=2, sort_by="sharpness")
    assert Image.open(sheet).size[1] == 2 * (192 + 28)
