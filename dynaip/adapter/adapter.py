"""``DynaIPAdapter``: every trainable DynaIP parameter, and the plumbing to plug it into FLUX."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .attention import (
    BRANCHES,
    CONDITIONING_KWARG,
    BlockReferenceAttention,
    Conditioning,
    ConditioningSlot,
    DynaIPAttnProcessor,
)
from .config import DynaIPConfig
from .hmoe import HMoEFFM

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
CHECKPOINT_FORMAT = "dynaip-adapter/1"


class DynaIPAdapter(nn.Module):
    """HMoE-FFM + projection to reference tokens + one image cross-attention per FLUX block.

    Holds every trainable parameter and nothing frozen. Typical use::

        adapter.attach(transformer)                       # installs 57 processors (FLUX.1-dev)
        C = adapter.encode_reference(clip_hidden_states)  # (B, L, ref_dim)
        with adapter.conditioning([C], branches="image", image_size=(H, W)):
            out = transformer(...)                        # every denoising step reuses the reference K/V

    ``forward`` is ``encode_reference``, so ``DistributedDataParallel(adapter)(hidden_states)`` works;
    the CA weights are used inside the transformer call and still receive gradients.
    The adapter does not follow ``transformer.to(...)``: move it yourself (``adapter.to(device)``).
    """

    def __init__(self, config: DynaIPConfig):
        super().__init__()
        self.config = config
        self.hmoe = HMoEFFM(config)
        self.proj = nn.Sequential(nn.Linear(config.expert_dim, config.ref_dim), nn.LayerNorm(config.ref_dim))
        args = (config.ref_dim, config.num_heads, config.head_dim, config.key_norm_eps)
        self.double_blocks = nn.ModuleList(
            BlockReferenceAttention(*args, text_stream=config.separate_stream_kv)
            for _ in range(config.num_double_blocks)
        )
        self.single_blocks = nn.ModuleList(
            BlockReferenceAttention(*args, text_stream=False) for _ in range(config.num_single_blocks)
        )
        self._slot = ConditioningSlot()
        self._originals: dict[int, tuple[list, object]] = {}  # id(transformer) -> (processors before attach, hook)

    # ------------------------------------------------------------------ references
    def encode_reference(
        self, hidden_states: Sequence[torch.Tensor], granularity: Sequence[float] | None = None
    ) -> torch.Tensor:
        """CLIP hidden states (one ``(B, L, clip_width)`` per ``config.clip_layers``) → C ``(B, L, ref_dim)``.

        ``granularity=(w_low, w_mid, w_high)`` overrides the router weights (normalised to sum 1).
        """
        fused = self.hmoe(hidden_states, granularity=granularity)  # (B, L, expert_dim)
        return self.proj(fused)  # (B, L, ref_dim)

    def forward(
        self, hidden_states: Sequence[torch.Tensor], granularity: Sequence[float] | None = None
    ) -> torch.Tensor:
        return self.encode_reference(hidden_states, granularity=granularity)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ attach / detach
    def _check_transformer(self, transformer: nn.Module) -> None:
        cfg = self.config
        doubles = getattr(transformer, "transformer_blocks", None)
        singles = getattr(transformer, "single_transformer_blocks", None)
        if doubles is None or singles is None:
            raise TypeError(
                f"{type(transformer).__name__} is not a diffusers FluxTransformer2DModel "
                "(needs transformer_blocks and single_transformer_blocks)"
            )
        if (len(doubles), len(singles)) != (cfg.num_double_blocks, cfg.num_single_blocks):
            raise ValueError(
                f"The transformer has {len(doubles)} double + {len(singles)} single blocks; this adapter "
                f"was built for {cfg.num_double_blocks} + {cfg.num_single_blocks}. Use the DynaIPConfig "
                "preset of this FLUX model (full() for FLUX.1-dev, tiny() for the tiny checkpoints)"
            )
        for block in list(doubles) + list(singles):
            attn = block.attn
            if (attn.heads, attn.head_dim) != (cfg.num_heads, cfg.head_dim):
                raise ValueError(
                    f"Transformer attention has {attn.heads} heads x {attn.head_dim}; the adapter "
                    f"expects {cfg.num_heads} x {cfg.head_dim}"
                )

    def attach(self, transformer: nn.Module) -> None:
        """Installs a ``DynaIPAttnProcessor`` in every block. Without an active conditioning they are exact no-ops."""
        if id(transformer) in self._originals:
            raise ValueError("This adapter is already attached to this transformer; call detach(transformer) first")
        self._check_transformer(transformer)
        blocks = [(b, True, ca) for b, ca in zip(transformer.transformer_blocks, self.double_blocks)]
        blocks += [(b, False, ca) for b, ca in zip(transformer.single_transformer_blocks, self.single_blocks)]
        originals = [b.attn.processor for b, _, _ in blocks]
        for block, double, ca in blocks:
            block.attn.set_processor(DynaIPAttnProcessor(ca, self._slot, double_stream=double))
        hooks = (
            transformer.register_forward_pre_hook(self._pass_conditioning, with_kwargs=True),
            transformer.register_forward_hook(self._image_guidance, with_kwargs=True),
        )
        self._originals[id(transformer)] = (originals, hooks)

    def _pass_conditioning(self, module: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook: puts the active conditioning into ``joint_attention_kwargs``.

        diffusers hands those kwargs to every block, and its gradient checkpointing hands them to the
        recomputation too, so training with ``enable_gradient_checkpointing()`` recomputes each block
        *with* the adapter even though backward runs after the ``conditioning`` block has closed.
        """
        cond = self._slot.active
        if cond is None or len(args) > 7:  # joint_attention_kwargs given positionally: the slot still serves
            return None
        joint = dict(kwargs.get("joint_attention_kwargs") or {})
        joint.setdefault(CONDITIONING_KWARG, cond)
        kwargs["joint_attention_kwargs"] = joint
        return args, kwargs

    def _image_guidance(self, module: nn.Module, args: tuple, kwargs: dict, output):
        """Forward hook: image CFG. When the active conditioning has ``image_guidance_scale`` s ≠ 1, the
        transformer runs once more with its zero-C twin (``Conditioning.unconditional``) and the call
        returns ``uncond + s · (cond − uncond)``. Text guidance is untouched: FLUX.1-dev's distilled
        guidance is an input of both runs, and with diffusers' true CFG (a negative prompt) each prompt
        branch gets image CFG before the text combination."""
        joint = kwargs.get("joint_attention_kwargs") or {}
        cond = joint.get(CONDITIONING_KWARG, self._slot.active)
        if cond is None or cond.image_guidance_scale == 1.0 or cond.num_subjects == 0:
            return None
        uncond = cond.unconditional()
        kwargs = dict(kwargs, joint_attention_kwargs={**joint, CONDITIONING_KWARG: uncond})
        previous = self._slot.active
        self._slot.active = uncond
        try:
            other = module(*args, **kwargs)
        finally:
            self._slot.active = previous
        s = cond.image_guidance_scale

        def mix(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            return u + s * (c - u)

        if isinstance(output, tuple):
            return (mix(output[0], other[0]), *output[1:])
        output.sample = mix(output.sample, other.sample)
        return output

    def detach(self, transformer: nn.Module) -> None:
        """Puts back the processors that were there before ``attach``."""
        entry = self._originals.pop(id(transformer), None)
        if entry is None:
            raise ValueError("This adapter is not attached to this transformer")
        originals, hooks = entry
        for hook in hooks:
            hook.remove()
        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        for block, proc in zip(blocks, originals):
            block.attn.set_processor(proc)

    # ------------------------------------------------------------------ conditioning
    def make_conditioning(
        self,
        refs: torch.Tensor | Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor] | None = None,
        scales: float | Sequence[float] = 1.0,
        branches: str = "image",
        image_size: tuple[int, int] | None = None,
        image_guidance_scale: float = 1.0,
    ) -> Conditioning:
        """Validates the arguments of ``conditioning`` and packs them (see there)."""
        refs = [refs] if isinstance(refs, torch.Tensor) else list(refs)
        if branches not in BRANCHES:
            raise ValueError(f"branches={branches!r}: choose one of {BRANCHES}")
        n = len(refs)
        for i, c in enumerate(refs):
            if c.ndim != 3 or c.shape[-1] != self.config.ref_dim:
                raise ValueError(
                    f"Reference {i} has shape {tuple(c.shape)}; expected (B, L, {self.config.ref_dim}) "
                    "from adapter.encode_reference"
                )
        if n and len({c.shape[1] for c in refs}) != 1:
            raise ValueError(
                f"References have different token counts {[c.shape[1] for c in refs]}; encode them at one size"
            )
        batches = {c.shape[0] for c in refs} - {1}
        if len(batches) > 1:
            raise ValueError(f"Reference batches {[c.shape[0] for c in refs]}: each must be 1 or the same B")

        lam = [float(scales)] * n if isinstance(scales, (int, float)) else [float(s) for s in scales]
        if len(lam) != n:
            raise ValueError(f"Got {len(lam)} scales for {n} references; give one λ per reference or a single float")
        if masks is not None:
            masks = list(masks)
            if len(masks) != n:
                raise ValueError(f"Got {len(masks)} masks for {n} references; give one mask per reference (or None)")
            sizes = {tuple(m.shape[-2:]) for m in masks}
            if image_size is None:
                if len(sizes) != 1:
                    raise ValueError(f"Masks have different pixel sizes {sorted(sizes)}; pass image_size=(H, W)")
                image_size = sizes.pop()
        if image_size is not None:
            image_size = (int(image_size[0]), int(image_size[1]))
            ds = self.config.latent_downsample
            if image_size[0] % ds or image_size[1] % ds:
                raise ValueError(f"image_size={image_size}: FLUX needs height and width divisible by {ds}")
        try:
            image_guidance_scale = float(image_guidance_scale)
        except (TypeError, ValueError):
            raise ValueError(f"image_guidance_scale={image_guidance_scale!r}: give a number (1.0 = off)") from None
        if not (image_guidance_scale >= 0.0 and image_guidance_scale < float("inf")):
            raise ValueError(f"image_guidance_scale={image_guidance_scale}: must be a finite number >= 0 (1.0 = off)")
        return Conditioning(
            refs=refs,
            scales=torch.tensor(lam, dtype=torch.float32),
            masks=masks,
            branches=branches,
            image_size=image_size,
            latent_downsample=self.config.latent_downsample,
            image_guidance_scale=image_guidance_scale,
        )

    @contextlib.contextmanager
    def conditioning(
        self,
        refs: torch.Tensor | Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor] | None = None,
        scales: float | Sequence[float] = 1.0,
        branches: str = "image",
        image_size: tuple[int, int] | None = None,
        image_guidance_scale: float = 1.0,
    ) -> Iterator[Conditioning]:
        """Makes every attached transformer call inject the references while the block is open.

        refs: N reference token sets ``(B or 1, L, ref_dim)`` from ``encode_reference`` (a tensor = one subject).
        masks: None (every image token) or one pixel-space mask per subject, ``(H, W)`` or ``(B, H, W)``,
            bool or float in [0, 1]; resampled to the packed latent grid ``(H/16, W/16)`` by area, then kept where ≥ 0.5.
        scales: λ for all subjects or one per subject; 0 turns a subject off.
        branches: ``image`` (inference default, DDS), ``both`` (training), ``text`` (ablation).
        image_size: ``(H, W)`` in pixels of the generated image; defaults to the masks' size. Needed
            with masks, and when the transformer has no double-stream blocks.
        image_guidance_scale: image CFG s; every transformer call also runs the zero-C branch and
            returns ``uncond + s · (cond − uncond)`` (twice the compute). 1.0 = off.

        The reference K/V are computed at the first transformer call and reused until the block
        closes (or C / the adapter weights change in place). Blocks nest; the inner one wins.
        """
        cond = self.make_conditioning(
            refs,
            masks=masks,
            scales=scales,
            branches=branches,
            image_size=image_size,
            image_guidance_scale=image_guidance_scale,
        )
        previous = self._slot.active
        self._slot.active = cond
        try:
            yield cond
        finally:
            self._slot.active = previous

    def set_conditioning(self, cond: Conditioning | None) -> None:
        """Non-context form for pipelines: ``set_conditioning(adapter.make_conditioning(...))``; None clears."""
        self._slot.active = cond

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(
        self,
        directory: str | Path,
        state_dict: dict[str, torch.Tensor] | None = None,
        clip_vision: dict | None = None,
        training: dict | None = None,
    ) -> Path:
        """Writes ``directory/adapter.safetensors`` (weights only), ``directory/config.json`` and the model
        card ``directory/README.md`` (dynaip/adapter/card.py).

        ``state_dict``: the whole weights when this module holds only shards (FSDP2 training gathers
        them with ``dynaip.train.parallel.full_adapter_state``); default: this module's own.
        ``clip_vision``: the CLIP vision tower the adapter was trained with (``models.yaml``'s
        ``clip_vision`` entry: path, model_name, quick_gelu); ``load_dynaip`` uses it when the caller
        names no tower.
        ``training``: what the card says about the run (the trainer's base model, step, datasets and their
        manifest digests, config: ``dynaip.adapter.card.model_card``); None = a card without it.
        """
        from safetensors.torch import save_file

        from dynaip.atomic import atomic_write_text

        from .card import model_card

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        source = self.state_dict() if state_dict is None else state_dict
        state = {k: v.detach().to("cpu").contiguous() for k, v in source.items()}
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
        meta = {"format": CHECKPOINT_FORMAT, "dtype": dtype, "config": self.config.to_dict()}
        if clip_vision is not None:
            meta["clip_vision"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(clip_vision).items()}
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        atomic_write_text(out / CARD_NAME, model_card(meta, sum(v.numel() for v in state.values()), training))
        return out

    @classmethod
    def read_metadata(cls, directory: str | Path) -> dict:
        """``config.json`` of a checkpoint directory (format, dtype, config, optional clip_vision)."""
        _, config_file = cls._files(directory)
        try:
            return json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file} is not valid JSON ({e})") from None

    @staticmethod
    def resolve_checkpoint(directory: str | Path) -> Path:
        """``directory``, or for ``RUN/checkpoints/best`` (no such directory, a ``best.json`` beside it, written
        by training's ``checkpoints.keep_best``) the checkpoint that best.json names."""
        d = Path(directory)
        best = d.parent / "best.json"
        if d.name != "best" or d.exists() or not best.is_file():
            return d
        try:
            name = json.loads(best.read_text())["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{best} is not a best-checkpoint record ({type(e).__name__}: {e})") from None
        if not isinstance(name, str) or not re.fullmatch(r"step-\d{6,}", name):  # never a path out of the folder
            raise ValueError(f"{best} names {name!r}, not a checkpoint of its folder (step-NNNNNN)")
        return d.parent / name

    @classmethod
    def _files(cls, directory: str | Path) -> tuple[Path, Path]:
        from .hub import resolve_adapter_dir

        # RUN/checkpoints/best via its best.json; else a local path wins; else "owner/name" from the hub cache
        d = cls.resolve_checkpoint(directory)
        if d == Path(directory):
            d = resolve_adapter_dir(directory)
        if not d.exists():  # a mistyped step number: say so, and where the checkpoints are
            near = sorted(p.name for p in d.parent.glob("step-*")) if d.parent.is_dir() else []
            have = f"; {d.parent} holds {', '.join(near[-3:])}" if near else ""
            raise FileNotFoundError(f"adapter checkpoint {d} does not exist{have}")
        weights, config = d / WEIGHTS_NAME, d / CONFIG_NAME
        missing = [p.name for p in (weights, config) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{d} is not a DynaIP adapter checkpoint: missing {', '.join(missing)}. "
                "Expected a directory written by DynaIPAdapter.save_pretrained "
                f"({WEIGHTS_NAME} + {CONFIG_NAME})"
            )
        return weights, config

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None) -> "DynaIPAdapter":
        """Rebuilds the adapter from ``config.json`` and loads ``adapter.safetensors`` (cast to ``dtype`` if given).
        ``directory``: a local directory, or a hub repo id ``owner/name`` already in the local Hugging Face
        cache (``dynaip.adapter.hub``; nothing is downloaded)."""
        weights, config_file = cls._files(directory)
        directory = weights.parent
        meta = json.loads(config_file.read_text())
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{config_file}: format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        config = DynaIPConfig.from_dict(meta["config"])
        with torch.device("meta"):  # no memory for the random init that the checkpoint replaces
            adapter = cls(config)
        adapter.load_weights(directory, assign=True)
        return adapter.to(dtype) if dtype is not None else adapter

    def load_weights(self, directory: str | Path, assign: bool = False) -> None:
        """Loads ``adapter.safetensors`` into this adapter; a clear ``ValueError`` if it does not fit the config."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        weights, _ = self._files(directory)
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        with safe_open(str(weights), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        shapes = [
            f"{k}: checkpoint {found[k]} vs adapter {expected[k]}"
            for k in sorted(set(found) & set(expected))
            if found[k] != expected[k]
        ]
        if missing or unexpected or shapes:
            detail = "; ".join(
                part
                for part in (
                    f"shape mismatch for {len(shapes)} tensors ({', '.join(shapes[:3])}{', ...' if len(shapes) > 3 else ''})"
                    if shapes
                    else "",
                    f"missing {len(missing)} tensors ({', '.join(missing[:3])})" if missing else "",
                    f"unexpected {len(unexpected)} tensors ({', '.join(unexpected[:3])})" if unexpected else "",
                )
                if part
            )
            raise ValueError(
                f"The checkpoint {weights} does not fit this adapter's config: {detail}. Load it with "
                "DynaIPAdapter.from_pretrained(dir), which rebuilds the adapter from its config.json"
            )
        state = load_file(str(weights))
        self.load_state_dict(state, strict=True, assign=assign)
