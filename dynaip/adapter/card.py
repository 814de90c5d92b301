"""The model card ``README.md`` that ``DynaIPAdapter.save_pretrained`` writes beside the weights, so an
adapter directory is a Hugging Face model repository as it is (docs/ARCHITECTURE.md, "Adapter
checkpoint"; README.md, "Publish your dataset / adapter").

YAML front matter in the hub's model-card metadata format (``base_model``, ``license``, ``pipeline_tag``,
``tags``), then: what the adapter is (format, dtype, parameters, config, CLIP tower), how it was trained
(base model, step, run, the datasets of every stage with the sha256 of their manifests, the training
config) and how to load it. ``training`` comes from the trainer (dynaip/train/resume.py); an adapter
saved by other code gets a card without that section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import yaml

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
FLUX_DEV_LICENSE = {
    "license": "other",
    "license_name": "flux-1-dev-non-commercial-license",
    "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
}
"""The terms FLUX.1-dev derivatives are published under (as its model card states)."""


def flux_base_model(transformer_config: Mapping[str, Any]) -> str | None:
    """``FLUX_DEV`` when a diffusers ``transformer/config.json`` has FLUX.1-dev's shape (19 double + 38
    single blocks, 24 heads × 128, guidance embedding: FLUX.1-schnell has none), else None."""
    c = transformer_config
    shape = (c.get("num_layers"), c.get("num_single_layers"), c.get("num_attention_heads"), c.get("attention_head_dim"))
    return FLUX_DEV if shape == (19, 38, 24, 128) and c.get("guidance_embeds") is True else None


def base_model_of(flux_dir: str) -> dict[str, Any]:
    """``{path, hub_id}`` of the FLUX directory an adapter is trained on (``hub_id`` from its
    ``transformer/config.json``: ``flux_base_model``; None when unreadable or another model)."""
    try:
        config = json.loads((Path(flux_dir) / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return {"path": str(flux_dir), "hub_id": flux_base_model(config) if isinstance(config, dict) else None}


def metadata(training: Mapping[str, Any] | None) -> dict[str, Any]:
    base = ((training or {}).get("base_model") or {}).get("hub_id")
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
        if base == FLUX_DEV:
            meta.update(FLUX_DEV_LICENSE)
    meta.update(
        {
            "pipeline_tag": "text-to-image",
            "tags": ["dynaip", "flux", "image-prompt-adapter", "subject-driven-generation"],
        }
    )
    return meta


def _redacted(obj: Any) -> Any:
    """``obj`` with every URL's ``user:password@`` removed: a card is meant to be published."""
    from dynaip.dataset.store import redact_url

    if isinstance(obj, str):
        return redact_url(obj) if "://" in obj else obj
    if isinstance(obj, Mapping):
        return {k: _redacted(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_redacted(v) for v in obj]
    return obj


def _yaml_block(obj: Any) -> list[str]:
    return ["```yaml", yaml.safe_dump(obj, sort_keys=True, allow_unicode=True, width=120).rstrip(), "```"]


def model_card(
    meta: Mapping[str, Any],
    num_parameters: int,
    training: Mapping[str, Any] | None = None,
    name: str = "path/to/this/directory",
) -> str:
    """``README.md`` of an adapter directory. ``meta``: its ``config.json`` (format, dtype, config,
    clip_vision); ``training``: ``{base_model: {path, hub_id}, step, max_steps, run_id, stage, datasets:
    [{stage, dirs, manifests}], config}`` (the trainer's), or None."""
    cfg = meta.get("config") or {}
    out = [
        "# DynaIP adapter",
        "",
        "A DynaIP image-prompt adapter for FLUX (HMoE-FFM reference encoder + one image cross-attention per "
        "transformer block): it conditions generation on reference images of one or more subjects.",
        "",
        "| | |",
        "|---|---|",
        f"| format | `{meta.get('format')}` (`adapter.safetensors` + `config.json`) |",
        f"| dtype | {meta.get('dtype')} |",
        f"| parameters | {num_parameters:,} |",
        f"| blocks | {cfg.get('num_double_blocks')} double + {cfg.get('num_single_blocks')} single |",
        f"| CLIP layers | {cfg.get('clip_layers')} |",
    ]
    if meta.get("clip_vision"):
        out.append(f"| CLIP vision tower | `{json.dumps(meta['clip_vision'], sort_keys=True)}` |")
    out += ["", "Adapter config (`config.json`):", "", *_yaml_block(cfg)]
    if training:
        training = _redacted(training)
        base = training.get("base_model") or {}
        out += [
            "",
            "## Training",
            "",
            f"- base model: {base.get('hub_id') or 'not FLUX.1-dev by its config'} (local copy `{base.get('path')}`)",
            f"- step {training.get('step')} of {training.get('max_steps')}, stage `{training.get('stage')}`, "
            f"run `{training.get('run_id')}`",
            "",
            "Training data, per stage (each dataset named by the sha256 of its `manifest.json`, which lists "
            "the sha256 of every shard):",
            "",
            "| stage | dataset | manifest sha256 |",
            "|---|---|---|",
        ]
        for stage in training.get("datasets") or []:
            for d, digest in zip(stage.get("dirs") or [], stage.get("manifests") or []):
                out.append(f"| {stage.get('stage')} | `{d}` | `{digest}` |")
        out += ["", "Training config:", "", *_yaml_block(training.get("config") or {})]
    out += [
        "",
        "## How to load",
        "",
        "```python",
        "import torch",
        "from diffusers import FluxPipeline",
        "from dynaip import load_dynaip",
        "",
        'pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")',
        f'dynaip = load_dynaip(pipe, "{name}", clip_vision="path/to/open_clip")  # or a hub id in the local cache',
        'image = dynaip("a dog on the beach", references=["dog.png"], seed=0).images[0]',
        "```",
        "",
        "`DynaIPAdapter.from_pretrained(...)` loads the adapter alone. A hub id (`owner/name`) is read from "
        "the local Hugging Face cache only: download it first with `huggingface-cli download owner/name`.",
        "",
    ]
    front = yaml.safe_dump(metadata(training), sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{front}---\n\n" + "\n".join(out)


__all__ = ["FLUX_DEV", "base_model_of", "flux_base_model", "metadata", "model_card"]
