"""SAM fast path: fused attention in the image encoder and one batched mask decoder call for every box.

- ``use_sdpa(encoder)`` makes each of the ViT image encoder's attention blocks compute
  ``softmax(q kᵀ / √d + B) v`` with ``torch.nn.functional.scaled_dot_product_attention``, where ``B`` is
  segment-anything's decomposed relative-position bias (a height term plus a width term, both read
  from the block's ``rel_pos_h`` / ``rel_pos_w``) passed as the additive attention mask. The
  arithmetic is the one of segment-anything's own block; the fused kernel only avoids writing the
  softmax matrix out (tests/test_sam_fast.py: equal within 1e-4 in fp32 on the tiny model).
- ``decode_boxes`` runs SAM's prompt encoder and mask decoder once over the boxes of every image of
  a batch (segment-anything's ``Sam.forward`` calls them once per image), each box paired with its
  own image's embedding.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """The decomposed relative-position bias of queries ``q`` ``(B, heads, H*W, d)`` on an ``H × W``
    grid attending to the same grid: ``(B, heads, H*W, H*W)``, ``bias[.., (y, x), (y', x')] =
    q·R_h[y - y'] + q·R_w[x - x']`` (the unscaled query, as segment-anything adds it)."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    b, heads, n, d = q.shape
    h, w = hw
    table_h = get_rel_pos(h, h, rel_pos_h).to(q.dtype)  # (H, H, d): R_h[y - y'] for every (y, y')
    table_w = get_rel_pos(w, w, rel_pos_w).to(q.dtype)
    grid = q.reshape(b * heads, h, w, d)
    by_row = torch.einsum("nywd,ykd->nywk", grid, table_h)  # (n, H, W, H)
    by_col = torch.einsum("nywd,wkd->nywk", grid, table_w)  # (n, H, W, W)
    bias = by_row[..., :, None] + by_col[..., None, :]  # (n, H, W, H, W)
    return bias.reshape(b, heads, n, n)


def _sdpa_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Replacement ``forward`` of segment-anything's image-encoder ``Attention`` (bound per instance)."""
    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, H*W, d) each
    bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w)).to(q.dtype) if self.use_rel_pos else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    return self.proj(out.permute(0, 2, 1, 3).reshape(b, h, w, -1))


def use_sdpa(encoder: torch.nn.Module, on: bool = True) -> int:
    """Switches every attention block of a SAM ``ImageEncoderViT`` to the fused path (``on``) or back
    to segment-anything's own; returns how many blocks were switched."""
    from segment_anything.modeling.image_encoder import Attention

    n = 0
    for module in encoder.modules():
        if isinstance(module, Attention):
            if on:
                module.forward = types.MethodType(_sdpa_forward, module)
            else:
                module.__dict__.pop("forward", None)
            n += 1
    return n


def decode_boxes(
    sam, embeddings: torch.Tensor, owner: torch.Tensor, boxes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution mask logits ``(N, 3, 256, 256)`` and predicted IoUs ``(N, 3)`` (SAM's three
    multimask outputs) of ``N`` XYXY ``boxes`` in the model's 1024-px input frame, box ``i`` on
    image ``owner[i]`` of ``embeddings`` ``(B, C, h, w)``: one prompt-encoder and one mask-decoder
    pass for all boxes."""
    decoder = sam.mask_decoder
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([tokens.unsqueeze(0).expand(len(boxes), -1, -1), sparse], dim=1)
    src = embeddings.index_select(0, owner) + dense
    pos = sam.prompt_encoder.get_dense_pe().expand(len(boxes), -1, -1, -1)
    n, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos, tokens)
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
    hyper = torch.stack([mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    n, c, h, w = upscaled.shape
    masks = (hyper @ upscaled.reshape(n, c, h * w)).reshape(n, -1, h, w)
    iou = decoder.iou_prediction_head(hs[:, 0, :])
    return masks[:, 1:], iou[:, 1:]  # the multimask outputs (the first token is the single-mask one)
