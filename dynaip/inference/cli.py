"""`dynaip generate`: one image (+ a JSON sidecar with every setting) from the command line."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dynaip.atomic import atomic_save_image, atomic_write_text
from dynaip.models import sampling

log = logging.getLogger(__name__)

OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
"""Image formats ``--out`` can name, by extension; the file is written in the format its name says."""


def output_format(out: str | Path) -> str:
    """The Pillow format of ``--out``; a name without an image extension is refused (it would clash with the
    .json sidecar, or hold bytes of another format than its name says)."""
    ext = Path(out).suffix.lower()
    if ext not in OUTPUT_FORMATS:
        raise ValueError(
            f"--out {out}: '{ext or 'no extension'}' is not an image format generate writes; "
            f"end the name in {', '.join(OUTPUT_FORMATS)} (a .json sidecar is written beside it)"
        )
    return OUTPUT_FORMATS[ext]


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate an image with DynaIP references",
        description="FLUX.1-dev + DynaIP. One --ref for a single subject; several --ref, each with a "
        "--mask or an --auto-mask phrase, for multi-subject composition.",
    )
    p.add_argument("--models", default=None, help="models.yaml with the local checkpoint paths (required)")
    p.add_argument("--adapter", required=True, help="adapter checkpoint directory (adapter.safetensors + config.json)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--ref", action="append", default=[], help="reference image (repeat for several subjects)")
    p.add_argument("--mask", action="append", default=None, help="mask image per --ref, in order (output aspect ratio)")
    p.add_argument(
        "--auto-mask",
        action="append",
        default=None,
        metavar="PHRASE",
        help="detection phrase per --ref: masks come from Grounding DINO + SAM on a first pass",
    )
    p.add_argument("--scale", type=_floats, default=[1.0], help="λ, one value or one per --ref (comma-separated)")
    p.add_argument(
        "--granularity",
        type=_floats,
        default=None,
        help="HMoE weights low,mid,high (e.g. 1,0,0 = low-level only); default: the routers'",
    )
    p.add_argument(
        "--branches",
        choices=("image", "text", "both"),
        default="image",
        help="where reference attention is injected (image = the paper's inference setting)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=sampling.STEPS)
    p.add_argument("--height", type=int, default=sampling.SIZE)
    p.add_argument("--width", type=int, default=sampling.SIZE)
    p.add_argument("--guidance", type=float, default=sampling.GUIDANCE, help="FLUX.1-dev's distilled text guidance")
    p.add_argument(
        "--image-cfg",
        type=float,
        default=1.0,
        metavar="S",
        help="image CFG scale: also run the no-reference branch and use uncond + S·(cond − uncond); "
        "1 = off (default), > 1 strengthens the references at twice the transformer compute",
    )
    p.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens")
    p.add_argument(
        "--controlnet",
        action="append",
        default=None,
        metavar="DIR",
        help="FLUX ControlNet directory (diffusers format); repeat for a multi-ControlNet, each with its "
        "--control-image in the same order",
    )
    p.add_argument(
        "--control-image",
        action="append",
        default=None,
        metavar="IMG",
        help="control image per --controlnet, in order (the output's aspect ratio)",
    )
    p.add_argument(
        "--control-scale",
        type=_floats,
        default=None,
        metavar="S",
        help="ControlNet conditioning scale: one value, or one per --controlnet (comma-separated); default 1",
    )
    p.add_argument("--lora", default=None, help="optional FLUX LoRA (diffusers format) loaded with load_lora_weights")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument(
        "--offload",
        choices=("none", "model", "sequential"),
        default="none",
        help="diffusers' CPU offload of FLUX (the adapter follows): model = one model on the device at a "
        "time, sequential = one layer at a time (least memory, slowest); see docs/low_memory.md",
    )
    p.add_argument(
        "--quantize",
        choices=("none", "int8", "fp8"),
        default="none",
        help="weight-only quantization of the frozen FLUX transformer (optimum-quanto)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="regional torch.compile of FLUX's blocks (each block class compiled once and reused; the "
        "first steps pay the compile time); not with --offload sequential or --quantize",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output image (.png, .jpg/.jpeg or .webp: written in that format); a .json sidecar is written beside it",
    )
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from .pipeline import DynaIPFluxPipeline

    if args.models is None:
        raise ValueError(
            "--models M.yaml is required: the local paths of FLUX.1-dev and the CLIP vision weights "
            "(`dynaip tiny-checkpoints --out DIR` writes DIR/models.yaml for the tiny set)"
        )
    fmt = output_format(args.out)  # before any model loads
    if not args.ref:
        raise ValueError("give at least one --ref image")
    from .inputs import check_image_path

    for i, ref in enumerate(args.ref):  # a typo or a folder fails now, not after minutes of model loading
        check_image_path(ref, f"reference {i + 1} (--ref)")
    for i, mask in enumerate(args.mask or []):
        check_image_path(mask, f"mask {i + 1} (--mask)")
    control_scale = _check_control_args(args)
    if args.compile and (args.offload == "sequential" or args.quantize != "none"):
        raise ValueError(
            "--compile works with the model on the device or --offload model; drop --compile, or "
            "--offload sequential / --quantize (their per-layer hooks and quantized weights are not "
            "compiled)"
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    offload = args.offload != "none"
    pipe = DynaIPFluxPipeline.from_local(
        args.models,
        args.adapter,
        dtype=dtype,
        device="cpu" if offload else device,
        with_auto_mask=bool(args.auto_mask),
        controlnet=args.controlnet,
    )
    if args.quantize != "none":
        from .lowmem import quantize_transformer

        quantize_transformer(pipe.flux, args.quantize)
    if offload:
        getattr(pipe, f"enable_{args.offload}_cpu_offload")(device=device)
    if args.compile:
        pipe.compile()
    from dynaip.console import progress_bars

    progress_bars(pipe.flux)
    if args.lora:  # offline loading needs the file name: a file, or a diffusers LoRA directory
        lora = Path(args.lora)
        if lora.is_file():
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        else:
            pipe.load_lora_weights(str(lora), weight_name="pytorch_lora_weights.safetensors")
    scale = args.scale[0] if len(args.scale) == 1 else args.scale
    out = pipe(
        args.prompt,
        references=args.ref,
        masks=args.mask,
        auto_mask=args.auto_mask,
        scale=scale,
        granularity=args.granularity,
        branches=args.branches,
        seed=args.seed,
        num_inference_steps=args.steps,
        height=args.height,
        width=args.width,
        guidance_scale=args.guidance,
        image_guidance_scale=args.image_cfg,
        max_sequence_length=args.max_sequence_length,
        control_image=args.control_image,
        controlnet_conditioning_scale=control_scale,
    )
    target = Path(args.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_image(out.images[0], target, format=fmt)
    sidecar = dict(
        out.settings,
        references=[str(r) for r in args.ref],
        masks=args.mask,
        adapter=str(args.adapter),
        models=str(args.models),
        lora=args.lora,
        device=device,
        dtype=str(dtype),
        offload=args.offload,
        quantize=args.quantize,
        controlnet=args.controlnet,
        control_images=args.control_image,
        compile=args.compile,
    )
    if out.masks is not None and args.auto_mask:
        for i, m in enumerate(out.masks):
            from PIL import Image

            mask_path = target.with_name(f"{target.stem}.mask{i + 1}.png")
            atomic_save_image(Image.fromarray((m.numpy() * 255).astype("uint8")), mask_path)
        sidecar["auto_masks"] = [str(target.with_name(f"{target.stem}.mask{i + 1}.png")) for i in range(len(out.masks))]
    atomic_write_text(target.with_suffix(".json"), json.dumps(sidecar, indent=2, default=str))
    print(f"wrote {target} and {target.with_suffix('.json')}")
    return 0


def _check_control_args(args: argparse.Namespace) -> float | list[float]:
    """The ControlNet switches agree with each other and name existing files (before any model loads);
    returns the conditioning scale for the pipeline."""
    nets, images = args.controlnet or [], args.control_image or []
    if not nets and (images or args.control_scale is not None):
        raise ValueError("--control-image and --control-scale need a --controlnet DIR")
    if len(images) != len(nets):
        raise ValueError(
            f"got {len(images)} --control-image for {len(nets)} --controlnet; give one control image per "
            "ControlNet, in the same order"
        )
    for d in nets:
        if not Path(d).is_dir():
            raise ValueError(
                f"--controlnet '{d}' is not a directory (a diffusers FLUX ControlNet: config.json + "
                "diffusion_pytorch_model.safetensors)"
            )
    for img in images:
        if not Path(img).is_file():
            raise ValueError(f"--control-image '{img}' does not exist")
    scale = args.control_scale if args.control_scale is not None else [1.0]
    if len(scale) not in (1, len(nets)):
        raise ValueError(
            f"got {len(scale)} --control-scale values for {len(nets)} --controlnet; give one, or one per ControlNet"
        )
    return scale[0] if len(scale) == 1 else scale
