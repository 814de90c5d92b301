"""#27: the precision switch and the fast paths of the curation models, on the CPU.

- SAM's fused attention (``sam_fast.use_sdpa``) equals segment-anything's own attention, and the
  batched segmenter equals segment-anything's ``Sam.forward`` (fp32, a 256-px SAM of the tiny
  checkpoint's structure with random relative-position tables: the tiny checkpoint's are zero);
- bf16 (autocast on the CPU) agrees with fp32 on the tiny checkpoints: SAM masks mean IoU ≥ 0.95,
  Grounding DINO boxes within 0.02 of the image side, scores within 0.05 (the tolerances stated in
  docs/curation_speed.md);
- Grounding DINO's BERT runs once per distinct caption, with the uncached detections;
- ``executor.precision`` is checked, resolved, and part of the output directory's identity.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.recipe import Recipe


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.fixture(scope="module")
def small_sam():
    from dynaip.models.sam import build_sam_tiny

    torch.manual_seed(0)
    sam = build_sam_tiny(img=256).eval().requires_grad_(False)
    for module in sam.image_encoder.modules():  # non-zero tables so the bias is really exercised
        if hasattr(module, "rel_pos_h"):
            module.rel_pos_h.normal_(0, 0.5)
            module.rel_pos_w.normal_(0, 0.5)
    return sam


@pytest.fixture(scope="module")
def gdino(tiny_models):
    from dynaip.models.grounding_dino import load_grounding_dino

    return load_grounding_dino(tiny_models.grounding_dino)


def test_sdpa_attention_equals_segment_anything_attention(small_sam):
    from dynaip.models.sam_fast import use_sdpa

    x = torch.randn(2, 3, 256, 256)
    try:
        assert use_sdpa(small_sam.image_encoder, False) == 2  # one windowed block, one global block
        with torch.no_grad():
            ref = small_sam.image_encoder(x)
        use_sdpa(small_sam.image_encoder, True)
        with torch.no_grad():
            fast = small_sam.image_encoder(x)
    finally:
        use_sdpa(small_sam.image_encoder, True)
    assert (fast - ref).abs().max() < 1e-4 * ref.abs().max()


def test_batched_segmenter_equals_sam_forward(small_sam):
    from segment_anything.utils.transforms import ResizeLongestSide
    from skimage import data

    from dynaip.models.sam import SamBoxSegmenter
    from dynaip.models.sam_fast import use_sdpa

    images = [data.chelsea()[::2, ::2], data.astronaut()[:300:2, ::2], data.coffee()[::2, ::2]]
    boxes = [np.array([[20, 10, 150, 120], [5, 5, 100, 90]]), np.zeros((0, 4)), np.array([[30, 20, 250, 180]])]
    fast = SamBoxSegmenter(small_sam).segment(images, boxes)
    tr = ResizeLongestSide(256)
    batched = [
        {
            "image": torch.as_tensor(tr.apply_image(im)).permute(2, 0, 1).contiguous(),
            "original_size": im.shape[:2],
            "boxes": torch.as_tensor(tr.apply_boxes(b.astype(np.float32), im.shape[:2])),
        }
        for im, b in zip(images, boxes)
        if len(b)
    ]
    try:
        use_sdpa(small_sam.image_encoder, False)
        with torch.no_grad():
            ref = small_sam(batched, multimask_output=True)  # segment-anything's own path, one image at a time
    finally:
        use_sdpa(small_sam.image_encoder, True)
    assert fast[1][0].shape == (0, *images[1].shape[:2])
    for (masks, scores), out in zip([fast[0], fast[2]], ref):
        best = out["iou_predictions"].argmax(dim=1)
        lib = out["masks"][torch.arange(len(best)), best].numpy()
        assert masks.shape == lib.shape and masks.any() and not masks.all()
        assert all(mask_iou(a, b) > 0.999 for a, b in zip(masks, lib))
        np.testing.assert_allclose(scores, out["iou_predictions"].max(dim=1).values.numpy(), atol=1e-5)


def test_bf16_on_the_cpu_agrees_with_fp32(tiny_models, gdino):
    """Both model stages at bf16 (autocast on the CPU) on the tiny checkpoints vs fp32."""
    from skimage import data

    from dynaip.models.grounding_dino import GroundingDinoDetector
    from dynaip.models.sam import SamBoxSegmenter, load_sam

    gd = gdino
    images = [data.astronaut()[::4, ::4], data.coffee()[::4, ::4]]
    dets = {}
    for precision in ("fp32", "bf16"):
        det = GroundingDinoDetector(gd, size=96, max_size=128, precision=precision)
        dets[precision] = det.detect(images, ["person . face", "cup"], box_threshold=0.0, text_threshold=0.0)
    for image, ref, low in zip(images, dets["fp32"], dets["bf16"]):
        assert len(ref) == len(low) > 0
        side = max(image.shape[:2])
        for d in ref:  # every fp32 box has a bf16 box of the same phrase within 0.02 of the image side
            near = [e for e in low if e.phrase == d.phrase and np.abs(np.subtract(e.box, d.box)).max() <= 0.02 * side]
            assert near and min(abs(e.score - d.score) for e in near) <= 0.05, d
    sam = load_sam(tiny_models.sam)
    image = data.chelsea()
    boxes = [np.array([[50, 40, 300, 250], [200, 20, 440, 290]])]
    ref = SamBoxSegmenter(sam, precision="fp32").segment([image], boxes)[0]
    low = SamBoxSegmenter(sam, precision="bf16").segment([image], boxes)[0]
    assert np.mean([mask_iou(a, b) for a, b in zip(ref[0], low[0])]) >= 0.95
    np.testing.assert_allclose(ref[1], low[1], atol=0.05)


def test_caption_encoder_runs_once_per_distinct_caption(gdino):
    from skimage import data

    from dynaip.models.grounding_dino import CachedTextEncoder, GroundingDinoDetector

    gd = gdino
    gd.bert = getattr(gd.bert, "bert", gd.bert)  # groundingdino's own BERT: a fresh cache below
    det = GroundingDinoDetector(gd, size=64, max_size=96)
    assert isinstance(gd.bert, CachedTextEncoder)
    images = [data.astronaut()[::8, ::8], data.chelsea()[::5, ::5], data.coffee()[::8, ::8]]
    captions = ["person . face", "person . face", "cup"]
    first = det.detect(images, captions, box_threshold=0.0, text_threshold=0.0)
    assert gd.bert.misses == 2  # two distinct rows in a batch of three
    assert det.detect(images, captions, box_threshold=0.0, text_threshold=0.0) == first
    assert gd.bert.misses == 2  # the second batch encodes nothing
    gd.bert = gd.bert.bert  # groundingdino's own path: BERT over every caption of the batch
    plain = GroundingDinoDetector.__new__(GroundingDinoDetector)
    plain.__dict__.update({**det.__dict__, "model": gd})
    uncached = plain.detect(images, captions, box_threshold=0.0, text_threshold=0.0)
    for a, b in zip(first, uncached):
        assert [d.phrase for d in a] == [d.phrase for d in b]
        np.testing.assert_allclose([d.box for d in a], [d.box for d in b], atol=1e-3)


def test_precision_key_is_checked_and_auto_is_fp32_on_the_cpu():
    from dynaip.configs import ConfigError
    from dynaip.models.precision import model_precision, resolve_precision

    raw = {"source": {"kind": "folder", "root": "/nonexistent"}}
    assert Recipe.from_dict(raw).executor.precision == "auto"
    assert Recipe.from_dict({**raw, "executor": {"precision": "bf16"}}).executor.precision == "bf16"
    with pytest.raises(ConfigError, match="executor.precision"):
        Recipe.from_dict({**raw, "executor": {"precision": "int8"}})
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("fp16", "cpu") == "fp16"
    with model_precision("bf16", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with model_precision("fp16", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    with model_precision("auto", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_resume_at_another_precision_is_refused(tmp_path):
    from pipeline.writer import DatasetWriter, OutputDirError

    DatasetWriter(tmp_path / "ds", "h1").prepare({}, "src", "bf16")
    DatasetWriter(tmp_path / "ds", "h1").prepare({}, "src", "bf16")  # same precision: resumes
    with pytest.raises(
        OutputDirError,
        match="built at model precision bf16, but this run's executor.precision "
        "resolves to fp32; set executor.precision: bf16",
    ):
        DatasetWriter(tmp_path / "ds", "h1").prepare({}, "src", "fp32")
