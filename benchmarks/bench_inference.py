"""Per-step generation time of DynaIPFluxPipeline with 0-3 subjects, relative to plain FLUX.

Runs the real pipeline (diffusers' FluxPipeline sampler + the attached adapter) on the CPU at a
reduced shape that keeps FLUX.1-dev's cost structure: tokens and width both divided by 4
(512x512 → 1024 image tokens, 128 text tokens, 144 reference tokens; inner width 768 = 6 heads x 128),
so attention-vs-linear and cross-attention-vs-base FLOP ratios equal those at 1024x1024 with 3072
width and 577 reference tokens. Fewer blocks (2 double + 4 single) keep it fast; the per-block
ratio is what matters. The text encoders and VAE are the tiny ones (not part of the per-step cost).

Per-step time = median gap between step callbacks (process CPU time, one torch thread, on the CPU), steps 2..N (step 1 also computes the
reference K/V once per generation and is reported separately). Configurations run in shuffled round-robin order;
medians over repeats; ratios against the plain pipeline's median from the same run.

    .venv/bin/python benchmarks/bench_inference.py [--repeats 3] [--steps 4] [--json OUT]

Goal: ≤ 1.05x the base per step with one subject. With a GPU: --device cuda --full runs the full
FLUX.1-dev transformer (random weights, bf16) at 1024x1024 and reports peak memory.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build(tiny_dir: Path, full: bool, device: str, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    from dynaip.adapter import DynaIPAdapter, DynaIPConfig
    from dynaip.inference import DynaIPFluxPipeline
    from dynaip.models.clip_vision import load_clip_vision
    from dynaip.models.flux import FLUX_DEV_TRANSFORMER_CONFIG, load_flux_pipeline
    from dynaip.models.config import ModelsConfig

    models = ModelsConfig.from_yaml(tiny_dir / "models.yaml")
    flux = load_flux_pipeline(models.flux)
    if full:
        cfg = dict(FLUX_DEV_TRANSFORMER_CONFIG, in_channels=16, joint_attention_dim=32, pooled_projection_dim=32)
        acfg = DynaIPConfig.full()
    else:
        cfg = dict(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=128,
            num_attention_heads=6,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
        acfg = DynaIPConfig.full(
            clip_tokens=144, ref_dim=768, inner_dim=768, num_heads=6, num_double_blocks=2, num_single_blocks=4
        )
    torch.manual_seed(0)
    flux.transformer = FluxTransformer2DModel(**cfg).to(device, dtype)
    flux.to(device)
    adapter = DynaIPAdapter(acfg)
    with torch.no_grad():  # trained-like V so the references do real work (zero-init V would be the same cost)
        for name, p in adapter.named_parameters():
            if "to_v" in name:
                p.normal_(std=0.02)
    tower = load_clip_vision(models.clip_vision, layers=models.clip_vision.layers)
    return DynaIPFluxPipeline(flux, adapter.to(device, dtype), tower.to(device)), acfg


def clock() -> float:
    """Process CPU time on the CPU (steadier than wall time on a shared 2-core machine), wall time on GPU."""
    return time.perf_counter() if torch.cuda.is_available() else time.process_time()


def time_steps(pipe, n_subjects: int, acfg, *, size: int, steps: int, text_tokens: int) -> tuple[float, float]:
    """(median seconds per step for steps 2..N, seconds of step 1)."""
    device = pipe.device
    dtype = next(pipe.adapter.parameters()).dtype
    cond = None
    if n_subjects:
        g = torch.Generator().manual_seed(n_subjects)
        refs = [
            torch.randn(1, acfg.clip_tokens, acfg.ref_dim, generator=g).to(device, dtype) for _ in range(n_subjects)
        ]
        masks = None
        if n_subjects > 1:
            masks = []
            for i in range(n_subjects):
                m = torch.zeros(size, size)
                m[:, i * size // n_subjects : (i + 1) * size // n_subjects] = 1
                masks.append(m)
        cond = pipe.adapter.make_conditioning(refs, masks=masks, image_size=(size, size))
    stamps: list[float] = []

    def on_step(_pipe, _i, _t, kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(clock())
        return kwargs

    call = dict(
        prompt="a photo of a dog on the beach",
        num_inference_steps=steps,
        height=size,
        width=size,
        max_sequence_length=text_tokens,
        output_type="latent",
        callback_on_step_end=on_step,
    )
    start = clock()
    with torch.no_grad():
        pipe._generate(call, seed=0, generator=None, cond=cond)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(gaps), stamps[0] - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true", help="full FLUX.1-dev transformer at 1024x1024 (GPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = least noisy)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    from dynaip.models.tiny import write_tiny_checkpoints

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_checkpoints(Path(tmp) / "tiny")
        pipe, acfg = build(Path(tmp) / "tiny", args.full, args.device, dtype)
        size, text_tokens = (1024, 512) if args.full else (512, 128)
        subjects = [0, 1, 2, 3]
        per_step: dict[int, list[float]] = {n: [] for n in subjects}
        first: dict[int, list[float]] = {n: [] for n in subjects}
        time_steps(pipe, 1, acfg, size=size, steps=2, text_tokens=text_tokens)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        order_rng = random.Random(0)
        for _ in range(args.repeats):
            order = subjects[:]
            order_rng.shuffle(order)  # shuffled round-robin: drift and position effects hit every configuration alike
            for n in order:
                s, f = time_steps(pipe, n, acfg, size=size, steps=args.steps, text_tokens=text_tokens)
                per_step[n].append(s)
                first[n].append(f)
        base = statistics.median(per_step[0])
        result = {
            "device": args.device,
            "shape": "full 1024x1024" if args.full else "reduced /4 (512x512, inner 768, 2+4 blocks)",
            "repeats": args.repeats,
            "steps": args.steps,
            "seconds_per_step": {n: statistics.median(v) for n, v in per_step.items()},
            "ratio_vs_base": {n: statistics.median(v) / base for n, v in per_step.items()},
            "first_step_seconds": {n: statistics.median(v) for n, v in first.items()},
        }
        if args.device.startswith("cuda"):
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
