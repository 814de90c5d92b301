"""VLM judges for concept preservation (CP) and prompt following (PF), DreamBench++ style.

Judges are OpenAI-compatible chat-completion servers (vLLM, SGLang, LMDeploy): the harness POSTs
``{base_url}/chat/completions`` with the images as base64 data URLs in ``image_url`` content parts.
The item score is ``score / 4``. How a judge is asked is the config's ``protocol``:

``dreambench`` — the procedure of the DreamBench++ benchmark (README.md, section "Evaluation", lists
every point and how it differs from the benchmark's own scripts):

- conversation: a user turn with the rubric, an assistant turn acknowledging it, then a user turn with
  the sample (CP: the reference image then the generated image; PF: the prompt text then the generated
  image); no system message. The rubric and acknowledgement texts are ours (``DREAMBENCH_RUBRICS``);
- images: EXIF-rotated, transparency flattened on white, resized to ``image_size`` × ``image_size``
  (512, aspect ratio not kept, bicubic) and sent as JPEG (``"detail": "high"``);
- sampling at temperature 1 on every try, each request with its own seed derived from (run, item, try);
- an answer is valid when ``score:`` / ``Score:`` followed by an optional word and a number occurs
  exactly once (``parse_score_dreambench``) and the number is 0–4; at most 3 tries, after which the
  item is left out of that run.

``open`` — the harness's own procedure (what ``eval score`` did before protocols existed): a system
message and one user turn holding our instruction and the images (PNG, longer side resized to
``image_size``); temperature 0, then ``retry_temperature`` for re-asks; an answer is valid when the
text after its first ``Score:`` holds exactly one number and it is an integer 0–4 ("Score: 3" ✓;
"Score: 3 or 4", "Score: 5", "Score: 2.5" ✗, ``parse_score``); at most ``1 + max_retries`` tries.

Config (YAML)::

    protocol: dreambench                      # required: dreambench | open
    image_size: 512
    judges:
      - name: internvl3-78b                   # a label; part of the score keys
        base_url: http://gpu-node-1:23333/v1  # the server's OpenAI-compatible root
        model: OpenGVLab/InternVL3-78B        # the served model name
        api_key_env: null                     # env var holding the API key (null: no Authorization header)
        timeout_s: 180                        # deadline of each HTTP request as a whole
        # protocol open only (dreambench fixes them): temperature, retry_temperature, max_retries
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
import http.client
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from dynaip.configs import ConfigError, build, read_yaml

from .judge_http import Redactor, post_json

log = logging.getLogger(__name__)

PROTOCOLS = ("dreambench", "open")
"""How judges are asked (see the module docstring)."""
PROTOCOL_SAMPLING = {
    "dreambench": {"temperature": 1.0, "retry_temperature": 1.0, "max_retries": 2},
    "open": {"temperature": 0.0, "retry_temperature": 0.7, "max_retries": 3},
}
"""Per protocol: first-try temperature, re-ask temperature and extra tries (dreambench: 3 tries at temperature 1)."""
DREAMBENCH_IMAGE_SIZE = 512
"""The side of the square images the dreambench protocol sends."""


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
    temperature: float | None = None
    """Sampling temperature of the first try; None: the protocol's (open 0.0; dreambench 1.0, fixed)."""
    retry_temperature: float | None = None
    """Temperature of re-asks after an unparsable answer; None: the protocol's (open 0.7; dreambench 1.0, fixed)."""
    max_retries: int | None = None
    """Extra requests after an unparsable answer or a transient HTTP failure, one budget for both
    (≤ 1 + max_retries requests per item in all); None: the protocol's (open 3; dreambench 2, fixed: 3 tries)."""
    timeout_s: float = 180.0
    """Deadline of each HTTP request as a whole (connect, headers, body, redirects), seconds."""
    max_tokens: int = 1024
    """Answer length limit."""
    retry_backoff_s: float = 2.0
    """Wait before retrying a failed HTTP request (doubles each time); 0 in tests."""

    def __post_init__(self) -> None:
        if not re.match(r"^[A-Za-z0-9_.\-]+$", self.name):
            raise ValueError(f"judge name {self.name!r} may hold only [A-Za-z0-9_.-] (it is part of score keys)")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge {self.name}: base_url {self.base_url!r} must start with http:// or https://")
        if (self.max_retries is not None and self.max_retries < 0) or self.timeout_s <= 0:
            raise ValueError(
                f"judge {self.name}: max_retries ({self.max_retries}) must be ≥ 0 and timeout_s ({self.timeout_s}) > 0"
            )

    def resolved(self, protocol: str) -> "JudgeConfig":
        """This judge with the protocol's sampling settings filled in; dreambench refuses other values."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r} is not one of {list(PROTOCOLS)}")
        fixed = PROTOCOL_SAMPLING[protocol]
        if protocol == "dreambench":
            bad = {k: getattr(self, k) for k, v in fixed.items() if getattr(self, k) not in (None, v)}
            if bad:
                raise ValueError(
                    f"judge {self.name}: {bad} conflicts with protocol dreambench, which samples at "
                    "temperature 1 with 3 tries; remove these keys or use protocol: open"
                )
        return replace(self, **{k: v if getattr(self, k) is None else getattr(self, k) for k, v in fixed.items()})

    def api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ValueError(
                f"judge {self.name}: environment variable {self.api_key_env} (api_key_env) is not set; "
                "export it or set api_key_env: null for servers without authentication"
            )
        return key


@dataclass(kw_only=True)
class DinoPaths:
    """A DINO ViT checkpoint (official ``dino_*_pretrain.pth`` or any timm-format ViT state dict)."""

    path: str = field(metadata={"path": True})
    """``.pth`` / ``.safetensors`` state dict with timm VisionTransformer key names (relative: against the config's folder)."""
    arch: str = "vit_small_patch16_224"
    """timm architecture name (``vit_small_patch16_224`` for DINO ViT-S/16, ``vit_base_patch16_224`` for ViT-B/16)."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """Extra timm ``create_model`` arguments (e.g. tiny test models: img_size, embed_dim, depth, num_heads)."""


@dataclass(kw_only=True)
class EvalConfig:
    """The ``eval score`` config file: judge protocol, judges and optional DINO weights."""

    judges: list[JudgeConfig] = field(default_factory=list)
    """VLM judges; their scores are averaged per item. Stored resolved for ``protocol``."""
    protocol: str = "dreambench"
    """How judges are asked: ``dreambench`` (the benchmark's procedure) or ``open`` (the harness's own)."""
    image_size: int = 512
    """Judge image size: dreambench, the square side (512 only); open, the longer side."""
    dino: DinoPaths | None = None
    """DINO weights for the DINO score; None skips it."""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"protocol {self.protocol!r} is not one of {list(PROTOCOLS)}: dreambench follows the "
                "DreamBench++ procedure, open is the harness's own"
            )
        if self.protocol == "dreambench" and self.image_size != DREAMBENCH_IMAGE_SIZE:
            raise ValueError(
                f"image_size {self.image_size} conflicts with protocol dreambench, which sends "
                f"{DREAMBENCH_IMAGE_SIZE} × {DREAMBENCH_IMAGE_SIZE} images; remove image_size or use "
                "protocol: open"
            )
        if self.image_size < 1:
            raise ValueError(f"image_size {self.image_size} must be ≥ 1")
        self.judges = [j.resolved(self.protocol) for j in self.judges]

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EvalConfig":
        """Through the one loader (dynaip/configs.py): unknown keys are refused naming the nearest
        valid one; ``dino.path`` resolves against the file's folder."""
        path = Path(path)
        raw = read_yaml(path, "eval config", "start from jobs/configs/eval_judges.yaml")
        if "protocol" not in raw:
            raise ConfigError(
                f"{path}: no 'protocol'; add 'protocol: dreambench' (the DreamBench++ judging procedure) "
                "or 'protocol: open' (the harness's own, as before protocols existed)"
            )
        cfg = build(cls, raw, where=str(path), base=path.parent)
        names = [j.name for j in cfg.judges]
        if len(set(names)) != len(names):
            raise ConfigError(f"{path}: judge names {names} repeat; give every judge a distinct name")
        return cfg


# ----------------------------------------------------------------------------------------------- prompts
SYSTEM_PROMPT = (
    "You are a meticulous, impartial judge of AI-generated images. You follow the rubric exactly, "
    "reason briefly, and always end with a line of the form 'Score: N' where N is one integer from 0 to 4."
)

SCALE = """Scale:
0 = very poor: {zero}
1 = poor: {one}
2 = fair: {two}
3 = good: {three}
4 = excellent: {four}"""

CP_SUBJECT = (
    """Image 1 is a reference image of a subject: {name}. Image 2 was generated by a personalization model.
{multi}Rate CONCEPT PRESERVATION: how faithfully Image 2 reproduces the identity of the subject in Image 1.
Compare, in this order:
- shape: overall silhouette, proportions and distinctive parts;
- colour: the colours and their placement;
- texture: materials, fur, fabric, patterns, printed details and logos;
- facial features: for people, animals and characters, the eyes, nose, mouth, face shape and hair.
Ignore the background, pose, viewpoint, lighting and whether a text prompt is followed: only the subject's identity counts.
"""
    + SCALE.format(
        zero="the subject is absent or unrecognizable",
        one="a similar kind of subject, but most details (shape, colour, texture, face) differ",
        two="recognizably related, with several clear differences",
        three="the same subject with minor differences in a few details",
        four="the same subject; shape, colour, texture and facial features all match",
    )
    + """
Answer with one or two sentences of justification, then a last line exactly 'Score: N'."""
)

CP_STYLE = (
    """Image 1 is a style reference ({name}). Image 2 was generated by a personalization model asked to use that style.
Rate STYLE PRESERVATION: how faithfully Image 2 reproduces the artistic style of Image 1, judging the colour palette,
brushwork or rendering technique, texture, line quality, lighting and level of abstraction.
Ignore what the images depict: only the style counts.
"""
    + SCALE.format(
        zero="an unrelated style",
        one="a vaguely similar style with most traits different",
        two="some traits shared, several clearly different",
        three="the same style with minor differences",
        four="indistinguishable in style",
    )
    + """
Answer with one or two sentences of justification, then a last line exactly 'Score: N'."""
)

PF_PROMPT = (
    """The image was generated from this text prompt:
"{prompt}"
Rate PROMPT FOLLOWING: how completely and accurately the image depicts what the prompt asks for — every subject it
names, their actions and relations, the scene, and any style or attribute it specifies. Do not judge image quality or
beauty, only agreement with the prompt.
"""
    + SCALE.format(
        zero="the image has nothing to do with the prompt",
        one="a small part of the prompt is depicted",
        two="the main subject is there but important parts of the prompt are missing or wrong",
        three="almost everything is depicted, with a minor omission or error",
        four="everything in the prompt is depicted accurately",
    )
    + """
Answer with one or two sentences of justification, then a last line exactly 'Score: N'."""
)

MULTI_NOTE = (
    "Image 2 is meant to contain several subjects; judge ONLY the subject shown in Image 1 (the one that "
    "best matches it), ignoring the others.\n"
)


def cp_prompt(name: str, *, style: bool, multi: bool) -> str:
    """The CP instruction for one reference subject (style rubric for DreamBench++ style references)."""
    if style:
        return CP_STYLE.format(name=name)
    return CP_SUBJECT.format(name=name, multi=MULTI_NOTE if multi else "")


def pf_prompt(prompt: str) -> str:
    return PF_PROMPT.format(prompt=prompt)


# dreambench protocol: rubric turn + acknowledgement turn (our own texts), then the sample turn.
_DB_ANSWER_SCORE_ONLY = """## How to answer
Reply with one line and nothing else:
Score: N
where N is your integer score. Do not explain."""

_DB_CP_SUBJECT = (
    """## Task
You are rating personalized image generation. A model was given a reference image of a subject and asked to
produce a new image of that same subject. Rate how well the subject of the generated image keeps the identity of
the subject in the reference.

## What to compare
1. Shape: the silhouette, structure and proportions of the subject and how its parts relate in size and place.
2. Colour: the hues, saturation and brightness of the subject and where each colour sits on it.
3. Texture: surface detail such as fur, skin, fabric, material, print and small markings, and whether it is
   rendered crisply instead of smeared. Stylisation of texture is only expected when the prompt asked for it.
4. Face: for people and animals, whether the face looks like the same individual; this weighs heavily.
{multi}
## Scale (integers 0 to 4)
0: unrelated. Nothing of the reference subject is present.
1: the same broad kind of thing, but a clearly different individual.
2: recognisably alike, with several obvious differences.
3: the same subject, with small differences only.
4: indistinguishable from the reference subject.

## Input
Each sample is two images: the reference first, the generated image second.

"""
    + _DB_ANSWER_SCORE_ONLY
)

_DB_CP_SUBJECT_ACK = """Understood. For every sample I will compare the subject of the second (generated) image with the
subject of the first (reference) image on shape, colour, texture and, for people and animals, the face{multi}. I
will weigh these together into one integer from 0 (unrelated) to 4 (indistinguishable) and reply with the single
line "Score: N", without any explanation. Please send the first sample."""

_DB_MULTI = """
The generated image may show several subjects. Rate only the one that corresponds to the reference and ignore
the others.
"""

_DB_CP_STYLE = (
    """## Task
You are rating personalized image generation. A model was given a reference artwork and asked to produce a new
image in the same style. Rate how well the generated image keeps the style of the reference. What the images
depict does not matter, only how they are made.

## What to compare
1. Colour and tone: the palette, how colours are combined, their saturation and brightness, and how tones are
   distributed and blended across the picture.
2. Strokes and texture: the marks the medium leaves (rough or smooth, long or short, their direction and density),
   surface textures and how light is rendered.
3. Manner: line quality (soft or hard), how far shapes are simplified or abstracted, and the overall artistic
   approach (for example realistic, expressive, graphic or abstract).

## Scale (integers 0 to 4)
0: unrelated. The generated image shares nothing of the reference style.
1: faintly related, with large differences.
2: clearly alike in some respects, with notable differences.
3: the same style, with small differences only.
4: indistinguishable in style from the reference.

## Input
Each sample is two images: the reference first, the generated image second.

"""
    + _DB_ANSWER_SCORE_ONLY
)

_DB_CP_STYLE_ACK = """Understood. For every sample I will compare the style of the second (generated) image with the
first (reference) image on colour and tone, strokes and texture, and overall manner, regardless of the content. I
will weigh these together into one integer from 0 (unrelated) to 4 (indistinguishable) and reply with the single
line "Score: N", without any explanation. Please send the first sample."""

_DB_PF = """## Task
You are rating text-to-image generation. You get a text prompt and the image a model generated from it. Rate how
well the image agrees with the prompt.

## What to check
1. Relevance: the subjects and things the prompt is about are the ones the image shows.
2. Accuracy: the details the prompt names (objects, attributes, actions, settings, styles) are present and right.
3. Completeness: nothing important from the prompt is left out.
4. Context: the scene, the surroundings and the relations between subjects are the ones the prompt describes.
Image quality and beauty do not count, only agreement with the prompt.

## Scale (integers 0 to 4)
0: no agreement. The image shows none of the prompt's key points.
1: weak agreement. The general topic is there, most details are missing.
2: partial agreement. Much of the prompt is there, but several important details are missing or wrong.
3: strong agreement. Nearly everything is there, with a minor omission or error.
4: full agreement. Everything of importance in the prompt is depicted accurately.

## Input
Each sample is the text prompt followed by the image.

## How to answer
First a short analysis of the points above, two or three sentences, then a last line:
Score: N
where N is your integer score."""

_DB_PF_ACK = """Understood. For every sample I will check the image against the prompt for relevance, accuracy,
completeness and context, ignoring image quality, write a short analysis and end with the line "Score: N", N an
integer from 0 (no agreement) to 4 (full agreement). Please send the first sample."""


def dreambench_rubric(kind: str, *, multi: bool = False) -> tuple[str, str]:
    """(rubric, acknowledgement) of the dreambench protocol for ``cp-subject``, ``cp-style`` or ``pf``."""
    if kind == "cp-subject":
        return (
            _DB_CP_SUBJECT.format(multi=_DB_MULTI if multi else ""),
            _DB_CP_SUBJECT_ACK.format(
                multi=", looking only at the subject that matches the reference" if multi else ""
            ),
        )
    if kind == "cp-style":
        return _DB_CP_STYLE, _DB_CP_STYLE_ACK
    if kind == "pf":
        return _DB_PF, _DB_PF_ACK
    raise ValueError(f"rubric kind {kind!r} is not one of cp-subject, cp-style, pf")


# ----------------------------------------------------------------------------------------------- parsing
_NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)?")
_SCORE = re.compile(r"score\s*[:：]", re.IGNORECASE)


def parse_score(answer: str) -> int | None:
    """The 0–4 integer after the first ``Score:`` or None when the answer is not exactly one such integer."""
    m = _SCORE.search(answer or "")
    if m is None:
        return None
    numbers = _NUMBER.findall(answer[m.end() :])
    if len(numbers) != 1:
        return None
    n = numbers[0]
    if not re.fullmatch(r"[+]?\d+", n):
        return None
    value = int(n)
    return value if 0 <= value <= 4 else None


_DB_SCORE = re.compile(r"(?:score|Score):\s*[A-Za-z]*\s*(\d+)")


def parse_score_dreambench(answer: str) -> int | None:
    """dreambench: the number of the one ``score:`` / ``Score:`` match (an optional word may sit between, as in
    "Score: about 3"), anywhere in the answer; None when there are no or several matches or it is not 0–4.
    Only the leading digits count ("Score: 2.5" reads 2), as in the benchmark's own pattern."""
    found = _DB_SCORE.findall(answer or "")
    if len(found) != 1:
        return None
    value = int(found[0])
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


def square_jpeg_data_url(image: Image.Image | str | Path, size: int = DREAMBENCH_IMAGE_SIZE) -> str:
    """dreambench: ``data:image/jpeg;base64,...`` of the image EXIF-rotated, flattened on white, RGB, resized to
    ``size`` × ``size`` (aspect ratio not kept, bicubic) and JPEG-encoded at Pillow's default quality (75)."""
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_part(image: Image.Image | str | Path, protocol: str, size: int) -> dict:
    """One ``image_url`` content part as the protocol sends it."""
    if protocol == "dreambench":
        return {"type": "image_url", "image_url": {"url": square_jpeg_data_url(image, size), "detail": "high"}}
    return {"type": "image_url", "image_url": {"url": image_data_url(image, size)}}


def dreambench_messages(
    kind: str,
    images: list[Image.Image | str | Path],
    *,
    prompt: str | None = None,
    multi: bool = False,
    size: int = DREAMBENCH_IMAGE_SIZE,
) -> list[dict]:
    """rubric (user) → acknowledgement (assistant) → sample (user: [prompt text,] images)."""
    rubric, ack = dreambench_rubric(kind, multi=multi)
    sample: list[dict[str, Any]] = [{"type": "text", "text": prompt}] if prompt is not None else []
    sample += [image_part(im, "dreambench", size) for im in images]
    return [
        {"role": "user", "content": rubric},
        {"role": "assistant", "content": ack},
        {"role": "user", "content": sample},
    ]


def open_messages(instruction: str, images: list[Image.Image | str | Path], size: int = 512) -> list[dict]:
    """system message → one user turn: the instruction, then the images in order."""
    content: list[dict[str, Any]] = [{"type": "text", "text": instruction}]
    content += [image_part(im, "open", size) for im in images]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


@dataclass(kw_only=True)
class Judgement:
    score: int | None
    """0–4, or None when every attempt was unparsable."""
    attempts: int
    """Chat requests answered (1 + parse retries)."""
    answers: list[str]
    """Every raw answer, in order (each cut to 2,000 characters)."""
    requests: int = 0
    """HTTP requests sent for the item, answered or failed (at most 1 + max_retries)."""


class _Transient(Exception):
    """A request that may succeed when sent again (5xx, 429, network, timeout, malformed reply)."""


class ChatJudge:
    """Asks one judge about one item under a protocol and parses its score with bounded retries.

    One budget of ``1 + max_retries`` HTTP requests per item covers both kinds of retry (a failed
    request and an unparsable answer), so a flaky server cannot multiply them. Every request ends
    within ``timeout_s`` as a whole (dynaip/eval/judge_http.py), and the API key never appears in
    an error or a log line.
    """

    def __init__(self, cfg: JudgeConfig, protocol: str = "dreambench"):
        self.protocol = protocol
        self.cfg = cfg.resolved(protocol)
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._key = cfg.api_key()
        self._redact = Redactor(self._key)

    def _post(self, body: dict) -> str:
        """One request → the answer text; raises ``_Transient`` (retry) or ``JudgeError`` (give up)."""
        try:
            resp = post_json(self.url, body, deadline_s=self.cfg.timeout_s, auth=self._key)
        except (OSError, http.client.HTTPException) as e:  # includes timeouts and DeadlineExceeded
            raise _Transient(f"{type(e).__name__}: {self._redact(e)}") from None
        if resp.status == 429 or resp.status >= 500:
            raise _Transient(f"HTTP {resp.status}")
        if resp.status != 200:  # the request itself is wrong: retrying will not help
            detail = self._redact(resp.body[:300].decode("utf-8", "replace"))
            raise JudgeError(
                self._redact(
                    f"judge {self.cfg.name} ({self.url}) refused the request: HTTP {resp.status} {detail}; "
                    f"check the model name '{self.cfg.model}' and the API key"
                )
            )
        try:
            payload = json.loads(resp.body.decode("utf-8"))
            return str(payload["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Transient(f"malformed reply ({type(e).__name__}: {self._redact(e)})") from None

    def ask(self, instruction: str, images: list[Image.Image | str | Path], image_size: int = 512) -> Judgement:
        """The open protocol's message form (system message, then the instruction and the images in one user turn);
        the answer is parsed by this judge's protocol."""
        return self.ask_messages(open_messages(instruction, images, image_size))

    def ask_messages(self, messages: list[dict], *, seed_key: str | None = None) -> Judgement:
        """Asks until the answer parses, sending at most 1 + max_retries requests in all (failed ones count).

        A failed request is sent again unchanged after a back-off; an unparsable answer is re-asked at
        ``retry_temperature``. dreambench: temperature 1 on every try and, with ``seed_key``, a seed per
        try derived from it (so runs differ and a rerun repeats its requests). When every request failed
        the server is taken to be down (``JudgeError``: ``eval score`` stops, a rerun resumes); when
        some answered but none parsed, the item gets no score this run.
        """
        parse = parse_score_dreambench if self.protocol == "dreambench" else parse_score
        budget = 1 + self.cfg.max_retries
        answers: list[str] = []
        delay = self.cfg.retry_backoff_s
        last: str | None = None
        for sent in range(1, budget + 1):
            attempt = len(answers)
            body = {
                "model": self.cfg.model,
                "max_tokens": self.cfg.max_tokens,
                "temperature": self.cfg.temperature if attempt == 0 else self.cfg.retry_temperature,
                "messages": messages,
            }
            if self.protocol == "dreambench" and seed_key is not None:
                body["seed"] = zlib.crc32(f"{seed_key}|{attempt}".encode()) & 0x7FFFFFFF
            try:
                answer = self._post(body)
            except _Transient as e:
                last = str(e)
                log.warning("judge %s: request failed (%s), request %d/%d", self.cfg.name, last, sent, budget)
                if sent < budget and delay > 0:
                    time.sleep(delay)
                    delay *= 2
                continue
            answers.append(self._redact(answer[:2000]))  # answers are stored in the score files
            score = parse(answer)
            if score is not None:
                return Judgement(score=score, attempts=len(answers), answers=answers, requests=sent)
            log.debug("judge %s: unparsable answer %r", self.cfg.name, self._redact(answer[-200:]))
        if not answers:
            raise JudgeError(
                self._redact(
                    f"judge {self.cfg.name} at {self.url} failed {budget} times "
                    f"(last: {last}); is the server up? (vLLM: `vllm serve MODEL`)"
                )
            )
        return Judgement(score=None, attempts=len(answers), answers=answers, requests=budget)
