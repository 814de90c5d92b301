"""`models.yaml`: where every checkpoint lives on local disk.

Example (paths relative to the YAML file are allowed)::

    flux: /ckpt/FLUX.1-dev                      # diffusers directory
    clip_vision:
      path: /ckpt/vit_large_patch14_clip_336.openai   # dir with open_clip_config.json, or a weights file
      model_name: ViT-L-14-336                  # used when `path` is a bare weights file
      quick_gelu: true                          # OpenAI-trained weights use QuickGELU (unless the config says)
    grounding_dino:
      config: /ckpt/GroundingDINO_SwinT_OGC.py
      checkpoint: /ckpt/groundingdino_swint_ogc.pth
      bert: /ckpt/bert-base-uncased             # local directory, never a hub name
    sam:
      checkpoint: /ckpt/sam_vit_h_4b8939.pth
      variant: vit_h
    captioner: /ckpt/blip-image-captioning-large   # optional transformers image-to-text directory
    aesthetic:                                  # optional LAION-aesthetics-style head (docs/curation_quality.md)
      path: /ckpt/aesthetic/sac+logos+ava1-l14-linearMSE.pth
      clip: /ckpt/ViT-L-14.openai               # the CLIP the head was trained on; default: clip_vision
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from dynaip.configs import build, read_yaml

PATH = {"path": True}
"""Field metadata: a relative path resolves against the YAML file's folder (dynaip/configs.py)."""


@dataclass(kw_only=True)
class ClipVisionPaths:
    SHORTHAND: ClassVar[str] = "path"
    """``clip_vision: DIR`` is ``clip_vision: {path: DIR}``."""

    path: str = field(metadata=PATH)
    """Directory holding open_clip_config.json + weights, or a weights file."""
    model_name: str = "ViT-L-14-336"
    """OpenCLIP architecture name, used when `path` is a bare weights file."""
    quick_gelu: bool | None = None
    """QuickGELU (true for OpenAI-trained weights, false for LAION/DataComp ones). One source of truth:
    the architecture's own config (open_clip_config.json's ``model_cfg`` or ``model_name``'s) when it
    states it, and then this must agree or be left out; otherwise this, and it must be given."""
    layers: tuple[int, ...] = (10, 17, 24)
    """1-based layers whose hidden states feed the low/mid/high experts."""


@dataclass(kw_only=True)
class GroundingDinoPaths:
    config: str = field(metadata=PATH)
    """The model's Python config file (e.g. GroundingDINO_SwinT_OGC.py)."""
    checkpoint: str = field(metadata=PATH)
    """The released .pth (a dict with a "model" state dict)."""
    bert: str = field(metadata=PATH)
    """Local directory of the BERT text encoder + tokenizer (bert-base-uncased for the release)."""


@dataclass(kw_only=True)
class SamPaths:
    checkpoint: str = field(metadata=PATH)
    """The released .pth state dict."""
    variant: str = "vit_h"
    """vit_h | vit_l | vit_b | tiny."""


@dataclass(kw_only=True)
class AestheticPaths:
    SHORTHAND: ClassVar[str] = "path"
    """``aesthetic: FILE`` is ``aesthetic: {path: FILE}``."""

    path: str = field(metadata=PATH)
    """Head weights as released (.pth, or safetensors): one linear layer or the improved-aesthetic-predictor
    MLP (dynaip/models/aesthetic.py)."""
    activation: Literal["none", "relu"] | None = None
    """none | relu: what sits between the head's layers. Detected from the published layouts; declare it
    only for another layout (a contradicting declaration is an error)."""
    clip: ClipVisionPaths | None = None
    """The OpenCLIP model whose image embeddings the head reads (ViT-L/14 for the LAION heads); None = ``clip_vision``."""


@dataclass(kw_only=True)
class ModelsConfig:
    flux: str = field(metadata=PATH)
    """Diffusers FLUX.1-dev directory (model_index.json, transformer/, vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/)."""
    clip_vision: ClipVisionPaths
    grounding_dino: GroundingDinoPaths | None = None
    sam: SamPaths | None = None
    captioner: str | None = field(default=None, metadata=PATH)
    """Optional transformers image-to-text model directory for captions."""
    aesthetic: AestheticPaths | None = None
    """Optional aesthetic head for the per-sample ``quality.aesthetic`` score."""
    source: str | None = field(default=None, repr=False, metadata={"yaml": False})
    """The YAML file this came from (for messages); not a key of the file."""

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelsConfig":
        path = Path(path)
        raw = read_yaml(
            path,
            "models file",
            "write one (see README 'Using real checkpoints') "
            "or run `dynaip tiny-checkpoints --out DIR` and pass DIR/models.yaml",
        )
        return cls.from_dict(raw, base=path.parent, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base: str | Path = ".", source: str | None = None) -> "ModelsConfig":
        """Through the one loader (dynaip/configs.py): relative paths resolve against ``base``."""
        return build(cls, raw, where=source or "models config", base=base, extra={"source": source})

    def require(self, name: str) -> Any:
        value = getattr(self, name)
        if value is None:
            raise ValueError(
                f"{self.source or 'models config'}: no '{name}' entry, but this command needs it; add its local paths"
            )
        return value
