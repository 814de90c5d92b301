"""The OpenCLIP vision tower (ViT-L/14-336 for the paper) returning chosen hidden states."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .config import ClipVisionPaths
from .errors import CheckpointError, require_file
from .weights import load_into, load_state_dict

EXPECTED = "an OpenCLIP checkpoint: a directory with open_clip_config.json + open_clip_model.safetensors (or open_clip_pytorch_model.bin), or a weights file"
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors")


class ClipVisionTower(nn.Module):
    """Frozen OpenCLIP ViT that returns the hidden states of the requested layers.

    ``forward(pixels)`` takes CLIP-normalised pixels ``(B, 3, S, S)`` (S = ``image_size``) and
    returns one tensor ``(B, 1 + (S/patch)^2, width)`` per requested layer, CLS token first.
    Layers are 1-based: 24 is the last block of ViT-L/14.
    """

    def __init__(
        self, visual: nn.Module, layers: Sequence[int], image_mean: Sequence[float], image_std: Sequence[float]
    ):
        super().__init__()
        depth = len(visual.transformer.resblocks)
        bad = [l for l in layers if not 1 <= l <= depth]
        if bad:
            raise ValueError(f"CLIP layers {bad} out of range: this tower has layers 1..{depth}")
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"CLIP layers {list(layers)}: give at least one layer, each once")
        self.visual = visual
        self.layers = tuple(int(l) for l in layers)
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.width = int(visual.transformer.width)
        self.num_tokens = int(visual.positional_embedding.shape[0])
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` in [0, 1] → CLIP-normalised."""
        return (images - self.mean.to(images)) / self.std.to(images)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        x = self.visual._embeds(pixels.to(self.visual.conv1.weight.dtype))  # (B, L, D)
        # OpenCLIP returns intermediates in ascending layer order whatever order they are asked in;
        # map them back so the i-th output is always the i-th requested layer (the i-th expert's input).
        ascending = sorted(self.layers)
        _, inter = self.visual.transformer.forward_intermediates(x, indices=[l - 1 for l in ascending], stop_early=True)
        by_layer = dict(zip(ascending, inter))
        return [by_layer[l] for l in self.layers]


OPENAI_TORCHSCRIPT_FIX = (
    "OpenAI's own .pt files (e.g. ViT-L-14-336px.pt) are TorchScript; download the open_clip folder of the "
    "same weights instead (timm/vit_large_patch14_clip_336.openai: open_clip_config.json + "
    "open_clip_model.safetensors) and point clip_vision.path at it."
)


def _read_open_clip_dir(p: Path) -> tuple[dict, dict, Path]:
    """The Hugging Face open_clip folder as open_clip's ``push_to_hf_hub`` writes it (e.g.
    timm/vit_large_patch14_clip_336.openai): ``open_clip_config.json`` = ``{"model_cfg": {...},
    "preprocess_cfg": {...}}`` beside ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``."""
    cfg_file = p / "open_clip_config.json"
    if not cfg_file.is_file():
        raise CheckpointError("OpenCLIP", p, EXPECTED, "open_clip_config.json is missing from the directory.")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError("OpenCLIP", cfg_file, EXPECTED, "The config is not valid JSON.", e) from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
        raise CheckpointError(
            "OpenCLIP",
            cfg_file,
            EXPECTED,
            "It has no 'model_cfg' object (the architecture); "
            "re-download open_clip_config.json from the same open_clip repository as the weights.",
        )
    pre = cfg.get("preprocess_cfg", {})
    if not isinstance(pre, dict):
        raise CheckpointError("OpenCLIP", cfg_file, EXPECTED, "Its 'preprocess_cfg' is not an object; re-download it.")
    for name in WEIGHT_NAMES:
        if (p / name).is_file():
            return cfg["model_cfg"], pre, p / name
    raise CheckpointError("OpenCLIP", p, EXPECTED, f"No weights file ({', '.join(WEIGHT_NAMES)}) in the directory.")


def _with_quick_gelu(model_cfg: dict, paths: ClipVisionPaths, source: str | Path) -> dict:
    """``model_cfg`` with ``quick_gelu`` settled from its one source of truth: the architecture's own
    config when it has the key (models.yaml's ``quick_gelu`` must then agree or be left out), else
    models.yaml's ``quick_gelu`` (then required: guessing would silently give wrong features)."""
    stated, given = model_cfg.get("quick_gelu"), paths.quick_gelu
    if stated is not None and given is not None and bool(stated) != given:
        raise CheckpointError(
            "OpenCLIP",
            source,
            EXPECTED,
            f"models.yaml says quick_gelu: {str(given).lower()} but "
            f"the model's own config says {str(bool(stated)).lower()}; drop clip_vision.quick_gelu "
            "from models.yaml (the model's config decides) or use the matching checkpoint.",
        )
    if stated is None and given is None:
        raise CheckpointError(
            "OpenCLIP",
            source,
            EXPECTED,
            "Its config does not say whether the tower uses QuickGELU; "
            "set clip_vision.quick_gelu in models.yaml (true for OpenAI-trained weights, "
            "false for LAION/DataComp ones).",
        )
    return {**model_cfg, "quick_gelu": bool(stated if stated is not None else given)}


def build_open_clip(model_cfg: dict, source: str | Path = "model_cfg"):
    import open_clip

    cfg = dict(model_cfg)
    cfg.pop("custom_text", None)
    try:
        return open_clip.model.CLIP(**cfg)
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError) as e:
        raise CheckpointError(
            "OpenCLIP",
            source,
            EXPECTED,
            "open_clip cannot build a CLIP from its model config; use the config published with the weights.",
            e,
        ) from None


def load_open_clip(paths: ClipVisionPaths):
    """The whole OpenCLIP model (vision + text) and its preprocessing config, from local files only."""
    import open_clip

    p = Path(paths.path)
    if p.is_dir():
        model_cfg, pre_cfg, weights = _read_open_clip_dir(p)
        model_cfg = _with_quick_gelu(model_cfg, paths, p / "open_clip_config.json")
    else:
        require_file("OpenCLIP", p, EXPECTED)  # a path that is not there is said first, before any config question
        model_cfg = open_clip.get_model_config(paths.model_name)
        if model_cfg is None:
            raise CheckpointError(
                "OpenCLIP",
                p,
                EXPECTED,
                f"Unknown model_name '{paths.model_name}'; use an open_clip "
                "architecture name (e.g. ViT-L-14-336) or the open_clip folder with its config.",
            )
        model_cfg = _with_quick_gelu(model_cfg, paths, f"{p} (model_name {paths.model_name})")
        pre_cfg, weights = {}, p
    sd = load_state_dict("OpenCLIP", weights, EXPECTED, torchscript_fix=OPENAI_TORCHSCRIPT_FIX)  # before the build
    model = build_open_clip(model_cfg, weights)
    if not any(k.startswith("transformer.") for k in sd):  # a vision-only export: keep the text tower random-free
        load_into(
            model.visual,
            {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")},
            "OpenCLIP",
            weights,
            EXPECTED,
        )
    else:
        load_into(model, sd, "OpenCLIP", weights, EXPECTED)
    mean = pre_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = pre_cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return model.eval().requires_grad_(False), (tuple(mean), tuple(std))


def load_clip_vision(paths: ClipVisionPaths, layers: Sequence[int] = (10, 17, 24)) -> ClipVisionTower:
    model, (mean, std) = load_open_clip(paths)
    return ClipVisionTower(model.visual, layers, mean, std)


def build_clip_vision_meta(model_name: str = "ViT-L-14-336") -> nn.Module:
    """The full-size vision tower on the meta device (parameter counting)."""
    import open_clip

    with torch.device("meta"):
        return build_open_clip(open_clip.get_model_config(model_name)).visual


class ClipImageEmbedder:
    """The projected OpenCLIP image embedding (``encode_image``) of ``(H, W, 3) uint8`` arrays, from
    local files. Each image is resized (bicubic) so its shorter side is the tower's input size and
    centre-cropped, as OpenCLIP's preprocessing does. Used by the aesthetic score and the diptych
    subject-consistency score (docs/curation_quality.md, docs/sources.md)."""

    def __init__(self, paths: ClipVisionPaths, device: str = "cpu"):
        model, (mean, std) = load_open_clip(paths)
        self.visual = model.visual.to(device)
        size = self.visual.image_size
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1).to(device)
        self.std = torch.tensor(std).view(1, 3, 1, 1).to(device)
        self.device = device

    def _pixels(self, image: np.ndarray) -> torch.Tensor:
        from PIL import Image

        im = Image.fromarray(image)
        s = self.size / min(im.size)
        w, h = max(self.size, round(im.width * s)), max(self.size, round(im.height * s))
        im = im.resize((w, h), Image.BICUBIC)
        x0, y0 = (w - self.size) // 2, (h - self.size) // 2
        im = im.crop((x0, y0, x0 + self.size, y0 + self.size))
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)

    @torch.no_grad()
    def embeddings(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``(B, D)`` projected image embeddings (not normalised)."""
        x = torch.stack([self._pixels(im) for im in images]).to(self.device)
        x = (x - self.mean) / self.std
        return self.visual(x.to(next(self.visual.parameters()).dtype)).float()
