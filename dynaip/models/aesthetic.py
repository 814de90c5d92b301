"""A LAION-aesthetics-style score: a head of linear layers over the L2-normalised OpenCLIP image
embedding (the projected one, ``encode_image``), as in the LAION aesthetic predictor and its improved
MLP version.

Head file (a tensors-only state dict: the releases' ``.pth``, loaded with ``weights_only``, or
safetensors), as released:
  * one linear layer: ``weight (1, D)``, ``bias (1,)`` — LAION-aesthetics v1 (LAION-AI/aesthetic-predictor
    ``sa_0_4_vit_l_14_linear.pth``, an ``nn.Linear(768, 1)`` state dict);
  * the improved-aesthetic-predictor MLP (christophschuhmann/improved-aesthetic-predictor), the state
    dict of its ``layers = nn.Sequential(...)``: ``layers.{i}.weight`` / ``layers.{i}.bias`` for the
    Linear entries. The Sequential's weightless entries (Dropout, ReLU) leave gaps in ``i``; two
    layouts are published:
      - ``sac+logos+ava1-l14-linearMSE.pth``: Linear indices 0, 2, 4, 6, 7 (a Dropout in each gap:
        no activation, the layers are applied back to back);
      - ``ava+logos-l14-reluMSE.pth``: indices 0, 3, 6, 9, 11 (ReLU + Dropout, then a last ReLU):
        a ReLU after every layer but the last.
    The activation is detected from those layouts (and contiguous indices mean nothing in between);
    any other layout must be declared in models.yaml (``aesthetic.activation: none | relu``), and a
    declaration that contradicts the detected layout is an error. Dropouts are identity at inference.
The score is ``head(e / |e|)``; docs/curation_quality.md says where the real files come from.
"""

from __future__ import annotations

import re
from itertools import pairwise
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .clip_vision import ClipImageEmbedder
from .errors import CheckpointError
from .weights import load_state_dict

EXPECTED = (
    "an aesthetic head state dict (.pth or .safetensors): 'weight' (1, D) + 'bias', or "
    "'layers.{i}.weight/bias' linear layers ending in one output (the improved-aesthetic-predictor MLP)"
)
ACTIVATIONS = ("none", "relu")
KNOWN_LAYOUTS = {(0, 2, 4, 6, 7): "none", (0, 3, 6, 9, 11): "relu"}
"""Linear indices of the two published improved-aesthetic-predictor heads → their activation."""


class AestheticHead(nn.Module):
    """Linear layers applied in order, with a ReLU between them when ``activation == "relu"``:
    ``(B, D) → (B,)``."""

    def __init__(self, layers: Sequence[nn.Linear], activation: str = "none"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"aesthetic head activation '{activation}': use one of {', '.join(ACTIVATIONS)}")
        self.layers = nn.ModuleList(layers)
        self.activation = activation

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        for n, layer in enumerate(self.layers):
            x = layer(x)
            if self.activation == "relu" and n < len(self.layers) - 1:
                x = torch.relu(x)
        return x[:, 0]


def _activation(idx: Sequence[int], declared: str | None, path: str | Path) -> str:
    """The head's activation: detected from the Linear indices where they tell, else as declared."""
    if declared is not None and declared not in ACTIVATIONS:
        raise CheckpointError(
            "aesthetic head",
            path,
            EXPECTED,
            f"models.yaml's aesthetic.activation is '{declared}'; use one of {', '.join(ACTIVATIONS)}.",
        )
    contiguous = all(b - a == 1 for a, b in pairwise(idx))
    detected = "none" if contiguous else KNOWN_LAYOUTS.get(tuple(idx))
    if detected is not None and declared is not None and declared != detected:
        raise CheckpointError(
            "aesthetic head",
            path,
            EXPECTED,
            f"Its layer indices {list(idx)} are the "
            f"'{detected}' layout but models.yaml declares aesthetic.activation: {declared}; "
            "drop the declaration or use the matching head.",
        )
    if detected is None and declared is None:
        raise CheckpointError(
            "aesthetic head",
            path,
            EXPECTED,
            f"Its layer indices {list(idx)} are not a published "
            "layout, so what sits between the layers is unknown; declare aesthetic.activation "
            "(none | relu) in models.yaml.",
        )
    return detected or declared  # type: ignore[return-value]


def head_from_state_dict(
    sd: dict[str, torch.Tensor], path: str | Path = "aesthetic head", activation: str | None = None
) -> AestheticHead:
    """The head from its state dict; ``activation`` is models.yaml's declaration (None = detect)."""
    if set(sd) == {"weight", "bias"}:
        pairs = [(sd["weight"], sd["bias"])]
        act = _activation([0], activation, path)
    else:
        idx = sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(r"layers\.(\d+)\.(weight|bias)", k))})
        if (
            not idx
            or len(sd) != 2 * len(idx)
            or any(f"layers.{i}.weight" not in sd or f"layers.{i}.bias" not in sd for i in idx)
        ):
            raise CheckpointError("aesthetic head", path, EXPECTED, f"Its keys are {sorted(sd)[:6]}.")
        pairs = [(sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"]) for i in idx]
        act = _activation(idx, activation, path)
    layers = []
    for n, (w, b) in enumerate(pairs):
        if w.dim() != 2 or b.shape != (w.shape[0],) or (layers and layers[-1].out_features != w.shape[1]):
            raise CheckpointError(
                "aesthetic head",
                path,
                EXPECTED,
                f"Layer {n} has weight {tuple(w.shape)} and bias {tuple(b.shape)}, which do not chain.",
            )
        lin = nn.Linear(w.shape[1], w.shape[0])
        lin.weight.data.copy_(w.float())
        lin.bias.data.copy_(b.float())
        layers.append(lin)
    if layers[-1].out_features != 1:
        raise CheckpointError("aesthetic head", path, EXPECTED, f"It ends in {layers[-1].out_features} outputs, not 1.")
    return AestheticHead(layers, act).eval().requires_grad_(False)


def load_aesthetic_head(path: str | Path, activation: str | None = None) -> AestheticHead:
    return head_from_state_dict(load_state_dict("aesthetic head", path, EXPECTED), path, activation)


class AestheticScorer(ClipImageEmbedder):
    """OpenCLIP image tower + head. ``scores(images)`` takes ``(H, W, 3) uint8`` arrays (preprocessed
    as ``ClipImageEmbedder`` does)."""

    def __init__(self, head_path: str | Path, clip_paths, device: str = "cpu", activation: str | None = None):
        self.head = load_aesthetic_head(head_path, activation).to(device)
        super().__init__(clip_paths, device)
        dim = int(getattr(self.visual, "output_dim", 0) or 0)
        if dim and dim != self.head.in_features:
            raise CheckpointError(
                "aesthetic head",
                head_path,
                EXPECTED,
                f"It takes {self.head.in_features}-d embeddings but the CLIP at '{clip_paths.path}' "
                f"gives {dim}-d; use the CLIP the head was trained on (ViT-L/14: 768).",
            )

    @torch.no_grad()
    def scores(self, images: Sequence[np.ndarray]) -> list[float]:
        if not len(images):
            return []
        return [float(v) for v in self.head(self.embeddings(images)).cpu()]


def write_tiny_aesthetic_head(out: Path, dim: int) -> None:
    """A random head in the improved-aesthetic-predictor's release form (``sac+logos+ava1-l14-linearMSE.pth``):
    ``torch.save`` of its ``nn.Sequential``'s state dict with the same entries (Linear, Dropout, Linear,
    Dropout, Linear, Dropout, Linear, Linear, so Linear indices 0, 2, 4, 6, 7) at small widths
    (dim→16→8→4→2→1). Call under a fixed seed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    layers = nn.Sequential(
        nn.Linear(dim, 16),
        nn.Dropout(0.2),
        nn.Linear(16, 8),
        nn.Dropout(0.2),
        nn.Linear(8, 4),
        nn.Dropout(0.1),
        nn.Linear(4, 2),
        nn.Linear(2, 1),
    )
    sd = {f"layers.{k}": v.detach().clone().contiguous() for k, v in layers.state_dict().items()}
    torch.save(sd, str(out))
