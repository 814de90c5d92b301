"""The encoders whose outputs are stored: FLUX's T5 + CLIP text models and its VAE, without the transformer.

The arithmetic is the trainer's own (``dynaip.train.step.encode_prompts`` / ``vae_posterior``), on
targets resized by the loader's own ``resize_center_crop``, so a stored feature is what the
on-the-fly path would compute for the same sample, bucket and dtype.

Stored floats are compared byte for byte (resume, local vs Ray), so the encoder pins what changes
their last bits: the number of CPU threads (a convolution splits its sums over threads) and, on
CUDA, cuDNN's algorithm choice (deterministic algorithms, no autotuning). These are process-wide
torch settings; an encoder runs in a precompute process or a Ray actor of its own.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dynaip.models import ModelsConfig

from .layout import FeatureSpec


class FeatureEncoder:
    """T5, CLIP text and the VAE of ``models.flux``, frozen, in ``spec``'s dtype on ``device``."""

    def __init__(self, models: ModelsConfig, device: torch.device, spec: FeatureSpec, threads: int = 1):
        from dynaip.models.flux import load_flux_pipeline

        self.device, self.spec, self.dtype = device, spec, spec.torch_dtype
        torch.set_num_threads(threads)
        if device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        # the 12B transformer is not needed to encode: leave it on disk
        self.pipe = load_flux_pipeline(models.flux, self.dtype, transformer=None)
        self.pipe.set_progress_bar_config(disable=True)
        for m in (self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2):
            m.requires_grad_(False).eval().to(device=device, dtype=self.dtype)

    @torch.no_grad()
    def text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """→ T5 tokens (B, L, D_t5) and pooled CLIP (B, D_clip) on the CPU."""
        from dynaip.train.step import encode_prompts

        t5, pooled, _ = encode_prompts(self.pipe, prompts, self.device, self.spec.max_sequence_length)
        return t5.cpu(), pooled.cpu()

    @torch.no_grad()
    def posterior(self, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tgt`` (B, 3, H, W) uint8 → VAE posterior mean and log-variance (B, C, H/8, W/8) on the CPU."""
        from dynaip.train.step import vae_posterior

        mean, logvar = vae_posterior(self.pipe.vae, tgt, self.device, self.dtype)
        return mean.cpu(), logvar.cpu()
