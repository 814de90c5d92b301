"""One loader for every YAML config file: curation recipes (``manifests/*.yaml``), training configs
(``jobs/configs/*.yaml``), ``models.yaml`` and the eval judge config (docs/ARCHITECTURE.md,
"Configuration").

A config is a tree of dataclasses; ``build(cls, mapping, where=...)`` turns a parsed YAML mapping
into it, checking every value against the field's annotation (nested dataclasses, ``Optional``,
unions, ``list``/``tuple``/``dict``, ``Literal``, ``Enum``, ``bool``/``int``/``float``/``str``).
Every error is one line naming the file, the key path (``stages[0].filters.min_sharpnes``) and, for
an unknown key, the nearest valid name (difflib), so a typo never silently falls back to a default.

Hooks, all declared on the dataclasses themselves so each config keeps its rules beside its fields:

- ``field(metadata={"path": True})``: a relative path (no ``scheme://``) resolves against the YAML
  file's folder (``base``); ``~`` expands.
- ``SHORTHAND: ClassVar[str]``: a scalar given where this dataclass is expected means
  ``{SHORTHAND: scalar}`` (``clip_vision: /ckpt/clip`` → ``{path: /ckpt/clip}``).
- ``RETIRED_KEYS: ClassVar[dict[str, str]]``: keys that used to exist; giving one fails with its
  message (which names the replacement) instead of "unknown key".

This module is a base layer (tests/test_layering.py): it imports the standard library and PyYAML
only, so curation, models, adapter, training and evaluation can all use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or mapping that does not fit its dataclass; the message is one line."""


def read_yaml(path: str | Path, what: str, hint: str) -> dict[str, Any]:
    """The top-level mapping of the YAML file ``path``; an empty file gives ``{}``.

    ``what`` names the kind of file in messages ("recipe", "train config"), ``hint`` says where to
    start from (an example file). FileNotFoundError for a missing file, ConfigError for bad YAML or a
    top level that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' does not exist; {hint}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} '{path}' is not valid YAML ({str(e).splitlines()[0]})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{what} '{path}' must be a mapping of keys at the top level, got {type(raw).__name__}; {hint}"
        )
    return raw


def nearest(name: str, known: typing.Iterable[str]) -> str | None:
    """The known name closest to ``name`` (difflib), or None when nothing is close."""
    match = difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_key_message(key: str, known: typing.Iterable[str], at: str = "") -> str:
    """``unknown key 'at.key'; did you mean 'x'? (keys: a, b, c)`` — the one wording every loader uses."""
    known = sorted(known)
    near = nearest(key, known)
    hint = f"; did you mean '{near}'?" if near else ""
    return f"unknown key '{at}{key}'{hint} (keys{' of ' + repr(at.rstrip('.')) if at else ''}: {', '.join(known)})"


def build(
    cls: type,
    raw: Any,
    *,
    where: str = "config",
    at: str = "",
    base: str | Path | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Any:
    """``cls`` built from the mapping ``raw``, strictly: unknown keys, missing required keys and values
    of the wrong type raise ConfigError ``"{where}: ..."`` naming the key path (``at`` is the prefix of
    this mapping's keys, e.g. ``"stages[0]."``). An instance of ``cls`` is returned as it is.

    ``base``: folder that relative ``path`` fields resolve against (None leaves them as written).
    ValueErrors raised by ``cls``'s own ``__post_init__`` checks are re-raised prefixed with ``where``.
    Fields with ``metadata={"yaml": False}`` are not keys of the file; ``extra`` sets them.
    """
    if isinstance(raw, cls):
        return raw
    shorthand = getattr(cls, "SHORTHAND", None)
    if shorthand is not None and not isinstance(raw, Mapping) and raw is not None:
        raw = {shorthand: raw}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.metadata.get("yaml", True)}
    section = at.rstrip(".") or "the top level"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: '{section}' must be a mapping with keys {', '.join(sorted(fields))}, got {raw!r}")
    retired: dict[str, str] = getattr(cls, "RETIRED_KEYS", {}) or {}
    for key in raw:
        if key not in fields:
            if key in retired:
                raise ConfigError(f"{where}: {at}{key} {retired[key]}")
            raise ConfigError(f"{where}: {unknown_key_message(str(key), fields, at)}")
    missing = [
        n
        for n, f in fields.items()
        if n not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: '{section}' needs the key '{at}{missing[0]}' (required: {', '.join(missing)})")
    hints = typing.get_type_hints(cls)
    kwargs = dict(extra or {})
    for name, value in raw.items():
        value = coerce(hints[name], value, where=where, at=f"{at}{name}", base=base)
        if base is not None and fields[name].metadata.get("path") and value is not None:
            value = resolve_path(value, base)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # the dataclass's own range checks: already one line naming the field
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def resolve_path(value: str, base: str | Path) -> str:
    """``value`` made absolute against ``base`` unless it is a URL (``scheme://``) or already absolute."""
    if "://" in str(value):
        return str(value)
    p = Path(str(value)).expanduser()
    return str(p if p.is_absolute() else (Path(base) / p).resolve())


def _kind(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) in (list, tuple):
        return "a list"
    if typing.get_origin(tp) in (dict, Mapping) or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(tp: Any, value: Any, *, where: str, at: str, base: str | Path | None = None) -> Any:
    """``value`` checked (and, for dataclasses, built) against the annotation ``tp``; ConfigError otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: '{at}' = null: expected {' or '.join(_kind(a) for a in args)}")
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return coerce(inner[0], value, where=where, at=at, base=base)
        for alt in inner:  # first alternative that accepts the value (str | list[str]: a name or a list)
            try:
                return coerce(alt, value, where=where, at=at, base=base)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: '{at}' = {value!r}: expected {' or '.join(_kind(a) for a in inner)}")
    if origin is typing.ClassVar:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where=where, at=at + ".", base=base)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: '{at}' = {value!r}: use one of {', '.join(map(str, args))}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(
                f"{where}: '{at}' = {value!r}: use one of {', '.join(str(m.value) for m in tp)}"
            ) from None
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{at}' = {value!r}: expected a list")
        item = args[0] if args else Any
        return [coerce(item, v, where=where, at=f"{at}[{i}]", base=base) for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{at}' = {value!r}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(args[0], v, where=where, at=f"{at}[{i}]", base=base) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: '{at}' = {value!r}: expected a list of {len(args)}")
        return tuple(
            coerce(a, v, where=where, at=f"{at}[{i}]", base=base)
            for i, (a, v) in enumerate(zip(args or [Any] * len(value), value))
        )
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: '{at}' = {value!r}: expected a mapping")
        if len(args) == 2:
            return {k: coerce(args[1], v, where=where, at=f"{at}.{k}", base=base) for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{at}' = {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{at}' = {value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{at}' = {value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{at}' = {value!r}: expected a string")
        return value
    return value


def as_dict(obj: Any) -> Any:
    """A config dataclass tree as plain data (tuples as lists), the inverse of ``build``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


__all__ = ["ConfigError", "read_yaml", "build", "coerce", "nearest", "unknown_key_message", "resolve_path", "as_dict"]
