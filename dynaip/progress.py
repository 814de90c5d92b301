"""Driver-side progress of a long command whose work runs elsewhere (Ray workers): done / total, rate,
ETA and a few last values (the training loss) — a bar on a terminal, else one line every ``every``
seconds, the form a Ray job's log or a CI log can hold (as curation's ``pipeline.orchestrate.Progress``).

``Progress`` is fed by the driver from what the workers already send back: results of an actor pool
(precompute, eval generation) or the metrics Ray Train's controller appends to a JSON-lines file
(training; ``follow_jsonl``). Lines go to stderr, so a command's own stdout stays parseable.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``done``/``total`` of ``unit`` s with the rate since the start and the ETA; ``info`` (e.g. the last
    loss) is appended to every line. Thread-safe: a follower thread may feed it while the driver waits."""

    def __init__(
        self,
        desc: str,
        total: int | None,
        unit: str,
        *,
        enabled: bool = True,
        every: float = 5.0,
        initial: int = 0,
        stream: TextIO | None = None,
    ):
        self.desc, self.total, self.unit, self.enabled, self.every = desc, total, unit, enabled, every
        self.initial = self.done = initial
        self.info: dict[str, str] = {}
        self.stream = stream
        self.t0 = self.last = self.rate_t0 = time.perf_counter()
        self.lock = threading.Lock()
        self.bar = None
        self.printed = 0
        self.printed_done: int | None = None
        if enabled and self._out().isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, file=self._out(), dynamic_ncols=True)

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr  # looked up late: redirections apply

    def update(self, done: int | None = None, *, advance: int = 0, **info: Any) -> None:
        """Sets ``done`` (or advances it by ``advance``) and the extra values, then shows them when due."""
        with self.lock:
            new = self.done + advance if done is None else done
            step, self.done = new - self.done, new
            for key, value in info.items():
                self.info[key] = f"{value:.4g}" if isinstance(value, float) else str(value)
            if not self.enabled:
                return
            now = time.perf_counter()
            if self.bar is not None:
                self.bar.set_postfix(self.info, refresh=False)
                self.bar.update(step)
            elif now - self.last >= self.every:
                self.last = now
                self._print(now)

    def tick(self) -> None:
        """Shows the state again when due although nothing advanced (the minutes a Ray job spends starting its
        workers and loading models): a log keeps getting lines, a bar its elapsed time."""
        with self.lock:
            if not self.enabled:
                return
            now = time.perf_counter()
            if self.bar is not None:
                self.bar.refresh()
            elif now - self.last >= self.every:
                self.last = now
                self._print(now)

    def restart_rate(self, done: int) -> None:
        """The rate (and so the ETA) counts from here, at ``done``: the minutes before the first step of a Ray
        job (workers starting, models loading) would make every estimate of the steps themselves wrong."""
        with self.lock:
            self.initial = self.done = done
            self.rate_t0 = time.perf_counter()

    def rate(self, now: float) -> float:
        return (self.done - self.initial) / max(now - self.rate_t0, 1e-9)

    def line(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        rate = self.rate(now)
        total = "?" if self.total is None else str(self.total)
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = ""
        if self.total is not None and self.done < self.total:
            eta = f", ETA {_duration((self.total - self.done) / rate)}" if rate > 0 else ", ETA ?"
        extra = "".join(f", {k} {v}" for k, v in self.info.items())
        return (
            f"{self.desc}: {self.unit}s {self.done}/{total}{pct}, {rate:.3g} {self.unit}s/s{eta}{extra}, "
            f"{_duration(now - self.t0)} elapsed"
        )

    def _print(self, now: float | None = None) -> None:
        print(self.line(now), file=self._out(), flush=True)
        self.printed += 1
        self.printed_done = self.done

    def close(self) -> None:
        """Ends the bar, or prints the end state unless the last line already showed it (a short run too)."""
        with self.lock:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            elif self.enabled and self.printed_done != self.done:
                self._print()


class JsonlFollower:
    """Reads the rows appended to a JSON-lines file in a background thread (every ``poll`` seconds), hands each
    complete one to ``on_row`` and then calls ``on_poll``; leaving the ``with`` block reads what is left."""

    def __init__(
        self,
        path: str | Path,
        on_row: Callable[[dict[str, Any]], None],
        poll: float = 0.5,
        on_poll: Callable[[], None] | None = None,
    ):
        self.path, self.on_row, self.poll, self.on_poll = Path(path), on_row, poll, on_poll
        self.offset = self.path.stat().st_size if self.path.is_file() else 0  # rows of an earlier run are not ours
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="progress-follower")

    def __enter__(self) -> "JsonlFollower":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        self._read()

    def _loop(self) -> None:
        while not self.stopping.wait(self.poll):
            self._read()
            if self.on_poll is not None:
                self.on_poll()

    def _read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:  # not written yet
            return
        end = data.rfind(b"\n") + 1  # a row still being written is read next time
        self.offset += end
        for raw in data[:end].splitlines():
            try:
                row = json.loads(raw)
            except ValueError:
                continue
            if isinstance(row, dict):
                self.on_row(row)
