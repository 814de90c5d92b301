"""What the *Generate* page runs, without any UI: one loaded ``DynaIPFluxPipeline`` and a call that
takes the page's inputs, validates them, generates, and writes the PNG with its JSON sidecar (and
the masks used) for download. Started with ControlNets (``dynaip serve --controlnet DIR``), a call
takes one control image per ControlNet, or none (then FLUX samples without the ControlNet)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from dynaip.atomic import atomic_save_image, atomic_write_text

MAX_REFERENCES = 3


@dataclass
class Generation:
    image: Image.Image
    settings: dict[str, Any]
    masks: list[Image.Image]
    """The masks used (drawn or found), at the output size; empty for one reference without a mask."""
    files: list[str]
    """PNG, its JSON sidecar, then the masks' PNGs."""


def drawn_mask(value: Any) -> np.ndarray | None:
    """A canvas value (Gradio's editor dict {background, layers, composite}, or an array) → (H, W) bool
    of the painted pixels; None when nothing is painted."""
    if value is None:
        return None
    if isinstance(value, dict):
        layers = [np.asarray(l) for l in (value.get("layers") or []) if l is not None]
        if not layers and value.get("composite") is not None:
            layers = [np.asarray(value["composite"])]
        painted = None
        for arr in layers:
            if arr.ndim == 3 and arr.shape[-1] == 4:
                m = arr[..., 3] > 0
            else:
                m = (arr.reshape(arr.shape[0], arr.shape[1], -1) > 0).any(-1)
            painted = m if painted is None else painted | m
        if painted is None or not painted.any():
            return None
        return painted
    arr = np.asarray(value)
    m = arr[..., 3] > 0 if arr.ndim == 3 and arr.shape[-1] == 4 else (arr.reshape(*arr.shape[:2], -1) > 0).any(-1)
    return m if m.any() else None


class GenerationService:
    """Loads the pipeline once (tiny checkpoints unless ``models`` names real ones) and serialises calls."""

    def __init__(
        self,
        models: str | Path | None,
        adapter: str | Path | None,
        out_dir: str | Path,
        device: str | None = None,
        controlnet: Sequence[str | Path] | None = None,
    ):
        from dynaip.console import progress_bars, quiet_libraries
        from dynaip.inference import DynaIPFluxPipeline
        from dynaip.models import ModelsConfig

        quiet_libraries()

        self.out_dir = Path(out_dir).resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if models is None:
            from dynaip.models.tiny import write_tiny_checkpoints

            models = write_tiny_checkpoints(self.out_dir / "tiny-checkpoints")
        self.models_yaml = str(models)
        mcfg = ModelsConfig.from_yaml(models)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.auto_mask = mcfg.grounding_dino is not None and mcfg.sam is not None
        self.controlnets = [str(c) for c in controlnet or []]
        self.pipe = DynaIPFluxPipeline.from_local(
            mcfg,
            adapter,
            dtype=dtype,
            device=self.device,
            with_auto_mask=self.auto_mask,
            controlnet=self.controlnets or None,
        )
        progress_bars(self.pipe.flux)
        self.adapter = str(adapter) if adapter is not None else None
        self._lock = threading.Lock()

    def generate(
        self,
        prompt: str,
        references: Sequence[Image.Image | None],
        *,
        scales: Sequence[float],
        granularities: Sequence[Sequence[float] | None],
        masks: Sequence[Any],
        phrases: Sequence[str | None],
        seed: int | None,
        steps: int,
        height: int,
        width: int,
        guidance: float,
        image_cfg: float,
        max_sequence_length: int | None = None,
        control_images: Sequence[Image.Image | None] = (),
        control_scales: Sequence[float] = (),
    ) -> Generation:
        """One generation from the page's slots (a slot without an image is skipped). ``control_images``
        / ``control_scales``: one per ControlNet the service was started with; all images or none."""
        if not prompt or not str(prompt).strip():
            raise ValueError("write a prompt")
        from dynaip.inference.pipeline import check_seed

        seed = None if seed is None or seed == "" else check_seed(seed)  # 2**70 from the form: one line with the range
        slots = [i for i, r in enumerate(references) if r is not None]
        if not slots:
            raise ValueError("upload at least one reference image")
        if len(slots) > MAX_REFERENCES:
            raise ValueError(f"at most {MAX_REFERENCES} references")
        refs = [references[i].convert("RGB") for i in slots]
        drawn = [drawn_mask(masks[i]) if i < len(masks) else None for i in slots]
        words = [(phrases[i] or "").strip() if i < len(phrases) else "" for i in slots]
        height, width = int(height), int(width)
        mask_arg = auto = None
        if any(m is not None for m in drawn) and any(words):
            raise ValueError("give every reference a drawn mask, or every reference a phrase, not a mix")
        if any(words):
            if not all(words):
                raise ValueError("automatic masks need a phrase for every reference")
            if not self.auto_mask:
                raise ValueError("automatic masks need Grounding DINO and SAM in models.yaml")
            auto = words
        elif any(m is not None for m in drawn):
            if not all(m is not None for m in drawn):
                missing = [str(slots[k] + 1) for k, m in enumerate(drawn) if m is None]
                raise ValueError(f"draw a mask for reference {', '.join(missing)} too (or find them by phrase)")
            # the canvas stands for the output frame: stretch each drawing to the output size
            mask_arg = [
                np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((width, height), Image.NEAREST))
                for m in drawn
            ]
        elif len(refs) > 1:
            raise ValueError(f"{len(refs)} references need one mask each: draw them, or give a phrase per reference")
        control = self._control(control_images, control_scales)
        gran = [tuple(float(x) for x in granularities[i]) if granularities[i] is not None else None for i in slots]
        if any(g is not None and sum(g) <= 0 for g in gran):
            raise ValueError("a granularity needs at least one of low / mid / high above 0")
        kwargs: dict[str, Any] = {}
        if max_sequence_length:
            kwargs["max_sequence_length"] = int(max_sequence_length)
        if gran.count(None) not in (0, len(gran)):  # mixed: the routers' own weights are spelled out as None
            raise ValueError("set granularity for every reference or for none")
        with self._lock:
            out = self.pipe(
                prompt,
                references=refs,
                masks=mask_arg,
                auto_mask=auto,
                scale=[float(scales[i]) for i in slots],
                granularity=None if gran[0] is None else [list(g) for g in gran],
                seed=seed,
                num_inference_steps=int(steps),
                height=height,
                width=width,
                guidance_scale=float(guidance),
                image_guidance_scale=float(image_cfg),
                **control,
                **kwargs,
            )
        return self._save(out, refs, slots, control.get("control_image") or [])

    def _control(self, images: Sequence[Image.Image | None], scales: Sequence[float]) -> dict[str, Any]:
        """The pipeline's ControlNet keywords from the page's control slots ({} without a control image)."""
        given = [img for img in images if img is not None]
        if not given:
            return {}
        n = len(self.controlnets)
        if not n:
            raise ValueError("this app was started without a ControlNet (dynaip serve --controlnet DIR)")
        if len(given) != n or len(images) != n:
            raise ValueError(f"upload a control image for each of the {n} ControlNets, or none")
        if len(scales) != n:
            raise ValueError(f"give {n} control scales, one per ControlNet")
        return dict(
            control_image=[img.convert("RGB") for img in images],
            controlnet_conditioning_scale=[float(s) for s in scales],
        )

    def _save(self, out, refs: list[Image.Image], slots: list[int], controls: Sequence[Image.Image] = ()) -> Generation:
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.perf_counter_ns() % 1_000_000:06d}"
        base = self.out_dir / f"gen-{stamp}"
        png = base.with_suffix(".png")
        atomic_save_image(out.images[0], png)  # a full disk: one StorageError line, no half-written file
        files = [str(png), str(base.with_suffix(".json"))]
        ref_paths, mask_images = [], []
        for k, ref in enumerate(refs):
            p = self.out_dir / f"gen-{stamp}.ref{k + 1}.png"
            atomic_save_image(ref, p)
            ref_paths.append(str(p))
        control_paths = []
        for k, img in enumerate(controls):
            p = self.out_dir / f"gen-{stamp}.control{k + 1}.png"
            atomic_save_image(img, p)
            control_paths.append(str(p))
        for k, m in enumerate(out.masks or []):
            img = Image.fromarray((m.cpu().numpy() > 0.5).astype(np.uint8) * 255)
            p = self.out_dir / f"gen-{stamp}.mask{k + 1}.png"
            atomic_save_image(img, p)
            files.append(str(p))
            mask_images.append(img)
        settings = dict(
            out.settings,
            references=ref_paths,
            reference_slots=[s + 1 for s in slots],
            masks=files[2:] or None,
            models=self.models_yaml,
            adapter=self.adapter,
            device=self.device,
        )
        if controls:
            settings.update(controlnet=self.controlnets, control_images=control_paths)
        atomic_write_text(files[1], json.dumps(settings, indent=2, default=str))
        return Generation(
            image=out.images[0], settings=json.loads(json.dumps(settings, default=str)), masks=mask_images, files=files
        )
