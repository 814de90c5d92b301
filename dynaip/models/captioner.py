"""Image captions from a local transformers image-to-text directory (BLIP, BLIP-2, ... — any model
that ``AutoModelForImageTextToText`` / ``AutoModelForVision2Seq`` loads without remote code).

Decoding is greedy with a fixed ``max_new_tokens`` (no sampling, one beam), so the same image gives
the same caption on every run, and a batch gives what its images give one by one (every image in a
batch gets the same prompt, so no prompt is padded).

``write_tiny_captioner(out)`` writes a random-weight BLIP (``BlipForConditionalGeneration``) in its
release format (config.json + model.safetensors + preprocessor/tokenizer files, WordPiece vocab built
offline) for tests and the demo: its captions are strings of random vocabulary words.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .errors import CheckpointError, FIX_HINT, require_dir

EXPECTED = (
    "a transformers image-to-text directory (config.json + weights + processor files, e.g. "
    "Salesforce/blip-image-captioning-large)"
)


def captioner_name(path: str | Path) -> str:
    """What the sample json records as the model: the directory's name (stable wherever the
    checkpoints are mounted, so shards do not depend on the mount point; the manifest keeps the path)."""
    return Path(path).name


class Captioner:
    """``captions(images, prompt)`` → one caption per PIL image, greedy, ``max_new_tokens`` at most."""

    def __init__(self, path: str | Path, device: str = "cpu", max_new_tokens: int = 40):
        from transformers import AutoProcessor

        p = require_dir("captioner", path, EXPECTED)
        if not (p / "config.json").is_file():
            raise CheckpointError("captioner", p, EXPECTED, f"config.json is missing from the directory. {FIX_HINT}")
        self.path, self.name, self.device, self.max_new_tokens = str(p), captioner_name(p), device, int(max_new_tokens)
        try:
            # use_fast=False: the processor the model was trained with (and no notice about fast ones)
            self.processor = AutoProcessor.from_pretrained(
                str(p), local_files_only=True, trust_remote_code=False, use_fast=False
            )
            self.model = _load_model(p).to(device).eval().requires_grad_(False)
        except CheckpointError:
            raise
        except Exception as e:  # unknown architecture, missing weights, remote code needed ...
            raise CheckpointError(
                "captioner",
                p,
                EXPECTED,
                "Use a model transformers loads without remote code (BLIP, BLIP-2; see docs/curation_quality.md).",
                e,
            ) from e

    @torch.no_grad()
    def captions(self, images: Sequence[Image.Image], prompt: str | None = None) -> list[str]:
        if not images:
            return []
        kwargs = {"images": list(images), "return_tensors": "pt"}
        if prompt:
            kwargs["text"] = [prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def _load_model(p: Path):
    import transformers

    errors = []
    for auto in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        cls = getattr(transformers, auto, None)
        if cls is None:
            continue
        try:
            return cls.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        except ValueError as e:  # this auto class does not map the architecture: try the next one
            errors.append(e)
    raise errors[-1] if errors else RuntimeError("no image-to-text auto class in this transformers")


# ---- tiny checkpoint ---------------------------------------------------------------------------------

TINY_IMAGE_SIZE = 32


def write_tiny_captioner(out: Path) -> None:
    """A random-weight BLIP captioner in the release's format (call under a fixed torch seed)."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from . import offline_tokenizers as tok

    out.mkdir(parents=True, exist_ok=True)
    vocab = tok.write_bert_vocab(out)
    with open(out / "vocab.txt", "a") as f:  # BLIP's decoder start token, as the release adds it after BERT's vocab
        f.write("[DEC]\n")
    dec = vocab  # its id
    config = BlipConfig(
        text_config=dict(
            vocab_size=vocab + 1,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            encoder_hidden_size=32,
            max_position_embeddings=64,
            bos_token_id=dec,
            pad_token_id=0,
            sep_token_id=3,
            eos_token_id=3,
            initializer_range=0.5,
        ),  # large random weights: captions that depend on the image
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=TINY_IMAGE_SIZE,
            patch_size=8,
            initializer_range=1.0,
        ),
        projection_dim=32,
    )
    BlipForConditionalGeneration(config).save_pretrained(str(out), safe_serialization=True)
    tokenizer = BertTokenizer(str(out / "vocab.txt"), do_lower_case=True, bos_token="[DEC]", model_max_length=64)
    image_processor = BlipImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(out))
    # the processor rewrites tokenizer_config.json with its own key order; keep it canonical (same bytes every run)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"):
        f = out / name
        if f.is_file():
            f.write_text(json.dumps(json.loads(f.read_text()), indent=2, sort_keys=True) + "\n")
