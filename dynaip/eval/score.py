"""Scoring generated images: VLM-judged CP / PF plus CLIP-I, CLIP-T and DINO, resumable.

Output directory (default ``GEN_DIR/scores``)::

    OUT/scores.jsonl   # one line per judged item / embedding metric, appended as results arrive
    OUT/summary.json   # per-group means for this method, rewritten at the end of every run

A ``scores.jsonl`` line is keyed by case id + source (judge name, ``clip`` or ``dino``) + metric::

    {"key": "dbpp-animal-0-p3|internvl3-78b|cp@0", "case_id": "dbpp-animal-0-p3", "source": "internvl3-78b",
     "metric": "cp", "subject": 0, "score": 3, "value": 0.75, "attempts": 2, "answers": ["...", "..."]}
    {"key": "dbpp-animal-0-p3|clip|clip-i", "case_id": "...", "source": "clip", "metric": "clip-i", "value": 0.81}

A rerun skips every key already present with a value; judged items whose answers never parsed
(``score: null``) are asked again. A torn last line (a crash mid-write) is ignored.

Aggregation (DreamBench++): an item's value is score / 4; a subject's CP is the mean over judges; a
case's CP is the mean over its subjects (multi-subject CP); PF is the mean over judges. A group's
CP and PF are means over its cases and CP·PF is their product.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Callable, Iterable, Sequence

from .bench_single import CATEGORIES
from .cases import Case, atomic_write_bytes
from .generate import image_path
from .judge import ChatJudge, EvalConfig, JudgeConfig, cp_prompt, pf_prompt

log = logging.getLogger(__name__)
JUDGE_METRICS = ("cp", "pf")
EMBED_METRICS = ("clip-i", "clip-t", "dino")
ALL_METRICS = JUDGE_METRICS + EMBED_METRICS


class ScoreStore:
    """Append-only JSON Lines of score records, indexed by ``key`` (the last record of a key wins)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self._torn = False
        if self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            for n, line in enumerate(lines, 1):
                try:
                    rec = json.loads(line)
                    self.records[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    if n == len(lines):
                        log.warning("%s: ignoring a torn last line (interrupted write)", self.path)
                        self._torn = True
                    else:
                        raise ValueError(f"{self.path}:{n} is not a score record; delete that line or the file") from None

    def has_value(self, key: str) -> bool:
        rec = self.records.get(key)
        return rec is not None and rec.get("value") is not None

    def add(self, rec: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            if self._torn:
                f.write("\n")  # end the torn line so the new record starts on its own
                self._torn = False
            f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
        self.records[rec["key"]] = rec

    def value(self, case_id: str, source: str, metric: str) -> float | None:
        rec = self.records.get(f"{case_id}|{source}|{metric}")
        return None if rec is None else rec.get("value")


@dataclass(kw_only=True)
class ScoreSettings:
    """What ``eval score`` computes."""

    method: str
    """Method name shown in reports (default: the generation directory's name)."""
    metrics: tuple[str, ...] = ALL_METRICS
    """Subset of cp, pf, clip-i, clip-t, dino."""
    concurrency: int = 4
    """Judge requests in flight at once (the servers batch them)."""
    device: str | None = None
    """Torch device for CLIP / DINO (default: cuda if available)."""

    def __post_init__(self) -> None:
        bad = [m for m in self.metrics if m not in ALL_METRICS]
        if bad:
            raise ValueError(f"unknown metrics {bad}; choose from {list(ALL_METRICS)}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency} must be ≥ 1")


@dataclass(kw_only=True)
class _Item:
    case: Case
    judge: JudgeConfig
    metric: str
    subject: int | None
    key: str = field(init=False)

    def __post_init__(self) -> None:
        suffix = f"cp@{self.subject}" if self.metric == "cp" else self.metric
        self.key = f"{self.case.id}|{self.judge.name}|{suffix}"


def _judge_item(judge: ChatJudge, item: _Item, generated: Path, image_size: int) -> dict:
    case = item.case
    if item.metric == "cp":
        subject = case.subjects[item.subject]
        instruction = cp_prompt(subject.name, style=subject.type == "style", multi=case.is_multi)
        images = [subject.path, generated]
    else:
        instruction, images = pf_prompt(case.prompt), [generated]
    j = judge.ask(instruction, images, image_size)
    return {"key": item.key, "case_id": case.id, "source": item.judge.name, "metric": item.metric,
            "subject": item.subject, "score": j.score, "value": None if j.score is None else j.score / 4,
            "attempts": j.attempts, "answers": j.answers}


def run_judges(cases: Sequence[Case], images_dir: Path, store: ScoreStore, cfg: EvalConfig, settings: ScoreSettings,
               judge_factory: Callable[[JudgeConfig], ChatJudge] = ChatJudge) -> int:
    """Asks every judge about every unfinished (case, metric, subject); returns how many items were judged."""
    metrics = [m for m in JUDGE_METRICS if m in settings.metrics]
    if not metrics:
        return 0
    if not cfg.judges:
        log.warning("score: no judges in the eval config: CP and PF skipped (add a 'judges:' list)")
        return 0
    items: list[_Item] = []
    for case in cases:
        if not image_path(images_dir, case.id).is_file():
            continue
        for jc in cfg.judges:
            if "cp" in metrics:
                items += [_Item(case=case, judge=jc, metric="cp", subject=s) for s in range(len(case.subjects))]
            if "pf" in metrics:
                items.append(_Item(case=case, judge=jc, metric="pf", subject=None))
    todo = [it for it in items if not store.has_value(it.key)]
    log.info("score: %d judged items, %d done, %d to ask", len(items), len(items) - len(todo), len(todo))
    if not todo:
        return 0
    judges = {jc.name: judge_factory(jc) for jc in cfg.judges}
    done = 0
    with ThreadPoolExecutor(max_workers=settings.concurrency) as pool:
        futures = {pool.submit(_judge_item, judges[it.judge.name], it, image_path(images_dir, it.case.id),
                               cfg.image_size): it for it in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in finished:
                if fut.exception() is not None:
                    for p in pending:
                        p.cancel()
                    raise fut.exception()
                rec = fut.result()
                if rec["score"] is None:
                    log.warning("score: %s gave no parsable score in %d attempts (kept as failed; a rerun asks again)",
                                rec["key"], rec["attempts"])
                store.add(rec)
                done += 1
                if done % 50 == 0:
                    log.info("score: %d/%d judged", done, len(todo))
    return done


def run_embeddings(cases: Sequence[Case], images_dir: Path, store: ScoreStore, settings: ScoreSettings, *,
                   clip_paths=None, dino_paths=None) -> int:
    """CLIP-I / CLIP-T / DINO for every case with an image and no stored value; returns values computed."""
    wanted = [m for m in EMBED_METRICS if m in settings.metrics]
    clip = dino = None
    if {"clip-i", "clip-t"} & set(wanted):
        if clip_paths is None:
            log.warning("score: no --models given: CLIP-I and CLIP-T skipped (pass --models M.yaml with clip_vision)")
        else:
            missing = [c for c in cases if image_path(images_dir, c.id).is_file()
                       and not all(store.has_value(f"{c.id}|clip|{m}") for m in ("clip-i", "clip-t") if m in wanted)]
            if missing:
                from .metrics import ClipScorer

                clip = ClipScorer(clip_paths, settings.device)
    if "dino" in wanted:
        if dino_paths is None:
            log.warning("score: no DINO weights configured (eval config 'dino: {path, arch}'): DINO skipped")
        elif any(image_path(images_dir, c.id).is_file() and not store.has_value(f"{c.id}|dino|dino") for c in cases):
            from .metrics import DinoScorer

            dino = DinoScorer(dino_paths, settings.device)
    n = 0
    for case in cases:
        gen = image_path(images_dir, case.id)
        if not gen.is_file():
            continue
        refs = [s.path for s in case.subjects]
        jobs: list[tuple[str, str, Callable[[], float]]] = []
        if clip is not None:
            if "clip-i" in wanted:
                jobs.append(("clip", "clip-i", lambda: clip.clip_i(gen, refs)))
            if "clip-t" in wanted:
                jobs.append(("clip", "clip-t", lambda: clip.clip_t(gen, case.prompt)))
        if dino is not None:
            jobs.append(("dino", "dino", lambda: dino.similarity(gen, refs)))
        for source, metric, fn in jobs:
            key = f"{case.id}|{source}|{metric}"
            if not store.has_value(key):
                store.add({"key": key, "case_id": case.id, "source": source, "metric": metric, "value": fn()})
                n += 1
    return n


# ----------------------------------------------------------------------------------------------- aggregation
def case_values(case: Case, store: ScoreStore, judges: Iterable[str]) -> dict[str, float | None]:
    """One case's CP, PF (judge means, /4 applied), CLIP-I, CLIP-T and DINO; None where not (fully) scored."""
    judges = list(judges)
    per_subject = []
    for s in range(len(case.subjects)):
        vals = [v for j in judges if (v := store.value(case.id, j, f"cp@{s}")) is not None]
        per_subject.append(fmean(vals) if vals else None)
    pf = [v for j in judges if (v := store.value(case.id, j, "pf")) is not None]
    return {"cp": fmean(per_subject) if per_subject and None not in per_subject else None,
            "pf": fmean(pf) if pf else None,
            "clip-i": store.value(case.id, "clip", "clip-i"), "clip-t": store.value(case.id, "clip", "clip-t"),
            "dino": store.value(case.id, "dino", "dino")}


def group_stats(values: Sequence[dict[str, float | None]]) -> dict[str, float | int | None]:
    """Means over the cases that have each metric; ``cp_pf`` = CP × PF; ``n`` = cases in the group."""
    out: dict[str, float | int | None] = {"n": len(values)}
    for m in ("cp", "pf") + EMBED_METRICS:
        vals = [v[m] for v in values if v[m] is not None]
        out[m] = fmean(vals) if vals else None
        out[f"n_{m}"] = len(vals)
    out["cp_pf"] = out["cp"] * out["pf"] if out["cp"] is not None and out["pf"] is not None else None
    return out


def group_order(cases: Sequence[Case]) -> list[tuple[str, Callable[[Case], bool]]]:
    """Report groups: DreamBench++ categories + overall, or combinations, 2/3 subjects and overall."""
    groups: list[tuple[str, Callable[[Case], bool]]] = []
    if all(c.benchmark == "dreambench++" for c in cases):
        cats = [c for c in CATEGORIES if any(x.category == c for x in cases)]
        cats += sorted({x.category for x in cases} - set(cats))
        groups += [(cat, lambda c, cat=cat: c.category == cat) for cat in cats]
    else:
        seen: list[str] = []
        for c in cases:
            if c.category not in seen:
                seen.append(c.category)
        groups += [(cat, lambda c, cat=cat: c.category == cat) for cat in seen]
        for k in sorted({len(c.subjects) for c in cases}):
            groups.append((f"{k} subjects", lambda c, k=k: len(c.subjects) == k))
    groups.append(("overall", lambda c: True))
    return groups


def summarize(cases: Sequence[Case], store: ScoreStore, judges: Sequence[str], *, method: str, images_dir: Path,
              cases_file: str | None = None) -> dict:
    """The per-group summary of one method (what ``summary.json`` holds and ``eval report`` reads)."""
    scored = [c for c in cases if image_path(images_dir, c.id).is_file()]
    values = {c.id: case_values(c, store, judges) for c in scored}
    groups = {name: group_stats([values[c.id] for c in scored if pred(c)]) for name, pred in group_order(cases)}
    per_judge = {}
    for j in judges:
        vals = [case_values(c, store, [j]) for c in scored]
        per_judge[j] = {k: group_stats(vals)[k] for k in ("cp", "pf", "cp_pf")}
    failed = sum(1 for r in store.records.values() if r.get("source") in judges and r.get("value") is None)
    kinds = sorted({c.benchmark for c in cases})
    benchmark = kinds[0] if len(kinds) == 1 else "+".join(kinds) or "unknown"
    return {"format": "dynaip-eval-summary/1", "method": method, "benchmark": benchmark, "cases_file": cases_file,
            "images_dir": str(images_dir), "n_cases": len(cases), "n_images": len(scored),
            "n_missing_images": len(cases) - len(scored), "judges": list(judges), "failed_items": failed,
            "groups": groups, "group_order": list(groups), "per_judge": per_judge}


def score_method(cases: Sequence[Case], images_dir: str | Path, out_dir: str | Path, cfg: EvalConfig,
                 settings: ScoreSettings, *, clip_paths=None, cases_file: str | None = None,
                 judge_factory: Callable[[JudgeConfig], ChatJudge] = ChatJudge) -> dict:
    """Scores one method's generations (layout in the module docstring) and writes ``summary.json``."""
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    missing = [c.id for c in cases if not image_path(images_dir, c.id).is_file()]
    if len(missing) == len(cases):
        raise FileNotFoundError(f"no generated images for these cases under '{images_dir}/images/'; "
                                "run `dynaip eval generate` first (or pass the right --images)")
    if missing:
        log.warning("score: %d of %d cases have no image yet (e.g. %s); they are left out", len(missing), len(cases),
                    missing[0])
    store = ScoreStore(out_dir / "scores.jsonl")
    run_judges(cases, images_dir, store, cfg, settings, judge_factory)
    run_embeddings(cases, images_dir, store, settings, clip_paths=clip_paths,
                   dino_paths=cfg.dino if "dino" in settings.metrics else None)
    summary = summarize(cases, store, [j.name for j in cfg.judges] if set(JUDGE_METRICS) & set(settings.metrics) else [],
                        method=settings.method, images_dir=images_dir, cases_file=cases_file)
    atomic_write_bytes(out_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True).encode())
    return summary
