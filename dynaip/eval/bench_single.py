"""DreamBench++ single-subject cases from the benchmark's on-disk layout.

The release as published (the benchmark's data archive; see the README section "Evaluation")::

    POOL/images/live_subject/animal/NN.jpg     # NN = 00, 01, ... (two digits)
    POOL/images/live_subject/human/NN.jpg
    POOL/images/object/NN.jpg
    POOL/images/style/NN.jpg
    POOL/captions/...                          # mirrors images/ with NN.txt: line 0 the subject name,
                                               # lines 1-9 the 9 prompts

Animals and humans sit one level deeper, under ``live_subject/``. The flat layout
(``POOL/images/<category>/<idx>.jpg``, ``POOL/captions/<category>/<idx>.txt``) that earlier versions of
this module expected is still read. Categories are ``animal``, ``human``, ``object`` and ``style``;
the full benchmark is 150 subjects × 9 prompts = 1,350 cases.

Checks:

- always an error: a missing caption or image (each needs the other), two images for one subject,
  a category found at two places, a caption file without prompts;
- by default an error, accepted with ``allow_partial`` (the counts are then logged and returned):
  anything that makes the pool differ from the release — subjects ≠ 150, a subject with ≠ 9 prompts,
  a missing or unknown category directory, animals/humans split between the two layouts;
- with ``strict`` additionally an error: anything not in the release's exact shape — the flat layout,
  image files other than ``NN.jpg``, caption files with blank lines or other than 1 + 9 lines, stray
  files in ``images/`` and ``captions/``.

Prompt types (by prompt index, as the benchmark reports prompt following): 0–3 photorealistic, 4–6
style transfer, 7–8 imaginative (``prompt_type``).
"""

from __future__ import annotations

import logging
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .cases import Case, Subject

log = logging.getLogger(__name__)

CATEGORIES = ("animal", "human", "object", "style")
LIVE_SUBJECT = "live_subject"
"""The release's parent directory of the live-subject categories."""
LIVE_CATEGORIES = ("animal", "human")
N_SUBJECTS = 150
N_PROMPTS = 9
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
PROMPT_TYPES = (("photorealistic", range(0, 4)), ("style transfer", range(4, 7)), ("imaginative", range(7, 9)))
"""DreamBench++ prompt types by prompt index (``Case.variation``)."""


def prompt_type(index: int) -> str | None:
    """``photorealistic`` (prompts 0–3), ``style transfer`` (4–6), ``imaginative`` (7–8); None otherwise."""
    return next((name for name, idx in PROMPT_TYPES if index in idx), None)


@dataclass(kw_only=True)
class SingleBenchConfig:
    """How ``bench-single`` reads the DreamBench++ directory."""

    pool: str
    """DreamBench++ root holding ``images/`` and ``captions/``."""
    seed: int = 0
    """Base seed; each case's generation seed is derived from it and the case id."""
    strict: bool = False
    """Also require the release's exact shape (``live_subject/`` nesting, ``NN.jpg``, 1 + 9 caption lines, no strays)."""
    allow_partial: bool = False
    """Accept a pool that differs from the release's 150 × 9 (its counts are logged); default: an error."""
    expected_subjects: int = N_SUBJECTS
    """Subjects the release has."""
    expected_prompts: int = N_PROMPTS
    """Prompts per subject in the release."""

    def __post_init__(self) -> None:
        if self.strict and self.allow_partial:
            raise ValueError(
                "strict and allow_partial contradict each other: strict requires the full release, "
                "allow_partial accepts less; choose one"
            )


@dataclass(kw_only=True)
class SinglePool:
    """What was read from a DreamBench++ directory."""

    cases: list[Case]
    """One case per (subject, prompt), by category (animal, human, object, style) then index."""
    layout: str
    """``published`` (``images/live_subject/animal/``), ``flat`` (``images/animal/``) or ``mixed``."""
    subjects: dict[str, int] = field(default_factory=dict)
    """Subjects per category."""
    problems: list[str] = field(default_factory=list)
    """How the pool differs from the release (empty for the full release)."""

    def describe(self) -> str:
        per_cat = ", ".join(f"{c} {n}" for c, n in self.subjects.items())
        return f"{len(self.cases)} cases from {sum(self.subjects.values())} subjects ({per_cat}), {self.layout} layout"


def case_seed(base_seed: int, case_id: str) -> int:
    """A deterministic 31-bit seed from the base seed and the case id (stable across runs and pools)."""
    return zlib.crc32(f"{base_seed}:{case_id}".encode()) & 0x7FFFFFFF


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", s).strip("_") or "x"


def _hidden(p: Path) -> bool:
    return p.name.startswith(".")


def _first(items: list[str], sep: str = "; ", k: int = 6) -> str:
    """The first ``k`` items joined, with how many there are in all when some are left out."""
    return sep.join(items[:k]) + (f"{sep}... ({len(items)} in all)" if len(items) > k else "")


def _index_key(stem: str) -> tuple:
    return (0, int(stem), stem) if stem.isdigit() else (1, 0, stem)


def _category_dirs(root: Path, problems: list[str], strays: list[str]) -> dict[str, str]:
    """Category → its directory relative to ``images/`` and ``captions/`` (``live_subject/animal``, ``object``)."""
    found: dict[str, set[str]] = {}
    for tree in ("images", "captions"):
        for p in sorted(q for q in (root / tree).iterdir() if not _hidden(q)):
            if not p.is_dir():
                strays.append(f"{tree}/{p.name}")
            elif p.name == LIVE_SUBJECT:
                for q in sorted(x for x in p.iterdir() if not _hidden(x)):
                    if q.is_dir() and q.name in LIVE_CATEGORIES:
                        found.setdefault(q.name, set()).add(f"{LIVE_SUBJECT}/{q.name}")
                    elif q.is_dir():
                        problems.append(
                            f"{tree}/{LIVE_SUBJECT}/{q.name}/ is not a DreamBench++ category "
                            f"(live subjects are {list(LIVE_CATEGORIES)})"
                        )
                    else:
                        strays.append(f"{tree}/{LIVE_SUBJECT}/{q.name}")
            elif p.name in CATEGORIES:
                found.setdefault(p.name, set()).add(p.name)
            else:
                problems.append(
                    f"{tree}/{p.name}/ is not a DreamBench++ category directory (expected "
                    f"{LIVE_SUBJECT}/animal, {LIVE_SUBJECT}/human, object, style)"
                )
    twice = {c: sorted(d) for c, d in found.items() if len(d) > 1}
    if twice:
        c, d = next(iter(twice.items()))
        raise ValueError(
            f"DreamBench++ pool '{root}': category {c} is at both {d[0]}/ and {d[1]}/ (in images/ or "
            f"captions/); keep one place, the release's being {LIVE_SUBJECT}/{c}/ in both trees"
        )
    dirs = {c: next(iter(found[c])) for c in CATEGORIES if c in found}
    absent = [c for c in CATEGORIES if c not in dirs]
    if absent:
        problems.append(f"categories {absent} are missing")
    return dirs


def _layout(dirs: dict[str, str]) -> str:
    nested = {d.startswith(f"{LIVE_SUBJECT}/") for c, d in dirs.items() if c in LIVE_CATEGORIES}
    return "mixed" if nested == {True, False} else "flat" if nested == {False} else "published"


def _caption(
    path: Path, root: Path, cfg: SingleBenchConfig, problems: list[str], shape: list[str]
) -> tuple[str, list[str]]:
    """(subject name, prompts); prompt-count differences go to ``problems``, line-format ones to ``shape``."""
    raw = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    lines = [ln for ln in raw if ln]
    if len(lines) < 2:
        raise ValueError(
            f"caption file '{path}' has {len(lines)} non-empty lines; expected the subject name on "
            "line 0 and the prompts after it"
        )
    if cfg.strict:
        while raw and not raw[-1]:
            raw.pop()
        if len(raw) != len(lines):
            shape.append(f"{path.relative_to(root)} has blank lines (the release has none)")
    name, prompts = lines[0], lines[1:]
    if len(prompts) != cfg.expected_prompts:
        problems.append(f"{path.relative_to(root)} has {len(prompts)} prompts, expected {cfg.expected_prompts}")
    return name, prompts


def read_single_pool(cfg: SingleBenchConfig) -> SinglePool:
    """Reads a DreamBench++ directory (published or flat layout) and checks it against the release."""
    root = Path(cfg.pool)
    img_root, cap_root = root / "images", root / "captions"
    for d in (img_root, cap_root):
        if not d.is_dir():
            raise FileNotFoundError(
                f"DreamBench++ pool '{root}' has no '{d.name}/' directory; expected the release's "
                f"{root}/images/{LIVE_SUBJECT}/animal/00.jpg and "
                f"{root}/captions/{LIVE_SUBJECT}/animal/00.txt (and so on)"
            )
    problems: list[str] = []  # differences from the release: errors unless allow_partial
    shape: list[str] = []  # departures from the release's exact shape: errors with strict
    strays: list[str] = []
    dirs = _category_dirs(root, problems, strays)
    layout = _layout(dirs)
    if layout == "mixed":
        problems.append(
            f"animals and humans are split between images/{LIVE_SUBJECT}/<category>/ and "
            "images/<category>/; use one layout"
        )
    elif layout == "flat":
        shape.append(f"flat layout (the release nests animal/ and human/ under {LIVE_SUBJECT}/)")

    missing: list[str] = []
    cases: list[Case] = []
    subjects: dict[str, int] = {}
    for cat, rel in dirs.items():
        files: dict[str, dict[str, list[Path]]] = {"images": {}, "captions": {}}
        for tree, exts in (("images", IMAGE_EXTS), ("captions", (".txt",))):
            d = root / tree / rel
            for p in sorted(d.iterdir()) if d.is_dir() else []:
                if _hidden(p):
                    continue
                if p.is_file() and p.suffix.lower() in exts:
                    files[tree].setdefault(p.stem, []).append(p)
                else:
                    strays.append(str(p.relative_to(root)))
        images, captions = files["images"], files["captions"]
        for tree, got in files.items():
            dup = next(((s, ps) for s, ps in got.items() if len(ps) > 1), None)
            if dup:
                raise ValueError(
                    f"DreamBench++ pool '{root}': {tree}/{rel}/ holds {[p.name for p in dup[1]]} for one "
                    f"subject '{dup[0]}'; keep one file per subject"
                )
        missing += [
            f"captions/{rel}/{s}.txt (for {images[s][0].relative_to(root)})"
            for s in sorted(set(images) - set(captions), key=_index_key)
        ]
        missing += [
            f"images/{rel}/{s}.jpg (for {captions[s][0].relative_to(root)})"
            for s in sorted(set(captions) - set(images), key=_index_key)
        ]
        stems = sorted(set(images) & set(captions), key=_index_key)
        subjects[cat] = len(stems)
        for stem in stems:
            image = images[stem][0]
            if not re.fullmatch(r"\d{2}", stem) or image.suffix != ".jpg":
                shape.append(f"{image.relative_to(root)} is not named NN.jpg like the release's images")
            name, prompts = _caption(captions[stem][0], root, cfg, problems, shape)
            collection = "_".join(
                [f"{LIVE_SUBJECT}_{cat}" if cat in LIVE_CATEGORIES else cat, stem, name.lower().replace(" ", "_")]
            )
            for j, prompt in enumerate(prompts):
                cid = f"dbpp-{_safe(cat)}-{_safe(stem)}-p{j}"
                cases.append(
                    Case(
                        id=cid,
                        benchmark="dreambench++",
                        category=cat,
                        prompt=prompt,
                        variation=j,
                        subjects=[Subject(path=str(image.resolve()), type=cat, name=name)],
                        seed=case_seed(cfg.seed, cid),
                        extra={"collection_id": collection},
                    )
                )
    if missing:
        shown = "; ".join(missing[:10]) + (f"; ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise FileNotFoundError(
            f"DreamBench++ pool '{root}' is incomplete: missing {shown}. Every image needs its caption "
            "file and vice versa; re-extract the benchmark"
        )
    totals = []  # listed first: the headline of what differs
    n_subjects = sum(subjects.values())
    if n_subjects != cfg.expected_subjects:
        totals.append(f"{n_subjects} subjects, expected {cfg.expected_subjects}")
    expected_cases = cfg.expected_subjects * cfg.expected_prompts
    if len(cases) != expected_cases:
        totals.append(f"{len(cases)} cases, expected {expected_cases}")
    problems[:0] = totals
    stray_note = f"files that are not part of the release: {_first(strays, ', ')}" if strays else ""
    shape += [stray_note] if stray_note else []
    pool = SinglePool(cases=cases, layout=layout, subjects=subjects, problems=problems)
    if cfg.strict and (problems or shape):
        raise ValueError(
            f"DreamBench++ pool '{root}' is not the release as published: {_first(problems + shape)}. "
            "Fix the pool, or drop --strict"
        )
    if problems and not cfg.allow_partial:
        raise ValueError(
            f"DreamBench++ pool '{root}' is not the full release ({pool.describe()}): {_first(problems)}. "
            "Point --pool at the extracted release, or pass --allow-partial to evaluate these cases anyway"
        )
    if problems:
        log.warning("DreamBench++ pool '%s' is partial (%s): %s", root, pool.describe(), _first(problems))
    if stray_note:
        log.warning("DreamBench++ pool '%s': ignoring %s", root, stray_note)
    return pool


def build_single_cases(cfg: SingleBenchConfig) -> list[Case]:
    """Reads the DreamBench++ layout and returns one case per (subject, prompt), sorted by category then index."""
    return read_single_pool(cfg).cases
