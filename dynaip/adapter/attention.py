"""Image cross-attention (CA) into FLUX blocks, with Dynamic Decoupling and multi-subject masks.

Per block, the reference tokens C get their own bias-free K and V projections (plus an RMSNorm on
keys over head_dim, as FLUX normalises its keys); the block's own normalised queries attend to
them, and the result is added to the block's attention output *before* its output projection:

    out = MMA(X) + Σ_i λ_i · M_i · CA(X, C_i)          (paper Eq. 2-5, 9)

Zero-init of V makes a fresh adapter an exact no-op (CA ≡ 0), so training starts from FLUX itself.
K and V have no bias, so an all-zero C row gives zero keys and values and hence exactly zero CA;
the trainer relies on that for image-CFG dropout (it zeroes C for dropped samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    _get_qkv_projections,
    apply_rotary_emb,
    dispatch_attention_fn,
)
from torch import nn

from dynaip.geometry import resample_mask

BRANCHES = ("image", "text", "both")
CONDITIONING_KWARG = "dynaip_conditioning"
"""Name under which the active conditioning travels in the transformer's ``joint_attention_kwargs``
(see ``DynaIPAdapter.attach``): diffusers passes those kwargs into every block call, also into the
gradient-checkpointed ones, so a block recomputed during backward sees the same conditioning."""


def _tensor_version(t: torch.Tensor) -> tuple:
    """Identity + in-place-modification counter (inference-mode tensors have no counter). An FSDP2
    shard (DTensor) is identified by its local tensor, which owns the storage."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return (id(t), local.data_ptr(), None if local.is_inference() else local._version)


class ReferenceKV(nn.Module):
    """Bias-free K/V projections of the reference tokens, with FLUX-style RMSNorm on keys.

    ``forward(c)``: ``(..., Lc, Dc)`` → keys and values ``(..., H, Lc, Dh)``.
    """

    def __init__(self, ref_dim: int, num_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.to_k = nn.Linear(ref_dim, num_heads * head_dim, bias=False)
        self.to_v = nn.Linear(ref_dim, num_heads * head_dim, bias=False)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        # Zero V: CA(X, C) == 0 for every input, so attaching a fresh adapter leaves FLUX exactly unchanged.
        nn.init.zeros_(self.to_v.weight)

    def forward(self, c: torch.Tensor, compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``compute_dtype`` (training: the frozen base's bf16) runs the projections in that dtype on
        casts of the (fp32 master) weights, so the transformer itself needs no autocast; the key
        RMSNorm stays in the weights' precision."""
        w_dtype = self.to_k.weight.dtype
        dt = compute_dtype or w_dtype
        c = c.to(dt)
        wk, wv, wn = self.to_k.weight, self.to_v.weight, self.norm_k.weight
        if wk.device != c.device:  # the adapter stays on the CPU under diffusers' CPU offload: follow C's device
            wk, wv, wn = wk.to(c.device), wv.to(c.device), None if wn is None else wn.to(c.device)
        k = F.linear(c, wk.to(dt)).unflatten(-1, (self.num_heads, self.head_dim))  # (..., Lc, H, Dh)
        k = F.rms_norm(k.to(w_dtype), (self.head_dim,), wn, self.norm_k.eps).to(dt)  # = self.norm_k
        v = F.linear(c, wv.to(dt)).unflatten(-1, (self.num_heads, self.head_dim))  # (..., Lc, H, Dh)
        return k.transpose(-3, -2), v.transpose(-3, -2)  # (..., H, Lc, Dh)

    def version(self) -> tuple:
        """Changes whenever a weight is modified in place (optimizer step, load_state_dict) or replaced."""
        return tuple(_tensor_version(p) for p in self.parameters())


class BlockReferenceAttention(nn.Module):
    """The CA weights of one FLUX block.

    ``kv`` serves the image stream of a double-stream block, or the whole joint sequence of a
    single-stream block. ``text_kv`` (double-stream blocks with ``separate_stream_kv``) serves the
    text stream, mirroring FLUX's separate per-stream weights there.
    """

    def __init__(self, ref_dim: int, num_heads: int, head_dim: int, eps: float, text_stream: bool):
        super().__init__()
        self.kv = ReferenceKV(ref_dim, num_heads, head_dim, eps)
        self.text_kv = ReferenceKV(ref_dim, num_heads, head_dim, eps) if text_stream else None

    def stream(self, name: str) -> ReferenceKV:
        return self.text_kv if (name == "text" and self.text_kv is not None) else self.kv


@dataclass
class Conditioning:
    """Everything one ``adapter.conditioning(...)`` block sets; caches live and die with it."""

    refs: list[torch.Tensor]
    """N reference token sets (Bc, Lc, Dc), one per subject (Bc = 1 broadcasts over the batch)."""
    scales: torch.Tensor
    """(N,) λ_i, fp32."""
    masks: list[torch.Tensor] | None
    """Per-subject pixel masks (H, W) or (B, H, W), or None = every image token."""
    branches: str
    image_size: tuple[int, int] | None
    latent_downsample: int
    kv_cache: dict = field(default_factory=dict)
    weight_cache: dict = field(default_factory=dict)
    seen_image_tokens: int | None = None
    """Image-token count recorded by double-stream blocks (used by single-stream blocks to split)."""
    image_guidance_scale: float = 1.0
    """Image CFG: each transformer call also runs the zero-C (no reference) branch and returns
    ``uncond + s · (cond − uncond)``; 1.0 = off (one call, exactly as without image CFG)."""
    _unconditional: "Conditioning | None" = field(default=None, repr=False)

    def unconditional(self) -> "Conditioning":
        """The image-CFG unconditional branch: the same masks, scales and branches with every reference
        zeroed — the zero-C path of training's image dropout (bias-free K/V → exactly zero CA)."""
        if self._unconditional is None:
            self._unconditional = Conditioning(
                refs=[torch.zeros_like(c) for c in self.refs],
                scales=self.scales,
                masks=self.masks,
                branches=self.branches,
                image_size=self.image_size,
                latent_downsample=self.latent_downsample,
            )
        return self._unconditional

    @property
    def num_subjects(self) -> int:
        return len(self.refs)

    def stacked_refs(self) -> torch.Tensor:
        """(N, Bc, Lc, Dc); Bc is 1 only if every reference has batch 1."""
        b = max(c.shape[0] for c in self.refs)
        return torch.stack([c.expand(b, -1, -1) for c in self.refs])

    @property
    def to_image(self) -> bool:
        return self.branches in ("image", "both")

    @property
    def to_text(self) -> bool:
        return self.branches in ("text", "both")

    def grid(self) -> tuple[int, int] | None:
        if self.image_size is None:
            return None
        h, w = self.image_size
        return h // self.latent_downsample, w // self.latent_downsample

    def image_tokens(self, total: int | None = None) -> int:
        """Number of image tokens; ``total`` = joint sequence length of a single-stream block."""
        grid = self.grid()
        n = grid[0] * grid[1] if grid is not None else self.seen_image_tokens
        if n is None:
            raise ValueError(
                "Cannot split the single-stream sequence into text and image tokens: pass "
                "image_size=(H, W) to adapter.conditioning(...)"
            )
        if total is not None and not 0 < n <= total:
            raise ValueError(
                f"image_size={self.image_size} gives {n} image tokens but the block sequence has "
                f"{total} tokens; pass the pixel size of the generated image"
            )
        return n

    def _kv_key(self, module: ReferenceKV) -> tuple:
        # Invalidate when C or the weights change in place; a new conditioning gets a new dict anyway.
        return (tuple(_tensor_version(c) for c in self.refs), module.version())

    def reference_kv(self, module: ReferenceKV, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, Bc, H, Lc, Dh) keys and values of all subjects, computed once per conditioning.

        Cached only without autograd (inference): with grad on, a cached graph could be reused
        after its backward. Training opens one conditioning per step, so nothing is lost.
        """
        if torch.is_grad_enabled():
            return module(self.stacked_refs(), compute_dtype=dtype)
        key = self._kv_key(module)
        hit = self.kv_cache.get(id(module))
        if hit is None or hit[0] != key or hit[1].dtype != dtype:
            k, v = module(self.stacked_refs())
            hit = (key, k.to(dtype), v.to(dtype))
            self.kv_cache[id(module)] = hit
        return hit[1], hit[2]

    def image_weights(self, batch: int, n_img: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(N, B, n_img) = λ_i · M_i on the packed token grid."""
        cache_key = (batch, n_img, dtype, device)
        if cache_key in self.weight_cache:
            return self.weight_cache[cache_key]
        lam = self.scales.to(device, non_blocking=True)[:, None, None]  # (N, 1, 1); no wait for the device
        if self.masks is None:
            w = lam.expand(-1, batch, n_img)
        else:
            grid = self.grid()
            if grid is None or grid[0] * grid[1] != n_img:
                raise ValueError(
                    f"image_size={self.image_size} gives a {grid} token grid but the transformer got "
                    f"{n_img} image tokens; pass the generated image's (H, W) as image_size"
                )
            rows = []
            for i, m in enumerate(self.masks):
                mi = resample_mask(m.to(device), grid)  # (Bm, n_img)
                if mi.shape[0] not in (1, batch):
                    raise ValueError(f"mask {i} has batch {mi.shape[0]}; expected 1 or {batch}")
                rows.append(mi.float().expand(batch, -1))
            w = lam * torch.stack(rows)  # (N, B, n_img)
        w = w.to(dtype)
        self.weight_cache[cache_key] = w
        return w

    def image_rows(self, batch: int, n_img: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor | None]:
        """Per subject: None when every image row has a nonzero weight, else the indices of those that
        do (computed once per conditioning, so no per-step host sync)."""
        cache_key = ("rows", batch, n_img, dtype, device)
        if cache_key not in self.weight_cache:
            rows: list[torch.Tensor | None] = []
            if self.masks is None:  # weights are λ_i everywhere: decided on the host, no device sync
                for lam in self.scales.tolist():
                    rows.append(None if lam != 0 else torch.empty(0, dtype=torch.long, device=device))
            else:
                for wi in self.image_weights(batch, n_img, dtype, device):  # (B, n_img)
                    active = (wi != 0).any(dim=0)
                    rows.append(None if bool(active.all()) else active.nonzero().flatten())
            self.weight_cache[cache_key] = rows
        return self.weight_cache[cache_key]

    def folded_scales(
        self, key: tuple, weights: torch.Tensor, rows: list[torch.Tensor | None] | None
    ) -> list[float | None]:
        """Per subject: λ_i when its weight is exactly λ_i on every row it acts on (no mask, or a mask
        shared by the batch), so ``reference_attention`` can fold λ_i into V and skip the per-row
        multiply; None when the rows need their own weights. Computed once per conditioning and key."""
        cache_key = ("folded", *key)
        if cache_key not in self.weight_cache and self.masks is None and len(weights) == len(self.refs):
            # no masks: every row of subject i weighs λ_i (text rows too), known on the host without a sync
            self.weight_cache[cache_key] = self.scales.tolist()
        if cache_key not in self.weight_cache:
            lams = self.scales.tolist()
            folded: list[float | None] = []
            for i, wi in enumerate(weights):  # (B, L)
                idx = rows[i] if rows is not None else None
                on = wi if idx is None else wi.index_select(1, idx)
                folded.append(lams[i] if bool((on == on.new_tensor(lams[i])).all()) else None)
            self.weight_cache[cache_key] = folded
        return self.weight_cache[cache_key]

    def text_weights(self, batch: int, n_txt: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(N, B, n_txt) = λ_i: text rows get the unmasked sum over subjects."""
        return self.scales.to(device, non_blocking=True).to(dtype)[:, None, None].expand(-1, batch, n_txt)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    rows: list[torch.Tensor | None] | None = None,
    folded: list[float | None] | None = None,
) -> torch.Tensor:
    """Σ_i weights_i · SDPA(q, k_i, v_i) over the N subjects.

    q: (B, Lq, H, Dh); k, v: (N, Bk, H, Lc, Dh) with Bk in {1, B}; weights: (N, B, Lq).
    rows: per subject, None (every query row) or the indices of the rows where its weight is nonzero
    (``Conditioning.image_rows``): subject i's attention runs on those rows only, so N subjects with
    disjoint masks cost about as much as one. folded: per subject, λ_i when its weight is λ_i on all
    of its rows (``Conditioning.folded_scales``): then λ_i·SDPA(q, k, v) = SDPA(q, k, λ_i·v) is
    computed by scaling the Lc reference values instead of the Lq output rows, which saves a full
    pass over the output per block (measured on an H100: see BENCHMARKS.md). Returns (B, Lq, H*Dh).
    One SDPA per subject (N is a handful): measured on CPU this beats one batched SDPA over copies of
    q and an einsum reduction.
    """
    b = q.shape[0]
    if k.shape[1] not in (1, b):
        raise ValueError(
            f"Reference batch {k.shape[1]} does not match the transformer batch {b}; give C with batch 1 or {b}"
        )
    qh = q.transpose(1, 2)  # (B, H, Lq, Dh)
    k, v, weights = k.to(q.dtype), v.to(q.dtype), weights.to(q.dtype)
    out = None
    for i in range(k.shape[0]):
        lam = folded[i] if folded is not None else None
        ki, vi = k[i].expand(b, -1, -1, -1), v[i].expand(b, -1, -1, -1)
        if lam is not None and lam != 1.0:
            vi = vi * lam
        idx = rows[i] if rows is not None else None
        if idx is None:
            o = F.scaled_dot_product_attention(qh, ki, vi)  # (B, H, Lq, Dh)
            if lam is None:
                o = o * weights[i][:, None, :, None]  # λ_i · M_i per query row
            out = o if out is None else out + o
            continue
        if out is None:
            out = torch.zeros_like(qh)
        if idx.numel() == 0:  # λ_i = 0 or an empty mask: nothing to add
            continue
        o = F.scaled_dot_product_attention(qh.index_select(2, idx), ki, vi)  # (B, H, l_i, Dh)
        if lam is None:
            o = o * weights[i].index_select(1, idx)[:, None, :, None]
        out.index_add_(2, idx, o)
    return out.transpose(1, 2).flatten(2)  # (B, Lq, H*Dh)


class ConditioningSlot:
    """Shared holder of the active ``Conditioning`` (None = the adapter is a pass-through)."""

    def __init__(self) -> None:
        self.active: Conditioning | None = None


class DynaIPAttnProcessor(FluxAttnProcessor):
    """FluxAttnProcessor plus the block's image cross-attention.

    Deliberately not an ``nn.Module``: diffusers registers module processors as children of the
    attention layer, which would copy adapter weights into the transformer's state_dict and let
    ``transformer.requires_grad_(False)`` freeze them. The adapter owns the weights; this object
    only points at them.

    Without an active conditioning it defers to FLUX's processor, so results are bit-identical.
    """

    def __init__(self, block: BlockReferenceAttention, slot: ConditioningSlot, double_stream: bool):
        super().__init__()
        self.block = block
        self.slot = slot
        self.double_stream = double_stream

    @torch.compiler.disable
    def _plan(self, cond: Conditioning, stream: str, where: str, q: torch.Tensor, n_txt: int, n_img: int):
        """What one cross-attention needs from the conditioning: (K, V, weights, rows, folded).

        ``where``: ``image`` (the image rows), ``text`` (the text rows) or ``joint`` (a single-stream
        block's [text, image] rows with ``branches="both"``). Kept out of ``torch.compile`` (a graph
        break, run eagerly): it reads and fills the conditioning's caches, runs the reference K/V
        modules (FSDP2 units when the adapter is sharded) and makes host-side decisions (which rows,
        folded λ) once per conditioning; the compiled block sees only their results, so a new
        conditioning every step does not recompile it."""
        b, dtype, device = q.shape[0], q.dtype, q.device
        if where == "image":
            weights = cond.image_weights(b, n_img, dtype, device)
            rows = cond.image_rows(b, n_img, dtype, device)
        elif where == "text":
            weights, rows = cond.text_weights(b, n_txt, dtype, device), None
        else:
            weights = torch.cat(
                [cond.text_weights(b, n_txt, dtype, device), cond.image_weights(b, n_img, dtype, device)], dim=2
            )  # (N, B, L)
            rows = None
        k, v = cond.reference_kv(self.block.stream(stream), dtype)
        if where == "text":  # text rows always carry λ_i
            folded = cond.scales.tolist()
        else:
            folded = cond.folded_scales((where, b, weights.shape[-1], dtype, device), weights, rows)
        return k, v, weights, rows, folded

    @staticmethod
    @torch.compiler.disable
    def _split(cond: Conditioning, total: int | None = None, n_img: int | None = None) -> int:
        """Image token count of this call: records the double-stream block's (``n_img``) for the
        single-stream blocks, or reads it back for a single-stream block of ``total`` tokens."""
        if n_img is not None:
            cond.seen_image_tokens = n_img
            return n_img
        return cond.image_tokens(total)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        dynaip_conditioning: Conditioning | None = None,
    ):
        # The conditioning passed with the call wins over the slot: under gradient checkpointing the
        # block is recomputed in backward, after the ``with adapter.conditioning(...)`` block closed.
        cond = dynaip_conditioning if dynaip_conditioning is not None else self.slot.active
        if cond is None or cond.num_subjects == 0:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        # Same steps as FluxAttnProcessor.__call__, keeping the pre-RoPE queries and the pre-projection output.
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (attn.heads, -1)))  # (B, Li, H, Dh) (single-stream: [text, image])
        key = attn.norm_k(key.unflatten(-1, (attn.heads, -1)))
        value = value.unflatten(-1, (attn.heads, -1))
        # CA queries are taken after the q-norm but BEFORE RoPE: reference tokens carry no position, so
        # rotating only the query would make q·k depend on the query's absolute position (a spatial
        # bias unrelated to content); un-rotated queries keep CA position-free (as IP-Adapter in diffusers).
        ca_query = query
        ca_text_query = None
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (attn.heads, -1)))  # (B, Lt, H, Dh)
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (attn.heads, -1)))
            encoder_value = encoder_value.unflatten(-1, (attn.heads, -1))
            ca_text_query = encoder_query
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(query.dtype)  # (B, L, D)

        if encoder_hidden_states is not None:  # double-stream block: separate text / image streams
            n_txt = encoder_hidden_states.shape[1]
            enc_out, img_out = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
            n_img = self._split(cond, n_img=img_out.shape[1])
            if cond.to_image:
                plan = self._plan(cond, "image", "image", ca_query, 0, n_img)
                img_out = img_out + reference_attention(ca_query, *plan)
            if cond.to_text:
                plan = self._plan(cond, "text", "text", ca_text_query, n_txt, 0)
                enc_out = enc_out + reference_attention(ca_text_query, *plan)
            img_out = attn.to_out[1](attn.to_out[0](img_out))
            enc_out = attn.to_add_out(enc_out)
            return img_out, enc_out

        # single-stream block: the sequence is [text, image]; one K/V serves both (FLUX shares weights here)
        total = out.shape[1]
        n_img = self._split(cond, total=total)
        n_txt = total - n_img
        if cond.to_image and cond.to_text:
            return out + reference_attention(ca_query, *self._plan(cond, "image", "joint", ca_query, n_txt, n_img))
        if cond.to_image:
            q_img = ca_query[:, n_txt:]
            ca = reference_attention(q_img, *self._plan(cond, "image", "image", q_img, 0, n_img))
            if not torch.is_grad_enabled():  # inference: add in place instead of copying the whole sequence
                out[:, n_txt:] += ca
                return out
            return torch.cat([out[:, :n_txt], out[:, n_txt:] + ca], dim=1)
        q_txt = ca_query[:, :n_txt]
        ca = reference_attention(q_txt, *self._plan(cond, "text", "text", q_txt, n_txt, 0))
        return torch.cat([out[:, :n_txt] + ca, out[:, n_txt:]], dim=1)
