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

import torch

from .pipeline import NOT_LOADED, DynaIPFluxPipeline


def load_dynaip(
    flux_pipeline,
    adapter,
    *,
    image_encoder=None,
    clip_vision=None,
    dtype: torch.dtype | None = None,
    detector=None,
    segmenter=None,
) -> DynaIPFluxPipeline:
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
    return DynaIPFluxPipeline.attach_to(
        flux_pipeline,
        adapter,
        image_encoder=image_encoder,
        clip_vision=clip_vision,
        dtype=dtype,
        detector=detector,
        segmenter=segmenter,
    )


def unload_dynaip(flux_pipeline) -> None:
    """Detaches the adapter that ``load_dynaip`` attached: FLUX's own processors and no hooks, so the
    pipeline's outputs are again bit-identical to before ``load_dynaip``."""
    current = getattr(flux_pipeline, "dynaip", None)
    if current is None:
        raise ValueError(NOT_LOADED)
    current.unload()
