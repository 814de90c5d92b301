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


def build_sam_tiny(img: int = 1024):
    """A small SAM with the release's structure and ``img``-px input (1024, the release's, for the tiny
    checkpoint of tests and the demo; smaller for cheap model-level tests)."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    dim, patch = 32, 16
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=2,
            embed_dim=32,
            img_size=img,
            mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=(1,),
            window_size=8,
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(img // patch, img // patch),
            input_image_size=(img, img),
            mask_in_chans=8,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
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
        raise CheckpointError(
            "SAM",
            paths.checkpoint,
            EXPECTED,
            f"Unknown variant '{paths.variant}' in models.yaml; use one of {VARIANTS}.",
        )
    model = build_sam(paths.variant)
    load_into(model, sd, f"SAM ({paths.variant})", paths.checkpoint, EXPECTED)
    return model.eval().requires_grad_(False).to(device)


class SamBoxSegmenter:
    """Batched SAM: many images, each with its own XYXY pixel boxes.

    ``segment(images, boxes)`` takes RGB uint8 ``(H, W, 3)`` arrays and per image an ``(N, 4)``
    array of XYXY boxes in that image's pixels; it returns per image ``(masks (N, H, W) bool,
    scores (N,))`` keeping, per box, the candidate mask with the highest predicted IoU.

    The images go through the encoder once per batch (fused attention, ``sam_fast.use_sdpa``), and
    the prompt encoder + mask decoder once over every box of the batch (``sam_fast.decode_boxes``);
    both run at ``precision`` (``dynaip.models.precision``). Mask logits and IoUs are then taken to
    fp32: the choice of the best candidate, the upsampling to the image and the threshold are fp32.
    """

    def __init__(self, model, device: str | torch.device = "cpu", precision: str = "fp32"):
        from segment_anything.utils.transforms import ResizeLongestSide

        from .precision import resolve_precision
        from .sam_fast import use_sdpa

        self.model = model
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        use_sdpa(model.image_encoder)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """The model input of one image: resized so its longer side is the encoder's (1024), CHW float."""
        resized = self.transform.apply_image(np.ascontiguousarray(image))
        return torch.from_numpy(resized).permute(2, 0, 1).float()

    @torch.no_grad()
    def segment(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        from .precision import model_precision
        from .sam_fast import decode_boxes

        if len(images) != len(boxes):
            raise ValueError(f"segment: {len(images)} images but {len(boxes)} box sets")
        results: list[tuple[np.ndarray, np.ndarray]] = [
            (np.zeros((0, *im.shape[:2]), dtype=bool), np.zeros((0,), dtype=np.float32)) for im in images
        ]
        sam, inputs, todo, owner, frame_boxes = self.model, [], [], [], []
        for i, (image, bx) in enumerate(zip(images, boxes)):
            bx = np.asarray(bx, dtype=np.float32).reshape(-1, 4)
            if len(bx) == 0:
                continue
            owner += [len(todo)] * len(bx)
            frame_boxes.append(self.transform.apply_boxes(bx, image.shape[:2]))
            inputs.append(self.prepare(image))
            todo.append(i)
        if not todo:
            return results
        x = torch.stack([sam.preprocess(t.to(self.device)) for t in inputs])
        box_t = torch.as_tensor(np.concatenate(frame_boxes), dtype=torch.float32, device=self.device)
        owner_t = torch.as_tensor(owner, device=self.device)
        with model_precision(self.precision, self.device):
            embeddings = sam.image_encoder(x)
            logits, iou = decode_boxes(sam, embeddings, owner_t, box_t)
        logits, iou = logits.float(), iou.float()  # every decision below is fp32
        best = iou.argmax(dim=1)
        chosen = logits[torch.arange(len(best), device=best.device), best][:, None]  # (N, 1, 256, 256)
        scores = iou.max(dim=1).values.cpu().numpy()
        owner_np = np.asarray(owner)
        for k, i in enumerate(todo):
            sel = np.flatnonzero(owner_np == k)
            masks = sam.postprocess_masks(chosen[sel], inputs[k].shape[-2:], images[i].shape[:2])
            results[i] = ((masks[:, 0] > sam.mask_threshold).cpu().numpy(), scores[sel])
        return results
