"""DynaIP-Bench: the multi-subject benchmark (paper, Table 3), built from a typed pool of references.

Pool layout (the user provides it)::

    POOL/<type>/<name>.jpg|.png        # one reference per file (subject on a plain background preferred)
    POOL/<type>/<name>.txt             # optional: how prompts name it, e.g. "a corgi" or "Mario"

``<type>`` is one of the 8 subject types below. Without a ``.txt`` the file stem is used
(``red_backpack`` → "a red backpack"; an article is added). With a ``.txt`` its first line is used
verbatim, so proper names ("Mario") stay without an article.

Subject types (our reading of the paper's categories):

=============  ==========================================================================
living         animals and other living non-human subjects (pets, birds, ...)
object         rigid objects (toys, cups, bags, vehicles, ...)
human          real people (face or whole body)
character      cartoon / game / anime characters, figurines
upwearing      upper-body garments (shirt, T-shirt, sweater, jacket)
midwearing     accessories worn at mid-body (handbag, belt, backpack)
wholewearing   full-body garments (dress, jumpsuit, long coat)
downwearing    lower-body garments (trousers, jeans, skirt, shorts)
=============  ==========================================================================

The 14 combination types and how the 642 two-subject + 246 three-subject = 888 cases split across
them (every count is a multiple of 6, so each of a type's 6 scene/action variations gets the same
number of cases; each case draws its own subjects):

====  ==============================  ========  =====  =============================
 #    combination                     subjects  cases  layout (preset mask bands)
====  ==============================  ========  =====  =============================
 1    living+living                   2         72     left, right
 2    living+object                   2         72     left, right
 3    human+living                    2         72     left, right
 4    human+object                    2         72     left, right
 5    human+human                     2         66     left, right
 6    character+living                2         72     left, right
 7    character+object                2         72     left, right
 8    human+upwearing                 2         72     middle, middle (worn)
 9    human+wholewearing              2         72     middle, middle (worn)
      **two-subject total**                     **642**
10    human+upwearing+downwearing     3         54     middle ×3 (worn)
11    human+wholewearing+midwearing   3         48     middle ×3 (worn)
12    human+upwearing+midwearing      3         48     middle ×3 (worn)
13    human+object+living             3         48     left, middle, right
14    character+living+object         3         48     left, middle, right
      **three-subject total**                   **246**
====  ==============================  ========  =====  =============================

Garments take their wearer's band (they are on the wearer); the band geometry for a case depends on
how many distinct positions it uses (see ``dynaip.eval.cases.preset_masks``).

Subjects are dealt from a seeded, shuffled deck per type (reshuffled when exhausted) so every pool
subject is used about equally often; the same pool + seed gives the same 888 cases.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .bench_single import IMAGE_EXTS, case_seed
from .cases import Case, Subject

log = logging.getLogger(__name__)

SUBJECT_TYPES = ("living", "object", "human", "character", "upwearing", "midwearing", "wholewearing", "downwearing")
WEARABLES = ("upwearing", "midwearing", "wholewearing", "downwearing")
N_VARIATIONS = 6


@dataclass(frozen=True, kw_only=True)
class Combination:
    """One combination type: which subject types, how many cases, and its 6 prompt variations."""

    name: str
    """``type+type[+type]``; also the case category."""
    types: tuple[str, ...]
    """Subject types in prompt order ({subject_1} is ``types[0]``)."""
    cases: int
    """How many cases this type contributes (a multiple of 6)."""
    layout: tuple[str, ...]
    """Preset mask position per subject."""
    templates: tuple[str, ...]
    """6 prompt variations (scene/action) with ``{subject_1}``, ``{subject_2}``, ... placeholders."""


_LR, _LMR = ("left", "right"), ("left", "middle", "right")
COMBINATIONS: tuple[Combination, ...] = (
    Combination(
        name="living+living",
        types=("living", "living"),
        cases=72,
        layout=_LR,
        templates=(
            "{subject_1} and {subject_2} playing together on a sunny lawn",
            "{subject_1} and {subject_2} sitting side by side on a wooden porch at sunset",
            "{subject_1} and {subject_2} resting on a cozy sofa in a living room",
            "{subject_1} and {subject_2} walking along a sandy beach",
            "{subject_1} and {subject_2} in the snow in front of a cabin",
            "{subject_1} and {subject_2} in a field of flowers, watercolor painting",
        ),
    ),
    Combination(
        name="living+object",
        types=("living", "object"),
        cases=72,
        layout=_LR,
        templates=(
            "{subject_1} next to {subject_2} on a kitchen table",
            "{subject_1} sniffing {subject_2} on a green lawn",
            "{subject_1} sitting beside {subject_2} on a city sidewalk",
            "{subject_1} and {subject_2} on a wooden floor in warm morning light",
            "{subject_1} and {subject_2} on a rock in a forest",
            "{subject_1} and {subject_2} on a beach at sunset",
        ),
    ),
    Combination(
        name="human+living",
        types=("human", "living"),
        cases=72,
        layout=_LR,
        templates=(
            "{subject_1} walking with {subject_2} in a park",
            "{subject_1} sitting on a bench next to {subject_2}",
            "{subject_1} playing with {subject_2} on a beach",
            "{subject_1} and {subject_2} in a cozy living room",
            "{subject_1} and {subject_2} on a snowy mountain trail",
            "{subject_1} feeding {subject_2} in a garden",
        ),
    ),
    Combination(
        name="human+object",
        types=("human", "object"),
        cases=72,
        layout=_LR,
        templates=(
            "{subject_1} standing next to {subject_2} in a modern office",
            "{subject_1} and {subject_2} on a city street at night",
            "{subject_1} looking at {subject_2} on a wooden table",
            "{subject_1} and {subject_2} in a bright studio, white background",
            "{subject_1} and {subject_2} in a garden in spring",
            "{subject_1} and {subject_2} on a beach under a blue sky",
        ),
    ),
    Combination(
        name="human+human",
        types=("human", "human"),
        cases=66,
        layout=_LR,
        templates=(
            "{subject_1} and {subject_2} shaking hands in an office",
            "{subject_1} and {subject_2} having coffee in a cafe",
            "{subject_1} and {subject_2} walking in a park in autumn",
            "{subject_1} and {subject_2} standing on a stage",
            "{subject_1} and {subject_2} posing for a photo on a beach",
            "{subject_1} and {subject_2} sitting at a dinner table",
        ),
    ),
    Combination(
        name="character+living",
        types=("character", "living"),
        cases=72,
        layout=_LR,
        templates=(
            "{subject_1} playing with {subject_2} in a meadow",
            "{subject_1} and {subject_2} on an adventure in a forest",
            "{subject_1} and {subject_2} sitting under a tree",
            "{subject_1} and {subject_2} in a snowy village",
            "{subject_1} and {subject_2} on a beach at sunset",
            "{subject_1} and {subject_2} in a colorful cartoon city",
        ),
    ),
    Combination(
        name="character+object",
        types=("character", "object"),
        cases=72,
        layout=_LR,
        templates=(
            "{subject_1} standing next to {subject_2} on a desk",
            "{subject_1} and {subject_2} in a toy shop window",
            "{subject_1} and {subject_2} in a grassy field",
            "{subject_1} and {subject_2} on a kitchen counter",
            "{subject_1} and {subject_2} on the surface of the moon",
            "{subject_1} and {subject_2} in a library",
        ),
    ),
    Combination(
        name="human+upwearing",
        types=("human", "upwearing"),
        cases=72,
        layout=("middle", "middle"),
        templates=(
            "{subject_1} wearing {subject_2}, standing in a city street",
            "{subject_1} wearing {subject_2}, sitting in a cafe",
            "{subject_1} wearing {subject_2}, walking in a park",
            "{subject_1} wearing {subject_2}, in a photo studio",
            "{subject_1} wearing {subject_2}, on a beach",
            "{subject_1} wearing {subject_2}, in an office",
        ),
    ),
    Combination(
        name="human+wholewearing",
        types=("human", "wholewearing"),
        cases=72,
        layout=("middle", "middle"),
        templates=(
            "{subject_1} wearing {subject_2}, on a runway",
            "{subject_1} wearing {subject_2}, at a garden party",
            "{subject_1} wearing {subject_2}, walking down a city street",
            "{subject_1} wearing {subject_2}, in a photo studio",
            "{subject_1} wearing {subject_2}, on a beach at sunset",
            "{subject_1} wearing {subject_2}, in a ballroom",
        ),
    ),
    Combination(
        name="human+upwearing+downwearing",
        types=("human", "upwearing", "downwearing"),
        cases=54,
        layout=("middle",) * 3,
        templates=(
            "{subject_1} wearing {subject_2} and {subject_3}, standing in a city street",
            "{subject_1} wearing {subject_2} and {subject_3}, walking in a park",
            "{subject_1} wearing {subject_2} and {subject_3}, in a photo studio",
            "{subject_1} wearing {subject_2} and {subject_3}, sitting on a bench",
            "{subject_1} wearing {subject_2} and {subject_3}, on a beach",
            "{subject_1} wearing {subject_2} and {subject_3}, in a shopping mall",
        ),
    ),
    Combination(
        name="human+wholewearing+midwearing",
        types=("human", "wholewearing", "midwearing"),
        cases=48,
        layout=("middle",) * 3,
        templates=(
            "{subject_1} wearing {subject_2} with {subject_3}, on a runway",
            "{subject_1} wearing {subject_2} with {subject_3}, walking down a city street",
            "{subject_1} wearing {subject_2} with {subject_3}, in a photo studio",
            "{subject_1} wearing {subject_2} with {subject_3}, at a garden party",
            "{subject_1} wearing {subject_2} with {subject_3}, in a hotel lobby",
            "{subject_1} wearing {subject_2} with {subject_3}, on a beach",
        ),
    ),
    Combination(
        name="human+upwearing+midwearing",
        types=("human", "upwearing", "midwearing"),
        cases=48,
        layout=("middle",) * 3,
        templates=(
            "{subject_1} wearing {subject_2} with {subject_3}, in a city street",
            "{subject_1} wearing {subject_2} with {subject_3}, in an office",
            "{subject_1} wearing {subject_2} with {subject_3}, in a photo studio",
            "{subject_1} wearing {subject_2} with {subject_3}, in a park",
            "{subject_1} wearing {subject_2} with {subject_3}, at an airport",
            "{subject_1} wearing {subject_2} with {subject_3}, in a cafe",
        ),
    ),
    Combination(
        name="human+object+living",
        types=("human", "object", "living"),
        cases=48,
        layout=_LMR,
        templates=(
            "{subject_1} with {subject_2} and {subject_3} in a park",
            "{subject_1} with {subject_2} and {subject_3} in a living room",
            "{subject_1} with {subject_2} and {subject_3} on a beach",
            "{subject_1} with {subject_2} and {subject_3} in a garden",
            "{subject_1} with {subject_2} and {subject_3} on a snowy street",
            "{subject_1} with {subject_2} and {subject_3} in a kitchen",
        ),
    ),
    Combination(
        name="character+living+object",
        types=("character", "living", "object"),
        cases=48,
        layout=_LMR,
        templates=(
            "{subject_1}, {subject_2} and {subject_3} in a meadow",
            "{subject_1}, {subject_2} and {subject_3} in a cartoon town",
            "{subject_1}, {subject_2} and {subject_3} on a wooden table",
            "{subject_1}, {subject_2} and {subject_3} in a forest",
            "{subject_1}, {subject_2} and {subject_3} on a beach",
            "{subject_1}, {subject_2} and {subject_3} in outer space",
        ),
    ),
)
N_TWO, N_THREE = 642, 246


def _check_table() -> None:
    two = sum(c.cases for c in COMBINATIONS if len(c.types) == 2)
    three = sum(c.cases for c in COMBINATIONS if len(c.types) == 3)
    assert (len(COMBINATIONS), two, three) == (14, N_TWO, N_THREE), (len(COMBINATIONS), two, three)
    for c in COMBINATIONS:
        assert c.cases % N_VARIATIONS == 0 and len(c.templates) == N_VARIATIONS, c.name
        assert len(c.layout) == len(c.types) and set(c.types) <= set(SUBJECT_TYPES), c.name
        for i in range(1, len(c.types) + 1):
            assert all(f"{{subject_{i}}}" in t for t in c.templates), c.name


_check_table()


@dataclass(kw_only=True)
class MultiBenchConfig:
    """How ``bench-multi`` builds DynaIP-Bench."""

    pool: str
    """Typed pool root: ``POOL/<type>/<name>.{jpg,png}`` (+ optional ``<name>.txt``)."""
    seed: int = 0
    """Seeds the subject draws and each case's generation seed."""


@dataclass(frozen=True, kw_only=True)
class PoolSubject:
    path: str
    type: str
    name: str
    key: str


def _with_article(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def read_pool(root: str | Path) -> dict[str, list[PoolSubject]]:
    """``{type: [subjects sorted by file name]}`` for every subject-type folder present in the pool."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"subject pool '{root}' does not exist; make POOL/<type>/<name>.jpg with types {list(SUBJECT_TYPES)}"
        )
    unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in SUBJECT_TYPES)
    if unknown:
        log.warning("pool '%s': folders %s are not subject types %s; ignored", root, unknown, list(SUBJECT_TYPES))
    pool: dict[str, list[PoolSubject]] = {}
    for t in SUBJECT_TYPES:
        d = root / t
        if not d.is_dir():
            continue
        subjects = []
        for img in sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS):
            txt = img.with_suffix(".txt")
            if txt.is_file() and txt.read_text(encoding="utf-8").strip():
                name = txt.read_text(encoding="utf-8").strip().splitlines()[0].strip()
            else:
                name = _with_article(re.sub(r"[_\-]+", " ", img.stem).strip())
            subjects.append(
                PoolSubject(
                    path=str(img.resolve()), type=t, name=name, key=re.sub(r"[^A-Za-z0-9]+", "", img.stem) or "s"
                )
            )
        if subjects:
            pool[t] = subjects
    return pool


class _Deck:
    """Deals subjects of one type from a shuffled deck, reshuffling when it runs out."""

    def __init__(self, items: list[PoolSubject], rng: random.Random):
        self.items, self.rng, self.cards = items, rng, []

    def deal(self, avoid: set[str]) -> PoolSubject:
        for _ in range(2):
            if not self.cards:
                self.cards = list(self.items)
                self.rng.shuffle(self.cards)
            for i, s in enumerate(self.cards):
                if s.path not in avoid:
                    return self.cards.pop(i)
            self.cards = []  # every remaining card is already in this case: start a fresh deck
        raise AssertionError("unreachable: pool sizes were checked")


def build_multi_cases(cfg: MultiBenchConfig) -> list[Case]:
    """All 888 DynaIP-Bench cases, in table order (combination, then variation-cycling draws)."""
    pool = read_pool(cfg.pool)
    need: Counter[str] = Counter()
    for c in COMBINATIONS:
        for t, n in Counter(c.types).items():
            need[t] = max(need[t], n)
    short = {t: (len(pool.get(t, [])), n) for t, n in need.items() if len(pool.get(t, [])) < n}
    if short:
        detail = "; ".join(f"{t}: has {have}, needs {n}" for t, (have, n) in sorted(short.items()))
        raise ValueError(
            f"subject pool '{cfg.pool}' is too small ({detail}); add images under "
            f"{cfg.pool}/<type>/ (combinations like human+human need 2 distinct subjects of a type)"
        )
    rng = random.Random(cfg.seed)
    decks = {t: _Deck(pool[t], rng) for t in need}
    cases: list[Case] = []
    for ci, combo in enumerate(COMBINATIONS, 1):
        for k in range(combo.cases):
            v = k % N_VARIATIONS
            picked: list[PoolSubject] = []
            for t in combo.types:
                picked.append(decks[t].deal({p.path for p in picked}))
            prompt = combo.templates[v].format(**{f"subject_{i}": s.name for i, s in enumerate(picked, 1)})
            cid = f"dib-{ci:02d}-{combo.name.replace('+', '_')}-{k:03d}"
            cases.append(
                Case(
                    id=cid,
                    benchmark="dynaip-bench",
                    category=combo.name,
                    prompt=prompt,
                    variation=v,
                    subjects=[Subject(path=s.path, type=s.type, name=s.name) for s in picked],
                    layout=list(combo.layout),
                    seed=case_seed(cfg.seed, cid),
                    extra={"template": combo.templates[v], "n_subjects": len(picked)},
                )
            )
    return cases
