"""HMoE-FFM: the hierarchical mixture-of-experts feature fusion module (paper Eq. 6-8).

Each chosen CLIP layer l gets an expert (Linear → GELU → LayerNorm over all its tokens) and, for
``fusion="hmoe"``, a router (Linear → Tanh → Linear(→1) on its CLS token). The fused tokens are
``Σ_l w_l · expert_l(h_l)`` with ``w = softmax(router logits)``, so low-level (texture) and high-level
(semantics) features are mixed per reference image.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .config import DynaIPConfig


class Expert(nn.Module):
    """Linear → GELU → LayerNorm over every token of one CLIP layer: (B, L, Dclip) → (B, L, E)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.fc(h)))


class Router(nn.Module):
    """Linear → Tanh → Linear(→1) on one layer's CLS token: (B, Dclip) → (B,) logit."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden_dim, 1)

    def forward(self, cls_token: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(cls_token))).squeeze(-1)


class HMoEFFM(nn.Module):
    """Fuses the hidden states of several CLIP layers into one token set ``(B, L, expert_dim)``.

    ``forward(hidden_states, granularity=None)`` takes one ``(B, L, clip_width)`` tensor per entry
    of ``config.clip_layers`` (CLS token first); layers not in ``config.expert_layers`` are ignored.

    Fusion (``config.fusion``):

    * ``hmoe``: ``w = softmax(router_l(h_l[:, 0]))`` over the experts, fused = ``Σ w_l · expert_l(h_l)``.
      ``granularity=(w_low, w_mid, w_high)`` (one non-negative number per expert, normalised to sum
      to 1) replaces the router weights at inference: ``(1, 0, 0)`` is exactly the low-level expert.
    * ``add``: the mean of the expert outputs (Table 2 ablation).
    * ``concat``: the expert outputs concatenated on channels → Linear back to ``expert_dim``.

    Expert dropout (training only, ``self.training`` and no ``granularity``): each expert of each
    sample is dropped independently with probability ``config.expert_dropout``. If all experts of a
    sample are drawn dropped, one of them, chosen uniformly at random, is kept, so a sample never
    loses every expert. A dropped expert gets weight 0 and the router softmax runs over the kept
    logits only, i.e. the kept weights are renormalised to sum to 1. For ``add`` the mean runs over
    the kept experts; for ``concat`` a dropped expert's channels are zeroed and the rest scaled by
    ``n / n_kept`` (inverted dropout).
    """

    def __init__(self, config: DynaIPConfig):
        super().__init__()
        self.config = config
        self.layers = config.active_layers
        # positions of the active layers inside the list that forward() receives
        self.layer_index = tuple(config.clip_layers.index(l) for l in self.layers)
        n = len(self.layers)
        self.experts = nn.ModuleList(Expert(config.clip_width, config.expert_dim) for _ in range(n))
        self.routers = (
            nn.ModuleList(Router(config.clip_width, config.router_hidden_dim) for _ in range(n))
            if config.fusion == "hmoe"
            else None
        )
        self.concat_proj = nn.Linear(n * config.expert_dim, config.expert_dim) if config.fusion == "concat" else None

    @property
    def num_experts(self) -> int:
        return len(self.layers)

    def _select(self, hidden_states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        expected = len(self.config.clip_layers)
        if len(hidden_states) != expected:
            raise ValueError(
                f"Got {len(hidden_states)} CLIP hidden states; expected {expected}, one per "
                f"configured CLIP layer {self.config.clip_layers}"
            )
        picked = [hidden_states[i] for i in self.layer_index]
        for l, h in zip(self.layers, picked):
            if h.ndim != 3 or h.shape[-1] != self.config.clip_width:
                raise ValueError(
                    f"CLIP layer {l} hidden state has shape {tuple(h.shape)}; expected (B, L, {self.config.clip_width})"
                )
        return picked

    def sample_keep_mask(
        self, batch: int, device: torch.device | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, n) bool: True = expert kept. At least one True per row (see the class docstring)."""
        n, p = self.num_experts, self.config.expert_dropout
        keep = torch.rand(batch, n, device=device, generator=generator) >= p  # (B, n)
        none_kept = ~keep.any(dim=1)  # (B,)
        rescue = torch.randint(0, n, (batch,), device=device, generator=generator)  # (B,)
        keep[none_kept, rescue[none_kept]] = True
        return keep

    def router_logits(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, n) router logits from each active layer's CLS token (``fusion="hmoe"`` only)."""
        if self.routers is None:
            raise ValueError(f"fusion={self.config.fusion!r} has no routers; router weights exist only for 'hmoe'")
        picked = self._select(hidden_states)
        return torch.stack([r(h[:, 0]) for r, h in zip(self.routers, picked)], dim=1)  # (B, n)

    def router_weights(self, hidden_states: Sequence[torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n) softmax weights (fp32) over the kept experts' logits; dropped experts get exactly 0."""
        logits = self.router_logits(hidden_states).float()  # (B, n)
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        return logits.softmax(dim=1)

    def _granularity_weights(self, granularity: Sequence[float], batch: int, device: torch.device) -> torch.Tensor:
        if self.config.fusion != "hmoe":
            raise ValueError(f"granularity needs fusion='hmoe'; this adapter uses fusion={self.config.fusion!r}")
        g = torch.as_tensor([float(x) for x in granularity], dtype=torch.float32, device=device)
        if g.numel() != self.num_experts or (g < 0).any() or g.sum() <= 0:
            raise ValueError(
                f"granularity={tuple(granularity)}: need {self.num_experts} non-negative weights "
                f"(one per expert layer {self.layers}) with a positive sum, e.g. (1, 0, 0)"
            )
        return (g / g.sum()).expand(batch, -1)  # (B, n)

    def forward(
        self, hidden_states: Sequence[torch.Tensor], granularity: Sequence[float] | None = None
    ) -> torch.Tensor:
        picked = self._select(hidden_states)
        batch, device = picked[0].shape[0], picked[0].device
        outs = torch.stack([e(h) for e, h in zip(self.experts, picked)], dim=0)  # (n, B, L, E)
        keep = None
        if granularity is None and self.training and self.config.expert_dropout > 0:
            keep = self.sample_keep_mask(batch, device)  # (B, n)

        if self.config.fusion == "hmoe":
            if granularity is not None:
                w = self._granularity_weights(granularity, batch, device)
            else:
                w = self.router_weights(hidden_states, keep)
            w = w.to(outs.dtype).t()[:, :, None, None]  # (n, B, 1, 1)
            return (w * outs).sum(dim=0)  # (B, L, E)

        if granularity is not None:
            self._granularity_weights(granularity, batch, device)  # raises: only hmoe has granularity
        kept = torch.ones(batch, self.num_experts, dtype=torch.bool, device=device) if keep is None else keep
        kf = kept.to(outs.dtype).t()[:, :, None, None]  # (n, B, 1, 1)
        if self.config.fusion == "add":
            return (kf * outs).sum(dim=0) / kf.sum(dim=0)  # mean over kept experts, (B, L, E)
        # concat: zero dropped experts' channels, rescale so the expected input scale is unchanged
        scale = self.num_experts / kf.sum(dim=0)  # (B, 1, 1)
        cat = torch.cat(list(kf * outs * scale), dim=-1)  # (B, L, n*E)
        return self.concat_proj(cat)
