"""FLUX ControlNets under DynaIP: diffusers' ``FluxControlNetPipeline`` with one ``FluxControlNetModel``
or a ``FluxMultiControlNetModel``, the adapter attached to its transformer.

Why they compose without glue: the ControlNet runs beside the transformer (its own blocks, FLUX's own
attention processors, no reference) and hands back one residual per double-stream and per
single-stream block; ``FluxTransformer2DModel.forward`` adds each residual to the block's output
*after* the block ran. DynaIP acts inside the block, in its attention (``DynaIPAttnProcessor``), so
in every block the adapter's cross-attention shapes the block and the ControlNet's residual is added
on top — the same order as without the adapter. Image CFG re-runs the transformer with the same
residuals (the control does not depend on the references), and with no reference (or λ = 0) the
pipeline is diffusers' ``FluxControlNetPipeline`` bit for bit.

A ``DynaIPFluxPipeline`` over a ``FluxControlNetPipeline`` also generates without a control image: it
then samples with a ``FluxPipeline`` over the same components (same transformer, same adapter).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from .inputs import ImageLike, load_image

MAX_ASPECT_ERROR = 0.01
"""A control image may differ from the output's aspect ratio by 1% (diffusers would stretch it)."""


def is_controlnet_pipeline(flux) -> bool:
    """A diffusers FLUX ControlNet pipeline: it has a ``controlnet`` component."""
    return getattr(flux, "controlnet", None) is not None


def nets_of(controlnet) -> list:
    """The ``FluxControlNetModel``s of a single or multi ControlNet."""
    return list(controlnet.nets) if hasattr(controlnet, "nets") else [controlnet]


def check_controlnet(net, transformer, what: str) -> None:
    """``net`` must produce residuals the size of ``transformer``'s hidden states and read its latents."""
    c, t = net.config, transformer.config
    for key in ("num_attention_heads", "attention_head_dim", "joint_attention_dim", "pooled_projection_dim"):
        if getattr(c, key) != getattr(t, key):
            raise ValueError(
                f"{what}: {key}={getattr(c, key)} but the FLUX transformer has {getattr(t, key)}; "
                "use a ControlNet trained for this base model"
            )
    if net.input_hint_block is None and c.in_channels != t.in_channels:
        raise ValueError(
            f"{what}: in_channels={c.in_channels} but the FLUX transformer reads {t.in_channels} "
            "packed latent channels; use a ControlNet trained for this base model"
        )


def make_controlnet(controlnets: Any, transformer, dtype: torch.dtype = torch.float32):
    """A path, a ``FluxControlNetModel``, a ``FluxMultiControlNetModel`` or a list of paths/models → the
    pipeline's ``controlnet`` (a ``FluxMultiControlNetModel`` for two or more), checked against the
    transformer."""
    from diffusers import FluxControlNetModel, FluxMultiControlNetModel

    from dynaip.models.flux import load_flux_controlnet

    if isinstance(controlnets, FluxMultiControlNetModel):
        items: list = list(controlnets.nets)
    elif isinstance(controlnets, (list, tuple)):
        items = list(controlnets)
    else:
        items = [controlnets]
    if not items:
        raise ValueError("no ControlNet given")
    nets = []
    for i, item in enumerate(items):
        what = f"ControlNet {i + 1}" if len(items) > 1 else "ControlNet"
        if isinstance(item, (str, Path)):
            what = f"ControlNet '{item}'"
            item = load_flux_controlnet(item, dtype=dtype)
        elif not isinstance(item, FluxControlNetModel):
            raise ValueError(
                f"{what} must be a directory or a diffusers FluxControlNetModel, got {type(item).__name__}"
            )
        check_controlnet(item, transformer, what)
        nets.append(item)
    if len({n.input_hint_block is None for n in nets}) > 1:
        # diffusers prepares every control image the way the first net wants (VAE latents or pixels)
        raise ValueError(
            "a multi-ControlNet must not mix ControlNets that read VAE latents (InstantX style) with "
            "ones that read pixels (XLabs style, with an input hint block)"
        )
    return nets[0] if len(nets) == 1 else FluxMultiControlNetModel(nets)


def with_controlnet(flux, controlnet):
    """A ``FluxControlNetPipeline`` over ``flux``'s own components (nothing copied: the same transformer,
    hence the same attached adapter) plus ``controlnet``."""
    from diffusers import FluxControlNetPipeline

    parts = {k: v for k, v in flux.components.items() if k != "controlnet"}
    return _same_progress_bar(FluxControlNetPipeline(**parts, controlnet=controlnet), flux)


def without_controlnet(flux):
    """A ``FluxPipeline`` over a ControlNet pipeline's components, for calls without a control image."""
    from diffusers import FluxPipeline

    parts = {k: v for k, v in flux.components.items() if k != "controlnet"}
    return _same_progress_bar(FluxPipeline(**parts), flux)


def _same_progress_bar(new, old):
    config = getattr(old, "_progress_bar_config", None)
    if config is not None:
        new.set_progress_bar_config(**config)
    return new


def control_inputs(
    controlnet,
    control_image: ImageLike | torch.Tensor | Sequence[ImageLike | torch.Tensor],
    scale: float | Sequence[float],
    height: int,
    width: int,
    control_mode: Any = None,
) -> dict:
    """Validates the control inputs of one call before any model runs → the ``FluxControlNetPipeline``
    keywords: ``control_image`` (one per ControlNet, read as RGB, with the output's aspect ratio) and
    ``controlnet_conditioning_scale`` (one value, or one per ControlNet)."""
    nets = nets_of(controlnet)
    n = len(nets)
    images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    if len(images) != n:
        raise ValueError(
            f"got {len(images)} control images for {n} ControlNet{'s' if n > 1 else ''}; "
            "give one control image per ControlNet, in order"
        )
    loaded = []
    for i, img in enumerate(images):
        what = f"control image {i + 1}" if n > 1 else "control image"
        if isinstance(img, torch.Tensor):  # diffusers' own form ((B, 3, H, W) in [0, 1]): passed on as is
            h, w = img.shape[-2:]
        else:
            img = load_image(img, what)
            w, h = img.size
        if abs(w / h - width / height) > MAX_ASPECT_ERROR * (width / height):
            raise ValueError(
                f"{what} is {w}x{h} (aspect {w / h:.3f}) but the output is {width}x{height} "
                f"(aspect {width / height:.3f}); give a control image with the output's aspect ratio"
            )
        loaded.append(img)
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * n
    if len(scales) != n:
        raise ValueError(f"got {len(scales)} control scales for {n} ControlNets; give one, or one per ControlNet")
    try:
        scales = [float(s) for s in scales]
    except (TypeError, ValueError):
        raise ValueError(f"control scale {scale!r}: give a number, or one per ControlNet") from None
    if not all(math.isfinite(s) for s in scales):
        raise ValueError(f"control scale {scale!r}: give finite numbers")
    if control_mode is None and any(net.union for net in nets):
        raise ValueError("a union ControlNet (config num_mode) needs control_mode=... (its mode per control image)")
    if n == 1:
        return dict(control_image=loaded[0], controlnet_conditioning_scale=scales[0])
    return dict(control_image=loaded, controlnet_conditioning_scale=scales)
