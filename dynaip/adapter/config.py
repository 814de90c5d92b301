"""``DynaIPConfig``: every size and switch of the DynaIP adapter, with the two presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

FUSIONS = ("hmoe", "add", "concat")


@dataclass(kw_only=True)
class DynaIPConfig:
    """Sizes of the adapter and of the frozen models it plugs into. Defaults are the paper's full size."""

    clip_width: int = 1024
    """Channel width of the CLIP vision hidden states (ViT-L/14-336: 1024)."""
    clip_tokens: int = 577
    """Tokens per CLIP hidden state, CLS first (ViT-L/14-336: 1 + 24*24). Used for FLOP/size reports."""
    clip_layers: tuple[int, ...] = (10, 17, 24)
    """1-based CLIP layers whose hidden states ``encode_reference`` receives, low → high level."""
    expert_layers: tuple[int, ...] | None = None
    """Ablation: the subset of ``clip_layers`` that gets an expert; None = all of them."""
    fusion: str = "hmoe"
    """How expert outputs are fused: ``hmoe`` (routed softmax weights), ``add`` (mean), ``concat`` (concat → Linear)."""
    expert_dim: int = 1024
    """Output width of each expert (Linear → GELU → LayerNorm)."""
    router_hidden_dim: int = 256
    """Hidden width of each router MLP (Linear → Tanh → Linear(→1)) applied to its layer's CLS token."""
    expert_dropout: float = 0.05
    """Training-time probability of dropping each expert independently (never all of them)."""
    ref_dim: int = 3072
    """Width of the reference tokens C produced by the projection (Linear → LayerNorm)."""
    inner_dim: int = 3072
    """FLUX transformer inner width (heads * head_dim); the CA K/V projections output this."""
    num_heads: int = 24
    """FLUX attention heads."""
    head_dim: int = 128
    """FLUX per-head width; the reference-key RMSNorm runs over it."""
    num_double_blocks: int = 19
    """FLUX double-stream blocks (``transformer.transformer_blocks``)."""
    num_single_blocks: int = 38
    """FLUX single-stream blocks (``transformer.single_transformer_blocks``)."""
    separate_stream_kv: bool = True
    """Double-stream blocks get one reference K/V per stream (text, image), as FLUX has per-stream weights."""
    latent_downsample: int = 16
    """Pixels per packed latent token side: VAE /8 then FLUX's 2x2 packing. Masks are resampled by it."""
    key_norm_eps: float = 1e-6
    """Epsilon of the RMSNorm on reference keys (FLUX's block key-norm epsilon)."""

    def __post_init__(self) -> None:
        self.clip_layers = tuple(int(l) for l in self.clip_layers)
        if self.expert_layers is not None:
            self.expert_layers = tuple(int(l) for l in self.expert_layers)
        if not self.clip_layers or len(set(self.clip_layers)) != len(self.clip_layers):
            raise ValueError(f"clip_layers={self.clip_layers}: need at least one layer, without repeats")
        if self.expert_layers is not None:
            bad = [l for l in self.expert_layers if l not in self.clip_layers]
            if not self.expert_layers or bad or len(set(self.expert_layers)) != len(self.expert_layers):
                raise ValueError(
                    f"expert_layers={self.expert_layers}: must be a non-empty subset of "
                    f"clip_layers={self.clip_layers} without repeats"
                )
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion={self.fusion!r}: choose one of {FUSIONS}")
        if not 0.0 <= self.expert_dropout <= 1.0:
            raise ValueError(f"expert_dropout={self.expert_dropout}: must be a probability in [0, 1]")
        if self.num_heads * self.head_dim != self.inner_dim:
            raise ValueError(f"num_heads * head_dim = {self.num_heads} * {self.head_dim} != inner_dim={self.inner_dim}")
        for name in ("clip_width", "clip_tokens", "expert_dim", "router_hidden_dim", "ref_dim", "latent_downsample"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be positive")
        if self.num_double_blocks < 0 or self.num_single_blocks < 0:
            raise ValueError("num_double_blocks and num_single_blocks must be >= 0")

    @property
    def active_layers(self) -> tuple[int, ...]:
        """The CLIP layers that have an expert, in ``clip_layers`` order."""
        chosen = self.expert_layers if self.expert_layers is not None else self.clip_layers
        return tuple(l for l in self.clip_layers if l in chosen)

    @property
    def num_blocks(self) -> int:
        return self.num_double_blocks + self.num_single_blocks

    @classmethod
    def full(cls, **overrides: Any) -> "DynaIPConfig":
        """FLUX.1-dev (inner 3072 = 24 x 128, 19 + 38 blocks) + OpenCLIP ViT-L/14-336 (layers 10, 17, 24)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "DynaIPConfig":
        """Matches ``dynaip.models.tiny``: TINY_FLUX_TRANSFORMER_CONFIG and TINY_CLIP_CONFIG / TINY_CLIP_LAYERS."""
        base = dict(
            clip_width=32,
            clip_tokens=17,
            clip_layers=(2, 4, 6),
            expert_dim=32,
            router_hidden_dim=16,
            ref_dim=32,
            inner_dim=32,
            num_heads=2,
            head_dim=16,
            num_double_blocks=1,
            num_single_blocks=2,
        )
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["clip_layers"] = list(self.clip_layers)
        d["expert_layers"] = None if self.expert_layers is None else list(self.expert_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DynaIPConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown DynaIPConfig fields {unknown}; known fields: {sorted(known)}")
        d = dict(d)
        for key in ("clip_layers", "expert_layers"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)
