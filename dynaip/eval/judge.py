"""VLM judges for concept preservation (CP) and prompt following (PF), DreamBench++ style.

Judges are OpenAI-compatible chat-completion servers (vLLM, SGLang, LMDeploy): the harness POSTs
``{base_url}/chat/completions`` with the images as base64 PNG data URLs in ``image_url`` content parts
(each resized so its longer side is ``image_size`` px, 512 by default). An answer is valid when the
text after its first ``Score:`` holds exactly one number and that number is an integer 0–4
("Score: 3" ✓; "Score: 3 or 4", "Score: 5", "Score: 2.5" and answers without ``Score:`` ✗). An invalid
answer is asked again, at most ``max_retries`` more times; the item score is ``score / 4``.

Config (YAML)::

    image_size: 512
    judges:
      - name: internvl3-78b                   # a label; part of the score keys
        base_url: http://gpu-node-1:23333/v1  # the server's OpenAI-compatible root
        model: OpenGVLab/InternVL3-78B        # the served model name
        api_key_env: null                     # env var holding the API key (null: no Authorization header)
        temperature: 0.0
        max_retries: 3                        # extra attempts after an unparsable answer
        timeout_s: 180                        # per HTTP request
      - name: qwen3-vl-32b
        base_url: http://gpu-node-2:8000/v1
        model: Qwen/Qwen3-VL-32B-Instruct
    dino:                                     # optional: DINO similarity (see dynaip.eval.metrics)
      path: /ckpt/dino_deitsmall16_pretrain.pth
      arch: vit_small_patch16_224
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class JudgeConfig:
    """One VLM judge behind an OpenAI-compatible chat-completions endpoint."""

    name: str
    """Label used in score keys and reports (e.g. ``internvl3-78b``)."""
    base_url: str
    """API root such as ``http://host:8000/v1``; requests go to ``{base_url}/chat/completions``."""
    model: str
    """Model name as the server knows it."""
    api_key_env: str | None = None
    """Environment variable holding the API key; None sends no Authorization header."""
    temperature: float = 0.0
    """Sampling temperature of the first attempt."""
    retry_temperature: float = 0.7
    """Temperature of retries after an unparsable answer (a greedy judge would repeat itself)."""
    max_retries: int = 3
    """Extra attempts after an unparsable answer or a transient HTTP failure (so ≤ 1 + max_retries requests)."""
    timeout_s: float = 180.0
    """Timeout of every HTTP request, seconds."""
    max_tokens: int = 1024
    """Answer length limit."""
    retry_backoff_s: float = 2.0
    """Wait before retrying a failed HTTP request (doubles each time); 0 in tests."""

    def __post_init__(self) -> None:
        if not re.match(r"^[A-Za-z0-9_.\-]+$", self.name):
            raise ValueError(f"judge name {self.name!r} may hold only [A-Za-z0-9_.-] (it is part of score keys)")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge {self.name}: base_url {self.base_url!r} must start with http:// or https://")
        if self.max_retries < 0 or self.timeout_s <= 0:
            raise ValueError(f"judge {self.name}: max_retries ({self.max_retries}) must be ≥ 0 and timeout_s "
                             f"({self.timeout_s}) > 0")

    def api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ValueError(f"judge {self.name}: environment variable {self.api_key_env} (api_key_env) is not set; "
                             "export it or set api_key_env: null for servers without authentication")
        return key


@dataclass(kw_only=True)
class DinoPaths:
    """A DINO ViT checkpoint (official ``dino_*_pretrain.pth`` or any timm-format ViT state dict)."""

    path: str
    """``.pth`` / ``.safetensors`` state dict with timm VisionTransformer key names."""
    arch: str = "vit_small_patch16_224"
    """timm architecture name (``vit_small_patch16_224`` for DINO ViT-S/16, ``vit_base_patch16_224`` for ViT-B/16)."""
    model_args: dict = field(default_factory=dict)
    """Extra timm ``create_model`` arguments (e.g. tiny test models: img_size, embed_dim, depth, num_heads)."""


@dataclass(kw_only=True)
class EvalConfig:
    """The ``eval score`` config file: judges and optional DINO weights."""

    judges: list[JudgeConfig] = field(default_factory=list)
    """VLM judges; their scores are averaged per item."""
    image_size: int = 512
    """Images sent to judges are resized so their longer side is this many pixels."""
    dino: DinoPaths | None = None
    """DINO weights for the DINO score; None skips it."""

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EvalConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"eval config '{path}' does not exist; start from jobs/configs/eval_judges.yaml")
        raw = yaml.safe_load(path.read_text()) or {}
        unknown = set(raw) - {"judges", "image_size", "dino"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: judges, image_size, dino")
        try:
            judges = [JudgeConfig(**j) for j in raw.get("judges") or []]
        except TypeError as e:
            raise ValueError(f"{path}: bad judge entry ({e}); see jobs/configs/eval_judges.yaml for the fields") from e
        names = [j.name for j in judges]
        if len(set(names)) != len(names):
            raise ValueError(f"{path}: judge names {names} repeat; give every judge a distinct name")
        dino = raw.get("dino")
        if dino is not None:
            dino = dict(dino)
            p = Path(str(dino["path"])).expanduser()
            dino["path"] = str(p if p.is_absolute() else (path.parent / p).resolve())
            dino = DinoPaths(**dino)
        return cls(judges=judges, image_size=int(raw.get("image_size", 512)), dino=dino)


# ----------------------------------------------------------------------------------------------- prompts
SYSTEM_PROMPT = ("You are a meticulous, impartial judge of AI-generated images. You follow the rubric exactly, "
                 "reason briefly, and always end with a line of the form 'Score: N' where N is one integer from 0 to 4.")

SCALE = """Scale:
0 = very poor: {zero}
1 = poor: {one}
2 = fair: {two}
3 = good: {three}
4 = excellent: {four}"""

CP_SUBJECT = """Image 1 is a reference image of a subject: {name}. Image 2 was generated by a personalization model.
{multi}Rate CONCEPT PRESERVATION: how faithfully Image 2 reproduces the identity of the subject in Image 1.
Compare, in this order:
- shape: overall silhouette, proportions and distinctive parts;
- colour: the colours and their placement;
- texture: materials, fur, fabric, patterns, printed details and logos;
- facial features: for people, animals and characters, the eyes, nose, mouth, face shape and hair.
Ignore the background, pose, viewpoint, lighting and whether a text prompt is followed: only the subject's identity counts.
""" + SCALE.format(zero="the subject is absent or unrecognizable",
                   one="a similar kind of subject, but most details (shape, colour, texture, face) differ",
                   two="recognizably related, with several clear differences",
                   three="the same subject with minor differences in a few details",
                   four="the same subject; shape, colour, texture and facial features all match") + """
Answer with one or two sentences of justification, then a last line exactly 'Score: N'."""

CP_STYLE = """Image 1 is a style reference ({name}). Image 2 was generated by a personalization model asked to use that style.
Rate STYLE PRESERVATION: how faithfully Image 2 reproduces the artistic style of Image 1, judging the colour palette,
brushwork or rendering technique, texture, line quality, lighting and level of abstraction.
Ignore what the images depict: only the style counts.
""" + SCALE.format(zero="an unrelated style", one="a vaguely similar style with most traits different",
                   two="some traits shared, several clearly different", three="the same style with minor differences",
                   four="indistinguishable in style") + """
Answer with one or two sentences of justification, then a last line exactly 'Score: N'."""

PF_PROMPT = """The image was generated from this text prompt:
"{prompt}"
Rate PROMPT FOLLOWING: how completely and accurately the image depicts what the prompt asks for — every subject it
names, their actions and relations, the scene, and any style or attribute it specifies. Do not judge image quality or
beauty, only agreement with the prompt.
""" + SCALE.format(zero="the image has nothing to do with the prompt", one="a small part of the prompt is depicted",
                   two="the main subject is there but important parts of the prompt are missing or wrong",
                   three="almost everything is depicted, with a minor omission or error",
                   four="everything in the prompt is depicted accurately") + """
Answer with one or two sentences of justification, then a last line exactly 'Score: N'."""

MULTI_NOTE = ("Image 2 is meant to contain several subjects; judge ONLY the subject shown in Image 1 (the one that "
              "best matches it), ignoring the others.\n")


def cp_prompt(name: str, *, style: bool, multi: bool) -> str:
    """The CP instruction for one reference subject (style rubric for DreamBench++ style references)."""
    if style:
        return CP_STYLE.format(name=name)
    return CP_SUBJECT.format(name=name, multi=MULTI_NOTE if multi else "")


def pf_prompt(prompt: str) -> str:
    return PF_PROMPT.format(prompt=prompt)


# ----------------------------------------------------------------------------------------------- parsing
_NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)?")
_SCORE = re.compile(r"score\s*[:：]", re.IGNORECASE)


def parse_score(answer: str) -> int | None:
    """The 0–4 integer after the first ``Score:`` or None when the answer is not exactly one such integer."""
    m = _SCORE.search(answer or "")
    if m is None:
        return None
    numbers = _NUMBER.findall(answer[m.end():])
    if len(numbers) != 1:
        return None
    n = numbers[0]
    if not re.fullmatch(r"[+]?\d+", n):
        return None
    value = int(n)
    return value if 0 <= value <= 4 else None


# ----------------------------------------------------------------------------------------------- client
class JudgeError(RuntimeError):
    """A judge server could not be reached or refused the request."""


def image_data_url(image: Image.Image | str | Path, size: int = 512) -> str:
    """``data:image/png;base64,...`` of the RGB image resized so its longer side is ``size`` px."""
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    image = image.convert("RGB")
    scale = size / max(image.size)
    if scale != 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass(kw_only=True)
class Judgement:
    score: int | None
    """0–4, or None when every attempt was unparsable."""
    attempts: int
    """Chat requests answered (1 + parse retries)."""
    answers: list[str]
    """Every raw answer, in order (each cut to 2,000 characters)."""


class ChatJudge:
    """Sends one rubric + images to one judge and parses ``Score: N`` with bounded retries."""

    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._key = cfg.api_key()

    def _post(self, body: dict) -> str:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        delay = self.cfg.retry_backoff_s
        last: Exception | None = None
        for attempt in range(1 + self.cfg.max_retries):
            if attempt:
                time.sleep(delay)
                delay *= 2
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
                return str(payload["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code != 429 and e.code < 500:  # the request itself is wrong: retrying will not help
                    raise JudgeError(f"judge {self.cfg.name} ({self.url}) refused the request: HTTP {e.code} {detail}; "
                                     f"check the model name '{self.cfg.model}' and the API key") from e
                last = e
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError, KeyError, IndexError,
                    TypeError) as e:
                last = e
            log.warning("judge %s: request failed (%s: %s), attempt %d/%d", self.cfg.name, type(last).__name__,
                        last, attempt + 1, 1 + self.cfg.max_retries)
        raise JudgeError(f"judge {self.cfg.name} at {self.url} failed {1 + self.cfg.max_retries} times "
                         f"(last: {type(last).__name__}: {last}); is the server up? (vLLM: `vllm serve MODEL`)")

    def ask(self, instruction: str, images: list[Image.Image | str | Path], image_size: int = 512) -> Judgement:
        """Asks until the answer parses (≤ 1 + max_retries times); images follow the instruction in order."""
        content: list[dict[str, Any]] = [{"type": "text", "text": instruction}]
        content += [{"type": "image_url", "image_url": {"url": image_data_url(im, image_size)}} for im in images]
        answers: list[str] = []
        for attempt in range(1 + self.cfg.max_retries):
            body = {"model": self.cfg.model, "max_tokens": self.cfg.max_tokens,
                    "temperature": self.cfg.temperature if attempt == 0 else self.cfg.retry_temperature,
                    "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]}
            answer = self._post(body)
            answers.append(answer[:2000])
            score = parse_score(answer)
            if score is not None:
                return Judgement(score=score, attempts=attempt + 1, answers=answers)
            log.debug("judge %s: unparsable answer %r", self.cfg.name, answer[-200:])
        return Judgement(score=None, attempts=len(answers), answers=answers)
