"""`DynaIPFluxPipeline`: FLUX.1-dev text-to-image through diffusers' own `FluxPipeline` sampler,
with DynaIP references injected into the image branch.

One call:
1. validate every input (references readable, one mask per reference with the output's aspect
   ratio and a non-empty region) before any model runs;
2. references → padded square on white → CLIP size → OpenCLIP hidden states → HMoE-FFM → C_i
   (once per call); the adapter computes each block's reference K/V at the first denoising step and
   reuses them at every later step;
3. `FluxPipeline.__call__` runs unchanged while the adapter's conditioning is active.

Image CFG (``image_guidance_scale`` s, default 1.0 = off): every transformer call also runs the
unconditional image branch — the references replaced by zero tokens, which is exactly the zero-C
path of training's image dropout — and the step uses ``uncond + s · (cond − uncond)``. It composes
with FLUX's text guidance: FLUX.1-dev's distilled ``guidance_scale`` is an input of both runs, and
with diffusers' true CFG (``true_cfg_scale`` > 1 and a ``negative_prompt``) each prompt branch gets
image CFG first, then ``neg + t · (pos − neg)``. s > 1 doubles the transformer compute; s = 1 runs
exactly the code of a call without it.

Automatic masks (paper §4.3), when ``auto_mask=[phrase per reference]``:
a. a first pass with the same starting noise and prompt and no references (the same seed, or a
   passed generator rewound to its state before the first pass, or a seed drawn for the call);
b. Grounding DINO finds each phrase in that image (best-scoring box per phrase);
c. SAM segments each box; small islands are removed and holes filled (the curation's segment
   cleanup), then each mask is dilated by ``auto_mask_dilation`` of the image's shorter side;
d. the masked multi-subject pass.

ControlNet (``control_image=``, one per ControlNet, and ``controlnet_conditioning_scale``): the
pipeline wraps diffusers' ``FluxControlNetPipeline`` (``load_dynaip`` on one, or ``from_local(...,
controlnet=DIR)``); see dynaip/inference/controlnet.py for how the two compose.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from dynaip.geometry import clean_mask
from dynaip.models import sampling

from .controlnet import control_inputs, is_controlnet_pipeline, nets_of, without_controlnet
from .inputs import ImageLike, load_image, load_mask, per_subject, reference_pixels

log = logging.getLogger(__name__)


@dataclass
class DynaIPOutput:
    images: list[Image.Image]
    masks: list[torch.Tensor] | None
    """The masks used, at the output size (given or automatic); None for single-subject unmasked."""
    settings: dict[str, Any] = field(default_factory=dict)


NOT_LOADED = "no DynaIP adapter is loaded on this pipeline (load_dynaip was not called, or it was already unloaded)"


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
            raise ValueError(
                f"{source}: clip_vision needs 'path' (and optionally {sorted(known - {'path'})}), "
                f"got keys {sorted(value)}"
            )
        d = dict(value)
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        return ClipVisionPaths(**d)
    raise ValueError(f"{source}: clip_vision must be a path or a dict with 'path', got {type(value).__name__}")


class DynaIPFluxPipeline:
    """FLUX.1-dev + DynaIP. Build with ``from_local`` or from parts::

    pipe = DynaIPFluxPipeline.from_local("models.yaml", adapter="run/checkpoints/step-000100")
    out = pipe("a dog on the beach", references=["dog.png"], seed=0)
    out.images[0].save("dog.png")
    """

    def __init__(self, flux, adapter, image_encoder, *, detector=None, segmenter=None):
        """Attaches ``adapter`` to ``flux`` (a diffusers ``FluxPipeline``) and registers itself as
        ``flux.dynaip``; ``load_dynaip`` is the usual way in, ``unload_dynaip(flux)`` the way out."""
        current = getattr(flux, "dynaip", None)
        if current is not None and current.attached:
            raise ValueError("this FluxPipeline already has a DynaIP adapter loaded; call unload_dynaip(pipe) first")
        self.flux = flux
        self.adapter = adapter
        self.image_encoder = image_encoder
        self.detector = detector
        self.segmenter = segmenter
        self._plain_flux = None  # over a ControlNet pipeline: the FluxPipeline for calls without a control image
        adapter.attach(flux.transformer)
        flux.dynaip = self

    @property
    def attached(self) -> bool:
        """Whether the adapter is (still) attached to ``flux.transformer``."""
        return id(self.flux.transformer) in self.adapter._originals

    def unload(self) -> None:
        """``unload_dynaip(self.flux)``: FLUX's own processors back, ``flux.dynaip`` removed."""
        current = getattr(self.flux, "dynaip", None)
        if current is None or not current.attached:
            raise ValueError(NOT_LOADED)
        current.adapter.detach(self.flux.transformer)
        del self.flux.dynaip

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_local(
        cls,
        models,
        adapter=None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        with_auto_mask: bool = False,
        controlnet=None,
    ) -> "DynaIPFluxPipeline":
        """Loads every part from local paths. ``models``: a ModelsConfig or models.yaml path;
        ``adapter``: a checkpoint directory, a DynaIPAdapter, or None (a fresh, zero-effect adapter);
        ``controlnet``: None, or a FLUX ControlNet directory (or a list of them: a multi-ControlNet) —
        FLUX is then diffusers' ``FluxControlNetPipeline`` and calls take ``control_image=``."""
        from dynaip.adapter import DynaIPAdapter
        from dynaip.models import ModelsConfig
        from dynaip.models.clip_vision import load_clip_vision
        from dynaip.models.flux import load_flux_pipeline

        if not isinstance(models, ModelsConfig):
            models = ModelsConfig.from_yaml(models)
        if adapter is None or isinstance(adapter, DynaIPAdapter):
            ad = adapter
        else:
            ad = DynaIPAdapter.from_pretrained(adapter)
        layers = ad.config.clip_layers if ad is not None else models.clip_vision.layers
        tower = load_clip_vision(models.clip_vision, layers=layers)
        flux = load_flux_pipeline(models.flux, dtype=dtype)
        if controlnet is not None:
            from .controlnet import make_controlnet, with_controlnet

            flux = with_controlnet(flux, make_controlnet(controlnet, flux.transformer, dtype))
        if ad is None:
            log.warning("no adapter checkpoint given: using a freshly initialised adapter (it changes nothing)")
            ad = DynaIPAdapter(adapter_config_for(flux.transformer, tower))
        detector = segmenter = None
        if with_auto_mask:
            detector, segmenter = _load_auto_mask_models(models, device)
        flux.to(device)
        return cls.attach_to(flux, ad, image_encoder=tower, dtype=dtype, detector=detector, segmenter=segmenter)

    @classmethod
    def attach_to(
        cls,
        flux_pipeline,
        adapter,
        *,
        image_encoder=None,
        clip_vision=None,
        dtype: torch.dtype | None = None,
        detector=None,
        segmenter=None,
    ) -> DynaIPFluxPipeline:
        """``load_dynaip`` (dynaip/inference/loading.py, where the arguments are described): checks the
        parts, loads the adapter and the CLIP tower when given as paths, attaches them to ``flux_pipeline``."""
        from dynaip.adapter import DynaIPAdapter
        from dynaip.models.clip_vision import ClipVisionTower, load_clip_vision

        transformer = getattr(flux_pipeline, "transformer", None)
        if transformer is None or not hasattr(transformer, "transformer_blocks"):
            raise ValueError(
                f"load_dynaip needs a diffusers FluxPipeline or FluxControlNetPipeline (with a "
                f"FluxTransformer2DModel), "
                f"got {type(flux_pipeline).__name__}"
            )
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
                raise ValueError(
                    "no CLIP vision tower: pass image_encoder=... or clip_vision='path/to/open_clip' "
                    "(this adapter checkpoint's config.json names none)"
                )
            source = "clip_vision argument" if clip_vision is not None else f"{adapter}/config.json"
            image_encoder = load_clip_vision(_clip_paths(named, source), layers=ad.config.clip_layers)
        elif not isinstance(image_encoder, ClipVisionTower):
            raise ValueError(f"image_encoder must be a dynaip ClipVisionTower, got {type(image_encoder).__name__}")
        elif tuple(image_encoder.layers) != tuple(ad.config.clip_layers):
            raise ValueError(
                f"image_encoder returns CLIP layers {list(image_encoder.layers)} but the adapter was "
                f"trained on {list(ad.config.clip_layers)}"
            )

        dtype = dtype or transformer.dtype
        ad = ad.to(dtype)
        image_encoder = image_encoder.to(dtype)
        pipe = cls(flux_pipeline, ad, image_encoder, detector=detector, segmenter=segmenter)
        if not pipe.offloaded:
            ad.to(pipe.device)
            image_encoder.to(pipe.device)
        return pipe

    def to(self, device: str | torch.device) -> "DynaIPFluxPipeline":
        self.flux.to(device)
        self.adapter.to(device)
        self.image_encoder.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """Where the denoiser runs (the accelerator under diffusers' CPU offload)."""
        return self.flux._execution_device

    @property
    def offloaded(self) -> bool:
        """diffusers' model or sequential CPU offload is on (accelerate hooks on the transformer)."""
        return hasattr(self.flux.transformer, "_hf_hook")

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None):
        """diffusers' model CPU offload of FLUX; the adapter and the CLIP tower stay on the CPU too: the
        tower and the reference encoder visit the accelerator for the encoding only, and each block's
        reference K/V are computed on the device its queries are on (once per call)."""
        self.flux.enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        self.adapter.to("cpu")
        self.image_encoder.to("cpu")
        return self

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None):
        """diffusers' sequential (per-module) CPU offload of FLUX; the adapter follows as in
        ``enable_model_cpu_offload``."""
        self.flux.enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        self.adapter.to("cpu")
        self.image_encoder.to("cpu")
        return self

    def compile(self, backend: str | None = None) -> int:
        """Regional ``torch.compile`` of FLUX's blocks with the adapter's processors inside, as training's
        ``parallel.compile`` (dynaip/models/compiled.py): each block class compiles at the first call and
        every block reuses it; inductor on CUDA, ``aot_eager`` on the CPU unless ``backend`` says otherwise.
        Returns how many blocks carry a compiled forward."""
        from dynaip.models.compiled import compile_blocks

        return compile_blocks(self.flux.transformer, self.device, backend)

    def load_lora_weights(self, *args, **kwargs):
        """diffusers' FLUX LoRA loading; the adapter stays attached (its processors use the LoRA'd projections)."""
        return self.flux.load_lora_weights(*args, **kwargs)

    # ------------------------------------------------------------------ references
    @torch.no_grad()
    def encode_references(
        self, images: Sequence[Image.Image], granularity: Sequence[Sequence[float] | None] | None = None
    ) -> list[torch.Tensor]:
        """RGB PILs → one ``(1, L, ref_dim)`` reference token set each (HMoE weights per subject)."""
        grans = (
            per_subject(granularity, len(images), "granularity") if granularity is not None else [None] * len(images)
        )
        enc = self.image_encoder
        device = self.device
        # under CPU offload the tower and the encoder (HMoE + projection, not the per-block K/V) visit the
        # execution device for this encoding only, as diffusers' model offload does with each model
        with _visiting([enc, self.adapter.hmoe, self.adapter.proj], device, self.offloaded):
            pixels = enc.normalize(reference_pixels(images, enc.image_size)).to(
                enc.mean.device, next(enc.parameters()).dtype
            )
            hidden = enc(pixels)  # per layer: (N, L, clip_width)
            adapter_dtype = next(self.adapter.parameters()).dtype
            self.adapter.eval()
            return [
                self.adapter.encode_reference([h[i : i + 1].to(adapter_dtype) for h in hidden], granularity=g).to(
                    device
                )
                for i, g in enumerate(grans)
            ]

    # ------------------------------------------------------------------ generation
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        references: Sequence[ImageLike] | ImageLike | None = None,
        masks: Sequence[ImageLike | torch.Tensor | None] | None = None,
        *,
        scale: float | Sequence[float] = 1.0,
        granularity: Sequence[float] | Sequence[Sequence[float]] | None = None,
        branches: str = "image",
        auto_mask: Sequence[str] | None = None,
        auto_mask_dilation: float = 0.02,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        seed: int | None = None,
        num_inference_steps: int = sampling.STEPS,
        height: int = sampling.SIZE,
        width: int = sampling.SIZE,
        guidance_scale: float = sampling.GUIDANCE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        image_guidance_scale: float = 1.0,
        control_image=None,
        controlnet_conditioning_scale: float | Sequence[float] = 1.0,
        **flux_kwargs,
    ) -> DynaIPOutput:
        """Generates with 0..N references.

        references: images or paths (N ≥ 0). masks: one per reference (pixel space, any size with the
            output's aspect ratio; resized to the output, thresholded at 50%); optional when N = 1.
        scale: λ, global or per reference. granularity: HMoE weights (low, mid, high), global or per
            reference; None = the routers' own. branches: image (default, DDS) | text | both (ablations).
        auto_mask: one detection phrase per reference → masks found in a first pass (see module doc).
        seed: fixes the sampling noise (same seed → same image). With neither seed nor generator a seed is
            drawn from torch's global RNG and recorded in ``settings`` (every result can be reproduced).
        image_guidance_scale: image CFG (see the module doc); 1.0 = off.
        control_image: one per ControlNet (image, path or array, with the output's aspect ratio), when the
            pipeline has a ControlNet; controlnet_conditioning_scale: one value or one per ControlNet.
        Other keywords go to FluxPipeline (FluxControlNetPipeline with a control image).
        """
        refs = (
            [] if references is None else (list(references) if isinstance(references, (list, tuple)) else [references])
        )
        ref_images = [load_image(r, f"reference {i + 1}") for i, r in enumerate(refs)]
        n = len(ref_images)
        ds = self.adapter.config.latent_downsample
        if height % ds or width % ds:
            raise ValueError(f"height={height}, width={width}: FLUX needs both divisible by {ds}")
        scales = per_subject(scale, n, "scale")
        if masks is not None and auto_mask is not None:
            raise ValueError("give either masks or auto_mask, not both")
        if auto_mask is not None and len(auto_mask) != n:
            raise ValueError(
                f"auto_mask has {len(auto_mask)} phrases for {n} references; give one phrase per reference"
            )
        if masks is not None:
            masks = list(masks)
            if len(masks) != n:
                raise ValueError(f"got {len(masks)} masks for {n} references; give one mask per reference")
            mask_t = [load_mask(m, height, width, i) for i, m in enumerate(masks)]
        elif n > 1 and auto_mask is None:
            raise ValueError(f"{n} references need one mask each (masks=...) or auto_mask=[phrase per reference]")
        else:
            mask_t = None
        if auto_mask is not None and (self.detector is None or self.segmenter is None):
            raise ValueError(
                "auto_mask needs Grounding DINO and SAM: build the pipeline with with_auto_mask=True "
                "(models.yaml must name grounding_dino and sam)"
            )
        if granularity is not None:
            per_subject(granularity, n, "granularity")  # validate before compute
        try:
            image_guidance_scale = float(image_guidance_scale)
        except (TypeError, ValueError):
            raise ValueError(f"image_guidance_scale={image_guidance_scale!r}: give a number (1.0 = off)") from None
        if not 0.0 <= image_guidance_scale < float("inf"):
            raise ValueError(f"image_guidance_scale={image_guidance_scale}: must be a finite number >= 0 (1.0 = off)")
        if seed is not None:
            seed = check_seed(seed)
        sampler, control = self._sampler(
            control_image, controlnet_conditioning_scale, height, width, flux_kwargs.get("control_mode")
        )
        if seed is None and generator is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())

        call = dict(
            prompt=prompt,
            num_inference_steps=num_inference_steps,
            height=height,
            width=width,
            guidance_scale=guidance_scale,
            **control,
            **flux_kwargs,
        )
        if auto_mask is not None:
            # the final pass must start from the first pass's noise: rewind a passed generator
            states = [g.get_state() for g in _generators(generator)]
            first = self._generate(call, seed, generator, cond=None, sampler=sampler).images[0]
            for g, st in zip(_generators(generator), states):
                g.set_state(st)
            mask_t = self.auto_masks(
                first,
                list(auto_mask),
                dilation=auto_mask_dilation,
                box_threshold=box_threshold,
                text_threshold=text_threshold,
            )
        cond = None
        if n:
            tokens = self.encode_references(ref_images, granularity)
            cond = self.adapter.make_conditioning(
                tokens,
                masks=mask_t,
                scales=scales,
                branches=branches,
                image_size=(height, width),
                image_guidance_scale=image_guidance_scale,
            )
        result = self._generate(call, seed, generator, cond=cond, sampler=sampler)
        settings = dict(
            prompt=prompt,
            num_references=n,
            scale=scales,
            granularity=granularity,
            branches=branches,
            auto_mask=list(auto_mask) if auto_mask else None,
            seed=seed,
            num_inference_steps=num_inference_steps,
            height=height,
            width=width,
            guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale,
        )
        if control:
            settings.update(
                num_control_images=len(nets_of(sampler.controlnet)),
                controlnet_conditioning_scale=control["controlnet_conditioning_scale"],
            )
        return DynaIPOutput(images=list(result.images), masks=mask_t, settings=settings)

    def _sampler(self, control_image, scale, height: int, width: int, control_mode=None) -> tuple[Any, dict]:
        """The diffusers pipeline that samples this call and its ControlNet keywords (checked before compute)."""
        if control_image is not None:
            if not is_controlnet_pipeline(self.flux):
                raise ValueError(
                    "control_image given but this pipeline has no ControlNet: load_dynaip on a diffusers "
                    "FluxControlNetPipeline, or from_local(..., controlnet=DIR)"
                )
            return self.flux, control_inputs(self.flux.controlnet, control_image, scale, height, width, control_mode)
        if not is_controlnet_pipeline(self.flux):
            return self.flux, {}
        if self.offloaded:  # the offload hooks belong to the ControlNet pipeline
            raise ValueError("this pipeline has a ControlNet and CPU offload on: give control_image=...")
        if self._plain_flux is None:
            self._plain_flux = without_controlnet(self.flux)
        return self._plain_flux, {}

    def _generate(self, call: dict, seed: int | None, generator: torch.Generator | None, cond, sampler=None):
        if generator is None and seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self.adapter.set_conditioning(cond)
        try:
            return (sampler or self.flux)(generator=generator, **call)
        finally:
            self.adapter.set_conditioning(None)

    # ------------------------------------------------------------------ automatic masks
    def auto_masks(
        self, image: Image.Image, phrases: list[str], *, dilation: float, box_threshold: float, text_threshold: float
    ) -> list[torch.Tensor]:
        """Finds each phrase in ``image`` (Grounding DINO → SAM → cleanup → dilation): ``(H, W)`` {0,1} each."""
        from scipy import ndimage

        arr = np.asarray(image.convert("RGB"))
        dets = self.detector.detect(
            [arr], [" . ".join(phrases)], box_threshold=box_threshold, text_threshold=text_threshold
        )[0]
        boxes = []
        for phrase in phrases:
            key = phrase.strip().lower().rstrip(".").strip()
            found = [d for d in dets if d.phrase == key]
            if not found:
                raise ValueError(
                    f"auto-mask: '{phrase}' was not found in the first-pass image; pass masks "
                    "explicitly or lower box_threshold/text_threshold"
                )
            boxes.append(found[0].box)  # detections are sorted by score
        masks, _ = self.segmenter.segment([arr], [np.asarray(boxes, dtype=np.float32)])[0]
        radius = max(1, int(round(dilation * min(arr.shape[:2]))))
        out = []
        for i, m in enumerate(masks):
            m = clean_mask(m)  # curation's defaults: a reference mask is cleaned the same way
            if not m.any():  # SAM found nothing inside the box: fall back to the box itself
                x0, y0, x1, y1 = (int(round(v)) for v in boxes[i])
                m = np.zeros(arr.shape[:2], dtype=bool)
                m[y0:y1, x0:x1] = True
            m = ndimage.binary_dilation(m, structure=np.ones((3, 3), bool), iterations=radius)
            out.append(torch.from_numpy(m.astype(np.float32)))
        return out


class _visiting:
    """Moves modules to ``device`` for a block and back where they were (no-op unless ``active``)."""

    def __init__(self, modules, device, active: bool):
        self.modules, self.device, self.active = modules, torch.device(device), active
        self.homes: list[torch.device] = []

    def __enter__(self):
        if self.active:
            for m in self.modules:
                self.homes.append(next(m.parameters()).device)
                m.to(self.device)
        return self

    def __exit__(self, *exc):
        for m, home in zip(self.modules, self.homes):
            m.to(home)


SEED_MAX = 2**64 - 1
"""The largest seed ``torch.Generator.manual_seed`` takes (an unsigned 64-bit number)."""


def check_seed(seed: Any) -> int:
    """``seed`` as an int in 0..SEED_MAX; else a one-line ValueError with the range (a web form can send 2**70)."""
    try:
        value = int(seed)
        whole = value == seed or isinstance(seed, str)
    except (TypeError, ValueError, OverflowError):
        value, whole = None, False
    if value is None or not whole or not 0 <= value <= SEED_MAX:
        raise ValueError(f"seed {seed!r} is out of range: give a whole number from 0 to {SEED_MAX} (2^64 - 1)")
    return value


def _generators(generator) -> list[torch.Generator]:
    if generator is None:
        return []
    return list(generator) if isinstance(generator, (list, tuple)) else [generator]


def adapter_config_for(transformer, tower):
    """The DynaIPConfig whose sizes match a loaded FLUX transformer and CLIP tower (full size for the
    real FLUX.1-dev + ViT-L/14-336, the tiny preset for the tiny checkpoints)."""
    from dynaip.adapter import DynaIPConfig

    c = transformer.config
    return DynaIPConfig(
        clip_width=tower.width,
        clip_tokens=tower.num_tokens,
        clip_layers=tower.layers,
        expert_dim=tower.width,
        router_hidden_dim=max(16, tower.width // 4),
        ref_dim=c.num_attention_heads * c.attention_head_dim,
        inner_dim=c.num_attention_heads * c.attention_head_dim,
        num_heads=c.num_attention_heads,
        head_dim=c.attention_head_dim,
        num_double_blocks=c.num_layers,
        num_single_blocks=c.num_single_layers,
    )


def _load_auto_mask_models(models, device):
    from dynaip.models.grounding_dino import GroundingDinoDetector, load_grounding_dino
    from dynaip.models.sam import SamBoxSegmenter, load_sam

    gd = load_grounding_dino(models.require("grounding_dino"), device=device)
    sam = load_sam(models.require("sam"), device=device)
    return GroundingDinoDetector(gd, device=device), SamBoxSegmenter(sam, device=device)
