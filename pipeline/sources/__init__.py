"""Source readers. ``get_reader(kind)`` returns ``read(cfg: SourceConfig) -> Iterator[SourceRecord]``
from ``pipeline.sources.<kind>``, imported lazily (a reader's heavy imports load only when used).

A reader yields records in a deterministic order (the order decides shard assignment). It may also
yield a ``Reject`` for an input it cannot turn into a record; that input is counted as rejected.
"""

from __future__ import annotations

from typing import Callable, Iterator

from pipeline.recipe import SOURCE_KINDS, SourceConfig, reader_module
from pipeline.records import Reject, SourceRecord
from pipeline.sources.common import UNKNOWN_LICENSE, SourceLicense

Reader = Callable[[SourceConfig], Iterator["SourceRecord | Reject"]]


def get_reader(kind: str) -> Reader:
    """The ``read`` function of ``pipeline.sources.<kind>``; ValueError for an unknown kind."""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown source kind {kind!r}; use one of {', '.join(SOURCE_KINDS)}")
    read = getattr(reader_module(kind), "read", None)
    if not callable(read):
        raise ValueError(f"pipeline/sources/{kind}.py has no read(cfg) function")
    return read


def get_license(kind: str) -> SourceLicense:
    """``LICENSE`` of ``pipeline.sources.<kind>``: the terms its data comes under (the dataset card's
    ``license`` and ``source_datasets``); ``UNKNOWN_LICENSE`` for a reader that defines none."""
    found = getattr(reader_module(kind), "LICENSE", None)
    return found if isinstance(found, SourceLicense) else UNKNOWN_LICENSE


__all__ = ["get_license", "get_reader", "Reader"]
