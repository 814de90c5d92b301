"""DreamBench++ single-subject cases from the benchmark's on-disk layout.

Expected layout (as in the DreamBench++ release)::

    POOL/images/<category>/<idx>.jpg        # .jpg/.jpeg/.png/.webp accepted
    POOL/captions/<category>/<idx>.txt      # line 0: subject name; lines 1..: the prompts (9 per subject)

Categories are ``animal``, ``human``, ``object`` and ``style``; the full benchmark is 150 subjects ×
9 prompts = 1,350 cases. A missing caption or image is an error; counts that differ from the release
(subjects, prompts per subject, categories) are warnings, errors with ``strict=True``.
"""

from __future__ import annotations

import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from .cases import Case, Subject

log = logging.getLogger(__name__)

CATEGORIES = ("animal", "human", "object", "style")
N_SUBJECTS = 150
N_PROMPTS = 9
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(kw_only=True)
class SingleBenchConfig:
    """How ``bench-single`` reads the DreamBench++ directory."""

    pool: str
    """DreamBench++ root holding ``images/`` and ``captions/``."""
    seed: int = 0
    """Base seed; each case's generation seed is derived from it and the case id."""
    strict: bool = False
    """Fail (instead of warn) when counts differ from the release's 150 × 9."""
    expected_subjects: int = N_SUBJECTS
    """Subjects the release has."""
    expected_prompts: int = N_PROMPTS
    """Prompts per subject in the release."""


def case_seed(base_seed: int, case_id: str) -> int:
    """A deterministic 31-bit seed from the base seed and the case id (stable across runs and pools)."""
    return zlib.crc32(f"{base_seed}:{case_id}".encode()) & 0x7FFFFFFF


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", s).strip("_") or "x"


def build_single_cases(cfg: SingleBenchConfig) -> list[Case]:
    """Reads the DreamBench++ layout and returns one case per (subject, prompt), sorted by category then index."""
    root = Path(cfg.pool)
    img_root, cap_root = root / "images", root / "captions"
    for d in (img_root, cap_root):
        if not d.is_dir():
            raise FileNotFoundError(f"DreamBench++ pool '{root}' has no '{d.name}/' directory; expected "
                                    f"{root}/images/<category>/<idx>.jpg and {root}/captions/<category>/<idx>.txt")
    categories = sorted({p.name for p in img_root.iterdir() if p.is_dir()} | {p.name for p in cap_root.iterdir() if p.is_dir()})
    problems: list[str] = []
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        problems.append(f"categories {unknown} are not DreamBench++ categories {list(CATEGORIES)}")
    absent = [c for c in CATEGORIES if c not in categories]
    if absent:
        problems.append(f"categories {absent} are missing")

    missing: list[str] = []
    cases: list[Case] = []
    n_subjects = 0
    for cat in categories:
        images = {p.stem: p for p in sorted((img_root / cat).glob("*")) if p.suffix.lower() in IMAGE_EXTS} \
            if (img_root / cat).is_dir() else {}
        captions = {p.stem: p for p in sorted((cap_root / cat).glob("*.txt"))} if (cap_root / cat).is_dir() else {}
        missing += [f"captions/{cat}/{s}.txt (for {images[s].relative_to(root)})" for s in sorted(set(images) - set(captions))]
        missing += [f"images/{cat}/{s}.jpg (for {captions[s].relative_to(root)})" for s in sorted(set(captions) - set(images))]
        for stem in sorted(set(images) & set(captions), key=lambda s: (len(s), s)):  # numeric order for 0..N
            lines = [ln.strip() for ln in captions[stem].read_text(encoding="utf-8").splitlines()]
            lines = [ln for ln in lines if ln]
            if len(lines) < 2:
                raise ValueError(f"caption file '{captions[stem]}' has {len(lines)} non-empty lines; expected the subject "
                                 "name on line 0 and the prompts after it")
            name, prompts = lines[0], lines[1:]
            if len(prompts) != cfg.expected_prompts:
                problems.append(f"{captions[stem].relative_to(root)} has {len(prompts)} prompts, expected {cfg.expected_prompts}")
            n_subjects += 1
            for j, prompt in enumerate(prompts):
                cid = f"dbpp-{_safe(cat)}-{_safe(stem)}-p{j}"
                cases.append(Case(id=cid, benchmark="dreambench++", category=cat, prompt=prompt, variation=j,
                                  subjects=[Subject(path=str(images[stem].resolve()), type=cat, name=name)],
                                  seed=case_seed(cfg.seed, cid)))
    if missing:
        shown = "; ".join(missing[:10]) + (f"; ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise FileNotFoundError(f"DreamBench++ pool '{root}' is incomplete: missing {shown}. Every image needs its caption "
                                "file and vice versa; re-extract the benchmark")
    if n_subjects != cfg.expected_subjects:
        problems.append(f"{n_subjects} subjects, expected {cfg.expected_subjects}")
    expected_cases = cfg.expected_subjects * cfg.expected_prompts
    if len(cases) != expected_cases:
        problems.append(f"{len(cases)} cases, expected {expected_cases}")
    if problems:
        msg = f"DreamBench++ pool '{root}' differs from the release: " + "; ".join(problems)
        if cfg.strict:
            raise ValueError(msg + ". Fix the pool, or drop --strict to evaluate it as it is")
        log.warning("%s", msg)
    return cases
