"""Embedding similarities: CLIP-I, CLIP-T (OpenCLIP) and DINO, all from local weights.

- CLIP-I: cosine similarity of the OpenCLIP image embeddings of the generated image and a reference.
- CLIP-T: cosine similarity of the generated image's embedding and the prompt's text embedding.
- DINO: cosine similarity of the DINO ViT CLS features of the generated image and a reference.

Images are RGB; each scorer resizes the shorter side to its input size (bicubic), centre-crops a
square and normalises with its mean/std. Multi-subject cases average over their references.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from dynaip.models.config import ClipVisionPaths
from dynaip.models.errors import CheckpointError
from dynaip.models.weights import load_state_dict

from .judge import DinoPaths

log = logging.getLogger(__name__)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _as_rgb(image: Image.Image | str | Path) -> Image.Image:
    return (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB")


def preprocess(
    images: Sequence[Image.Image | str | Path], size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``(B, 3, size, size)`` float32: shorter side → ``size`` (bicubic), centre crop, ``(x/255 - mean) / std``."""
    out = []
    for im in images:
        im = _as_rgb(im)
        s = size / min(im.size)
        im = im.resize((max(size, round(im.width * s)), max(size, round(im.height * s))), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))  # (3, S, S)
    x = torch.stack(out)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class ClipScorer:
    """CLIP-I / CLIP-T with OpenCLIP weights loaded by ``dynaip.models.clip_vision.load_open_clip``."""

    def __init__(self, paths: ClipVisionPaths, device: str | None = None):
        import open_clip

        from dynaip.models.clip_vision import load_open_clip

        self.device = _device(device)
        model, (self.mean, self.std) = load_open_clip(paths)
        self.model = model.to(self.device)
        size = model.visual.image_size
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
        self.vocab_size = int(model.vocab_size)
        if self.vocab_size < self.tokenizer.vocab_size:
            log.warning(
                "CLIP text tower has %d token ids but the tokenizer %d (a tiny test checkpoint?): ids are folded "
                "modulo the vocabulary; CLIP-T from this model is meaningless",
                self.vocab_size,
                self.tokenizer.vocab_size,
            )

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """``(B, D)`` unit-norm image embeddings."""
        x = preprocess(images, self.size, self.mean, self.std).to(self.device)
        return self.model.encode_image(x, normalize=True).float().cpu()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``(B, D)`` unit-norm text embeddings."""
        tokens = self.tokenizer(list(texts))
        if self.vocab_size < self.tokenizer.vocab_size:
            tokens = tokens % self.vocab_size
        return self.model.encode_text(tokens.to(self.device), normalize=True).float().cpu()

    def clip_i(self, generated: Image.Image | str | Path, references: Sequence[Image.Image | str | Path]) -> float:
        """Mean cosine similarity between the generated image and each reference."""
        e = self.embed_images([generated, *references])
        return float((e[1:] @ e[0]).mean())

    def clip_t(self, generated: Image.Image | str | Path, prompt: str) -> float:
        return float(self.embed_images([generated])[0] @ self.embed_texts([prompt])[0])


def load_dino(paths: DinoPaths) -> torch.nn.Module:
    """A timm VisionTransformer (no head) with DINO weights; ``model(x)`` returns the ``(B, D)`` CLS features."""
    import timm

    expected = f"a DINO ViT state dict with timm key names (cls_token, pos_embed, blocks.N...) for '{paths.arch}'"
    sd = load_state_dict("DINO", paths.path, expected)
    for prefix in ("teacher.backbone.", "backbone.", "student.backbone."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    try:
        model = timm.create_model(paths.arch, pretrained=False, num_classes=0, **paths.model_args)
    except Exception as e:
        raise CheckpointError(
            "DINO",
            paths.path,
            expected,
            f"timm cannot build arch '{paths.arch}' with "
            f"{paths.model_args}; fix dino.arch / dino.model_args in the eval config",
            e,
        ) from e
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            "DINO",
            paths.path,
            expected,
            f"Keys do not match '{paths.arch}' (missing {list(result.missing_keys)[:4]}, unexpected "
            f"{list(result.unexpected_keys)[:4]}); set dino.arch to the checkpoint's architecture",
        )
    return model.eval().requires_grad_(False)


class DinoScorer:
    """DINO similarity: cosine of CLS features of the generated image and each reference (mean)."""

    def __init__(self, paths: DinoPaths, device: str | None = None):
        self.device = _device(device)
        self.model = load_dino(paths).to(self.device)
        size = self.model.patch_embed.img_size
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        x = preprocess(images, self.size, IMAGENET_MEAN, IMAGENET_STD).to(self.device)
        return torch.nn.functional.normalize(self.model(x).float(), dim=-1).cpu()

    def similarity(self, generated: Image.Image | str | Path, references: Sequence[Image.Image | str | Path]) -> float:
        e = self.embed([generated, *references])
        return float((e[1:] @ e[0]).mean())
