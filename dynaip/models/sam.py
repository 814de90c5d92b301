"""Segment Anything from its released .pth, and a batched box-prompted segmenter."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .config import SamPaths
from .errors import CheckpointError
from .weights import load_into, load_state_dict

EXPECTED = "a Segment Anything state dict (.pth), e.g. sam_vit_h_4b8939.pth"
VARIANTS = ("vit_h", "vit_l", "vit_b", "tiny")


def build_sam_tiny():
    """A small SAM with the release's structure and 1024-px input (for tests and the demo)."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    dim, img, patch = 32, 1024, 16
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=2, embed_dim=32, img_size=img, mlp_ratio=2, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2, patch_size=patch, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,),
            window_size=8, out_chans=dim),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(img // patch, img // patch),
                                     input_image_size=(img, img), mask_in_chans=8),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
                                 transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=32),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )


def build_sam(variant: str):
    if variant not in VARIANTS:
        raise ValueError(f"unknown SAM variant '{variant}': use one of {', '.join(VARIANTS)}")
    if variant == "tiny":
        return build_sam_tiny()
    from segment_anything import sam_model_registry

    return sam_model_registry[variant](checkpoint=None)


def load_sam(paths: SamPaths, device: str | torch.device = "cpu"):
    sd = load_state_dict(f"SAM ({paths.variant})", paths.checkpoint, EXPECTED)
    if paths.variant not in VARIANTS:
        raise CheckpointError("SAM", paths.checkpoint, EXPECTED, f"Unknown variant '{paths.variant}' in models.yaml; use one of {VARIANTS}.")
    model = build_sam(paths.variant)
    load_into(model, sd, f"SAM ({paths.variant})", paths.checkpoint, EXPECTED)
    return model.eval().requires_grad_(False).to(device)


class SamBoxSegmenter:
    """Batched SAM: many images, each with its own XYXY pixel boxes, through ``Sam.forward``.

    ``segment(images, boxes)`` takes RGB uint8 ``(H, W, 3)`` arrays and per image an ``(N, 4)``
    array of XYXY boxes in that image's pixels; it returns per image ``(masks (N, H, W) bool,
    scores (N,))`` keeping, per box, the candidate mask with the highest predicted IoU.
    """

    def __init__(self, model, device: str | torch.device = "cpu"):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.model = model
        self.device = torch.device(device)
        self.transform = ResizeLongestSide(model.image_encoder.img_size)

    @torch.no_grad()
    def segment(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        if len(images) != len(boxes):
            raise ValueError(f"segment: {len(images)} images but {len(boxes)} box sets")
        batched, todo = [], []
        for i, (image, bx) in enumerate(zip(images, boxes)):
            bx = np.asarray(bx, dtype=np.float32).reshape(-1, 4)
            if len(bx) == 0:
                continue
            h, w = image.shape[:2]
            resized = self.transform.apply_image(np.ascontiguousarray(image))
            batched.append({
                "image": torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous(),
                "original_size": (h, w),
                "boxes": torch.as_tensor(self.transform.apply_boxes(bx, (h, w)), device=self.device),
            })
            todo.append(i)
        results: list[tuple[np.ndarray, np.ndarray]] = [
            (np.zeros((0, *im.shape[:2]), dtype=bool), np.zeros((0,), dtype=np.float32)) for im in images]
        if not batched:
            return results
        outputs = self.model(batched, multimask_output=True)
        for i, out in zip(todo, outputs):
            iou = out["iou_predictions"].float()  # (N, 3)
            best = iou.argmax(dim=1)
            masks = out["masks"][torch.arange(len(best)), best]  # (N, H, W) bool
            results[i] = (masks.cpu().numpy().astype(bool), iou.max(dim=1).values.cpu().numpy())
        return results
