"""Evaluation: DreamBench++ and DynaIP-Bench cases, resumable generation, VLM judging and reports.

Modules: ``cases`` (the case record), ``bench_single`` / ``bench_multi`` (benchmarks), ``generate``
(the runner; ``generate_case`` is the one model call), ``judge`` (OpenAI-compatible VLM judges),
``metrics`` (CLIP-I, CLIP-T, DINO), ``score`` (resumable scoring + aggregation), ``report`` (tables,
contact sheets), ``cli`` (``add_eval_parser``).
"""

from .cases import Case, Subject, read_cases, write_cases

__all__ = ["Case", "Subject", "read_cases", "write_cases"]
