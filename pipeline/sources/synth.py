"""``synth``: diptychs we generate ourselves with FLUX.1-dev, as public subject-pair sets were made
(docs/sources.md, "Generated diptychs (synth)").

One record per (subject description × seed), in a deterministic order: descriptions come from the
recipe's ``prompts`` list or from the template grammar shipped in ``pipeline/synth_grammar.yaml``
(attribute × subject of a category, two different scenes per draw, seeded by ``seed``). The record is a
``Diptych`` whose ``generate`` holds the settings the ``generate`` stage renders it from — prompt, seed,
steps, guidance, width × height — so nothing exists on disk before the stage runs, and the same recipe
always asks for the same images (the sample json keeps the settings under ``extra``). The decode stage
then splits the image into its two panels and the curation's own detect → segment → consistency → pair
path follows, as for Subjects200K.

Options (``Options``); there is no ``root``. Record (``source="synth"``, ``id`` = ``p<description
index>-s<seed index>``): ``image`` = ``ImageRef("synth/<id>.png")`` (a name only: the pixels come from
the generate stage), ``phrase`` = the subject noun (grammar) or ``phrase`` option (prompt list),
``diptych`` = ``Diptych(padding, captions=(left caption, right caption), generate=settings)``, ``extra`` =
the settings plus ``subject`` and ``scenes``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dynaip.models import sampling
from pipeline.records import Diptych, ImageRef, Reject, SourceRecord
from pipeline.sources.common import SourceLicense, check_not_empty, read_options

SOURCE = "synth"
GRAMMAR = Path(__file__).resolve().parents[1] / "synth_grammar.yaml"
PROMPT = (
    "A diptych of two side-by-side photos of the same {subject}. Left: the {subject} {scene_0}. "
    "Right: the same {subject} {scene_1}. Identical object in both panels, centered, fully visible."
)


LICENSE = SourceLicense(
    name="images generated with FLUX.1-dev",
    license="other",
    license_name="flux-1-dev-non-commercial-license",
    url="https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
    note="outputs of FLUX.1 [dev]: its license's terms on outputs apply",
)
"""The terms of this source's data, repeated in the card of every dataset curated from it."""


@dataclass(frozen=True, kw_only=True)
class Options:
    """Reader options (the recipe's ``source:`` keys besides kind)."""

    prompts: list[str] | None = None
    """Subject descriptions to generate (e.g. "a red vintage camera"); null = draw from the grammar."""
    phrase: str = "object"
    """Detection phrase for ``prompts`` entries (grammar subjects use their noun)."""
    grammar: str | None = None
    """Grammar YAML (attributes, categories → subjects, scenes); null = pipeline/synth_grammar.yaml."""
    subjects: int = 100
    """Grammar: how many subject descriptions to draw."""
    seeds_per_subject: int = 1
    """Diptychs per description, each with its own generation seed."""
    seed: int = 0
    """Seed of the grammar draw and base of the generation seeds (seed of record = seed·1e6 + index)."""
    width: int = 1056
    """Diptych width in pixels (two panels of height × height; a multiple of 16 for FLUX)."""
    height: int = 528
    """Diptych height in pixels (= panel side + 2·padding)."""
    steps: int = sampling.STEPS
    """FLUX denoising steps."""
    guidance: float = sampling.GUIDANCE
    """FLUX.1-dev guidance (distilled guidance embedding)."""
    padding: int = 0
    """Border pixels around each panel that the split drops."""
    template: str = PROMPT
    """The generation prompt; ``{subject}``, ``{scene_0}`` (left) and ``{scene_1}`` (right) are filled."""
    caption: str = "a photo of the {subject} {scene}"
    """Each panel's provided caption; ``{subject}`` and ``{scene}`` (that panel's) are filled."""

    def __post_init__(self) -> None:
        """An option given but saying nothing fails when the recipe loads (``check_not_empty``)."""
        check_not_empty("synth", "phrase", self.phrase)


def _reject(rid: str, reason: str) -> Reject:
    return Reject(source=SOURCE, id=rid, stage="read", reason=reason)


def load_grammar(path: str | Path) -> dict[str, Any]:
    """The grammar mapping, checked: ``attributes`` and ``scenes`` (lists of strings, >= 2 scenes) and
    ``categories`` (name → non-empty list of subject nouns). ValueError names what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"synth: grammar {p} does not exist (source.grammar)")
    try:
        g = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"synth: grammar {p} is not valid YAML: {str(e).splitlines()[0]}") from None

    def strings(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, str) and x.strip() for x in v)

    if (
        not isinstance(g, dict)
        or not strings(g.get("attributes"))
        or not strings(g.get("scenes"))
        or len(g["scenes"]) < 2
    ):
        raise ValueError(f"synth: grammar {p} needs 'attributes' and 'scenes' (>= 2) as lists of strings")
    cats = g.get("categories")
    if not isinstance(cats, dict) or not cats or not all(strings(v) for v in cats.values()):
        raise ValueError(f"synth: grammar {p} needs 'categories': a mapping of name to a list of subject nouns")
    return g


def descriptions(opt: Options) -> list[tuple[str, str, str, str]]:
    """``(subject description, detection phrase, scene 0, scene 1)`` per draw, in order. Grammar draws
    use one generator seeded by ``seed``; a prompt list keeps its order and draws only the scenes."""
    g = load_grammar(opt.grammar or GRAMMAR) if opt.prompts is None or opt.grammar else None
    scenes = g["scenes"] if g else yaml.safe_load(GRAMMAR.read_text())["scenes"]
    rng = np.random.default_rng(opt.seed)
    out = []
    if opt.prompts is not None:
        for text in opt.prompts:
            a, b = rng.choice(len(scenes), size=2, replace=False)
            out.append((text.strip(), opt.phrase, scenes[a], scenes[b]))
        return out
    cats = sorted(g["categories"])
    for _ in range(opt.subjects):
        cat = cats[int(rng.integers(len(cats)))]
        noun = g["categories"][cat][int(rng.integers(len(g["categories"][cat])))]
        attr = g["attributes"][int(rng.integers(len(g["attributes"])))]
        a, b = rng.choice(len(scenes), size=2, replace=False)
        out.append((f"{attr} {noun}", noun, scenes[a], scenes[b]))
    return out


def read(cfg: Any) -> Iterator[SourceRecord | Reject]:
    """Check the options now (ValueError / FileNotFoundError, one line); return the record iterator."""
    opt = read_options(cfg, Options, SOURCE)  # typed, unknown keys refused with the nearest name
    for name in ("subjects", "seeds_per_subject", "steps", "width", "height"):
        if getattr(opt, name) < 1:
            raise ValueError(f"synth: source option {name!r} = {getattr(opt, name)}: must be >= 1")
    if opt.width % 16 or opt.height % 16:
        raise ValueError(f"synth: width × height {opt.width}x{opt.height}: FLUX needs multiples of 16")
    if opt.width != 2 * opt.height:
        raise ValueError(f"synth: width {opt.width} must be 2 × height {opt.height} (two square panels)")
    if opt.padding < 0 or opt.height - 2 * opt.padding < 1:
        raise ValueError(f"synth: padding {opt.padding} leaves no panel at height {opt.height}")
    if opt.prompts is not None and not opt.prompts:
        raise ValueError("synth: source option 'prompts' is an empty list; give descriptions or null for the grammar")
    draws = descriptions(opt)
    for field in ("template", "caption"):
        try:
            getattr(opt, field).format(subject="s", scene_0="a", scene_1="b", scene="c")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"synth: source option {field!r} has a bad placeholder: {e}") from None
    return _records(draws, opt)


def _records(draws: list[tuple[str, str, str, str]], opt: Options) -> Iterator[SourceRecord | Reject]:
    for i, (subject, phrase, s0, s1) in enumerate(draws):
        if not subject:
            yield _reject(f"p{i:06d}", f"prompts[{i}] is empty")
            continue
        for k in range(opt.seeds_per_subject):
            rid = f"p{i:06d}-s{k:02d}"
            settings = {
                "prompt": opt.template.format(subject=subject, scene_0=s0, scene_1=s1),
                "seed": opt.seed * 1_000_000 + i * opt.seeds_per_subject + k,
                "steps": opt.steps,
                "guidance": opt.guidance,
                "width": opt.width,
                "height": opt.height,
            }
            yield SourceRecord(
                source=SOURCE,
                id=rid,
                image=ImageRef(path=f"synth/{rid}.png"),
                phrase=phrase,
                diptych=Diptych(
                    padding=opt.padding,
                    generate=settings,
                    captions=(
                        opt.caption.format(subject=subject, scene=s0),
                        opt.caption.format(subject=subject, scene=s1),
                    ),
                ),
                extra={**settings, "subject": subject, "scenes": [s0, s1]},
            )
