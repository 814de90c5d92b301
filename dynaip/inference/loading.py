"""diffusers-style loading: ``load_dynaip(flux_pipeline, "ckpt/")`` and ``unload_dynaip(flux_pipeline)``.

For a ``diffusers.FluxPipeline`` a user already holds (any dtype, device, LoRA, CPU offload or
quantized transformer)::

    from diffusers import FluxPipeline
    from dynaip import load_dynaip, unload_dynaip

    pipe = FluxPipeline.from_pretrained("/ckpt/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")
    dynaip = load_dynaip(pipe, "run/checkpoints/step-100000")   # also reachable as pipe.dynaip
    image = dynaip("a dog on the beach", references=["dog.png"], seed=0).images[0]
    pipe("a dog on the beach").images[0]                          # plain FLUX: no reference, no effect
    unload_dynaip(pipe)                                           # FLUX's own attention processors back

The CLIP vision tower is ``image_encoder`` (a loaded ``ClipVisionTower``), else ``clip_vision``
(a path, a ``ClipVisionPaths`` or its dict), else the one named in the checkpoint's
``config.json`` (the trainer writes the ``clip_vision`` entry of its models.yaml there).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import torch


def _clip_paths(value: Any, source: str):
    from dynaip.models.config import ClipVisionPaths

    if isinstance(value, ClipVisionPaths):
        return value
    if isinstance(value, (str, Path)):
        return ClipVisionPaths(path=str(value))
    if isinstance(value, dict):
        known = {f.name for f in fields(ClipVisionPaths)}
        unknown = sorted(set(value) - known)
        if unknown or "path" not in value:
            raise ValueError(f"{source}: clip_vision needs 'path' (and optionally {sorted(known - {'path'})}), "
                             f"got keys {sorted(value)}")
        d = dict(value)
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        return ClipVisionPaths(**d)
    raise ValueError(f"{source}: clip_vision must be a path or a dict with 'path', got {type(value).__name__}")


def load_dynaip(flux_pipeline, adapter, *, image_encoder=None, clip_vision=None, dtype: torch.dtype | None = None,
                detector=None, segmenter=None):
    """Attaches a trained DynaIP adapter to ``flux_pipeline`` and returns the ``DynaIPFluxPipeline``
    that generates with references (also set as ``flux_pipeline.dynaip``).

    adapter: a checkpoint directory (``adapter.safetensors`` + ``config.json``) or a ``DynaIPAdapter``.
    image_encoder / clip_vision: the CLIP vision tower (see the module doc); the adapter's own
        ``clip_layers`` decide which hidden states it returns.
    dtype: of the adapter and the tower (default: the transformer's; a quantized transformer reports
        its compute dtype). They go to the pipeline's device unless diffusers' CPU offload is on, in
        which case they stay on the CPU and visit the accelerator when needed.
    Until references are given, the pipeline behaves exactly as before (scale 0 likewise).
    """
    from dynaip.adapter import DynaIPAdapter
    from dynaip.models.clip_vision import ClipVisionTower, load_clip_vision

    from .pipeline import DynaIPFluxPipeline

    transformer = getattr(flux_pipeline, "transformer", None)
    if transformer is None or not hasattr(transformer, "transformer_blocks"):
        raise ValueError(f"load_dynaip needs a diffusers FluxPipeline (with a FluxTransformer2DModel), "
                         f"got {type(flux_pipeline).__name__}")
    current = getattr(flux_pipeline, "dynaip", None)
    if current is not None and current.attached:
        raise ValueError("this FluxPipeline already has a DynaIP adapter loaded; call unload_dynaip(pipe) first")

    meta: dict = {}
    if isinstance(adapter, DynaIPAdapter):
        ad = adapter
    elif isinstance(adapter, (str, Path)):
        meta = DynaIPAdapter.read_metadata(adapter)
        ad = DynaIPAdapter.from_pretrained(adapter)
    else:
        raise ValueError(f"adapter must be a checkpoint directory or a DynaIPAdapter, got {type(adapter).__name__}")

    if image_encoder is None:
        named = clip_vision if clip_vision is not None else meta.get("clip_vision")
        if named is None:
            raise ValueError("no CLIP vision tower: pass image_encoder=... or clip_vision='path/to/open_clip' "
                             "(this adapter checkpoint's config.json names none)")
        source = "clip_vision argument" if clip_vision is not None else f"{adapter}/config.json"
        image_encoder = load_clip_vision(_clip_paths(named, source), layers=ad.config.clip_layers)
    elif not isinstance(image_encoder, ClipVisionTower):
        raise ValueError(f"image_encoder must be a dynaip ClipVisionTower, got {type(image_encoder).__name__}")
    elif tuple(image_encoder.layers) != tuple(ad.config.clip_layers):
        raise ValueError(f"image_encoder returns CLIP layers {list(image_encoder.layers)} but the adapter was "
                         f"trained on {list(ad.config.clip_layers)}")

    dtype = dtype or transformer.dtype
    ad = ad.to(dtype)
    image_encoder = image_encoder.to(dtype)
    pipe = DynaIPFluxPipeline(flux_pipeline, ad, image_encoder, detector=detector, segmenter=segmenter)
    if not pipe.offloaded:
        ad.to(pipe.device)
        image_encoder.to(pipe.device)
    return pipe


def unload_dynaip(flux_pipeline) -> None:
    """Detaches the adapter that ``load_dynaip`` attached: FLUX's own processors and no hooks, so the
    pipeline's outputs are again bit-identical to before ``load_dynaip``."""
    current = getattr(flux_pipeline, "dynaip", None)
    if current is None or not current.attached:
        raise ValueError("no DynaIP adapter is loaded on this pipeline (load_dynaip was not called, or it was "
                         "already unloaded)")
    current.adapter.detach(flux_pipeline.transformer)
    del flux_pipeline.dynaip
