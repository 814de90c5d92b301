"""A LAION-aesthetics-style score: a head of linear layers over the L2-normalised OpenCLIP image
embedding (the projected one, ``encode_image``), as in the LAION aesthetic predictor and its improved
MLP version.

Head file (safetensors, tensors only), either
  * one linear layer: ``weight (1, D)``, ``bias (1,)`` — LAION-aesthetics v1 (``sa_0_4_vit_l_14_linear``);
  * a stack: ``layers.{i}.weight`` / ``layers.{i}.bias`` applied in ascending ``i``, with nothing
    between them — the improved-aesthetic-predictor MLP (768→1024→128→64→16→1; its dropouts have no
    weights and are identity at inference, so its ``.pth`` state dict converts key for key).
The score is ``head(e / |e|)``; docs/curation_quality.md says where the real files come from.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .clip_vision import ClipImageEmbedder
from .errors import CheckpointError
from .weights import load_state_dict

EXPECTED = ("an aesthetic head in safetensors: 'weight' (1, D) + 'bias', or 'layers.{i}.weight/bias' "
            "linear layers ending in one output (the improved-aesthetic-predictor MLP)")


class AestheticHead(nn.Module):
    """Linear layers applied in order (no activations, as the released heads): ``(B, D) → (B,)``."""

    def __init__(self, layers: Sequence[nn.Linear]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        for layer in self.layers:
            x = layer(x)
        return x[:, 0]


def head_from_state_dict(sd: dict[str, torch.Tensor], path: str | Path = "aesthetic head") -> AestheticHead:
    if set(sd) == {"weight", "bias"}:
        pairs = [(sd["weight"], sd["bias"])]
    else:
        idx = sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(r"layers\.(\d+)\.(weight|bias)", k))})
        if not idx or len(sd) != 2 * len(idx) or any(f"layers.{i}.weight" not in sd or f"layers.{i}.bias" not in sd
                                                      for i in idx):
            raise CheckpointError("aesthetic head", path, EXPECTED, f"Its keys are {sorted(sd)[:6]}.")
        pairs = [(sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"]) for i in idx]
    layers = []
    for n, (w, b) in enumerate(pairs):
        if w.dim() != 2 or b.shape != (w.shape[0],) or (layers and layers[-1].out_features != w.shape[1]):
            raise CheckpointError("aesthetic head", path, EXPECTED, f"Layer {n} has weight {tuple(w.shape)} and "
                                  f"bias {tuple(b.shape)}, which do not chain.")
        lin = nn.Linear(w.shape[1], w.shape[0])
        lin.weight.data.copy_(w.float())
        lin.bias.data.copy_(b.float())
        layers.append(lin)
    if layers[-1].out_features != 1:
        raise CheckpointError("aesthetic head", path, EXPECTED, f"It ends in {layers[-1].out_features} outputs, not 1.")
    return AestheticHead(layers).eval().requires_grad_(False)


def load_aesthetic_head(path: str | Path) -> AestheticHead:
    return head_from_state_dict(load_state_dict("aesthetic head", path, EXPECTED), path)


class AestheticScorer(ClipImageEmbedder):
    """OpenCLIP image tower + head. ``scores(images)`` takes ``(H, W, 3) uint8`` arrays (preprocessed
    as ``ClipImageEmbedder`` does)."""

    def __init__(self, head_path: str | Path, clip_paths, device: str = "cpu"):
        self.head = load_aesthetic_head(head_path).to(device)
        super().__init__(clip_paths, device)
        dim = int(getattr(self.visual, "output_dim", 0) or 0)
        if dim and dim != self.head.in_features:
            raise CheckpointError("aesthetic head", head_path, EXPECTED,
                                  f"It takes {self.head.in_features}-d embeddings but the CLIP at '{clip_paths.path}' "
                                  f"gives {dim}-d; use the CLIP the head was trained on (ViT-L/14: 768).")

    @torch.no_grad()
    def scores(self, images: Sequence[np.ndarray]) -> list[float]:
        if not len(images):
            return []
        return [float(v) for v in self.head(self.embeddings(images)).cpu()]


def write_tiny_aesthetic_head(out: Path, dim: int) -> None:
    """A random two-layer head (``layers.0``: dim→8, ``layers.1``: 8→1) in the stack format (call under a fixed seed)."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    a, b = nn.Linear(dim, 8), nn.Linear(8, 1)
    save_file({"layers.0.weight": a.weight.detach().contiguous(), "layers.0.bias": a.bias.detach().contiguous(),
               "layers.1.weight": b.weight.detach().contiguous(), "layers.1.bias": b.bias.detach().contiguous()},
              str(out))
