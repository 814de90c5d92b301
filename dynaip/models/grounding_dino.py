"""Grounding DINO (groundingdino-py) from its config .py, released .pth and a local BERT directory,
with a batched text-prompted detector on top.

The release forms followed (IDEA-Research/GroundingDINO; README.md, "Using real checkpoints", lists
them per model):

- the config, e.g. ``groundingdino/config/GroundingDINO_SwinT_OGC.py``: a Python file of plain
  ``name = literal`` assignments. It is read as data (``read_config``): its statements are parsed
  with ``ast`` and never executed, unlike groundingdino's own ``SLConfig.fromfile``, which imports it;
- the weights, ``groundingdino_swint_ogc.pth``: ``{"model": {"module.<key>": tensor}}`` (a DDP
  state dict) holding, beyond what current groundingdino builds, ``label_enc.weight`` (the training
  denoising label embedding) and ``bert.embeddings.position_ids`` (a buffer transformers no longer
  saves); those two are skipped by name (``RELEASE_EXTRA_KEYS``), any other extra key is an error.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import GroundingDinoPaths
from .errors import CheckpointError, require_dir, require_file
from .weights import load_into, load_state_dict

EXPECTED = "Grounding DINO: a config .py (e.g. GroundingDINO_SwinT_OGC.py), a .pth with a 'model' state dict, and a local BERT directory"
RELEASE_EXTRA_KEYS = ("label_enc.weight", "bert.embeddings.position_ids")
"""Keys of the released .pth that the model built by current groundingdino does not have."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Detection:
    """One box: ``box`` is XYXY in the input image's pixels; ``phrase`` is the prompt phrase it matched."""

    box: tuple[float, float, float, float]
    score: float
    phrase: str


def normalize_caption(phrases: Sequence[str] | str) -> str:
    """Grounding DINO's caption convention: lower case, phrases joined by ' . ', ending with '.'."""
    if isinstance(phrases, str):
        phrases = [phrases]
    parts = [q.strip().lower() for p in phrases for q in p.split(".") if q.strip()]
    if not parts:
        raise ValueError("detection prompt is empty: give at least one phrase, e.g. 'person'")
    return " . ".join(parts) + " ."


CONFIG_EXPECTED = "a Grounding DINO config of plain `name = literal` assignments (as GroundingDINO_SwinT_OGC.py)"


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``name = value`` assignments of a Grounding DINO config file, read as data.

    Only top-level assignments of one name to a Python literal (numbers, strings, None/True/False,
    lists, tuples, dicts of those) and docstrings are accepted; anything else (imports, calls,
    expressions, ``_base_`` inheritance) is refused with a CheckpointError naming the line. The
    file is never executed.
    """
    p = require_file("Grounding DINO config", path, CONFIG_EXPECTED)

    def refuse(fix: str, cause: BaseException | None = None) -> CheckpointError:
        return CheckpointError("Grounding DINO config", p, CONFIG_EXPECTED, fix, cause)

    try:
        tree = ast.parse(p.read_text(encoding="utf-8"), filename=str(p))
    except (SyntaxError, ValueError, UnicodeDecodeError) as e:
        raise refuse("It is not valid Python source; use the config published with the checkpoint.", e) from None
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise refuse(
                f"Line {node.lineno} is not a `name = literal` assignment ({type(node).__name__}); the "
                "file is read as data, never run: write its values out as literals."
            )
        name = node.targets[0].id
        if name == "_base_":
            raise refuse(
                f"Line {node.lineno}: config inheritance (_base_) is not read; copy the base config's values in."
            )
        try:
            values[name] = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise refuse(f"Line {node.lineno}: the value of '{name}' is not a literal; write it out as one.") from None
    return values


def load_grounding_dino(paths: GroundingDinoPaths, device: str | torch.device = "cpu"):
    """Builds the model from its config file (read as data, ``read_config``) with ``text_encoder_type``
    pointed at the local BERT directory, then loads the released weights strictly (no pickle:
    ``weights_only=True``), skipping only the release's two known extra keys."""
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    cfg = read_config(paths.config)
    bert = require_dir("Grounding DINO BERT", paths.bert, "a BERT directory with config.json, weights and vocab.txt")
    if not (bert / "config.json").is_file() or not (bert / "vocab.txt").is_file():
        raise CheckpointError(
            "Grounding DINO BERT",
            bert,
            "config.json + vocab.txt + weights",
            "Copy the whole bert-base-uncased directory.",
        )
    sd = load_state_dict("Grounding DINO", paths.checkpoint, EXPECTED)
    cfg.update(text_encoder_type=str(bert), device=str(device), use_checkpoint=False, use_transformer_ckpt=False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the library prints on build
            model = build_model(SLConfig(cfg))  # SLConfig from a dict: nothing is read or run
    except OSError as e:  # transformers reading the BERT directory
        raise CheckpointError(
            "Grounding DINO BERT",
            bert,
            "config.json + vocab.txt + weights",
            "Copy the whole bert-base-uncased directory.",
            e,
        ) from None
    except (AttributeError, KeyError, TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise CheckpointError(
            "Grounding DINO config",
            paths.config,
            CONFIG_EXPECTED,
            "groundingdino cannot build a model from it (a key missing or of the wrong kind?); "
            "use the config published with the checkpoint.",
            e,
        ) from None
    # the BERT pooler is unused by Grounding DINO (the release does carry it); its absence is harmless
    load_into(
        model,
        sd,
        "Grounding DINO",
        paths.checkpoint,
        EXPECTED,
        allow_missing=("bert.pooler",),
        skip_unexpected=RELEASE_EXTRA_KEYS,
    )
    return model.eval().requires_grad_(False).to(device)


class CachedTextEncoder(torch.nn.Module):
    """Grounding DINO's BERT with a cache: each distinct tokenised caption row is encoded once.

    groundingdino encodes the caption of every image of every batch, though a recipe gives one prompt
    to nearly all of them. Rows are keyed by their token ids, self-attention mask, position and type
    ids (all of which BERT reads) and by the autocast state, so a hit returns exactly what BERT
    computed for that row before; only missing rows run, together in one call. Holds at most
    ``size`` rows (least recently used dropped first)."""

    def __init__(self, bert: torch.nn.Module, size: int = 64):
        super().__init__()
        self.bert = bert
        self.size = size
        self.cache: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
        self.misses = 0

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = inputs["input_ids"]
        dev = ids.device.type
        mode = (
            torch.is_autocast_enabled(dev),
            torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None,
        )
        host = {k: v.cpu().numpy() for k, v in sorted(inputs.items())}
        keys = [(mode, *((k, a[i].shape, a[i].tobytes()) for k, a in host.items())) for i in range(len(ids))]
        missing = sorted({keys.index(k) for k in keys if k not in self.cache})
        if missing:
            rows = torch.as_tensor(missing, device=ids.device)
            out = self.bert(**{k: v.index_select(0, rows) for k, v in inputs.items()})["last_hidden_state"]
            self.misses += len(missing)
            for j, i in enumerate(missing):
                self.cache[keys[i]] = out[j]
        for k in keys:
            self.cache.move_to_end(k)
        hidden = torch.stack([self.cache[k] for k in keys])
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return {"last_hidden_state": hidden}


class GroundingDinoDetector:
    """Batched open-vocabulary detection.

    ``detect(images, captions)`` takes RGB uint8 arrays ``(H, W, 3)`` and one caption per image
    (phrases separated by '.'), and returns per image the boxes whose best token logit passes
    ``box_threshold``, each labelled with the phrase whose tokens score highest (≥ ``text_threshold``).

    The model runs at ``precision`` (``dynaip.models.precision``); its scores and boxes are taken to
    fp32 before the thresholds and the box decoding. The caption encoder (BERT) runs once per distinct
    caption (``CachedTextEncoder``).
    """

    def __init__(
        self,
        model,
        *,
        size: int = 800,
        max_size: int = 1333,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
    ):
        from .precision import resolve_precision

        self.model = model
        self.size = size
        self.max_size = max_size
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.tokenizer = model.tokenizer
        if not isinstance(model.bert, CachedTextEncoder):
            model.bert = CachedTextEncoder(model.bert)

    def _prepare(self, image: np.ndarray) -> torch.Tensor:
        h, w = image.shape[:2]
        scale = self.size / min(h, w)
        if max(h, w) * scale > self.max_size:
            scale = self.max_size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255)[None]
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std

    def _phrase_spans(self, caption: str) -> list[tuple[str, list[int]]]:
        enc = self.tokenizer(caption, return_offsets_mapping=True)
        spans: list[tuple[str, list[int]]] = []
        start = 0
        for phrase in caption.split("."):
            stripped = phrase.strip()
            if stripped:
                lo = caption.index(stripped, start)
                hi = lo + len(stripped)
                idx = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a >= lo and b <= hi]
                spans.append((stripped, idx))
                start = hi
        return spans

    @torch.no_grad()
    def detect(
        self, images: Sequence[np.ndarray], captions: Sequence[str], *, box_threshold: float, text_threshold: float
    ) -> list[list[Detection]]:
        from groundingdino.util.misc import nested_tensor_from_tensor_list

        from .precision import model_precision

        if len(images) != len(captions):
            raise ValueError(f"detect: {len(images)} images but {len(captions)} captions; give one caption per image")
        if not images:
            return []
        captions = [normalize_caption(c) for c in captions]
        batch = nested_tensor_from_tensor_list([self._prepare(im) for im in images]).to(self.device)
        with model_precision(self.precision, self.device):
            out = self.model(batch, captions=list(captions))
        logits = out["pred_logits"].sigmoid().float().cpu()  # (B, nq, 256) token scores
        boxes = out["pred_boxes"].float().cpu()  # (B, nq, 4) normalised cx, cy, w, h
        results: list[list[Detection]] = []
        for b, (image, caption) in enumerate(zip(images, captions)):
            h, w = image.shape[:2]
            spans = self._phrase_spans(caption)
            keep = logits[b].max(dim=1).values > box_threshold
            dets: list[Detection] = []
            for q in torch.nonzero(keep).flatten().tolist():
                scored = [(float(logits[b, q, idx].max()), phrase) for phrase, idx in spans if idx]
                if not scored:
                    continue
                best, phrase = max(scored)
                if best < text_threshold:
                    continue
                cx, cy, bw, bh = boxes[b, q].tolist()
                x0, y0 = max(0.0, (cx - bw / 2) * w), max(0.0, (cy - bh / 2) * h)
                x1, y1 = min(float(w), (cx + bw / 2) * w), min(float(h), (cy + bh / 2) * h)
                if x1 > x0 and y1 > y0:
                    dets.append(Detection((x0, y0, x1, y1), float(logits[b, q].max()), phrase))
            dets.sort(key=lambda d: -d.score)
            results.append(dets)
        return results
