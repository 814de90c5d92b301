"""Does the adapter use its references? The held-out loss with own vs. permuted vs. no references.

``reference_loss_gap`` encodes one batch once (VAE latents, text, CLIP hidden states), then
evaluates ``step.flow_matching_loss`` three times per draw with a generator seeded identically,
so the three losses share every noise tensor and every t and differ only in what reaches the
adapter's cross-attention:

* ``own``: each sample's own reference (what training optimises);
* ``permuted``: the references rolled by one along the batch, so every sample gets another
  sample's reference (a derangement: no sample keeps its own);
* ``off``: no reference at all. ``flow_matching_loss`` zeroes C for samples marked in
  ``drop_image`` and zero C gives exactly zero K/V and so CA ≡ 0 (dynaip.adapter.attention),
  the same as λ = 0: the bare frozen FLUX prediction.

A trained adapter that learned something about the *reference* gives own < permuted; one that
only learned a reference-independent correction gives own ≈ permuted < off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .config import LossConfig
from .step import FrozenModels, clip_hidden_states, encode_targets, encode_text, flow_matching_loss


@dataclass(frozen=True)
class ReferenceLosses:
    """Mean flow-matching losses of one batch over ``draws`` noise/t draws, one per condition."""

    own: float
    permuted: float
    off: float
    draws: int

    @property
    def permuted_over_own(self) -> float:
        """> 1 when the own reference helps more than someone else's."""
        return self.permuted / self.own

    @property
    def off_over_own(self) -> float:
        """> 1 when the adapter with the own reference beats the bare base (λ = 0)."""
        return self.off / self.own

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "permuted_over_own": self.permuted_over_own, "off_over_own": self.off_over_own}


@torch.no_grad()
def reference_loss_gap(
    frozen: FrozenModels,
    adapter: nn.Module,
    batch: dict[str, Any],
    settings: LossConfig,
    seeds: Sequence[int] = (0,),
    autocast: torch.dtype | None = None,
) -> ReferenceLosses:
    """Losses of ``batch`` (a loader batch: ``tgt``, ``ref``, ``txt``) with own / permuted / no references.

    ``adapter`` must be attached to ``frozen.transformer``; it is evaluated in eval mode (no expert
    dropout) and put back in its previous mode. Each seed in ``seeds`` is one draw of the VAE
    posterior sample, noise and t, shared by the three conditions; the losses are averaged over draws.
    CFG dropout is not applied (``settings``' drop rates are ignored): every sample keeps its prompt.
    """
    b = batch["tgt"].shape[0]
    if b < 2:
        raise ValueError("reference_loss_gap needs a batch of at least 2 samples to permute references")
    dev = frozen.device
    was_training = adapter.training
    adapter.eval()
    txt, pooled, txt_ids = encode_text(frozen, list(batch["txt"]), settings.max_sequence_length)
    hidden = clip_hidden_states(frozen, batch["ref"])
    rolled = [hs.roll(1, dims=0) for hs in hidden]  # sample i gets sample i-1's reference
    keep = torch.zeros(b, dtype=torch.bool)
    drop = torch.ones(b, dtype=torch.bool)
    totals = {"own": 0.0, "permuted": 0.0, "off": 0.0}
    try:
        for seed in seeds:
            x0, img_ids, (h, w) = encode_targets(frozen, batch["tgt"], torch.Generator(device=dev).manual_seed(seed))
            common = dict(
                x0=x0,
                img_ids=img_ids,
                image_size=(h * 8, w * 8),
                txt=txt,
                pooled=pooled,
                txt_ids=txt_ids,
                settings=settings,
                autocast=autocast,
            )
            for name, refs, dropped in (("own", hidden, keep), ("permuted", rolled, keep), ("off", hidden, drop)):
                # the same generator seed for every condition: the same noise, then the same t
                gen = torch.Generator(device=dev).manual_seed(seed + 1_000_003)
                totals[name] += flow_matching_loss(
                    frozen.transformer,
                    frozen.pipe.scheduler.config,
                    adapter,
                    adapter,
                    hidden=refs,
                    drop_image=dropped,
                    generator=gen,
                    **common,
                ).item()
    finally:
        adapter.train(was_training)
    n = len(seeds)
    return ReferenceLosses(own=totals["own"] / n, permuted=totals["permuted"] / n, off=totals["off"] / n, draws=n)
