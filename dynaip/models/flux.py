"""FLUX.1-dev from a local diffusers directory."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import FIX_HINT, CheckpointError, require_dir

FLUX_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
EXPECTED = "a diffusers FLUX.1-dev directory (model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/)"

# FLUX.1-dev's transformer/config.json, so the full size can be built on the meta device.
FLUX_DEV_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def _check_layout(path: str | Path) -> Path:
    p = require_dir("FLUX.1-dev", path, EXPECTED)
    missing = [part for part in ("model_index.json", *FLUX_PARTS) if not (p / part).exists()]
    if missing:
        raise CheckpointError("FLUX.1-dev", p, EXPECTED, f"Missing: {', '.join(missing)}. {FIX_HINT}")
    return p


def load_flux_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, **components):
    """Loads ``diffusers.FluxPipeline`` with every part from ``path`` (nothing is downloaded)."""
    from diffusers import FluxPipeline

    from dynaip.console import quiet_libraries

    quiet_libraries()  # diffusers' "Loading pipeline components" bar has no switch but this call, after its import
    p = _check_layout(path)
    try:
        return FluxPipeline.from_pretrained(str(p), torch_dtype=dtype, local_files_only=True, **components)
    except Exception as e:
        raise CheckpointError(
            "FLUX.1-dev", p, EXPECTED, "A component failed to load; re-download the directory.", e
        ) from e


def build_flux_transformer_meta(config: dict | None = None):
    """The FLUX.1-dev transformer (or ``config``) on the meta device: shapes and counts, no memory."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**(config or FLUX_DEV_TRANSFORMER_CONFIG))


VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
VAE_ENCODER_PREFIXES = ("encoder.", "quant_conv.")


def load_vae_config(path: str | Path) -> dict:
    """``path/vae/config.json`` as a dict (shift/scaling factors, latent channels) without loading weights."""
    import json

    cfg = require_dir("FLUX.1-dev", path, EXPECTED) / "vae" / "config.json"
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            "FLUX.1-dev VAE config", cfg, "the VAE's config.json", "Re-download the vae folder.", e
        ) from e


def load_vae_decoder(path: str | Path, dtype: torch.dtype = torch.float32):
    """The FLUX VAE with only its decoder (``post_quant_conv`` + ``decoder``) read from disk.

    Training on precomputed features never encodes an image, so the encoder's weights are not read:
    the model is built on the meta device, the encoder is dropped, and only the decoder's tensors
    are taken from the safetensors file (strictly: a missing or unexpected decoder key is an error).
    """
    from diffusers import AutoencoderKL
    from safetensors import safe_open

    p = _check_layout(path)
    weights = p / "vae" / VAE_WEIGHTS
    expected = f"{EXPECTED}, with vae/{VAE_WEIGHTS}"
    if not weights.is_file():
        raise CheckpointError("FLUX.1-dev VAE", weights, expected, f"The file does not exist. {FIX_HINT}")
    try:
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(load_vae_config(p))
        vae.encoder = None
        vae.quant_conv = None
        with safe_open(str(weights), framework="pt") as f:
            state = {k: f.get_tensor(k).to(dtype) for k in f.keys() if not k.startswith(VAE_ENCODER_PREFIXES)}
        vae.load_state_dict(state, strict=True, assign=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError("FLUX.1-dev VAE decoder", weights, expected, "Re-download the vae folder.", e) from e
    return vae.eval()


CONTROLNET_EXPECTED = (
    "a diffusers FLUX ControlNet directory (config.json with _class_name FluxControlNetModel + "
    "diffusion_pytorch_model.safetensors, as FluxControlNetModel.save_pretrained writes it)"
)


def load_flux_controlnet(path: str | Path, dtype: torch.dtype = torch.float32):
    """One ``diffusers.FluxControlNetModel`` from a local release directory (safetensors only: no pickle)."""
    import json

    from diffusers import FluxControlNetModel

    p = require_dir("FLUX ControlNet", path, CONTROLNET_EXPECTED)
    cfg_file = p / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            "FLUX ControlNet", p, CONTROLNET_EXPECTED, "config.json is missing or not JSON.", e
        ) from e
    if not isinstance(cfg, dict) or cfg.get("_class_name") != "FluxControlNetModel":
        found = cfg.get("_class_name") if isinstance(cfg, dict) else type(cfg).__name__
        raise CheckpointError("FLUX ControlNet", p, CONTROLNET_EXPECTED, f"config.json names {found!r}.")
    if not any(p.glob("diffusion_pytorch_model*.safetensors")):
        raise CheckpointError("FLUX ControlNet", p, CONTROLNET_EXPECTED, "No safetensors weights in it.")
    try:
        return FluxControlNetModel.from_pretrained(
            str(p), torch_dtype=dtype, local_files_only=True, use_safetensors=True
        ).eval()
    except Exception as e:
        raise CheckpointError("FLUX ControlNet", p, CONTROLNET_EXPECTED, "Re-download the directory.", e) from e
