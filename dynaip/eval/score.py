"""Scoring generated images: VLM-judged CP / PF in N independent runs, plus CLIP-I, CLIP-T and DINO, resumable.

Output directory (default ``GEN_DIR/scores``)::

    OUT/judge_run1.jsonl   # judging run 1: one line per judged item, appended as results arrive
    OUT/judge_run2.jsonl   # ... one file per run (``--runs N``; dreambench protocol: 3 by default)
    OUT/scores.jsonl       # CLIP-I / CLIP-T / DINO, one line per case and metric (computed once)
    OUT/summary.json       # per-group mean ± sample std over runs, rewritten at the end of every call

A judge line is keyed by case id + judge name + metric (+ subject for CP); an embedding line by case
id + source (``clip`` or ``dino``) + metric::

    {"key": "dbpp-animal-00-p3|internvl3-78b|cp@0", "case_id": "dbpp-animal-00-p3", "source": "internvl3-78b",
     "metric": "cp", "subject": 0, "run": 1, "protocol": "dreambench", "score": 3, "value": 0.75,
     "attempts": 2, "answers": ["...", "..."]}
    {"key": "dbpp-animal-00-p3|clip|clip-i", "case_id": "...", "source": "clip", "metric": "clip-i", "value": 0.81}

Every run resumes on its own: a rerun skips each key its file holds with a value; items whose answers
never parsed (``score: null``) are asked again, in their run. A torn last line (a crash mid-write) is
ignored. A run file judged under another protocol is refused (its scores would not be comparable).

Aggregation: an item's value is score / 4; a subject's CP is the mean over judges; a case's CP is the
mean over its subjects (multi-subject CP); PF is the mean over judges. Within one run a group's CP and
PF are means over its cases that have a value in that run (items that failed every try are left
out). Over runs a group reports the mean of the per-run means and their sample standard deviation
(n − 1; None for one run), and CP·PF = mean CP × mean PF. DreamBench++ cases are also grouped by prompt
type (``bench_single.prompt_type``: prompts 0–3 photorealistic, 4–6 style transfer, 7–8 imaginative).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean, stdev
from typing import Callable, Sequence

from .bench_single import CATEGORIES, PROMPT_TYPES, prompt_type
from .cases import Case, atomic_write_bytes, image_path
from .judge import ChatJudge, EvalConfig, JudgeConfig, cp_prompt, dreambench_messages, open_messages, pf_prompt

log = logging.getLogger(__name__)
JUDGE_METRICS = ("cp", "pf")
EMBED_METRICS = ("clip-i", "clip-t", "dino")
ALL_METRICS = JUDGE_METRICS + EMBED_METRICS
EMBED_SOURCES = ("clip", "dino")
DEFAULT_RUNS = {"dreambench": 3, "open": 1}
"""Judging runs when ``--runs`` is not given, per protocol (the benchmark judges every item 3 times)."""
SUMMARY_FORMAT = "dynaip-eval-summary/2"


def run_file(out_dir: str | Path, run: int) -> Path:
    """The judge records of run ``run`` (1-based)."""
    return Path(out_dir) / f"judge_run{run}.jsonl"


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
                        raise ValueError(
                            f"{self.path}:{n} is not a score record; delete that line or the file"
                        ) from None

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
    runs: int | None = None
    """Independent judging runs; None: the protocol's default (``DEFAULT_RUNS``: dreambench 3, open 1)."""

    def __post_init__(self) -> None:
        bad = [m for m in self.metrics if m not in ALL_METRICS]
        if bad:
            raise ValueError(f"unknown metrics {bad}; choose from {list(ALL_METRICS)}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency} must be ≥ 1")
        if self.runs is not None and self.runs < 1:
            raise ValueError(f"runs={self.runs} must be ≥ 1 (independent judging runs)")


@dataclass(kw_only=True)
class _Item:
    case: Case
    judge: JudgeConfig
    metric: str
    subject: int | None
    run: int
    key: str = field(init=False)

    def __post_init__(self) -> None:
        suffix = f"cp@{self.subject}" if self.metric == "cp" else self.metric
        self.key = f"{self.case.id}|{self.judge.name}|{suffix}"


def _judge_item(judge: ChatJudge, item: _Item, generated: Path, image_size: int) -> dict:
    case = item.case
    if judge.protocol == "dreambench":
        if item.metric == "cp":
            subject = case.subjects[item.subject]
            messages = dreambench_messages(
                "cp-style" if subject.type == "style" else "cp-subject",
                [subject.path, generated],
                multi=case.is_multi,
                size=image_size,
            )
        else:
            messages = dreambench_messages("pf", [generated], prompt=case.prompt, size=image_size)
    elif item.metric == "cp":
        subject = case.subjects[item.subject]
        messages = open_messages(
            cp_prompt(subject.name, style=subject.type == "style", multi=case.is_multi),
            [subject.path, generated],
            image_size,
        )
    else:
        messages = open_messages(pf_prompt(case.prompt), [generated], image_size)
    j = judge.ask_messages(messages, seed_key=f"{item.run}|{item.key}")
    return {
        "key": item.key,
        "case_id": case.id,
        "source": item.judge.name,
        "metric": item.metric,
        "subject": item.subject,
        "run": item.run,
        "protocol": judge.protocol,
        "score": j.score,
        "value": None if j.score is None else j.score / 4,
        "attempts": j.attempts,
        "answers": j.answers,
    }


def open_run_stores(out_dir: Path, runs: int, protocol: str) -> dict[int, ScoreStore]:
    """The stores of runs 1..runs; refuses a run file judged under another protocol and pre-run judge records."""
    legacy = ScoreStore(out_dir / "scores.jsonl")
    if any(r.get("source") not in EMBED_SOURCES for r in legacy.records.values()):
        raise ValueError(
            f"'{legacy.path}' holds judge scores written before judging runs existed; rename it to "
            f"'{run_file(out_dir, 1)}' to keep them as run 1 (they were judged with protocol open), or "
            "score into a new --out directory"
        )
    stores = {}
    for r in range(1, runs + 1):
        store = ScoreStore(run_file(out_dir, r))
        other = sorted({rec.get("protocol", "open") for rec in store.records.values()} - {protocol})
        if other:
            raise ValueError(
                f"'{store.path}' was judged with protocol {other[0]}, this config says {protocol}; runs "
                "of different protocols are not comparable: score into a new --out directory"
            )
        stores[r] = store
    extra = sorted(
        p.name for p in out_dir.glob("judge_run*.jsonl") if p.name not in {run_file(out_dir, r).name for r in stores}
    )
    if extra:
        log.info("score: %s left as they are (only runs 1-%d are judged and reported)", ", ".join(extra), runs)
    return stores


def run_judges(
    cases: Sequence[Case],
    images_dir: Path,
    stores: dict[int, ScoreStore],
    cfg: EvalConfig,
    settings: ScoreSettings,
    judge_factory: Callable[..., ChatJudge] = ChatJudge,
) -> int:
    """Asks every judge about every unfinished (run, case, metric, subject); returns how many items were judged."""
    metrics = [m for m in JUDGE_METRICS if m in settings.metrics]
    if not metrics:
        return 0
    if not cfg.judges:
        log.warning("score: no judges in the eval config: CP and PF skipped (add a 'judges:' list)")
        return 0
    if not stores:
        return 0
    items: list[_Item] = []
    for case in cases:
        if not image_path(images_dir, case.id).is_file():
            continue
        for run in stores:
            for jc in cfg.judges:
                if "cp" in metrics:
                    items += [
                        _Item(case=case, judge=jc, metric="cp", subject=s, run=run) for s in range(len(case.subjects))
                    ]
                if "pf" in metrics:
                    items.append(_Item(case=case, judge=jc, metric="pf", subject=None, run=run))
    todo = [it for it in items if not stores[it.run].has_value(it.key)]
    log.info(
        "score: %d judged items in %d run(s), %d done, %d to ask",
        len(items),
        len(stores),
        len(items) - len(todo),
        len(todo),
    )
    if not todo:
        return 0
    judges = {jc.name: judge_factory(jc, protocol=cfg.protocol) for jc in cfg.judges}
    done = 0
    with ThreadPoolExecutor(max_workers=settings.concurrency) as pool:
        futures = {
            pool.submit(_judge_item, judges[it.judge.name], it, image_path(images_dir, it.case.id), cfg.image_size): it
            for it in todo
        }
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
                    log.warning(
                        "score: run %d: %s gave no parsable score in %d tries (left out of this run; a rerun "
                        "asks again)",
                        rec["run"],
                        rec["key"],
                        rec["attempts"],
                    )
                stores[rec["run"]].add(rec)
                done += 1
                if done % 50 == 0:
                    log.info("score: %d/%d judged", done, len(todo))
    return done


def run_embeddings(
    cases: Sequence[Case],
    images_dir: Path,
    store: ScoreStore,
    settings: ScoreSettings,
    *,
    clip_paths=None,
    dino_paths=None,
) -> int:
    """CLIP-I / CLIP-T / DINO for every case with an image and no stored value; returns values computed."""
    wanted = [m for m in EMBED_METRICS if m in settings.metrics]
    clip = dino = None
    if {"clip-i", "clip-t"} & set(wanted):
        if clip_paths is None:
            log.warning("score: no --models given: CLIP-I and CLIP-T skipped (pass --models M.yaml with clip_vision)")
        else:
            missing = [
                c
                for c in cases
                if image_path(images_dir, c.id).is_file()
                and not all(store.has_value(f"{c.id}|clip|{m}") for m in ("clip-i", "clip-t") if m in wanted)
            ]
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
def judge_values(case: Case, store: ScoreStore, judges: Sequence[str]) -> dict[str, float | None]:
    """One case's CP and PF in one run (judge means, /4 applied); None where not (fully) scored."""
    per_subject = []
    for s in range(len(case.subjects)):
        vals = [v for j in judges if (v := store.value(case.id, j, f"cp@{s}")) is not None]
        per_subject.append(fmean(vals) if vals else None)
    pf = [v for j in judges if (v := store.value(case.id, j, "pf")) is not None]
    return {
        "cp": fmean(per_subject) if per_subject and None not in per_subject else None,
        "pf": fmean(pf) if pf else None,
    }


def embed_values(case: Case, store: ScoreStore) -> dict[str, float | None]:
    return {
        "clip-i": store.value(case.id, "clip", "clip-i"),
        "clip-t": store.value(case.id, "clip", "clip-t"),
        "dino": store.value(case.id, "dino", "dino"),
    }


def _mean(xs: list[float]) -> float | None:
    return fmean(xs) if xs else None


def group_stats(
    run_values: Sequence[Sequence[dict[str, float | None]]], embed: Sequence[dict[str, float | None]]
) -> dict:
    """One group: per run, CP / PF means over the cases with a value (``runs``); over runs, their mean, sample
    std (``cp_std`` / ``pf_std``, None below two runs) and the fewest cases any run had (``n_cp`` / ``n_pf``);
    ``cp_pf`` = mean CP × mean PF; embedding means; ``n`` = cases in the group."""
    out: dict = {"n": len(embed)}
    per_run = []
    for values in run_values:
        row: dict = {}
        for m in JUDGE_METRICS:
            vals = [v[m] for v in values if v[m] is not None]
            row[m], row[f"n_{m}"] = _mean(vals), len(vals)
        row["cp_pf"] = row["cp"] * row["pf"] if row["cp"] is not None and row["pf"] is not None else None
        per_run.append(row)
    for m in JUDGE_METRICS:
        means = [r[m] for r in per_run if r[m] is not None]
        out[m] = _mean(means)
        out[f"{m}_std"] = stdev(means) if len(means) >= 2 else None
        out[f"n_{m}"] = min((r[f"n_{m}"] for r in per_run), default=0)
    out["cp_pf"] = out["cp"] * out["pf"] if out["cp"] is not None and out["pf"] is not None else None
    out["runs"] = per_run
    for m in EMBED_METRICS:
        vals = [v[m] for v in embed if v[m] is not None]
        out[m], out[f"n_{m}"] = _mean(vals), len(vals)
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


def prompt_type_order(cases: Sequence[Case]) -> list[tuple[str, Callable[[Case], bool]]]:
    """DreamBench++ prompt-type groups (photorealistic, style transfer, imaginative); none for other benchmarks."""
    if not cases or not all(c.benchmark == "dreambench++" for c in cases):
        return []
    return [(name, lambda c, name=name: prompt_type(c.variation) == name) for name, _ in PROMPT_TYPES]


def summarize(
    cases: Sequence[Case],
    stores: dict[int, ScoreStore],
    embed_store: ScoreStore,
    judges: Sequence[str],
    *,
    method: str,
    images_dir: Path,
    protocol: str,
    cases_file: str | None = None,
) -> dict:
    """The per-group summary of one method (what ``summary.json`` holds and ``eval report`` reads)."""
    scored = [c for c in cases if image_path(images_dir, c.id).is_file()]
    runs = sorted(stores) if judges else []
    run_vals = [{c.id: judge_values(c, stores[r], judges) for c in scored} for r in runs]
    emb = {c.id: embed_values(c, embed_store) for c in scored}

    def stats(pred: Callable[[Case], bool], judge_vals: list[dict] = run_vals) -> dict:
        members = [c for c in scored if pred(c)]
        return group_stats([[v[c.id] for c in members] for v in judge_vals], [emb[c.id] for c in members])

    groups = {name: stats(pred) for name, pred in group_order(cases)}
    prompt_types = {name: stats(pred) for name, pred in prompt_type_order(cases)}
    per_judge = {}
    for j in judges:
        one = stats(lambda c: True, [{c.id: judge_values(c, stores[r], [j]) for c in scored} for r in runs])
        per_judge[j] = {k: one[k] for k in ("cp", "cp_std", "pf", "pf_std", "cp_pf")}
    failed = {
        r: sum(1 for rec in stores[r].records.values() if rec.get("source") in judges and rec.get("value") is None)
        for r in runs
    }
    kinds = sorted({c.benchmark for c in cases})
    benchmark = kinds[0] if len(kinds) == 1 else "+".join(kinds) or "unknown"
    return {
        "format": SUMMARY_FORMAT,
        "method": method,
        "benchmark": benchmark,
        "cases_file": cases_file,
        "images_dir": str(images_dir),
        "n_cases": len(cases),
        "n_images": len(scored),
        "n_missing_images": len(cases) - len(scored),
        "judges": list(judges),
        "protocol": protocol,
        "runs": len(runs),
        "failed_items": sum(failed.values()),
        "failed_by_run": {str(r): n for r, n in failed.items()},
        "groups": groups,
        "group_order": list(groups),
        "prompt_types": prompt_types,
        "prompt_type_order": list(prompt_types),
        "per_judge": per_judge,
    }


def score_method(
    cases: Sequence[Case],
    images_dir: str | Path,
    out_dir: str | Path,
    cfg: EvalConfig,
    settings: ScoreSettings,
    *,
    clip_paths=None,
    cases_file: str | None = None,
    judge_factory: Callable[..., ChatJudge] = ChatJudge,
) -> dict:
    """Scores one method's generations (layout in the module docstring) and writes ``summary.json``."""
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    missing = [c.id for c in cases if not image_path(images_dir, c.id).is_file()]
    if len(missing) == len(cases):
        raise FileNotFoundError(
            f"no generated images for these cases under '{images_dir}/images/'; "
            "run `dynaip eval generate` first (or pass the right --images)"
        )
    if missing:
        log.warning(
            "score: %d of %d cases have no image yet (e.g. %s); they are left out", len(missing), len(cases), missing[0]
        )
    judged = bool(set(JUDGE_METRICS) & set(settings.metrics)) and bool(cfg.judges)
    runs = (settings.runs or DEFAULT_RUNS[cfg.protocol]) if judged else 0
    if runs > 1 and cfg.protocol == "open" and any(j.temperature == 0 for j in cfg.judges):
        log.warning(
            "score: %d runs with temperature 0 repeat one another; use protocol dreambench or a temperature "
            "> 0 for independent runs",
            runs,
        )
    stores = open_run_stores(out_dir, runs, cfg.protocol)
    embed_store = ScoreStore(out_dir / "scores.jsonl")
    run_judges(cases, images_dir, stores, cfg, settings, judge_factory)
    run_embeddings(
        cases,
        images_dir,
        embed_store,
        settings,
        clip_paths=clip_paths,
        dino_paths=cfg.dino if "dino" in settings.metrics else None,
    )
    summary = summarize(
        cases,
        stores,
        embed_store,
        [j.name for j in cfg.judges] if judged else [],
        method=settings.method,
        images_dir=images_dir,
        protocol=cfg.protocol,
        cases_file=cases_file,
    )
    atomic_write_bytes(out_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True).encode())
    return summary
