"""The GPU benchmark: full-size models with random weights (speed and memory do not depend on weight
values), built from their configs — nothing is downloaded.

    python benchmarks/gpu_suite.py --out DIR [--parts train,generate,curate] [--repeats 5]
    python benchmarks/gpu_suite.py --out DIR --parts attention,train,generate --compile   # issue #28

With ``--compile`` the train and generate parts run ``gpu_compile.py``'s versions instead (compile off
and on, fused AdamW, the trainer's SDPA choice); ``attention`` checks and times every SDPA backend.
That module's docstring says what they measure.

Measures on one GPU, within about 9 minutes on an 80 GB card:

(a) **train** — one DynaIP training step at 1024² on frozen FLUX.1-dev (bf16, gradient checkpointing)
    with the fp32 adapter under bf16 autocast, AdamW and gradient clipping, per-rank batch 1 and 2,
    world size 1, through ``dynaip.train.step.flow_matching_loss`` on precomputed text/latent features
    (the path ``paper.yaml`` trains with: T5, CLIP-L text and the VAE encoder are not on the rank; the
    CLIP vision tower runs in the step). Seconds/step (median), peak memory, and MFU = model FLOPs /
    (time × the GPU's dense bf16 peak), model FLOPs counted analytically: frozen FLUX forward + its
    input-gradient backward (2×), adapter and CA forward + both backward products (3×), CLIP forward;
    the checkpointing recomputation is reported separately as hardware FLOPs (HFU).
(b) **generate** — seconds per denoising step (one FLUX transformer call, bf16, batch 1, 512 T5
    tokens, 1024²) bare and with 1/2/3 subjects (2 and 3 with disjoint stripe masks; reference K/V
    cached as in a generation), and the peak memory of a generation step with every generation model
    resident (transformer, adapter, T5-XXL, CLIP-L text, VAE, OpenCLIP ViT-L/14-336) including a
    T5 encode and a 1024² VAE decode.
(c) **curate** — Grounding DINO Swin-T (800/1333 resize, BERT-base text) and SAM ViT-H (two boxes
    per image) images/s at batch 1/4/16 on 1024×768 photos, at fp32 and the device's ``auto`` precision,
    with the agreement with fp32, the FLOP-count limit and one whole chunk worker (benchmarks/gpu_curate.py).
(d) **precompute** — the encoders of ``dynaip precompute`` (T5-XXL, CLIP-L text, VAE encoder posterior
    at 1024²) in samples/s at batch 1 and 8.
(e) **synth** — diptychs per minute of ``dynaip synth``'s generate stage on one GPU: full-size FLUX.1-dev,
    1056 × 528, 28 steps, guidance 3.5, bf16, one diptych per call (median of ``--repeats``).
(f) **lowmem** — one whole generation (one reference, 1024², 4 steps, T5 encode to VAE decode) through
    ``DynaIPFluxPipeline`` in each mode of docs/low_memory.md: every model on the GPU, diffusers' model
    offload, sequential offload, an int8 weight-quantized transformer (optimum-quanto) on the GPU and with
    model offload. Peak allocated and reserved GPU memory and seconds per generation. Each mode builds
    its models afresh (sequential offload leaves the modules on the meta device); a mode that fails is
    recorded with its error and the others still run. Not in the default parts: run ``--parts lowmem``
    on its own (about 5 minutes on an H100, sequential offload being the slow one).

Writes ``DIR/gpu_suite.json`` and ``DIR/gpu_suite.md``. Without a CUDA GPU it prints one line and
exits with status 1. ``--smoke`` runs every part with the tiny configs on whatever device there is;
it checks the script itself (used by the test suite) and its figures are not measurements.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapter import Shape, adapter_step_flops, base_flops  # noqa: E402

# Dense bf16 tensor-core peak (no sparsity) from NVIDIA's data sheets, for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.05, "B200": 2250.0}


# ----------------------------------------------------------------------------- helpers
class Sizes:
    """Full-size (default) or smoke-test shapes."""

    def train_configs(self, n_blocks: int) -> list[tuple[int, int]]:
        """(per-rank batch, blocks kept un-checkpointed): every block recomputed at batch 1 and 2, batch 2
        keeping a third and a half of the blocks, and batch 1 recomputing nothing (what paper.yaml runs at
        batch 2 once the adapter and the base are sharded over 8 ranks; at world size 1 the unsharded
        adapter state leaves room for batch 1 only — docs/memory.md)."""
        return [(1, 0), (2, 0), (2, n_blocks // 3), (2, n_blocks // 2), (1, n_blocks)]

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.resolution = 64 if smoke else 1024
        self.text_tokens = 8 if smoke else 512
        self.clip_size = 56 if smoke else 336
        self.batches_train = (1, 2)
        self.batches_curate = (1, 2) if smoke else (1, 4, 16)
        self.batches_precompute = (1, 2) if smoke else (1, 8)
        self.curate_hw = (96, 128) if smoke else (768, 1024)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def gpu_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class default_dtype:
    """Builds parameters directly in ``dtype``: a 12 B model initialised in fp32 and cast afterwards
    would need 48 GB on the GPU for a moment."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __enter__(self):
        self.previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.previous)


def build_transformer(sizes: Sizes, device: torch.device, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    from dynaip.models.flux import FLUX_DEV_TRANSFORMER_CONFIG
    from dynaip.models.tiny import TINY_FLUX_TRANSFORMER_CONFIG

    cfg = TINY_FLUX_TRANSFORMER_CONFIG if sizes.smoke else FLUX_DEV_TRANSFORMER_CONFIG
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        model = FluxTransformer2DModel(**cfg)
    return model.to(dtype).eval().requires_grad_(False)


def build_adapter(sizes: Sizes, device: torch.device, dtype: torch.dtype):
    from dynaip import DynaIPAdapter, DynaIPConfig

    torch.manual_seed(1)
    cfg = DynaIPConfig.tiny() if sizes.smoke else DynaIPConfig.full()
    with torch.device(device):
        adapter = DynaIPAdapter(cfg)
    for m in adapter.modules():  # V is zero-init; random V so no product is trivially zero
        if hasattr(m, "to_v"):
            torch.nn.init.normal_(m.to_v.weight, std=0.02)
    return adapter.to(dtype)


def build_clip_vision(sizes: Sizes, device: torch.device, dtype: torch.dtype, layers):
    import open_clip

    from dynaip.models.clip_vision import ClipVisionTower
    from dynaip.models.tiny import TINY_CLIP_CONFIG

    if sizes.smoke:
        model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    else:
        model = open_clip.create_model("ViT-L-14-336", pretrained=None)
    tower = ClipVisionTower(
        model.visual, layers, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    )
    return tower.to(device=device, dtype=dtype)


def image_ids(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    from diffusers import FluxPipeline

    g = sizes.resolution // 16
    return FluxPipeline._prepare_latent_image_ids(1, g, g, device, dtype)


# ----------------------------------------------------------------------------- (a) training step
def train_flops(sizes: Sizes, batch: int, adapter_cfg, clip_params: int, recomputed: float = 1.0) -> dict[str, float]:
    """Analytic FLOPs of one step; ``recomputed``: the fraction of blocks that recompute in backward."""
    s = Shape(
        image_tokens=(sizes.resolution // 16) ** 2,
        text_tokens=sizes.text_tokens,
        ref_tokens=adapter_cfg.clip_tokens,
        inner=adapter_cfg.inner_dim,
        double=adapter_cfg.num_double_blocks,
        single=adapter_cfg.num_single_blocks,
        clip_width=adapter_cfg.clip_width,
        expert_dim=adapter_cfg.expert_dim,
        ref_dim=adapter_cfg.ref_dim,
    )
    base = base_flops(s)["total"]
    # branches="both": CA on every text and image row; K/V recomputed each step (they get gradients)
    s_all = Shape(**{**vars(s), "image_tokens": s.image_tokens + s.text_tokens})
    ca = adapter_step_flops(s_all, 1)
    kv_proj = (s.double * 2 + s.single) * 2 * (2 * s.ref_tokens * s.ref_dim * s.inner)
    hmoe = s.experts * 2 * s.ref_tokens * s.clip_width * s.expert_dim + 2 * s.ref_tokens * s.expert_dim * s.ref_dim
    clip = 2 * clip_params * s.ref_tokens
    model = batch * (2 * base + 3 * (ca + kv_proj + hmoe) + clip)
    hardware = model + recomputed * batch * (base + ca + kv_proj)  # + the checkpointed blocks' recomputation
    return {"model_flops": model, "hardware_flops": hardware}


def train_step(
    transformer,
    adapter,
    clip,
    optimizer,
    sizes: Sizes,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    autocast: torch.dtype | None,
):
    """One training step of the adapter on random features of ``batch`` samples (the trainer's loss,
    gradient clipping and optimizer step), as a function to time."""
    from dynaip.train.step import LossConfig, flow_matching_loss

    settings = LossConfig(max_sequence_length=sizes.text_tokens)
    sched_cfg = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    gen = torch.Generator(device=device).manual_seed(0)
    n_img = (sizes.resolution // 16) ** 2
    feats = dict(
        x0=torch.randn(batch, n_img, transformer.config.in_channels, device=device, dtype=dtype),
        img_ids=image_ids(sizes, device, dtype),
        txt=torch.randn(batch, sizes.text_tokens, transformer.config.joint_attention_dim, device=device, dtype=dtype),
        pooled=torch.randn(batch, transformer.config.pooled_projection_dim, device=device, dtype=dtype),
        txt_ids=torch.zeros(sizes.text_tokens, 3, device=device, dtype=dtype),
    )
    refs = torch.rand(batch, 3, sizes.clip_size, sizes.clip_size, device=device)
    no_drop = torch.zeros(batch, dtype=torch.bool)

    def step() -> None:
        hidden = clip(clip.normalize(refs).to(dtype))
        loss = flow_matching_loss(
            transformer,
            sched_cfg,
            adapter,
            adapter,
            **feats,
            image_size=(sizes.resolution, sizes.resolution),
            hidden=hidden,
            drop_image=no_drop,
            settings=settings,
            generator=gen,
            autocast=autocast,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_train(sizes: Sizes, device: torch.device, repeats: int, profile_dir: Path | None = None) -> list[dict]:
    from dynaip.train.step import (
        configure_attention_backends,
        disable_checkpointing,
        enable_checkpointing,
    )

    configure_attention_backends(device)  # as the trainer does
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = torch.bfloat16 if device.type == "cuda" else None
    transformer = build_transformer(sizes, device, dtype)
    adapter = build_adapter(sizes, device, torch.float32).train()
    adapter.attach(transformer)
    clip = build_clip_vision(sizes, device, dtype, adapter.config.clip_layers)
    clip_params = sum(p.numel() for p in clip.parameters())
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=2e-5, weight_decay=1e-4)
    n_blocks = adapter.config.num_blocks
    rows = []
    for batch, keep in sizes.train_configs(n_blocks):
        disable_checkpointing(transformer)
        recomputed = enable_checkpointing(transformer, keep)
        step = train_step(transformer, adapter, clip, optimizer, sizes, batch, device, dtype, autocast)

        row = {"batch_per_rank": batch, "blocks_recomputed": recomputed, "blocks_kept": keep}
        try:
            reset_peak(device)
            for _ in range(2):  # warm-up; the first also allocates the AdamW state
                step()
            times = [timed(step, device) for _ in range(repeats)]
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            row["error"] = "out of memory"
            rows.append(row)
            print(f"train batch {batch}, {keep} blocks kept: out of memory", flush=True)
            continue
        row.update(
            step_figures(times, train_flops(sizes, batch, adapter.config, clip_params, recomputed / n_blocks), device)
        )
        sec = row["seconds_per_step"]
        rows.append(row)
        print(
            f"train batch {batch}, {keep} blocks kept: {sec:.3f} s/step, peak {row['peak_memory_gib']} GiB, "
            f"MFU {row['mfu']}",
            flush=True,
        )
        if profile_dir is not None and keep == 0 and batch == max(sizes.batches_train):
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                step()
                sync(device)
            sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            (profile_dir / "train_profile.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
    disable_checkpointing(transformer)
    adapter.detach(transformer)
    del optimizer, adapter, transformer, clip
    return rows


# ----------------------------------------------------------------------------- (b) generation
def stripe_masks(k: int, size: int) -> list[torch.Tensor]:
    masks = []
    for i in range(k):
        m = torch.zeros(size, size)
        m[i * size // k : (i + 1) * size // k] = 1
        masks.append(m)
    return masks


def build_text_and_vae(
    sizes: Sizes, device: torch.device, dtype: torch.dtype, smoke_vocab: tuple[int, int] = (128, 128)
):
    """T5-XXL encoder, CLIP-L text, the FLUX VAE (smoke: tiny ones with ``smoke_vocab`` = (CLIP, T5) sizes)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from dynaip.models.tiny import TINY_VAE_CONFIG

    if sizes.smoke:
        t5 = T5Config(
            vocab_size=smoke_vocab[1],
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
        )
        clip_txt = CLIPTextConfig(
            vocab_size=smoke_vocab[0],
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
        )
        vae_cfg = TINY_VAE_CONFIG
    else:  # google/t5-v1_1-xxl encoder and openai/clip-vit-large-patch14 text, as FLUX.1-dev ships them
        t5 = T5Config(
            vocab_size=32128,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=24,
            num_heads=64,
            feed_forward_proj="gated-gelu",
        )
        clip_txt = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
        vae_cfg = dict(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            act_fn="silu",
            norm_num_groups=32,
            sample_size=1024,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=True,
        )
    with torch.device(device), default_dtype(dtype):
        models = (T5EncoderModel(t5), CLIPTextModel(clip_txt), AutoencoderKL(**vae_cfg))
    return [m.to(dtype).eval().requires_grad_(False) for m in models]


def step_figures(times: list[float], flops: dict, device: torch.device) -> dict:
    """A training step's timed figures: median seconds, peak memory, and MFU / HFU against the device's
    dense bf16 peak (``train_flops``'s accounting; None where the peak is unknown)."""
    sec = statistics.median(times)
    peak = gpu_peak_tflops(device)
    return {
        "seconds_per_step": sec,
        "seconds_all": times,
        "peak_memory_gib": peak_gib(device),
        "model_tflop_per_step": flops["model_flops"] / 1e12,
        "mfu": flops["model_flops"] / sec / (peak * 1e12) if peak else None,
        "hfu": flops["hardware_flops"] / sec / (peak * 1e12) if peak else None,
    }


def generate_setup(sizes: Sizes, device: torch.device) -> tuple:
    """What both generation benchmarks time (this file's and gpu_compile.py's): a FLUX transformer, the
    adapter, the CLIP tower, one denoising step's inputs and the conditionings bare / 1 / 2 / 3 subjects (2 and 3 masked)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer = build_transformer(sizes, device, dtype)
    adapter = build_adapter(sizes, device, dtype).eval()
    clip = build_clip_vision(sizes, device, dtype, adapter.config.clip_layers)
    n_img = (sizes.resolution // 16) ** 2
    g = torch.Generator(device=device).manual_seed(0)
    call = dict(
        hidden_states=torch.randn(1, n_img, transformer.config.in_channels, generator=g, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(
            1, sizes.text_tokens, transformer.config.joint_attention_dim, generator=g, device=device, dtype=dtype
        ),
        pooled_projections=torch.randn(
            1, transformer.config.pooled_projection_dim, generator=g, device=device, dtype=dtype
        ),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=torch.float32),
        img_ids=image_ids(sizes, device, dtype),
        txt_ids=torch.zeros(sizes.text_tokens, 3, device=device, dtype=dtype),
        return_dict=False,
    )
    refs = [
        adapter.encode_reference(
            clip(clip.normalize(torch.rand(1, 3, sizes.clip_size, sizes.clip_size, device=device)).to(dtype))
        )
        for _ in range(3)
    ]
    size = (sizes.resolution, sizes.resolution)
    conds = {"bare": None}
    for k in (1, 2, 3):
        conds[f"{k} subject{'s' if k > 1 else ''}"] = adapter.make_conditioning(
            refs[:k], masks=None if k == 1 else stripe_masks(k, sizes.resolution), branches="image", image_size=size
        )
    return transformer, adapter, clip, call, conds


@torch.no_grad()
def bench_generate(sizes: Sizes, device: torch.device, repeats: int) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer, adapter, clip, call, conds = generate_setup(sizes, device)

    def run(name: str) -> float:
        if conds[name] is None:
            return timed(lambda: transformer(**call), device)
        adapter.attach(transformer)
        adapter.set_conditioning(conds[name])
        try:
            return timed(lambda: transformer(**call), device)
        finally:
            adapter.set_conditioning(None)
            adapter.detach(transformer)

    for name in conds:  # warm-up, and the reference K/V of each conditioning (cached, as in a generation)
        run(name)
    samples: dict[str, list[float]] = {name: [] for name in conds}
    order = list(conds)
    rnd = random.Random(0)
    for _ in range(repeats):
        rnd.shuffle(order)
        for name in order:
            samples[name].append(run(name))
    med = {name: statistics.median(v) for name, v in samples.items()}
    result = {
        "seconds_per_step": med,
        "seconds_all": samples,
        "ratio_to_bare": {name: med[name] / med["bare"] for name in med},
    }
    print("generate:", {k: round(v, 4) for k, v in med.items()}, flush=True)

    # peak memory of a generation with every model it needs resident
    t5, clip_text, vae = build_text_and_vae(sizes, device, dtype)
    resident = (
        sum(
            p.numel() * p.element_size()
            for m in (transformer, adapter, clip, t5, clip_text, vae)
            for p in m.parameters()
        )
        / 2**30
    )
    reset_peak(device)
    ids = torch.randint(0, t5.config.vocab_size, (1, sizes.text_tokens), device=device)
    t_t5 = timed(lambda: t5(ids), device)
    clip_text(torch.randint(0, clip_text.config.vocab_size, (1, 77), device=device))
    adapter.attach(transformer)
    adapter.set_conditioning(conds["3 subjects"])
    transformer(**call)
    adapter.set_conditioning(None)
    adapter.detach(transformer)
    lat = torch.randn(
        1, vae.config.latent_channels, sizes.resolution // 8, sizes.resolution // 8, device=device, dtype=dtype
    )
    t_vae = timed(lambda: vae.decode(lat), device)
    result.update(
        {
            "resident_weights_gib": resident,
            "peak_memory_gib": peak_gib(device),
            "t5_encode_seconds": t_t5,
            "vae_decode_seconds": t_vae,
        }
    )
    del transformer, adapter, clip, t5, clip_text, vae
    return result


# ----------------------------------------------------------------------------- (e) synth and (f) low-memory generation
LOWMEM_MODES = ("full", "model offload", "sequential offload", "int8", "int8 + model offload")


def build_dynaip_pipeline(sizes: Sizes, device: torch.device, dtype: torch.dtype):
    """A ``DynaIPFluxPipeline`` (with a random adapter and CLIP tower) around ``build_flux_pipeline``."""
    from dynaip import load_dynaip

    flux = build_flux_pipeline(sizes, device, dtype)
    adapter = build_adapter(sizes, device, dtype).eval()
    tower = build_clip_vision(sizes, device, dtype, adapter.config.clip_layers)
    return load_dynaip(flux, adapter, image_encoder=tower)


def build_flux_pipeline(sizes: Sizes, device: torch.device, dtype: torch.dtype):
    """A diffusers ``FluxPipeline`` assembled from full-size (or smoke) random-weight models, built on
    ``device`` (fast initialisation); the tokenizers are the project's offline ones (their ids are a
    subset of the real vocabularies, which is all a speed/memory run needs)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    from dynaip.models import offline_tokenizers as tok

    with tempfile.TemporaryDirectory() as tmp:
        tok.write_clip_tokenizer(Path(tmp) / "tokenizer")
        t5_vocab = tok.write_t5_tokenizer(Path(tmp) / "tokenizer_2")
        clip_vocab = tok.clip_vocab_size(Path(tmp) / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(Path(tmp) / "tokenizer")
        tokenizer_2 = T5TokenizerFast.from_pretrained(Path(tmp) / "tokenizer_2")
    transformer = build_transformer(sizes, device, dtype)
    t5, clip_text, vae = build_text_and_vae(sizes, device, dtype, smoke_vocab=(clip_vocab, t5_vocab))
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler_config.json
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip_text,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


@torch.no_grad()
def bench_synth(sizes: Sizes, device: torch.device, repeats: int) -> dict:
    """Diptychs per minute of ``dynaip synth``'s generate stage: one FluxPipeline call per diptych
    (1056 × 528, 28 steps, guidance 3.5, bf16, a CPU generator seeded per diptych — exactly the stage's
    call, pipeline/stages/generate.py), T5 encode to VAE decode."""
    from dynaip.models import sampling

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    width, height, steps = (64, 32, 2) if sizes.smoke else (1056, 528, sampling.STEPS)
    flux = build_flux_pipeline(sizes, device, dtype)
    prompt = (
        "A two-panel image of the same red vintage camera. Left: on a wooden desk. "
        "Right: on a beach at sunset. Identical object in both panels."
    )

    def one(seed: int) -> None:
        flux(
            prompt=prompt,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=sampling.GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        )

    one(0)  # warm-up
    reset_peak(device)
    seconds = [timed(lambda s=s: one(s), device) for s in range(1, 1 + max(1, repeats))]
    med = statistics.median(seconds)
    result = {
        "width": width,
        "height": height,
        "steps": steps,
        "seconds_per_diptych": med,
        "seconds_all": seconds,
        "diptychs_per_minute": 60.0 / med,
        "peak_memory_gib": peak_gib(device),
    }
    print("synth:", {k: v for k, v in result.items() if k != "seconds_all"}, flush=True)
    del flux
    return result


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def bench_lowmem(sizes: Sizes, device: torch.device, repeats: int) -> dict:
    from PIL import Image

    from dynaip.inference.lowmem import quantize_transformer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps = 2 if sizes.smoke else 4
    reference = Image.fromarray(photos(sizes, 1)[0])
    call = dict(
        references=[reference],
        height=sizes.resolution,
        width=sizes.resolution,
        num_inference_steps=steps,
        guidance_scale=3.5,
        seed=0,
    )
    results: dict[str, dict] = {}

    def measure(name: str, pipe) -> None:
        if not sizes.smoke:
            pipe("a photo of a cat on a sofa", **call)  # warm-up (kernels, allocator)
        seconds = []
        reset_peak(device)
        for _ in range(max(1, min(repeats, 2))):  # whole generations are long; two are enough for a median
            seconds.append(timed(lambda: pipe("a photo of a cat on a sofa", **call), device))
        results[name] = {
            "seconds_per_generation": statistics.median(seconds),
            "seconds_all": seconds,
            "peak_allocated_gib": peak_gib(device),
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        }
        print(f"lowmem {name}:", {k: v for k, v in results[name].items() if k != "seconds_all"}, flush=True)

    def attempt(names: tuple[str, ...], run: Callable[[], None]) -> None:
        try:
            run()
        except Exception as e:  # one failing mode must not lose the others' figures
            for name in names:
                results.setdefault(name, {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
        finally:
            _free(device)

    def full_then_model_offload() -> None:
        pipe = build_dynaip_pipeline(sizes, device, dtype)
        measure("full", pipe)
        pipe.to("cpu")
        _free(device)
        pipe.enable_model_cpu_offload(device=device)
        measure("model offload", pipe)

    def sequential_offload() -> None:
        if device.type != "cuda":
            results["sequential offload"] = {
                "skipped": "accelerate's sequential offload needs a CUDA device (docs/low_memory.md)"
            }
            return
        pipe = build_dynaip_pipeline(sizes, device, dtype)
        pipe.to("cpu")
        _free(device)
        pipe.enable_sequential_cpu_offload(device=device)
        measure("sequential offload", pipe)

    def int8_then_model_offload() -> None:
        pipe = build_dynaip_pipeline(sizes, device, dtype)
        quantize_transformer(pipe.flux, "int8")
        _free(device)
        measure("int8", pipe)
        pipe.to("cpu")
        _free(device)
        pipe.enable_model_cpu_offload(device=device)
        measure("int8 + model offload", pipe)

    attempt(("full", "model offload"), full_then_model_offload)
    attempt(("sequential offload",), sequential_offload)
    attempt(("int8", "int8 + model offload"), int8_then_model_offload)
    return {"steps": steps, "modes": {name: results.get(name, {"error": "not run"}) for name in LOWMEM_MODES}}


# ----------------------------------------------------------------------------- (d) precompute
@torch.no_grad()
def bench_precompute(sizes: Sizes, device: torch.device, repeats: int) -> list[dict]:
    """Encoder compute of ``dynaip precompute`` per sample: T5-XXL over max_sequence_length tokens,
    CLIP-L text over 77, and the VAE encoder's posterior of a target at the training resolution, with
    the deterministic cuDNN settings FeatureEncoder uses. Tokenising, JPEG decoding and writing are not
    included."""
    from dynaip.train.step import vae_posterior

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    t5, clip_text, vae = build_text_and_vae(sizes, device, dtype)
    rows = []
    for batch in sizes.batches_precompute:
        ids = torch.randint(0, t5.config.vocab_size, (batch, sizes.text_tokens), device=device)
        clip_ids = torch.randint(0, clip_text.config.vocab_size, (batch, 77), device=device)
        tgt = torch.randint(0, 256, (batch, 3, sizes.resolution, sizes.resolution), dtype=torch.uint8, device=device)

        def encode():
            t5(ids)
            clip_text(clip_ids)
            vae_posterior(vae, tgt, device, dtype)

        reset_peak(device)
        encode()  # warm-up
        sec = statistics.median(timed(encode, device) for _ in range(repeats))
        rows.append(
            {
                "batch": batch,
                "seconds_per_batch": sec,
                "samples_per_s": batch / sec,
                "peak_memory_gib": peak_gib(device),
            }
        )
        print(f"precompute batch {batch}: {batch / sec:.2f} samples/s", flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, False
    del t5, clip_text, vae
    return rows


# ----------------------------------------------------------------------------- (c) curation models
def photos(sizes: Sizes, n: int) -> list[np.ndarray]:
    import skimage.data
    from PIL import Image

    names = ("astronaut", "chelsea", "coffee", "rocket")
    h, w = sizes.curate_hw
    return [
        np.asarray(Image.fromarray(getattr(skimage.data, names[i % len(names)])()).convert("RGB").resize((w, h)))
        for i in range(n)
    ]


def build_grounding_dino(sizes: Sizes, device: torch.device, workdir: Path):
    import contextlib
    import io

    import groundingdino
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig
    from transformers import BertConfig, BertModel

    from dynaip.models import offline_tokenizers as tok
    from dynaip.models.grounding_dino import GroundingDinoDetector, read_config
    from dynaip.models.tiny import TINY_GROUNDING_DINO_CONFIG

    bert_dir = workdir / "bert"
    vocab = tok.write_bert_vocab(bert_dir)
    bert = (
        BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        if sizes.smoke
        else BertConfig(vocab_size=max(vocab, 30522))
    )  # bert-base-uncased sizes
    BertModel(bert).save_pretrained(str(bert_dir), safe_serialization=True)
    if sizes.smoke:
        cfg_file = workdir / "gdino.py"
        cfg_file.write_text(TINY_GROUNDING_DINO_CONFIG)
    else:
        cfg_file = Path(groundingdino.__file__).parent / "config" / "GroundingDINO_SwinT_OGC.py"
    args = SLConfig(read_config(cfg_file))  # read as data, never run (dynaip/models/grounding_dino.py)
    args.text_encoder_type = str(bert_dir)
    args.device = str(device)
    with contextlib.redirect_stdout(io.StringIO()):
        model = build_model(args)
    model = model.eval().requires_grad_(False).to(device)
    size, max_size = (96, 128) if sizes.smoke else (800, 1333)
    return GroundingDinoDetector(model, size=size, max_size=max_size, device=device)


def bench_curate(sizes: Sizes, device: torch.device, repeats: int) -> dict:
    """Part (c), in benchmarks/gpu_curate.py (precisions, agreement with fp32, the limit, end to end)."""
    import gpu_curate

    return gpu_curate.bench_curate(sizes, device, repeats)


# ----------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    def f(x, fmt="{:.3f}"):
        return "n/a" if x is None else fmt.format(x)

    lines = [
        f"# GPU suite — {report['device']}",
        "",
        f"torch {report['torch']}, {report['date']}{' — SMOKE RUN (tiny sizes, not a measurement)' if report['smoke'] else ''}",
        "",
    ]
    if "train" in report:
        lines += [
            f"## Training step ({report['resolution']}², gradient checkpointing, world size 1)",
            "",
            "| batch/rank | blocks recomputed | s/step | peak GiB | model TFLOP/step | MFU | HFU |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["train"]:
            if "error" in r:
                lines.append(f"| {r['batch_per_rank']} | {r['blocks_recomputed']} | {r['error']} | | | | |")
                continue
            lines.append(
                f"| {r['batch_per_rank']} | {r['blocks_recomputed']} | {f(r['seconds_per_step'])} | "
                f"{f(r['peak_memory_gib'], '{:.1f}')} | {f(r['model_tflop_per_step'], '{:.1f}')} | "
                f"{f(r['mfu'], '{:.1%}')} | {f(r['hfu'], '{:.1%}')} |"
            )
        lines.append("")
    if "generate" in report:
        g = report["generate"]
        lines += [
            f"## Generation ({report['resolution']}², {report['text_tokens']} text tokens, per denoising step, batch 1)",
            "",
            "| conditioning | s/step | × bare |",
            "|---|---|---|",
        ]
        for name, sec in g["seconds_per_step"].items():
            lines.append(f"| {name} | {f(sec, '{:.4f}')} | {f(g['ratio_to_bare'][name])} |")
        lines += [
            "",
            f"Resident weights {f(g['resident_weights_gib'], '{:.1f}')} GiB; peak {f(g['peak_memory_gib'], '{:.1f}')} GiB "
            f"(T5 encode {f(g['t5_encode_seconds'])} s, VAE decode {f(g['vae_decode_seconds'])} s).",
            "",
        ]
    if "curate" in report:
        import gpu_curate

        lines += gpu_curate.markdown(report["curate"])
    if "precompute" in report:
        lines += [
            f"## Precompute encoders ({report['resolution']}², {report['text_tokens']} T5 tokens)",
            "",
            "| batch | samples/s | peak GiB |",
            "|---|---|---|",
        ]
        for r in report["precompute"]:
            lines.append(f"| {r['batch']} | {f(r['samples_per_s'], '{:.2f}')} | {f(r['peak_memory_gib'], '{:.1f}')} |")
        lines.append("")
    if "synth" in report:
        sy = report["synth"]
        lines += [
            f"## Diptych generation (`dynaip synth`, {sy['width']} × {sy['height']}, {sy['steps']} steps)",
            "",
            f"{f(sy['diptychs_per_minute'], '{:.2f}')} diptychs/min ({f(sy['seconds_per_diptych'], '{:.2f}')} s each), "
            f"peak {f(sy['peak_memory_gib'], '{:.1f}')} GiB.",
            "",
        ]
    if "lowmem" in report:
        lm = report["lowmem"]
        lines += [
            f"## Low-memory generation ({report['resolution']}², one reference, {lm['steps']} steps, "
            "T5 encode to VAE decode)",
            "",
            "| mode | s/generation | peak allocated GiB | peak reserved GiB |",
            "|---|---|---|---|",
        ]
        for name, r in lm["modes"].items():
            if "error" in r or "skipped" in r:
                lines.append(f"| {name} | {r.get('error') or 'skipped: ' + r['skipped']} | | |")
                continue
            lines.append(
                f"| {name} | {f(r['seconds_per_generation'], '{:.2f}')} | {f(r['peak_allocated_gib'], '{:.1f}')} | "
                f"{f(r['peak_reserved_gib'], '{:.1f}')} |"
            )
        lines.append("")
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    """``markdown`` for the eager parts, gpu_compile's tables for the #28 parts."""
    import gpu_compile

    extra = gpu_compile.markdown(report)
    eager = {
        k: v
        for k, v in report.items()
        if not (k == "train" and v and "compile" in v[0]) and not (k == "generate" and "compiled" in v)
    }
    return markdown(eager) + ("\n" + "\n".join(extra) if extra else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for gpu_suite.json and gpu_suite.md")
    ap.add_argument(
        "--parts",
        default="train,generate,curate,precompute",
        help="comma-separated subset of train,generate,curate,precompute,lowmem,synth (lowmem: run it on its own)",
    )
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration (median reported)")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny sizes on any device: checks the script, measures nothing"
    )
    ap.add_argument(
        "--profile", action="store_true", help="also write DIR/train_profile.txt (kernel table of one step)"
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="train and generate with compiled blocks off and on (benchmarks/gpu_compile.py, issue #28)",
    )
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    known = ("train", "generate", "curate", "precompute", "lowmem", "synth", "attention")
    unknown = sorted(set(parts) - set(known))
    if unknown:
        print(f"gpu_suite: unknown parts {unknown}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print(
            "gpu_suite: no CUDA GPU on this machine; it measures full-size models on a GPU only "
            "(use --smoke to check the script on tiny sizes)",
            file=sys.stderr,
        )
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = Sizes(args.smoke)
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "smoke": args.smoke,
        "repeats": args.repeats,
        "resolution": sizes.resolution,
        "text_tokens": sizes.text_tokens,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    benches = {
        "train": lambda *a: bench_train(*a, profile_dir=out if args.profile else None),
        "generate": bench_generate,
        "curate": bench_curate,
        "precompute": bench_precompute,
        "lowmem": bench_lowmem,
        "synth": bench_synth,
    }
    import gpu_compile

    benches["attention"] = gpu_compile.bench_attention
    if args.compile:
        report["compile_backend"] = "inductor" if device.type == "cuda" else "aot_eager"
        benches.update(train=gpu_compile.bench_train_compile, generate=gpu_compile.bench_generate_compile)
    for part in parts:
        t0 = time.perf_counter()
        report[part] = benches[part](sizes, device, args.repeats)
        report[f"{part}_wall_seconds"] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # write after every part, so a later failure keeps what was measured
        (out / "gpu_suite.json").write_text(json.dumps(report, indent=2))
        (out / "gpu_suite.md").write_text(report_markdown(report))
    print(report_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
