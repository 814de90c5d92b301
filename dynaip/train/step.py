"""The model-specific part of training: one flow-matching step of DynaIP on frozen FLUX.1-dev.

``training_loss`` is the whole recipe (the trainer around it knows nothing about FLUX):

1. target ``tgt`` (B, 3, H, W) uint8 → [-1, 1] → VAE posterior (mean, log-variance) → latent
   (B, 16, H/8, W/8) sampled from it → ``(x - shift_factor) * scaling_factor`` → packed 2×2 to
   (B, H/16·W/16, 64) exactly as ``FluxPipeline._pack_latents`` (ids from ``_prepare_latent_image_ids``);
2. text: T5 + CLIP through ``FluxPipeline.encode_prompt``; CFG dropout replaces the prompt by "";
3. reference ``ref`` (B, 3, S, S) uint8 (padded to square on white and resized to the CLIP input
   by the loader) → [0, 1] → CLIP-normalised → hidden states of the configured layers →
   ``adapter.encode_reference`` → C (B, Lc, D); image CFG dropout zeroes C's rows, which the
   adapter turns into exactly no injection;
4. t = sigmoid(N(m, s)) (logit-normal), shifted by mu = calculate_shift(image_seq_len) as FluxPipeline
   shifts its sigmas; x_t = (1 - t)·x0 + t·ε; the transformer predicts v = ε - x0 with the adapter
   injecting into text and image tokens (``branches="both"``, the paper's training-time DDS);
5. loss = MSE(v̂, ε - x0) in fp32.

Every random draw goes through the caller's ``torch.Generator`` (plus the global RNG for the
adapter's expert dropout), so a run restored with those states repeats bit for bit.

With precomputed features (``dynaip.features``) a batch carries the stored posterior
(``posterior_mean``, ``posterior_logvar``) and text embeddings (``t5``, ``pooled``) instead of
``tgt`` and the captions' encodings; steps 1 and 2 then run the same sampling, packing and dropout
on them (the empty prompt's stored embedding replaces a dropped caption), drawing the same numbers
from the same generators, so both paths give the same loss for the same sample and draw.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynaip.models import ModelsConfig

from .config import LossConfig


@dataclass
class FrozenModels:
    """FLUX.1-dev (as a diffusers FluxPipeline) and the CLIP vision tower, frozen, on one device.

    Without ``encoders`` (training on precomputed features) the pipeline has no T5, no CLIP text
    model and no VAE encoder: ``pipe.text_encoder``/``text_encoder_2`` are None and ``pipe.vae``
    is None or a decoder-only VAE (``load_vae_decoder``).
    """

    pipe: Any
    """``diffusers.FluxPipeline``: transformer, vae, text encoders, tokenizers, scheduler."""
    clip: nn.Module
    """``ClipVisionTower``: ``.normalize``, ``.image_size``, forward → hidden states of the configured layers."""
    device: torch.device
    dtype: torch.dtype
    latent_norm: tuple[float, float]
    """The VAE's (shift_factor, scaling_factor), read from its config even when the VAE is not loaded."""
    checkpointed_blocks: int = 0
    """Transformer blocks that recompute their activations in backward (gradient checkpointing)."""

    @property
    def transformer(self) -> nn.Module:
        return self.pipe.transformer

    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    def modules(self) -> dict[str, nn.Module]:
        """The loaded frozen modules by name (absent parts are left out)."""
        p = self.pipe
        found = {
            "transformer": p.transformer,
            "vae": p.vae,
            "text_encoder": p.text_encoder,
            "text_encoder_2": p.text_encoder_2,
            "clip_vision": self.clip,
        }
        return {k: v for k, v in found.items() if v is not None}

    def loaded(self) -> list[str]:
        """Names of the loaded parts, the VAE split into ``vae_encoder`` / ``vae_decoder``."""
        names = [k for k in ("transformer", "text_encoder", "text_encoder_2", "clip_vision") if k in self.modules()]
        vae = self.pipe.vae
        if vae is not None:
            names += [f"vae_{part}" for part in ("encoder", "decoder") if getattr(vae, part, None) is not None]
        return sorted(names)


def enable_checkpointing(transformer: nn.Module, keep_last: int = 0) -> int:
    """Gradient checkpointing of the frozen transformer's blocks; returns how many blocks recompute.

    ``keep_last = 0``: diffusers' own ``enable_gradient_checkpointing`` (every block). Otherwise each of
    the first ``57 - keep_last`` blocks (double-stream first, then single-stream) is wrapped in a
    non-reentrant ``torch.utils.checkpoint`` and the last ``keep_last`` keep their activations: less
    recomputation for more memory (docs/memory.md). Either way the adapter's conditioning reaches the
    recomputation through the block's ``joint_attention_kwargs`` (DynaIPAdapter.attach).
    """
    import functools

    from torch.utils.checkpoint import checkpoint

    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    if not 0 <= keep_last <= len(blocks):
        raise ValueError(f"checkpoint_keep_blocks={keep_last}: the transformer has {len(blocks)} blocks")
    if keep_last == 0:
        transformer.enable_gradient_checkpointing()
        return len(blocks)
    for block in blocks[: len(blocks) - keep_last]:

        def forward(*args, _inner=block.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = functools.update_wrapper(forward, block.forward)
    return len(blocks) - keep_last


def disable_checkpointing(transformer: nn.Module) -> None:
    """Undoes ``enable_checkpointing`` (compiled blocks stay compiled)."""
    from dynaip.models.compiled import restore_forward

    transformer.gradient_checkpointing = False
    for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
        restore_forward(block)


def load_frozen(
    models: ModelsConfig,
    device: torch.device,
    dtype: torch.dtype,
    gradient_checkpointing: bool = False,
    clip_layers: Sequence[int] | None = None,
    checkpoint_keep_blocks: int = 0,
    *,
    encoders: bool = True,
    vae_decoder: bool = True,
    compile_blocks: bool = False,
) -> FrozenModels:
    """Loads the frozen models. ``clip_layers``: the adapter's ``config.clip_layers`` — the one source of
    truth for which hidden states feed the experts; ``models.yaml``'s list only seeds fresh adapters.

    ``encoders=False`` (training on precomputed features): T5, the CLIP text model and the VAE
    encoder are never read from disk; ``vae_decoder`` then says whether the VAE's decoder is loaded
    (only sample images need it). The transformer and the CLIP vision tower are always loaded.
    ``compile_blocks``: regional ``torch.compile`` of the transformer's blocks (dynaip.models.compiled),
    applied before checkpointing wraps them, so a recomputed block replays its compiled graph.
    """
    from dynaip.models.clip_vision import load_clip_vision
    from dynaip.models.flux import load_flux_pipeline, load_vae_config, load_vae_decoder

    parts: dict[str, Any] = {}
    if not encoders:
        parts = dict(
            text_encoder=None,
            text_encoder_2=None,
            tokenizer=None,
            tokenizer_2=None,
            vae=load_vae_decoder(models.flux, dtype) if vae_decoder else None,
        )
    pipe = load_flux_pipeline(models.flux, dtype, **parts)
    pipe.set_progress_bar_config(disable=True)
    clip = load_clip_vision(
        models.clip_vision, tuple(clip_layers) if clip_layers is not None else models.clip_vision.layers
    )
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, clip):
        if m is not None:
            m.requires_grad_(False).eval().to(device=device, dtype=dtype)
    if compile_blocks:
        from dynaip.models.compiled import compile_blocks as compile_flux_blocks

        compile_flux_blocks(pipe.transformer, device, grad_only=True)  # eval / samples stay eager
    checkpointed = enable_checkpointing(pipe.transformer, checkpoint_keep_blocks) if gradient_checkpointing else 0
    vae_cfg = pipe.vae.config if pipe.vae is not None else load_vae_config(models.flux)
    return FrozenModels(
        pipe=pipe,
        clip=clip,
        device=device,
        dtype=dtype,
        latent_norm=(vae_cfg["shift_factor"], vae_cfg["scaling_factor"]),
        checkpointed_blocks=checkpointed,
    )


def configure_attention_backends(
    device: torch.device, choice: str = "auto", dtype: torch.dtype | None = None, transformer: nn.Module | None = None
) -> str:
    """Training: the SDPA backend of ``parallel.attention`` (dynaip/models/attention_backend.py), checked
    against the math backend at the transformer's head count and head size in ``dtype``, then set
    process-wide (backward runs on autograd's device threads, where an ``sdpa_kernel`` context would not
    reach). ``auto`` on CUDA leaves cuDNN off (its backward failed on an H100; see that module).
    Returns the backend in use."""
    from dynaip.models.attention_backend import configure

    heads, head_dim = 24, 128  # FLUX.1-dev's
    if transformer is not None:
        heads, head_dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    default = torch.bfloat16 if device.type == "cuda" else torch.float32
    return configure(choice, device, dtype or default, heads, head_dim)


# ----------------------------------------------------------------------------- pieces


def flux_shift_mu(scheduler_config: Any, image_seq_len: int) -> float:
    """FluxPipeline's ``calculate_shift``: mu linear in the packed image token count."""
    c = scheduler_config
    base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    base_shift, max_shift = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def sample_timesteps(
    batch: int, mu: float | None, mean: float, std: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """(B,) t in (0, 1): logit-normal, then the exponential time shift exp(mu)/(exp(mu) + 1/t - 1)."""
    t = torch.sigmoid(torch.randn(batch, generator=generator, device=device) * std + mean)
    if mu is not None:
        t = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
    return t


def vae_posterior(
    vae: nn.Module, tgt: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tgt`` (B, 3, H, W) uint8 → the VAE posterior's mean and (clamped) log-variance, each (B, C, H/8, W/8).

    What ``dynaip precompute`` stores, and what the on-the-fly path samples from.
    """
    x = tgt.to(device, non_blocking=True).to(dtype) / 127.5 - 1.0  # [-1, 1]; pinned by the loader on CUDA
    dist = vae.encode(x).latent_dist
    return dist.mean, dist.logvar


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """mean + exp(0.5·logvar)·ε with ε drawn exactly as diffusers' ``DiagonalGaussianDistribution.sample``
    draws it (same call, shape, device and dtype), so a stored posterior gives the on-the-fly latent."""
    from diffusers.utils.torch_utils import randn_tensor

    eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps


def pack_latents(frozen: FrozenModels, lat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """VAE latents (B, C, h, w) → scaled/shifted, packed (B, h/2·w/2, 4·C), image ids (N, 3), (h, w)."""
    shift, scale = frozen.latent_norm
    lat = (lat - shift) * scale
    b, c, h, w = lat.shape
    packed = frozen.pipe._pack_latents(lat, b, c, h, w)  # (B, h/2·w/2, 4C)
    ids = frozen.pipe._prepare_latent_image_ids(b, h // 2, w // 2, frozen.device, frozen.dtype)  # (h/2·w/2, 3)
    return packed, ids, (h, w)


def encode_targets(
    frozen: FrozenModels, tgt: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """``tgt`` (B, 3, H, W) uint8 → packed latents (B, H/16·W/16, 4·C), image ids (N, 3), (h, w) latent size."""
    mean, logvar = vae_posterior(frozen.vae, tgt, frozen.device, frozen.dtype)
    return pack_latents(frozen, sample_posterior(mean, logvar, generator))  # (B, C, H/8, W/8) sampled


def targets_from_posterior(
    frozen: FrozenModels, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """``encode_targets`` from a stored posterior (B, C, h, w): the same draw, scaling and packing."""
    mean = mean.to(frozen.device, non_blocking=True).to(frozen.dtype)  # pinned by the loader on CUDA
    logvar = logvar.to(frozen.device, non_blocking=True).to(frozen.dtype)
    return pack_latents(frozen, sample_posterior(mean, logvar, generator))


def encode_prompts(
    pipe: Any, prompts: Sequence[str], device: torch.device, max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``FluxPipeline.encode_prompt`` on T5 and CLIP text → T5 tokens (B, L, D_t5), pooled CLIP (B, D_clip), ids (L, 3)."""
    prompts = list(prompts)
    return pipe.encode_prompt(prompt=prompts, prompt_2=prompts, device=device, max_sequence_length=max_sequence_length)


def encode_text(
    frozen: FrozenModels, prompts: Sequence[str], max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ T5 tokens (B, L, D_t5), pooled CLIP (B, D_clip), text ids (L, 3)."""
    if frozen.pipe.text_encoder_2 is None:
        raise RuntimeError(
            "the text encoders are not loaded (training on precomputed features); "
            "use the stored text features or load_frozen(encoders=True)"
        )
    return encode_prompts(frozen.pipe, prompts, frozen.device, max_sequence_length)


def text_ids(frozen: FrozenModels, length: int) -> torch.Tensor:
    """(L, 3) zeros: FLUX's text position ids, as ``FluxPipeline.encode_prompt`` makes them."""
    return torch.zeros(length, 3, device=frozen.device, dtype=frozen.dtype)  # made there: no host copy


def stored_text(
    frozen: FrozenModels,
    batch: dict[str, Any],
    drop: torch.Tensor | None,
    empty_text: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``encode_text`` from precomputed features: the batch's ``t5`` (B, L, D) and ``pooled`` (B, D),
    the rows where ``drop`` (B,) is set replaced by ``empty_text`` (the stored empty prompt, (1, L, D), (1, D))."""
    txt = batch["t5"].to(frozen.device, non_blocking=True).to(frozen.dtype)
    pooled = batch["pooled"].to(frozen.device, non_blocking=True).to(frozen.dtype)
    if drop is not None and bool(drop.any()):
        if empty_text is None:
            raise ValueError("text CFG dropout on precomputed features needs the stored empty-prompt embedding")
        keep = ~drop.to(frozen.device)
        e_txt, e_pooled = (e.to(frozen.device, frozen.dtype) for e in empty_text)
        txt = torch.where(keep.view(-1, 1, 1), txt, e_txt.expand_as(txt))
        pooled = torch.where(keep.view(-1, 1), pooled, e_pooled.expand_as(pooled))
    return txt, pooled, text_ids(frozen, txt.shape[1])


def clip_hidden_states(frozen: FrozenModels, ref: torch.Tensor) -> list[torch.Tensor]:
    """``ref`` (B, 3, S, S) uint8 on white → one (B, 1 + tokens, width) hidden state per configured layer."""
    x = ref.to(frozen.device, non_blocking=True).to(torch.float32) / 255.0
    if x.shape[-1] != frozen.clip.image_size:
        x = F.interpolate(x, size=(frozen.clip.image_size,) * 2, mode="bicubic", align_corners=False).clamp(0, 1)
    return frozen.clip(frozen.clip.normalize(x).to(frozen.dtype))


def cfg_dropout(
    batch: int, drop_text: float, drop_image: float, drop_both: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) bool masks (text dropped, image dropped): one uniform draw per sample, three disjoint ranges."""
    u = torch.rand(batch, generator=generator)
    text = u < drop_text
    image = (u >= drop_text) & (u < drop_text + drop_image)
    both = (u >= drop_text + drop_image) & (u < drop_text + drop_image + drop_both)
    return text | both, image | both


# ----------------------------------------------------------------------------- the step


def training_loss(
    frozen: FrozenModels,
    adapter: nn.Module,
    encode: nn.Module,
    batch: dict[str, Any],
    settings: LossConfig,
    generator: torch.Generator,
    cpu_generator: torch.Generator,
    autocast: torch.dtype | None = None,
    empty_text: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Flow-matching loss of one batch (scalar, fp32, with a graph to the adapter's parameters).

    ``adapter`` is the attached ``DynaIPAdapter``; ``encode`` is what computes C from CLIP hidden
    states — the adapter itself, or its DistributedDataParallel wrapper (DDP hooks its reducer
    into that forward call). ``generator`` lives on the device (noise, VAE posterior, t);
    ``cpu_generator`` draws the CFG dropout. A batch with precomputed features (``posterior_mean``,
    ``t5``, ...) is used as stored; ``empty_text`` is then the stored empty prompt for text dropout.
    """
    b = len(batch["txt"])
    drop_txt, drop_img = cfg_dropout(b, settings.drop_text, settings.drop_image, settings.drop_both, cpu_generator)
    with torch.no_grad():
        if "posterior_mean" in batch:
            x0, img_ids, (h, w) = targets_from_posterior(
                frozen, batch["posterior_mean"], batch["posterior_logvar"], generator
            )
        else:
            x0, img_ids, (h, w) = encode_targets(frozen, batch["tgt"], generator)  # (B, N, 64)
        if "t5" in batch:
            txt, pooled, txt_ids = stored_text(frozen, batch, drop_txt, empty_text)
        else:
            prompts = ["" if d else p for p, d in zip(batch["txt"], drop_txt.tolist())]
            txt, pooled, txt_ids = encode_text(frozen, prompts, settings.max_sequence_length)
        hidden = clip_hidden_states(frozen, batch["ref"])
    return flow_matching_loss(
        frozen.transformer,
        frozen.pipe.scheduler.config,
        adapter,
        encode,
        x0=x0,
        img_ids=img_ids,
        image_size=(h * 8, w * 8),
        txt=txt,
        pooled=pooled,
        txt_ids=txt_ids,
        hidden=hidden,
        drop_image=drop_img,
        settings=settings,
        generator=generator,
        autocast=autocast,
    )


def flow_matching_loss(
    transformer: nn.Module,
    scheduler_config: Any,
    adapter: nn.Module,
    encode: nn.Module,
    *,
    x0: torch.Tensor,
    img_ids: torch.Tensor,
    image_size: tuple[int, int],
    txt: torch.Tensor,
    pooled: torch.Tensor,
    txt_ids: torch.Tensor,
    hidden: Sequence[torch.Tensor],
    drop_image: torch.Tensor,
    settings: LossConfig,
    generator: torch.Generator,
    autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """The loss from encoded inputs: packed target latents ``x0`` (B, N, 64), text features, CLIP
    hidden states and the image-dropout mask. Draws the noise, then t, from ``generator``."""
    dev, b = x0.device, x0.shape[0]
    with torch.no_grad():
        noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=torch.float32).to(x0.dtype)
        mu = flux_shift_mu(scheduler_config, x0.shape[1]) if settings.resolution_shift else None
        t = sample_timesteps(b, mu, settings.logit_mean, settings.logit_std, generator, dev)  # (B,)
        tt = t.view(b, 1, 1).to(x0.dtype)
        x_t = (1.0 - tt) * x0 + tt * noise
        target = (noise - x0).float()
    guidance = (
        torch.full((b,), settings.guidance, device=dev, dtype=torch.float32)
        if transformer.config.guidance_embeds
        else None
    )

    # Autocast covers the adapter's own fp32 modules (HMoE, projection) only. The frozen transformer
    # already holds its weights in the training dtype and runs without autocast, as in generation:
    # under autocast its LayerNorms would return fp32 and every modulation after them would run and be
    # saved in fp32 (measured on an H100: BENCHMARKS.md). The CA K/V run in the transformer's dtype
    # on casts of the fp32 master weights (ReferenceKV.forward).
    with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
        c = encode([hs.float() for hs in hidden])  # (B, Lc, D)
    # zero rows = no reference for those samples; non_blocking: a host→device copy of B flags must not
    # wait for the device (a pageable buffer is staged at once, so this is safe)
    c = c * (~drop_image).to(dev, non_blocking=True).to(c.dtype).view(b, 1, 1)
    with adapter.conditioning([c], branches="both", image_size=image_size):
        pred = transformer(
            hidden_states=x_t,
            timestep=t.to(x0.dtype),
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=txt,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]  # (B, N, 64)
    return F.mse_loss(pred.float(), target)


# ----------------------------------------------------------------------------- samples


@torch.no_grad()
def generate_samples(
    frozen: FrozenModels,
    adapter: nn.Module,
    prompts: Sequence[str],
    refs: torch.Tensor,
    size: tuple[int, int],
    steps: int,
    guidance: float,
    seed: int,
    max_sequence_length: int = 512,
    text: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[np.ndarray]:
    """A plain Euler loop of FLUX with the adapter on the image branch (inference DDS).

    ``refs`` (N, 3, S, S) uint8; returns N (H, W, 3) uint8 arrays. Uses its own generator, so
    calling it never changes the training RNG. ``text``: the prompts' stored (T5, pooled) features
    when the text encoders are not loaded. Needs the VAE decoder.
    """
    if text is not None:
        txt, pooled, txt_ids = stored_text(frozen, {"t5": text[0], "pooled": text[1]}, None, None)
    else:
        txt, pooled, txt_ids = encode_text(frozen, prompts, max_sequence_length)
    c = adapter([h.float() for h in clip_hidden_states(frozen, refs)])  # forward: FSDP2 gathers a sharded adapter
    return sample_images(frozen, adapter, [c], txt, pooled, txt_ids, size, steps, guidance, seed)


@torch.no_grad()
def sample_images(
    frozen: FrozenModels,
    adapter: nn.Module,
    refs: Sequence[torch.Tensor],
    txt: torch.Tensor,
    pooled: torch.Tensor,
    txt_ids: torch.Tensor,
    size: tuple[int, int],
    steps: int,
    guidance: float,
    seed: int,
    masks: Sequence[torch.Tensor] | None = None,
) -> list[np.ndarray]:
    """The Euler loop of ``generate_samples`` from encoded inputs: ``refs`` one C (B or 1, L, D) per subject,
    text features (B, L, D_t5), (B, D_clip), ids (L, 3); ``masks`` one pixel mask (H, W) per subject or None.
    Draws the starting noise from its own generator seeded with ``seed``."""
    dev = frozen.device
    n, (hgt, wid) = txt.shape[0], size
    gen = torch.Generator(device=dev).manual_seed(seed)
    h, w = hgt // 8, wid // 8
    ch = frozen.transformer.config.in_channels // 4
    lat = torch.randn((n, ch, h, w), generator=gen, device=dev, dtype=torch.float32).to(frozen.dtype)
    lat = frozen.pipe._pack_latents(lat, n, ch, h, w)  # (N, h/2·w/2, 4ch)
    ids = frozen.pipe._prepare_latent_image_ids(n, h // 2, w // 2, dev, frozen.dtype)
    sched = copy.deepcopy(frozen.pipe.scheduler)
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    mu = flux_shift_mu(sched.config, lat.shape[1])
    sched.set_timesteps(sigmas=sigmas, device=dev, mu=mu)
    g = (
        torch.full((n,), guidance, device=dev, dtype=torch.float32)
        if frozen.transformer.config.guidance_embeds
        else None
    )
    with adapter.conditioning([c.to(frozen.dtype) for c in refs], masks=masks, branches="image", image_size=(hgt, wid)):
        for t in sched.timesteps:
            pred = frozen.transformer(
                hidden_states=lat,
                timestep=(t / 1000).expand(n).to(lat.dtype),
                guidance=g,
                pooled_projections=pooled,
                encoder_hidden_states=txt,
                txt_ids=txt_ids,
                img_ids=ids,
                return_dict=False,
            )[0]
            lat = sched.step(pred, t, lat, return_dict=False)[0]
    lat = frozen.pipe._unpack_latents(lat, hgt, wid, 8)  # (N, ch, h, w)
    lat = lat / frozen.vae.config.scaling_factor + frozen.vae.config.shift_factor
    img = frozen.vae.decode(lat, return_dict=False)[0]  # (N, 3, H, W) in [-1, 1]
    img = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [im.permute(1, 2, 0).cpu().numpy() for im in img]
