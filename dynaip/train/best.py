"""``checkpoints.keep_best``: ``RUN/checkpoints/best.json`` names the checkpoint with the best fidelity value.

The file (written atomically, rank 0)::

    {"format": "dynaip-best-checkpoint/1", "step": 4000, "metric": "clip_i", "value": 0.7132,
     "checkpoint": "step-004000"}

``checkpoint`` is relative to the folder holding best.json, so a moved RUN stays valid; ``dynaip generate
--adapter RUN/checkpoints/best`` resolves it (``DynaIPAdapter``'s checkpoint lookup). Higher is better for
every fidelity metric (similarities, judge scores). A value is offered only once the checkpoint of its
step is on disk (``Worker`` evaluates, then saves, then offers), so best.json never names a checkpoint
that was not written. On resume the file is read back when it names the same metric and a checkpoint
that exists; otherwise the best starts over (a warning says why).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from dynaip.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

BEST_FORMAT = "dynaip-best-checkpoint/1"
BEST_FILE = "best.json"


class BestCheckpoint:
    """The best (step, value) of one metric over a run's checkpoints under ``root`` (RUN/checkpoints)."""

    def __init__(self, root: Path, metric: str):
        self.root, self.metric = Path(root), metric
        self.step: int | None = None
        self.value: float | None = None

    @property
    def path(self) -> Path:
        return self.root / BEST_FILE

    def load(self) -> None:
        """Takes over an existing best.json (a resumed run); ignores one of another metric or whose checkpoint is gone."""
        if not self.path.is_file():
            return
        try:
            saved = json.loads(self.path.read_text())
            step, value, metric, name = int(saved["step"]), float(saved["value"]), saved["metric"], saved["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s is unreadable (%s); the best checkpoint starts over", self.path, e)
            return
        if metric != self.metric:
            log.warning(
                "%s ranks by %s, this run by %s; the best checkpoint starts over", self.path, metric, self.metric
            )
        elif not (self.root / name / "adapter.safetensors").is_file():
            log.warning("%s names %s, which is gone; the best checkpoint starts over", self.path, name)
        else:
            self.step, self.value = step, value

    def offer(self, step: int, value: float | None) -> bool:
        """Records ``value`` of the checkpoint at ``step`` if it beats the best; writes best.json then. True if it did."""
        if value is None or not math.isfinite(value) or (self.value is not None and value <= self.value):
            return False
        self.step, self.value = step, float(value)
        record = {
            "format": BEST_FORMAT,
            "step": step,
            "metric": self.metric,
            "value": self.value,
            "checkpoint": f"step-{step:06d}",
        }
        atomic_write_bytes(self.path, (json.dumps(record, indent=1) + "\n").encode())
        log.info("best checkpoint: step %d (%s %.4f)", step, self.metric, self.value)
        return True
