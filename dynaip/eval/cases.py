"""Evaluation cases: the one record type every eval step reads and writes.

A cases file is JSON Lines, one case per line::

    {"id": "dbpp-animal-003-p4",            # unique; only [A-Za-z0-9_-], used as the image file name
     "benchmark": "dreambench++",           # or "dynaip-bench"
     "category": "animal",                  # DreamBench++ category, or the multi-subject combination type
     "subjects": [{"path": "/abs/ref.jpg", "type": "animal", "name": "a corgi"}],
     "prompt": "a corgi swimming in a pool",
     "layout": ["left", "right"],           # one position per subject (multi-subject only, else null)
     "seed": 123456789,
     "variation": 4}                        # prompt index within its subject / combination type

Paths are absolute so a cases file can be used from any working directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from dynaip.atomic import atomic_write_bytes  # noqa: F401  (re-exported for eval modules)

ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
POSITIONS = ("left", "middle", "right")


@dataclass(kw_only=True)
class Subject:
    """One reference subject of a case."""

    path: str
    """Absolute path of the reference image (RGB; any size)."""
    type: str
    """DreamBench++ category (animal/human/object/style) or DynaIP-Bench subject type (living, object, ...)."""
    name: str
    """How the prompt names the subject (e.g. "a corgi"); also the auto-mask detection phrase."""


@dataclass(kw_only=True)
class Case:
    """One prompt + reference set to generate and score."""

    id: str
    """Unique, only ``[A-Za-z0-9_-]``: the generated image is ``<id>.png``."""
    benchmark: str
    """``dreambench++`` or ``dynaip-bench``."""
    category: str
    """Single-subject: the DreamBench++ category; multi-subject: the combination type (e.g. ``human+object``)."""
    subjects: list[Subject]
    """The references, in prompt order ({subject_1}, {subject_2}, ...)."""
    prompt: str
    """The full text prompt."""
    seed: int
    """Generation seed (fixed per case so methods are compared on the same noise)."""
    layout: list[str] | None = None
    """Multi-subject: one of left/middle/right per subject, for preset masks; None for single-subject cases."""
    variation: int = 0
    """Index of the prompt within its subject (DreamBench++, 0-8) or combination type (DynaIP-Bench, 0-5)."""
    extra: dict = field(default_factory=dict)
    """Free-form extras (kept through read/write)."""

    def __post_init__(self) -> None:
        if not ID_RE.match(self.id):
            raise ValueError(f"case id {self.id!r} is invalid: it becomes a file name, so use only [A-Za-z0-9_-]")
        if not self.subjects:
            raise ValueError(f"case {self.id!r} has no subjects; every case needs at least one reference image")
        if self.layout is not None:
            if len(self.layout) != len(self.subjects):
                raise ValueError(
                    f"case {self.id!r}: layout {self.layout} has {len(self.layout)} positions for "
                    f"{len(self.subjects)} subjects; give one position per subject"
                )
            bad = [p for p in self.layout if p not in POSITIONS]
            if bad:
                raise ValueError(f"case {self.id!r}: layout positions {bad} are not among {POSITIONS}")

    @property
    def is_multi(self) -> bool:
        return len(self.subjects) > 1

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> "Case":
        raw = dict(raw)
        raw["subjects"] = [Subject(**s) for s in raw.get("subjects", [])]
        return cls(**raw)


def write_cases(path: str | Path, cases: Iterable[Case]) -> int:
    """Writes cases as JSON Lines (atomically); returns how many were written."""
    cases = list(cases)
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"duplicate case ids {dup}: every case id must be unique")
    text = "".join(json.dumps(c.to_json(), ensure_ascii=False, sort_keys=True) + "\n" for c in cases)
    atomic_write_bytes(path, text.encode("utf-8"))
    return len(cases)


def read_cases(path: str | Path) -> list[Case]:
    """Reads a cases JSON Lines file written by ``bench-single`` / ``bench-multi``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"cases file '{path}' does not exist; write it with `dynaip eval bench-single` or `dynaip eval bench-multi`"
        )
    cases = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            cases.append(Case.from_json(json.loads(line)))
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ValueError(
                f"{path}:{n}: not a case record ({type(e).__name__}: {e}); regenerate the cases file"
            ) from e
    return cases


def image_path(out_dir: str | Path, case_id: str) -> Path:
    return Path(out_dir) / "images" / f"{case_id}.png"


def preset_masks(layout: Sequence[str], width: int, height: int) -> list[Image.Image]:
    """One binary ``L`` mask (0 / 255, ``height × width``) per subject: a full-height vertical band.

    The bands split the width equally among the distinct positions the case uses, in the order
    left → middle → right (two positions: halves; three: thirds). A case that uses one position only
    gets the central two thirds for ``middle`` and a half for ``left`` / ``right``. Subjects sharing a
    position (a person and the garments they wear) share the band.
    """
    order = ("left", "middle", "right")
    bad = [p for p in layout if p not in order]
    if bad:
        raise ValueError(f"layout positions {bad} unknown; use left / middle / right")
    used = [p for p in order if p in layout]
    if len(used) == 1:
        band = {"left": (0.0, 0.5), "middle": (1 / 6, 5 / 6), "right": (0.5, 1.0)}[used[0]]
        bands = {used[0]: band}
    else:
        bands = {p: (i / len(used), (i + 1) / len(used)) for i, p in enumerate(used)}
    masks = []
    for p in layout:
        x0, x1 = (round(f * width) for f in bands[p])
        m = Image.new("L", (width, height), 0)
        m.paste(255, (x0, 0, x1, height))
        masks.append(m)
    return masks
