"""Shared by the diptych readers (``subjects200k``, ``synth``): typed reader options from a recipe's
``source:`` section. A diptych record (``pipeline.records.Diptych``) is split into its two panels by the
decode stage; both panels are detected and segmented, the ``consistency`` stage compares the two
cut-outs, and the pair stage writes one cross sample per direction (docs/sources.md, "Diptych cross pairs").
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def parse_options(cls: type[T], cfg: Any, kind: str) -> T:
    """``cls`` (a frozen dataclass listing every option with its default) from ``cfg.options`` (or a
    mapping). An unknown key is a one-line ValueError naming the nearest valid option; a value of the
    wrong type too."""
    raw = {k: v for k, v in dict(getattr(cfg, "options", cfg) or {}).items() if k not in ("kind", "root")}
    names = [f.name for f in dataclasses.fields(cls)]
    for key in sorted(raw):
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; options: {', '.join(names)}"
            raise ValueError(f"{kind}: unknown source option {key!r}{hint}")
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if value is not None and not _fits(hints[key], value):
            raise ValueError(f"{kind}: source option {key!r} = {value!r} has the wrong type (expected {hints[key]})")
    return cls(**raw)


def _fits(tp: Any, value: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        return any(a is not type(None) and _fits(a, value) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_fits(args[0], v) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True
