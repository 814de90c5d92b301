"""Per-rank GPU memory plan of DynaIP training: which parallel strategy and how much gradient
checkpointing fit 8 × 80 GB at 2 samples per rank (1024², the paper's global batch 16).

    python benchmarks/memory_plan.py                       # prints the Markdown report
    python benchmarks/memory_plan.py --markdown docs/memory.md --json plan.json

Every module size is counted from a meta-device build of the full-size model (no memory, no
download): FLUX.1-dev's transformer (``FLUX_DEV_TRANSFORMER_CONFIG``), the T5-XXL encoder, CLIP-L
text, the FLUX VAE (encoder and decoder counted apart), OpenCLIP ViT-L/14-336's vision tower and
``DynaIPAdapter(DynaIPConfig.full())``. Activations are modelled analytically from the tensor
shapes that diffusers 0.36's ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock`` forwards (with
``DynaIPAttnProcessor``) hand to autograd. ``--markdown`` writes docs/memory.md exactly as printed.

Assumptions (each one is a number or a rule in the code below):

1. Precision: the frozen models (FLUX transformer, T5, CLIP-L text, VAE, CLIP vision) are bf16
   (2 B/param). The adapter trains in fp32 with AdamW: weights 4 B + grads 4 B + exp_avg and
   exp_avg_sq 8 B per parameter. No mixed-precision copy of the adapter is kept (its CA K/V run
   in bf16 on per-call casts of the fp32 weights, counted as activations, see 6).
2. Shapes: 2 samples per rank, 1024² → 4096 image tokens + 512 text tokens, inner width 3072 (24
   heads × 128), MLP ratio 4, 19 double + 38 single blocks; one reference of 577 CLIP tokens per
   sample; CA on text and image rows (``branches="both"``, as the step trains).
3. Frozen weights that only receive input gradients save no activations for their own weight
   gradient: a frozen ``Linear`` keeps just its weight, and ``x * (1 + scale)`` with a modulation
   that needs no gradient keeps just ``scale``. Autograd saves a tensor only for the inputs whose
   gradient it will compute.
4. A block that keeps its activations (the last ``checkpoint_keep_blocks`` of the 57, double-stream
   first, then single-stream) saves, in units u = batch × tokens × 3072 × 2 B over its text + image
   tokens: LayerNorm inputs (single 1 u, double 2 u), GELU(tanh) inputs (4 u), the q/k RMSNorm inputs
   (2 u: PyTorch's fused CUDA RMSNorm saves input and fp32 rstd), FlashAttention's rotated q, k, v
   and output (4 u), and the CA's pre-RoPE query and output (2 u): single 13 u, double 14 u, plus
   per-row fp32 statistics (LayerNorm mean/rstd, RMSNorm rstd, attention logsumexp). RoPE saves
   only cos/sin (shared), the gates and residual adds save nothing large.
5. A gradient-checkpointed block keeps only its inputs (1 u: the text and image hidden states;
   temb and the rotary tables are shared). When backward reaches it, its full activations
   (assumption 4) are recomputed.
6. Each CA stream (one per single block, two per double block: text and image K/V) saves the bf16
   copy of the reference tokens, the fp32 key (RMSNorm input), the bf16 key and value for SDPA, and
   the two bf16 weight casts ``W.to(bf16)`` that ``ReferenceKV`` makes (needed for the gradient into
   the reference tokens) — 37.7 MB of weights per stream whatever the batch.
7. Working set of the block that runs, beyond what it saves: ≈ 11 u in its forward (the GELU
   output, 4 u, is alive while RoPE makes fp32 temporaries of q and k, up to 7 u) and ≈ 9 u in its
   backward (incoming gradient 1 u, proj_out's input gradient 5 u, attention gradients 3 u); the
   plan takes 11 u for both. Estimates from the op order, not measurements. Backward is walked
   block by block from the last: peak = saved activations still alive + the recomputed block + the
   working set + the adapter gradients already written. The end of the forward holds the same
   saved tensors as the start of the backward, so this "forward/backward" phase covers both.
8. Optimizer step: ``torch.optim.AdamW`` (foreach) allocates one temporary of the parameters' size
   (``exp_avg_sq.sqrt()``) while all gradients are alive; gradient clipping adds only per-tensor
   norms.
9. DDP (``gradient_as_bucket_view=False``, the default ``wrap_adapter`` uses) keeps flat gradient
   buckets: one more full fp32 gradient set of the replicated adapter, allocated for the whole run.
   At world size 1 ``wrap_adapter`` returns the adapter itself: no buckets.
10. FSDP2 of the frozen transformer (``fsdp2``, ``fsdp2_full``): 1/8 of the weights per rank, plus
    3 un-sharded units at a time — the block in use, the prefetched next one, and FSDP2's flat
    all-gather buffer that exists until it is copied out — of the largest unit (a double-stream
    block, 0.68 GB), plus the root (embedders, final norm and projection) un-sharded.
11. FSDP2 of the adapter (``fsdp2_adapter``, ``fsdp2_full``): weights, gradients, AdamW states and
    the optimizer temporary are 1/8 per rank; units are the modules whose forward is called (each
    ``ReferenceKV`` and the root: HMoE + projection); 3 un-sharded parameter units (as 10) and 2
    un-sharded gradient units (the gradient and the reduce-scatter input) of the largest unit.
12. Precomputed features (``features``): T5-XXL, CLIP-L text and the VAE encoder are not on the
    training rank. Without them they are resident (bf16), and their encode runs before the
    transformer under ``no_grad``: its working set (≈ 4 full-resolution 128-channel bf16 maps of the
    VAE encoder) is a phase of its own. The CLIP vision tower is on the rank in both cases; its
    forward is ``no_grad``, so only its three returned hidden states stay alive; the HMoE and
    projection save their inputs under bf16 autocast (LayerNorms in fp32). The VAE decoder (used only
    for sample images, outside the step) is listed but not counted.
13. Per-rank peak = resident (weights, AdamW states, DDP buckets, gathered units) + the largest of
    three phases: encode (12), forward/backward (7), optimizer step (8).
14. Overhead outside PyTorch's allocated bytes, a stated constant (not fitted): CUDA context and
    library workspaces 1.0 GiB, NCCL buffers 1.0 GiB at world size > 1, and caching-allocator
    fragmentation 5 % of the allocated peak. The measured cross-check compares allocated bytes
    only (``torch.cuda.max_memory_allocated``), so it excludes this overhead.
15. Capacity: an "80 GB" H100 exposes 79.2 GiB to CUDA; a row over it is marked. The plan keeps a
    margin and budgets 72 GiB per rank (≈ 91 %) for the recommendation.
16. Speed rule for the recommendation: less recomputation is faster (each recomputed block re-runs
    its forward: ≈ 7 ms of a ≈ 1.5 s step at batch 2 on an H100, the measured slope below), so the
    plan takes, with precomputed features, the configuration with the most kept blocks under the
    budget that also fits the card without precomputed features (``features: auto`` may fall back
    to encoding on the rank); ties go to the strategy with the least communication
    (ddp < fsdp2_adapter < fsdp2 < fsdp2_full). FSDP2's all-gathers of the frozen base (≈ 2 × 21 GB
    per rank and step: forward and backward) are expected to overlap with compute: one double block
    is 0.68 GB, ≈ 2 ms at the ≈ 350 GB/s all-gather bandwidth NVLink 4 typically gives (not measured
    here), against ≈ 7 ms for its forward at batch 2 (the recomputation slope).

Nothing is calibrated to the measurements: the constants above were set from the source and the
kernels' documented behaviour, and the cross-check table shows how far the result is from what
``benchmarks/gpu_suite.py`` measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30
BF16, FP32 = 2, 4
ADAMW_STATES = 2  # exp_avg, exp_avg_sq

WORLD = 8
BATCH_PER_RANK = 2
RESOLUTION = 1024
TEXT_TOKENS = 512
CARD_GIB = 79.2  # what CUDA reports for an H100 80GB (85.0e9 bytes)
BUDGET_GIB = 72.0  # the recommendation's limit: headroom for allocator spikes and variance
CONTEXT_GIB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces: outside torch's allocated bytes
NCCL_GIB = 1.0  # NCCL communicator buffers (world size > 1)
FRAGMENTATION = 0.05  # caching allocator: reserved beyond allocated, as a share of the allocated peak
BLOCK_WORKING_UNITS = 11  # assumption 7: max(forward 11 u, backward 9 u)
GATHERED_UNITS = 3  # assumption 10: in use + prefetched + all-gather buffer
GATHERED_GRAD_UNITS = 2  # assumption 11: un-sharded gradient + reduce-scatter input
VAE_ENCODE_MAPS = 4  # assumption 12: full-resolution 128-channel maps alive at once in the VAE encoder

STRATEGIES: dict[str, tuple[bool, bool]] = {
    # name: (frozen transformer sharded, adapter sharded); listed by communication, least first
    "ddp": (False, False),
    "fsdp2_adapter": (False, True),
    "fsdp2": (True, False),
    "fsdp2_full": (True, True),
}
TABLE_ORDER = ("ddp", "fsdp2", "fsdp2_adapter", "fsdp2_full")

# benchmarks/gpu_suite.py on an NVIDIA H100 80GB HBM3 (BENCHMARKS.md "GPU suite", runs 5 and 6): world
# size 1, precomputed features, adapter fp32 + AdamW unsharded, FLUX and CLIP vision bf16.
MEASURED_WORLD1 = (
    # (batch per rank, blocks kept, peak GiB = torch.cuda.max_memory_allocated, seconds per step)
    (1, 0, 49.7, 0.913),
    (2, 0, 49.7, 1.646),
    (2, 19, 56.1, 1.515),
    (2, 28, 62.5, 1.448),
    (1, 57, 63.4, 0.644),  # run 6: nothing recomputed
)


# ----------------------------------------------------------------------------- module sizes
@dataclass(frozen=True)
class ModuleSizes:
    """Parameter counts from the meta-device builds."""

    flux: int
    flux_double_block: int
    flux_single_block: int
    flux_root: int
    """Parameters outside the 57 blocks (embedders, final norm, projection): FSDP2's root unit."""
    num_double: int
    num_single: int
    t5_encoder: int
    clip_text: int
    vae_encoder: int
    vae_decoder: int
    clip_vision: int
    adapter: int
    adapter_double_ca: int
    """One double-stream block's CA (text + image K/V)."""
    adapter_single_ca: int
    adapter_root: int
    """HMoE-FFM + projection."""
    adapter_largest_unit: int
    """Largest module FSDP2 would gather at once: a ReferenceKV or the root."""

    @property
    def num_blocks(self) -> int:
        return self.num_double + self.num_single


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _build_flux() -> Any:
    from diffusers import FluxTransformer2DModel

    from dynaip.models.flux import FLUX_DEV_TRANSFORMER_CONFIG

    return FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER_CONFIG)


def _build_text_encoders() -> tuple[Any, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    # google/t5-v1_1-xxl's encoder and openai/clip-vit-large-patch14's text model, as FLUX.1-dev ships them
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=32128,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=24,
            num_heads=64,
            feed_forward_proj="gated-gelu",
        )
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            projection_dim=768,
        )
    )
    return t5, clip


def _build_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _build_clip_vision() -> Any:
    import open_clip

    return open_clip.create_model("ViT-L-14-336", pretrained=None, device="meta").visual


def _build_adapter() -> Any:
    from dynaip import DynaIPAdapter, DynaIPConfig

    return DynaIPAdapter(DynaIPConfig.full())


def measure_module_sizes() -> ModuleSizes:
    """Builds every full-size model on the meta device and counts its parameters."""
    import logging

    import torch

    from dynaip.adapter.attention import ReferenceKV

    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that no pretrained weights were loaded
    with torch.device("meta"):
        flux = _build_flux()
        t5, clip_text = _build_text_encoders()
        vae = _build_vae()
        clip_vision = _build_clip_vision()
        adapter = _build_adapter()
    blocks = _count(flux.transformer_blocks) + _count(flux.single_transformer_blocks)
    adapter_root = _count(adapter.hmoe) + _count(adapter.proj)
    kv_units = [_count(m) for m in adapter.modules() if isinstance(m, ReferenceKV)]
    return ModuleSizes(
        flux=_count(flux),
        flux_double_block=_count(flux.transformer_blocks[0]),
        flux_single_block=_count(flux.single_transformer_blocks[0]),
        flux_root=_count(flux) - blocks,
        num_double=len(flux.transformer_blocks),
        num_single=len(flux.single_transformer_blocks),
        t5_encoder=_count(t5),
        clip_text=_count(clip_text),
        vae_encoder=_count(vae.encoder),
        vae_decoder=_count(vae.decoder),
        clip_vision=_count(clip_vision),
        adapter=_count(adapter),
        adapter_double_ca=_count(adapter.double_blocks[0]),
        adapter_single_ca=_count(adapter.single_blocks[0]),
        adapter_root=adapter_root,
        adapter_largest_unit=max([adapter_root, *kv_units]),
    )


# ----------------------------------------------------------------------------- activation model
@dataclass(frozen=True)
class Shape:
    """Per-rank step shape; the defaults are the paper's 1024² training at 2 samples per rank."""

    batch: int = BATCH_PER_RANK
    image_tokens: int = (RESOLUTION // 16) ** 2
    text_tokens: int = TEXT_TOKENS
    resolution: int = RESOLUTION
    width: int = 3072
    heads: int = 24
    mlp_ratio: int = 4
    ref_tokens: int = 577
    ref_dim: int = 3072
    clip_width: int = 1024
    clip_layers: int = 3
    expert_dim: int = 1024
    out_channels: int = 64
    vae_channels: int = 128

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    @property
    def unit(self) -> int:
        """u: one bf16 hidden state of the joint sequence (assumption 4)."""
        return self.batch * self.tokens * self.width * BF16


def paper_shape(batch: int = BATCH_PER_RANK) -> Shape:
    """The shape from the models' own configs: FLUX.1-dev's widths and the full adapter's reference
    sizes (so the plan follows them if they change)."""
    from dynaip import DynaIPConfig
    from dynaip.models.flux import FLUX_DEV_TRANSFORMER_CONFIG as flux

    a = DynaIPConfig.full()
    return Shape(
        batch=batch,
        width=flux["num_attention_heads"] * flux["attention_head_dim"],
        heads=flux["num_attention_heads"],
        ref_tokens=a.clip_tokens,
        ref_dim=a.ref_dim,
        clip_width=a.clip_width,
        clip_layers=len(a.clip_layers),
        expert_dim=a.expert_dim,
        out_channels=flux["in_channels"],
    )


def _row_stats(s: Shape, layernorms: int) -> int:
    """fp32 per-row statistics: LayerNorm mean + rstd, q/k RMSNorm rstd per head, logsumexp of the
    block attention and of the CA (per head)."""
    rows = s.batch * s.tokens
    return rows * FP32 * (2 * layernorms + 2 * s.heads + 2 * s.heads)


def ca_stream_bytes(s: Shape) -> int:
    """Saved by one ReferenceKV call and its SDPA (assumption 6)."""
    kv = s.batch * s.ref_tokens * s.width
    keys_values = kv * (FP32 + BF16 + BF16)  # fp32 key (RMSNorm input), bf16 key and value (SDPA)
    refs_bf16 = s.batch * s.ref_tokens * s.ref_dim * BF16  # input of both projections (their weight grads)
    weight_casts = 2 * s.ref_dim * s.width * BF16  # W.to(bf16) of K and V (the gradient into C)
    key_rstd = s.batch * s.ref_tokens * s.heads * FP32
    return keys_values + refs_bf16 + weight_casts + key_rstd


def kept_block_bytes(s: Shape, double: bool) -> int:
    """Everything one un-checkpointed block saves for backward (assumptions 4 and 6)."""
    layernorm_inputs = 2 if double else 1
    units = layernorm_inputs + s.mlp_ratio + 2 + 4 + 2  # LN, GELU, q/k RMSNorm, flash q k v out, CA q + out
    streams = 2 if double else 1
    return units * s.unit + _row_stats(s, layernorm_inputs) + streams * ca_stream_bytes(s)


def checkpointed_block_bytes(s: Shape) -> int:
    """A checkpointed block keeps its text + image input hidden states (assumption 5)."""
    return s.unit


def outside_blocks_bytes(s: Shape) -> int:
    """Saved outside the blocks for the whole backward: the final LayerNorm's input (it views the last
    block's joint output), the fp32 prediction and target of the MSE loss, the CLIP vision hidden
    states, and the HMoE + projection under bf16 autocast (assumption 12)."""
    final_norm = s.unit
    loss = 2 * s.batch * s.image_tokens * s.out_channels * FP32
    return final_norm + loss + clip_and_hmoe_bytes(s)


def clip_and_hmoe_bytes(s: Shape) -> int:
    """CLIP vision outputs (bf16) + what the adapter's reference encoder saves + C itself."""
    ref = s.batch * s.ref_tokens
    clip_out = s.clip_layers * ref * s.clip_width * BF16
    # per expert: bf16 input cast, GELU input (bf16), LayerNorm input (fp32), stacked output (fp32)
    experts = s.clip_layers * ref * (s.clip_width * BF16 + s.expert_dim * (BF16 + FP32 + FP32))
    # projection: bf16 input cast, LayerNorm input (fp32); C (fp32) lives through the forward
    proj = ref * (s.expert_dim * BF16 + s.ref_dim * FP32 + s.ref_dim * FP32)
    return clip_out + experts + proj


def vae_encode_bytes(s: Shape) -> int:
    """Working set of the VAE encode at full resolution (assumption 12)."""
    return VAE_ENCODE_MAPS * s.batch * s.vae_channels * s.resolution * s.resolution * BF16


# ----------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """One row: per-rank bytes of each component for a strategy, feature setting and checkpointing."""

    strategy: str
    features: bool
    world: int
    keep: int
    recomputed: int
    flux_weights: int
    other_frozen: int
    adapter_state: int
    """fp32 weights + AdamW states (+ gathered units when sharded)."""
    ddp_buckets: int
    grads: int
    activations: int
    """Activations alive at the forward/backward peak (with the recomputed block and working set)."""
    clip_hmoe_activations: int
    optimizer_temp: int
    step_peak: int
    """max(encode, backward activations + gradients written so far, all gradients + optimizer temp)."""
    peak_phase: str
    overhead: int
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def resident(self) -> int:
        return self.flux_weights + self.other_frozen + self.adapter_state + self.ddp_buckets

    @property
    def allocated(self) -> int:
        """What ``torch.cuda.max_memory_allocated`` would report."""
        return self.resident + self.step_peak

    @property
    def total(self) -> int:
        return self.allocated + self.overhead


def frozen_flux_bytes(z: ModuleSizes, world: int, sharded: bool) -> int:
    if not sharded:
        return z.flux * BF16
    largest = max(z.flux_double_block, z.flux_single_block)
    return (z.flux * BF16) // world + GATHERED_UNITS * largest * BF16 + z.flux_root * BF16


def other_frozen_bytes(z: ModuleSizes, features: bool) -> int:
    encoders = 0 if features else z.t5_encoder + z.clip_text + z.vae_encoder
    return (z.clip_vision + encoders) * BF16


def adapter_state_bytes(z: ModuleSizes, world: int, sharded: bool) -> int:
    per_param = FP32 * (1 + ADAMW_STATES)
    if not sharded:
        return z.adapter * per_param
    return (z.adapter * per_param) // world + GATHERED_UNITS * z.adapter_largest_unit * FP32


def block_grad_bytes(z: ModuleSizes, double: bool, world: int, sharded: bool) -> int:
    params = z.adapter_double_ca if double else z.adapter_single_ca
    return params * FP32 // (world if sharded else 1)


def backward_peak(z: ModuleSizes, s: Shape, keep: int, world: int, sharded_adapter: bool) -> tuple[int, int]:
    """Walks backward from the last block (assumption 7); its first step is also the end of the
    forward. Returns (peak of activations + gradients written so far, the activation part at that peak)."""
    double = [i < z.num_double for i in range(z.num_blocks)]
    kept = [i >= z.num_blocks - keep for i in range(z.num_blocks)]
    saved = [kept_block_bytes(s, d) if k else checkpointed_block_bytes(s) for d, k in zip(double, kept)]
    alive = sum(saved) + outside_blocks_bytes(s)
    grads = GATHERED_GRAD_UNITS * z.adapter_largest_unit * FP32 if sharded_adapter else 0
    best, best_act = 0, 0
    for i in reversed(range(z.num_blocks)):
        recompute = 0 if kept[i] else kept_block_bytes(s, double[i])
        act = alive + recompute + BLOCK_WORKING_UNITS * s.unit
        if act + grads > best:
            best, best_act = act + grads, act
        alive -= saved[i]
        grads += block_grad_bytes(z, double[i], world, sharded_adapter)
    return best, best_act


def make_plan(z: ModuleSizes, s: Shape, strategy: str, features: bool, world: int, keep: int) -> Plan:
    """Per-rank memory of one configuration. At world size 1 nothing is sharded or wrapped in DDP
    (``apply_strategy`` only shards when distributed; ``wrap_adapter`` returns the adapter)."""
    base_sharded, adapter_sharded = STRATEGIES[strategy] if world > 1 else (False, False)
    shard = world if adapter_sharded else 1
    grads = z.adapter * FP32 // shard + (GATHERED_GRAD_UNITS * z.adapter_largest_unit * FP32 if adapter_sharded else 0)
    optimizer_temp = z.adapter * FP32 // shard
    bwd, act = backward_peak(z, s, keep, world, adapter_sharded)
    phases = {"forward/backward": bwd, "optimizer step": grads + optimizer_temp}
    if not features:
        phases["encode"] = vae_encode_bytes(s)
    phase = max(phases, key=phases.__getitem__)
    plan = Plan(
        strategy=strategy,
        features=features,
        world=world,
        keep=keep,
        recomputed=z.num_blocks - keep,
        flux_weights=frozen_flux_bytes(z, world, base_sharded),
        other_frozen=other_frozen_bytes(z, features),
        adapter_state=adapter_state_bytes(z, world, adapter_sharded),
        ddp_buckets=z.adapter * FP32 if world > 1 and not adapter_sharded else 0,
        grads=grads,
        activations=act,
        clip_hmoe_activations=clip_and_hmoe_bytes(s),
        optimizer_temp=optimizer_temp,
        step_peak=phases[phase],
        peak_phase=phase,
        overhead=0,
        phases=phases,
    )
    plan.overhead = overhead_bytes(plan.allocated, world)
    return plan


def overhead_bytes(allocated: int, world: int) -> int:
    """Assumption 14."""
    fixed = CONTEXT_GIB + (NCCL_GIB if world > 1 else 0.0)
    return int(fixed * GIB + FRAGMENTATION * allocated)


def largest_keep(z: ModuleSizes, s: Shape, strategy: str, features: bool, limit_gib: float) -> int | None:
    """The most blocks that can keep their activations with the per-rank total under ``limit_gib``."""
    for keep in range(z.num_blocks, -1, -1):
        if make_plan(z, s, strategy, features, WORLD, keep).total <= limit_gib * GIB:
            return keep
    return None


def recommend(z: ModuleSizes, s: Shape) -> dict[str, Any]:
    """Assumption 16: most kept blocks under the budget with precomputed features, still within the
    card without them; ties to the strategy with the least communication (STRATEGIES order)."""
    best: tuple[int, int, str] | None = None
    for rank, strategy in enumerate(STRATEGIES):
        keep = largest_keep(z, s, strategy, True, BUDGET_GIB)
        fallback = largest_keep(z, s, strategy, False, CARD_GIB)
        if keep is None or fallback is None:
            continue
        keep = min(keep, fallback)
        if best is None or (keep, -rank) > (best[0], -best[1]):
            best = (keep, rank, strategy)
    if best is None:
        raise RuntimeError("no strategy fits the budget even with every block recomputed")
    keep, _, strategy = best
    with_features = make_plan(z, s, strategy, True, WORLD, keep)
    without = make_plan(z, s, strategy, False, WORLD, keep)
    return {
        "strategy": strategy,
        "gradient_checkpointing": keep < z.num_blocks,
        "checkpoint_keep_blocks": keep,
        "recomputed_blocks": z.num_blocks - keep,
        "total_gib_features": with_features.total / GIB,
        "total_gib_no_features": without.total / GIB,
    }


# ----------------------------------------------------------------------------- report
def build_report(z: ModuleSizes | None = None) -> dict[str, Any]:
    """Everything the Markdown and JSON outputs show."""
    z = z or measure_module_sizes()
    s = paper_shape()
    rows = [make_plan(z, s, strategy, features, WORLD, 0) for strategy in TABLE_ORDER for features in (True, False)]
    keeps = [largest_keep_row(z, s, st, f) for st in TABLE_ORDER for f in (True, False)]
    world1 = []
    for batch, keep, measured, seconds in MEASURED_WORLD1:
        p = make_plan(z, paper_shape(batch), "ddp", True, 1, keep)
        world1.append(
            {
                "batch": batch,
                "keep": keep,
                "predicted_gib": p.allocated / GIB,
                "phase": p.peak_phase,
                "measured_gib": measured,
                "seconds_per_step": seconds,
            }
        )
    return {
        "world": WORLD,
        "batch_per_rank": s.batch,
        "resolution": s.resolution,
        "card_gib": CARD_GIB,
        "budget_gib": BUDGET_GIB,
        "module_sizes": asdict(z),
        "shape": asdict(s),
        "rows": [plan_dict(p) for p in rows],
        "largest_keep": keeps,
        "world1": world1,
        "recompute_seconds_per_block": recompute_slope(z.num_blocks),
        "recommendation": recommend(z, s),
    }


def largest_keep_row(z: ModuleSizes, s: Shape, strategy: str, features: bool) -> dict[str, Any]:
    """The largest ``checkpoint_keep_blocks`` under the budget, and the total without any checkpointing."""
    keep = largest_keep(z, s, strategy, features, BUDGET_GIB)
    total = None if keep is None else make_plan(z, s, strategy, features, WORLD, keep).total / GIB
    no_ckpt = make_plan(z, s, strategy, features, WORLD, z.num_blocks).total / GIB
    return {
        "strategy": strategy,
        "features": features,
        "keep": keep,
        "total_gib": total,
        "no_checkpointing_gib": no_ckpt,
    }


def plan_dict(p: Plan) -> dict[str, Any]:
    d = asdict(p)
    d.update(
        resident=p.resident,
        allocated=p.allocated,
        total=p.total,
        total_gib=p.total / GIB,
        fits_card=p.total <= CARD_GIB * GIB,
    )
    return d


def recompute_slope(num_blocks: int) -> float:
    """Seconds per recomputed block at batch 2, from the measured steps (a least-squares line)."""
    pts = [(num_blocks - keep, sec) for batch, keep, _, sec in MEASURED_WORLD1 if batch == 2]
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _fits(total_gib: float) -> str:
    return "yes" if total_gib <= CARD_GIB else "**NO: over 80 GB**"


def _sizes_table(z: dict[str, int]) -> list[str]:
    rows = [
        ("FLUX.1-dev transformer", z["flux"], BF16),
        ("one double-stream block", z["flux_double_block"], BF16),
        ("one single-stream block", z["flux_single_block"], BF16),
        ("outside the blocks (FSDP2 root)", z["flux_root"], BF16),
        ("T5-XXL encoder", z["t5_encoder"], BF16),
        ("CLIP-L text", z["clip_text"], BF16),
        ("VAE encoder", z["vae_encoder"], BF16),
        ("VAE decoder (not counted)", z["vae_decoder"], BF16),
        ("OpenCLIP ViT-L/14-336 vision", z["clip_vision"], BF16),
        ("DynaIP adapter", z["adapter"], FP32),
        ("one double-stream block's CA", z["adapter_double_ca"], FP32),
        ("one single-stream block's CA", z["adapter_single_ca"], FP32),
        ("HMoE-FFM + projection", z["adapter_root"], FP32),
    ]
    out = ["| module | parameters | dtype | weights GiB |", "|---|---|---|---|"]
    for name, n, b in rows:
        out.append(f"| {name} | {n:,} | {'bf16' if b == BF16 else 'fp32'} | {n * b / GIB:.2f} |")
    return out


def _plan_table(report: dict[str, Any]) -> list[str]:
    out = [
        "| strategy | features | FLUX weights | other frozen | adapter w + AdamW | DDP buckets | grads | "
        "activations | CLIP + HMoE act. | optimizer temp | step peak (phase) | overhead | **total** | fits 80 GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        cells = [
            r["strategy"],
            "precomputed" if r["features"] else "on rank",
            *(
                _gib(r[k])
                for k in ("flux_weights", "other_frozen", "adapter_state", "ddp_buckets", "grads", "activations")
            ),
            f"{r['clip_hmoe_activations'] / GIB:.2f}",
            _gib(r["optimizer_temp"]),
            f"{_gib(r['step_peak'])} ({r['peak_phase']})",
            _gib(r["overhead"]),
            f"**{r['total_gib']:.1f}**",
            _fits(r["total_gib"]),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _keep_table(report: dict[str, Any]) -> list[str]:
    blocks = report["module_sizes"]["num_double"] + report["module_sizes"]["num_single"]
    out = [
        f"| strategy | features | largest checkpoint_keep_blocks ≤ {report['budget_gib']:.0f} GiB | "
        "blocks recomputed | total GiB | total without checkpointing | without checkpointing fits 80 GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in report["largest_keep"]:
        feats = "precomputed" if k["features"] else "on rank"
        head = f"| {k['strategy']} | {feats} | "
        none = f"{k['no_checkpointing_gib']:.1f} | {_fits(k['no_checkpointing_gib'])} |"
        if k["keep"] is None:
            out.append(head + "does not fit | | | " + none)
        else:
            out.append(head + f"{k['keep']} | {blocks - k['keep']} | {k['total_gib']:.1f} | " + none)
    return out


def _world1_table(report: dict[str, Any]) -> list[str]:
    out = [
        "| batch/rank | blocks kept | predicted GiB (peak phase) | measured GiB | predicted − measured |",
        "|---|---|---|---|---|",
    ]
    for w in report["world1"]:
        out.append(
            f"| {w['batch']} | {w['keep']} | {w['predicted_gib']:.1f} ({w['phase']}) | "
            f"{w['measured_gib']:.1f} | {w['predicted_gib'] - w['measured_gib']:+.1f} |"
        )
    return out


def _assumptions() -> list[str]:
    doc = __doc__ or ""
    start = doc.index("Assumptions")
    return doc[start:].strip().splitlines()


def _recommendation(report: dict[str, Any]) -> list[str]:
    rec, z = report["recommendation"], report["module_sizes"]
    blocks = z["num_double"] + z["num_single"]
    replicated = z["adapter"] * FP32 * (2 + ADAMW_STATES) / GIB
    return [
        f"**`strategy: {rec['strategy']}`, `gradient_checkpointing: {str(rec['gradient_checkpointing']).lower()}`, "
        f"`checkpoint_keep_blocks: {rec['checkpoint_keep_blocks']}`** ({rec['recomputed_blocks']} of {blocks} "
        f"blocks recomputed): {rec['total_gib_features']:.1f} GiB per rank with precomputed features, "
        f"{rec['total_gib_no_features']:.1f} GiB if T5, CLIP-L and the VAE encoder have to run on the rank. "
        "`jobs/configs/paper.yaml` uses it.",
        "",
        f"Rule: with precomputed features, keep as many blocks as fit under {report['budget_gib']:.0f} GiB (of the "
        f"card's {report['card_gib']} GiB; the rest is headroom for allocator spikes and this model's error), "
        "provided the same setting still fits the card without precomputed features (`features: auto` may fall "
        "back to encoding on the rank); among equals, the strategy with the least communication (ddp < "
        "fsdp2_adapter < fsdp2 < fsdp2_full). Less recomputation is faster: each recomputed block costs ≈ "
        f"{report['recompute_seconds_per_block'] * 1000:.1f} ms per step at batch 2 (slope of the measured H100 "
        f"steps below). Replicated, the adapter's weights, gradients and AdamW states take {replicated:.1f} GiB per "
        f"rank (DDP's buckets {z['adapter'] * FP32 / GIB:.1f} GiB more) and the frozen transformer "
        f"{z['flux'] * BF16 / GIB:.1f} GiB; sharding both over 8 ranks is what frees the room to keep activations.",
    ]


def _notes(report: dict[str, Any]) -> list[str]:
    return [
        "- The world-size-1 cross-check covers the replicated layout only. The DDP buckets and the FSDP2 terms "
        "(sharded shares, gathered units) follow assumptions 9–11 and are not measured yet.",
        "- DDP with `gradient_as_bucket_view=True` would make the gradients views into the buckets and save the "
        "'DDP buckets' column (ddp, fsdp2).",
        "- Not counted: evaluation losses and sample images. They run under `no_grad` between steps, after the "
        "step's activations and gradients are freed; a `no_grad` forward keeps no saved tensors, only one block's "
        "working set (a few GiB at 8 samples), far below a training step's forward/backward peak.",
    ]


def render_markdown(report: dict[str, Any]) -> str:
    s, z = report["shape"], report["module_sizes"]
    blocks = z["num_double"] + z["num_single"]
    lines = [
        "# Memory plan: per-rank GPU memory of DynaIP training",
        "",
        "<!-- Written by `python benchmarks/memory_plan.py --markdown docs/memory.md`; "
        "edit the script, not this file. -->",
        "",
        f"World size {report['world']} × H100 80 GB, {report['batch_per_rank']} samples per rank at "
        f"{report['resolution']}² ({s['image_tokens']} image + {s['text_tokens']} text tokens, "
        f"inner width {s['width']}, {blocks} blocks), frozen models bf16, adapter fp32 + AdamW. "
        "All figures are GiB (2³⁰ bytes) per rank, "
        "counted by `benchmarks/memory_plan.py` from meta-device builds of the full-size models and an analytic "
        "activation model (assumptions below). Re-run (CPU only, no download): "
        "`python benchmarks/memory_plan.py --markdown docs/memory.md [--json plan.json]`.",
        "",
        "## Recommendation",
        "",
        *_recommendation(report),
        "",
        "## Per-rank memory with every block recomputed (`checkpoint_keep_blocks: 0`)",
        "",
        *_plan_table(report),
        "",
        "total = FLUX weights + other frozen + adapter w + AdamW + DDP buckets + step peak + overhead. The step peak "
        "is the largest phase: forward/backward (activations + adapter gradients written so far), optimizer step (all "
        "gradients + AdamW's temporary) or, without precomputed features, the encode. 'other frozen' is the CLIP "
        "vision tower, plus T5-XXL, CLIP-L text and the VAE encoder when features are encoded on the rank. "
        "'activations' (at the forward/backward peak) includes 'CLIP + HMoE act.'.",
        "",
        "## How many blocks can keep their activations",
        "",
        *_keep_table(report),
        "",
        "## Cross-check against the measured H100 steps (world size 1)",
        "",
        "`benchmarks/gpu_suite.py` (BENCHMARKS.md, GPU suite runs 5 and 6): one H100, precomputed features, adapter fp32 + "
        "AdamW unsharded (no DDP at world size 1), FLUX and CLIP vision bf16. Measured = "
        "`torch.cuda.max_memory_allocated`; predicted = this script's allocated bytes for the same setting "
        "(overhead excluded). Nothing was fitted to these numbers.",
        "",
        *_world1_table(report),
        "",
        "## Notes",
        "",
        *_notes(report),
        "",
        "## Module sizes (meta-device builds)",
        "",
        *_sizes_table(z),
        "",
        "## Assumptions",
        "",
        "From the script's docstring:",
        "",
        *_assumptions(),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--markdown", type=Path, help="write the report here (docs/memory.md)")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args(argv)
    report = build_report()
    text = render_markdown(report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
