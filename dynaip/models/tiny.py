"""Tiny random-weight checkpoints in the real release formats (tests and the demo).

``write_tiny_checkpoints(out)`` writes::

    out/flux/                       diffusers FluxPipeline directory (safetensors; transformer and T5 sharded)
    out/clip/                       open_clip_config.json + open_clip_model.safetensors
    out/grounding_dino/config.py    Grounding DINO config (SwinT backbone, tiny heads)
    out/grounding_dino/model.pth    {"model": {"module.<key>": ...}} + the release's extra keys (weights_only)
    out/grounding_dino/bert/        BERT directory (config.json, model.safetensors, vocab.txt)
    out/sam/sam_tiny.pth            SAM state dict
    out/captioner/                  BLIP (BlipForConditionalGeneration) directory (safetensors, WordPiece vocab.txt)
    out/aesthetic/tiny-linearMSE.pth  aesthetic head (improved-aesthetic-predictor .pth form) over the tiny CLIP
    out/controlnet/                 FLUX ControlNet (diffusers FluxControlNetModel directory) over the tiny FLUX
    out/models.yaml                 paths of the models every command reads (not the ControlNet: like a
                                    LoRA it is a per-generation extension, named with --controlnet)

Same seed → byte-identical files. Pictures made with these weights are noise by design.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from . import offline_tokenizers as tok

log = logging.getLogger(__name__)

TINY_FLUX_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    out_channels=None,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
# The tiny VAE stands in for FLUX's in training too, so a training latent must depend on its image
# as a trained VAE's does (measured: BENCHMARKS.md, "Reference-conditional loss gap"):
# - scaling_factor / shift_factor: 1 / std and mean of this VAE's posterior means (seed 0) over the
#   64-px photo crops 0-47 of tests/train_fixtures.py, so scaled latents have unit variance as FLUX's
#   have with its own factors (FLUX's 0.3611 / 0.1159 left this VAE's latents at variance 0.13);
# - the posterior is made near-deterministic after init (TINY_VAE_LOGVAR).
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=2.5849,
    shift_factor=0.007,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
TINY_VAE_LOGVAR = -10.0
"""Posterior log-variance of the tiny VAE (std ≈ 0.007). Random init gives ≈ 0 (std ≈ 0.9, larger than
the spread of the posterior means), which made a sampled training latent mostly noise, unrelated to
its image: nothing, the reference included, could then predict it."""
TINY_CLIP_CONFIG = dict(  # OpenCLIP model_cfg: 6-layer ViT on 56-px images, 2-layer text tower
    embed_dim=32,
    quick_gelu=False,
    vision_cfg=dict(image_size=56, patch_size=14, width=32, layers=6, head_width=16, mlp_ratio=2.0),
    text_cfg=dict(context_length=77, vocab_size=1000, width=32, heads=2, layers=2),
)
TINY_CLIP_LAYERS = (2, 4, 6)  # low / mid / high of the tiny 6-layer tower (the paper: 10, 17, 24 of 24)
TINY_GROUNDING_DINO_CONFIG = """\
# Grounding DINO config with the release's structure and small heads (tests and the demo only).
batch_size = 1
modelname = "groundingdino"
backbone = "swin_T_224_1k"
position_embedding = "sine"
pe_temperatureH = 20
pe_temperatureW = 20
return_interm_indices = [1, 2, 3]
backbone_freeze_keywords = None
enc_layers = 1
dec_layers = 1
pre_norm = False
dim_feedforward = 256
hidden_dim = 256  # the text enhancer hard-codes 256-d sine position features
dropout = 0.0
nheads = 8
num_queries = 20
query_dim = 4
num_patterns = 0
num_feature_levels = 4
enc_n_points = 2
dec_n_points = 2
two_stage_type = "standard"
two_stage_bbox_embed_share = False
two_stage_class_embed_share = False
transformer_activation = "relu"
dec_pred_bbox_embed_share = True
dn_box_noise_scale = 1.0
dn_label_noise_ratio = 0.5
dn_label_coef = 1.0
dn_bbox_coef = 1.0
embed_init_tgt = True
dn_labelbook_size = 2000
max_text_len = 256
text_encoder_type = "bert-base-uncased"
use_text_enhancer = True
use_fusion_layer = True
use_checkpoint = False
use_transformer_ckpt = False
use_text_cross_attention = True
text_dropout = 0.0
fusion_dropout = 0.0
fusion_droppath = 0.1
sub_sentence_present = True
"""


TINY_CONTROLNET_CONFIG = dict(  # an InstantX-style FLUX ControlNet (no input hint block: the VAE encodes the
    # control image) with the tiny transformer's sizes; one double and one single block, so both kinds of
    # residual reach the transformer
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)


def _sharpen_posterior(vae: torch.nn.Module) -> None:
    """Constant log-variance ``TINY_VAE_LOGVAR``: the encoder's output channels past ``latent_channels``
    are the posterior's log-variance (diffusers' DiagonalGaussianDistribution)."""
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.encoder.conv_out.weight[c:].zero_()
        vae.encoder.conv_out.bias[c:].fill_(TINY_VAE_LOGVAR)


def _write_flux(out: Path) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    tok_dir = out.parent / (out.name + ".tok")
    tok.write_clip_tokenizer(tok_dir / "tokenizer")
    t5_vocab = tok.write_t5_tokenizer(tok_dir / "tokenizer_2")
    clip_vocab = tok.clip_vocab_size(tok_dir / "tokenizer")

    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER_CONFIG)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    _sharpen_posterior(vae)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=clip_vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=clip_vocab - 2,
            eos_token_id=clip_vocab - 1,
            pad_token_id=clip_vocab - 1,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=t5_vocab,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            is_encoder_decoder=False,
            use_cache=False,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir / "tokenizer"),
        text_encoder_2=text_encoder_2,
        tokenizer_2=T5TokenizerFast.from_pretrained(tok_dir / "tokenizer_2"),
        transformer=transformer,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    # FLUX.1-dev's own layout (black-forest-labs/FLUX.1-dev): transformer/ and text_encoder_2/ split in
    # safetensors shards (3 and 2 there; the tiny split goes by tensor, so the counts may differ) beside
    # their *.safetensors.index.json; vae/ and text_encoder/ are single files, as there
    for name, model, shards in (("transformer", transformer, 3), ("text_encoder_2", text_encoder_2, 2)):
        shutil.rmtree(out / name)
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        model.save_pretrained(str(out / name), safe_serialization=True, max_shard_size=size // shards + 1)
    # save_pretrained rewrites tokenizer files; keep the exact offline-built ones (deterministic bytes)
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(out / name)
        shutil.copytree(tok_dir / name, out / name)
    shutil.rmtree(tok_dir)


def _write_clip(out: Path) -> None:
    """The Hugging Face open_clip folder as open_clip's ``push_to_hf_hub`` writes it (e.g.
    timm/vit_large_patch14_clip_336.openai): ``open_clip_config.json`` = ``{"model_cfg", "preprocess_cfg"}``
    (``model_cfg`` states ``quick_gelu``) + ``open_clip_model.safetensors`` holding the whole model's
    state dict (vision and text towers) with open_clip's own key names."""
    from .clip_vision import build_open_clip

    out.mkdir(parents=True, exist_ok=True)
    model = build_open_clip(TINY_CLIP_CONFIG)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": TINY_CLIP_CONFIG,
                "preprocess_cfg": {
                    "mean": [0.48145466, 0.4578275, 0.40821073],
                    "std": [0.26862954, 0.26130258, 0.27577711],
                    "interpolation": "bicubic",
                    "resize_mode": "shortest",
                },
            },
            indent=2,
            sort_keys=True,
        )
    )


def _write_grounding_dino(out: Path) -> None:
    """The release's container (IDEA-Research/GroundingDINO ``groundingdino_swint_ogc.pth``):
    ``{"model": {"module.<key>": tensor}}``, a DDP state dict, with the two keys current groundingdino
    does not build (``label_enc.weight``: the training label embedding, ``(dn_labelbook_size + 1,
    hidden_dim)``; ``bert.embeddings.position_ids``: ``(1, max_position_embeddings)`` int64) and the
    BERT pooler, which the release carries."""
    import contextlib
    import io

    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig
    from transformers import BertConfig, BertModel

    from .grounding_dino import read_config

    out.mkdir(parents=True, exist_ok=True)
    bert_dir = out / "bert"
    vocab = tok.write_bert_vocab(bert_dir)
    bert = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(bert).save_pretrained(str(bert_dir), safe_serialization=True)
    (out / "config.py").write_text(TINY_GROUNDING_DINO_CONFIG)
    cfg = read_config(out / "config.py")
    cfg.update(text_encoder_type=str(bert_dir), device="cpu")
    with contextlib.redirect_stdout(io.StringIO()):
        model = build_model(SLConfig(cfg))
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    sd["label_enc.weight"] = torch.randn(cfg["dn_labelbook_size"] + 1, cfg["hidden_dim"])
    sd["bert.embeddings.position_ids"] = torch.arange(bert.max_position_embeddings).unsqueeze(0)
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, str(out / "model.pth"))


def _write_sam(out: Path) -> None:
    """The segment-anything release form (``sam_vit_h_4b8939.pth``): ``torch.save`` of the model's flat
    state dict, no wrapper, no prefix."""
    from .sam import build_sam_tiny

    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in build_sam_tiny().state_dict().items()}
    torch.save(sd, str(out / "sam_tiny.pth"))


def write_tiny_controlnet(out: Path) -> None:
    """A ``FluxControlNetModel`` directory as diffusers' ``save_pretrained`` lays it out and FLUX ControlNet
    releases ship it (e.g. InstantX/FLUX.1-dev-Controlnet-Canny on the Hugging Face hub): ``config.json`` +
    ``diffusion_pytorch_model.safetensors``. A fresh ControlNet is a no-op (its input embedder and
    per-block output projections start at zero), so those are re-drawn as a trained one's are not zero:
    the control image then changes the picture."""
    from diffusers import FluxControlNetModel

    net = FluxControlNetModel(**TINY_CONTROLNET_CONFIG)
    with torch.no_grad():
        for layer in (net.controlnet_x_embedder, *net.controlnet_blocks, *net.controlnet_single_blocks):
            layer.reset_parameters()
    net.save_pretrained(str(out), safe_serialization=True)


MODELS_YAML = {
    "flux": "flux",
    "clip_vision": {"path": "clip", "layers": list(TINY_CLIP_LAYERS)},  # quick_gelu: open_clip_config.json says
    "grounding_dino": {
        "config": "grounding_dino/config.py",
        "checkpoint": "grounding_dino/model.pth",
        "bert": "grounding_dino/bert",
    },
    "sam": {"checkpoint": "sam/sam_tiny.pth", "variant": "tiny"},
    "captioner": "captioner",
    "aesthetic": {"path": "aesthetic/tiny-linearMSE.pth"},  # over clip_vision's embeddings
}


def write_tiny_checkpoints(out: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Writes every tiny checkpoint under ``out`` and returns the path of ``out/models.yaml``.

    The directory is built in a temporary sibling and renamed into place, so an interrupted
    run never leaves a half-written set behind.
    """
    out = Path(out)
    if (out / "models.yaml").is_file() and not overwrite:
        log.info("tiny checkpoints already in %s", out)
        return out / "models.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        torch.manual_seed(seed)
        _write_flux(tmp / "flux")
        torch.manual_seed(seed + 1)
        _write_clip(tmp / "clip")
        torch.manual_seed(seed + 2)
        _write_grounding_dino(tmp / "grounding_dino")
        torch.manual_seed(seed + 3)
        _write_sam(tmp / "sam")
        from .aesthetic import write_tiny_aesthetic_head
        from .captioner import write_tiny_captioner

        torch.manual_seed(seed + 4)
        write_tiny_captioner(tmp / "captioner")
        torch.manual_seed(seed + 5)
        write_tiny_aesthetic_head(tmp / "aesthetic" / "tiny-linearMSE.pth", TINY_CLIP_CONFIG["embed_dim"])
        torch.manual_seed(seed + 6)
        write_tiny_controlnet(tmp / "controlnet")
        (tmp / "models.yaml").write_text(
            "# Tiny random-weight checkpoints written by `dynaip tiny-checkpoints` (tests/demo only).\n"
            + yaml.safe_dump(MODELS_YAML, sort_keys=False)
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "models.yaml"
