"""The ``curate`` part of benchmarks/gpu_suite.py (issue #27): Grounding DINO Swin-T + SAM ViT-H at each
precision and batch size, their agreement with fp32, the physical limit, and one whole chunk worker.

    python benchmarks/gpu_suite.py --out DIR --parts curate [--repeats 3] [--smoke]

Full-size models with random weights built from their configs (nothing is downloaded), on generated
1024×768 photos (skimage's sample photos resized). For every precision (fp32, then the reduced ones
the device runs: bf16 on a bf16-capable GPU; the smoke run adds bf16 on the CPU) and batch size:

- ``detect_images_per_s``, ``segment_images_per_s`` (two fixed boxes per image), and
  ``detect_plus_segment_images_per_s`` = batch / (t_detect + t_segment), medians of ``repeats``;
- ``peak_memory_gib`` (CUDA allocator peak over that configuration);
- agreement with fp32 on the same images and batch: ``mask_iou_vs_fp32`` (mean IoU of the kept mask of
  every box), ``box_match_vs_fp32`` (fraction of fp32 detections, all queries with thresholds 0, with a
  detection at IoU ≥ 0.9 and score within 0.05 at this precision), ``phrase_match_vs_fp32`` (of those
  matches, the fraction labelled with the same phrase) and ``box_max_abs_px`` (largest corner
  difference of the matched boxes, pixels).

``limit``: model FLOPs per image counted by ``torch.utils.flop_counter`` on one image (matmuls,
convolutions and attention; Grounding DINO's deformable-attention sampling is not a matmul and is left
out), the dense bf16 peak of the GPU, and the images/s that peak would give. ``end_to_end``: one
``ChunkWorker`` (decode → detect → select → segment → compose → quality → caption → pair → shard) over
``e2e_images`` generated JPEGs in one chunk at the largest batch size, at the device's ``auto`` precision,
with ``executor.prefetch`` 1 and 0, on ``manifests/demo.yaml``'s loosened filters (random networks'
boxes and masks fail the production ones; ``rejected_by_reason`` says which inputs stopped where). Random weights: the speed is the real models' speed; the agreement
figures are those of random networks, a harsher case than trained ones (docs/curation_speed.md).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gpu_suite import Sizes, build_grounding_dino, gpu_peak_tflops, peak_gib, photos, reset_peak, timed

REPO = Path(__file__).resolve().parents[1]
MATCH_IOU, MATCH_SCORE = 0.9, 0.05


def precisions(device: torch.device, smoke: bool) -> list[str]:
    """fp32 first (the reference), then the reduced precisions worth timing on ``device``."""
    from dynaip.models.precision import resolve_precision

    if smoke:
        return ["fp32", "bf16"]
    auto = resolve_precision("auto", device)
    return ["fp32"] + ([auto] if auto != "fp32" else [])


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of XYXY boxes ``a`` (n, 4) and ``b`` (m, 4)."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def box_agreement(ref: list[list], got: list[list]) -> tuple[float | None, float | None, float | None]:
    """(fraction of ``ref`` detections matched in ``got``, fraction of matches with the same phrase,
    largest corner difference of a match in px)."""
    matched, total, worst, same = 0, 0, 0.0, 0
    for r_img, g_img in zip(ref, got):
        total += len(r_img)
        if not r_img or not g_img:
            continue
        rb, gb = np.array([d.box for d in r_img]), np.array([d.box for d in g_img])
        ok = box_iou(rb, gb) >= MATCH_IOU
        ok &= (
            np.abs(np.array([d.score for d in r_img])[:, None] - np.array([e.score for e in g_img])[None])
            <= MATCH_SCORE
        )
        for i in np.flatnonzero(ok.any(axis=1)):
            matched += 1
            diff = np.abs(rb[i] - gb[ok[i]]).max(axis=1)
            worst = max(worst, float(diff.min()))
            same += r_img[i].phrase == g_img[int(np.flatnonzero(ok[i])[diff.argmin()])].phrase
    return ((matched / total if total else None), (same / matched if matched else None), (worst if matched else None))


def mask_agreement(ref: list[tuple], got: list[tuple]) -> float:
    ious = []
    for (rm, _), (gm, _) in zip(ref, got):
        for a, b in zip(rm, gm):
            union = np.logical_or(a, b).sum()
            ious.append(np.logical_and(a, b).sum() / union if union else 1.0)
    return float(np.mean(ious))


def flops_per_image(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def models_part(sizes: Sizes, device: torch.device, repeats: int, detector_model, sam) -> tuple[list[dict], dict]:
    h, w = sizes.curate_hw
    boxes = np.array([[w * 0.1, h * 0.1, w * 0.5, h * 0.6], [w * 0.4, h * 0.3, w * 0.9, h * 0.9]], np.float32)
    rows, reference = [], {}
    limit: dict = {}
    for precision in precisions(device, sizes.smoke):
        try:
            rows += precision_rows(sizes, device, repeats, detector_model, sam, precision, boxes, reference, limit)
        except Exception as e:  # e.g. an op without a kernel at this precision: recorded, the rest still runs
            rows.append({"precision": precision, "error": f"{type(e).__name__}: {e}"[:500]})
            print(f"curate {precision}: {rows[-1]['error']}", flush=True)
    ok = [r for r in rows if "error" not in r]
    if ok and limit.get("limit_images_per_s"):
        limit["fraction_reached"] = max(r["detect_plus_segment_images_per_s"] for r in ok) / limit["limit_images_per_s"]
    return rows, limit


def precision_rows(
    sizes: Sizes,
    device: torch.device,
    repeats: int,
    detector_model,
    sam,
    precision: str,
    boxes: np.ndarray,
    reference: dict,
    limit: dict,
) -> list[dict]:
    """The rows of one precision; fills ``reference`` (fp32 outputs) and ``limit`` (FLOPs) on the first."""
    from dynaip.models.grounding_dino import GroundingDinoDetector
    from dynaip.models.sam import SamBoxSegmenter

    size, max_size = (96, 128) if sizes.smoke else (800, 1333)
    rows = []
    detector = GroundingDinoDetector(detector_model, size=size, max_size=max_size, device=device, precision=precision)
    segmenter = SamBoxSegmenter(sam, device=device, precision=precision)
    if not limit:  # counted once, at fp32 (the FLOPs do not depend on the precision)
        one = photos(sizes, 1)
        fd = flops_per_image(
            lambda: detector.detect(one, ["person . animal . cup ."], box_threshold=0.35, text_threshold=0.25)
        )
        fs = flops_per_image(lambda: segmenter.segment(one, [boxes]))
        peak = gpu_peak_tflops(device)
        limit.update(
            {
                "detect_tflop_per_image": fd / 1e12,
                "segment_tflop_per_image": fs / 1e12,
                "peak_bf16_tflops": peak,
                "limit_images_per_s": (peak * 1e12 / (fd + fs)) if peak else None,
            }
        )
    for batch in sizes.batches_curate:
        imgs = photos(sizes, batch)
        caps = ["person . animal . cup ."] * batch
        det = lambda: detector.detect(imgs, caps, box_threshold=0.35, text_threshold=0.25)  # noqa: E731
        seg = lambda: segmenter.segment(imgs, [boxes] * batch)  # noqa: E731
        reset_peak(device)
        det(), seg()  # warm-up
        td = statistics.median(timed(det, device) for _ in range(repeats))
        ts = statistics.median(timed(seg, device) for _ in range(repeats))
        all_dets = detector.detect(imgs, caps, box_threshold=0.0, text_threshold=0.0)
        masks = seg()
        row = {
            "precision": precision,
            "batch": batch,
            "detect_images_per_s": batch / td,
            "segment_images_per_s": batch / ts,
            "detect_plus_segment_images_per_s": batch / (td + ts),
            "peak_memory_gib": peak_gib(device),
        }
        if precision == "fp32":
            reference[batch] = (all_dets, masks)
        else:
            row["mask_iou_vs_fp32"] = mask_agreement(reference[batch][1], masks)
            (row["box_match_vs_fp32"], row["phrase_match_vs_fp32"], row["box_max_abs_px"]) = box_agreement(
                reference[batch][0], all_dets
            )
        rows.append(row)
        print(
            f"curate {precision} batch {batch}: detect {batch / td:.2f} img/s, segment {batch / ts:.2f} img/s"
            + (f", mask IoU vs fp32 {row['mask_iou_vs_fp32']:.4f}" if "mask_iou_vs_fp32" in row else ""),
            flush=True,
        )
    return rows


def end_to_end(sizes: Sizes, device: torch.device, detector_model, sam) -> list[dict]:
    """One chunk of generated photos through a whole ``ChunkWorker`` (writer included), per prefetch."""
    from PIL import Image

    from dynaip.models.grounding_dino import GroundingDinoDetector
    from dynaip.models.sam import SamBoxSegmenter
    from pipeline.executor_local import run_local
    from pipeline.recipe import Recipe
    from pipeline.stages import build_stages

    n = 4 if sizes.smoke else 64
    batch = max(sizes.batches_curate)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        root.mkdir()
        for i, im in enumerate(photos(sizes, n)):
            # each photo differs (a shifted crop-and-flip), so de-duplication keeps them all
            im = np.roll(im if i % 2 else im[:, ::-1], 7 * i, axis=1)
            Image.fromarray(np.ascontiguousarray(im)).save(root / f"{i:04d}.jpg", quality=92)
        recipe = Recipe.from_yaml(REPO / "manifests" / "demo.yaml", source_root=str(root))
        recipe.source.options.pop("cross_pairs", None)
        if not sizes.smoke:
            recipe.detection.image_size, recipe.detection.max_size = 800, 1333  # production sizes
        recipe.filters.min_image_side = 16
        recipe.filters.max_comparable_subjects = 10_000  # random detectors score every query alike (≤ 900 queries)
        recipe.filters.min_mask_area = 0.0  # random SAM masks are small; an empty one is still a reject
        recipe.captioning.order = ["provided", "template"]  # no captioning model in this benchmark
        recipe.shards.inputs_per_shard = n
        ex = recipe.executor
        ex.device, ex.precision, ex.batch_size = str(device), "auto", batch
        from dynaip.models.precision import resolve_precision

        precision = resolve_precision("auto", device)
        for prefetch in (1, 0):
            ex.prefetch = prefetch
            stages = build_stages(recipe, None)
            for s in stages:
                if s.name == "detect":
                    s._detector = GroundingDinoDetector(
                        detector_model,
                        size=recipe.detection.image_size,
                        max_size=recipe.detection.max_size,
                        device=device,
                        precision="auto",
                    )
                elif s.name == "segment":
                    s._segmenter = SamBoxSegmenter(sam, device=device, precision="auto")
            run_local(recipe, Path(tmp) / f"warm{prefetch}", None, limit=batch, progress=False, stages=stages)
            t0 = time.perf_counter()
            manifest = run_local(recipe, Path(tmp) / f"ds{prefetch}", None, progress=False, stages=stages)
            wall = time.perf_counter() - t0
            t = manifest["totals"]
            rows.append(
                {
                    "precision": precision,
                    "prefetch": prefetch,
                    "batch": batch,
                    "inputs": t["inputs"],
                    "accepted": t["accepted"],
                    "wall_s": wall,
                    "images_per_s": t["inputs"] / wall,
                    "rejected_by_reason": t["rejected_by_reason"],
                }
            )
            print(
                f"curate end-to-end prefetch {prefetch}: {t['inputs'] / wall:.2f} img/s "
                f"({t['accepted']}/{t['inputs']} accepted)",
                flush=True,
            )
    return rows


def bench_curate(sizes: Sizes, device: torch.device, repeats: int) -> dict:
    from dynaip.models.sam import build_sam

    with tempfile.TemporaryDirectory() as tmp:
        detector_model = build_grounding_dino(sizes, device, Path(tmp)).model
    sam = build_sam("tiny" if sizes.smoke else "vit_h").eval().requires_grad_(False).to(device)
    rows, limit = models_part(sizes, device, repeats, detector_model, sam)
    e2e = end_to_end(sizes, device, detector_model, sam)
    return {"models": rows, "limit": limit, "end_to_end": e2e}


def markdown(curate: dict) -> list[str]:
    """The report's curation section (lines)."""

    def f(x, fmt="{:.2f}"):
        return "n/a" if x is None else fmt.format(x)

    lines = [
        "## Curation models",
        "",
        "| precision | batch | detect img/s | segment img/s | both img/s | peak GiB | mask IoU vs fp32 | "
        "boxes matched vs fp32 | same phrase | max box diff px |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in curate["models"]:
        if "error" in r:
            lines.append(f"| {r['precision']} | {r['error']} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['precision']} | {r['batch']} | {f(r['detect_images_per_s'])} | {f(r['segment_images_per_s'])} | "
            f"{f(r['detect_plus_segment_images_per_s'])} | {f(r['peak_memory_gib'], '{:.1f}')} | "
            f"{f(r.get('mask_iou_vs_fp32'), '{:.4f}')} | {f(r.get('box_match_vs_fp32'), '{:.3f}')} | "
            f"{f(r.get('phrase_match_vs_fp32'), '{:.3f}')} | {f(r.get('box_max_abs_px'), '{:.1f}')} |"
        )
    lm = curate["limit"]
    lines += [
        "",
        f"FLOPs per image: detect {f(lm['detect_tflop_per_image'], '{:.3f}')} TFLOP, segment "
        f"{f(lm['segment_tflop_per_image'], '{:.3f}')} TFLOP; at {f(lm['peak_bf16_tflops'], '{:.0f}')} TFLOP/s "
        f"(dense bf16 peak) the limit is {f(lm['limit_images_per_s'], '{:.0f}')} images/s; best reached "
        f"{f(lm.get('fraction_reached'), '{:.1%}')}.",
        "",
        "| end to end (one chunk worker) | prefetch | batch | inputs | accepted | img/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in curate["end_to_end"]:
        lines.append(
            f"| {r['precision']} | {r['prefetch']} | {r['batch']} | {r['inputs']} | {r['accepted']} | "
            f"{f(r['images_per_s'])} |"
        )
    lines.append("")
    return lines
