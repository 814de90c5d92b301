"""What a training run reports: ``MetricsWriter`` (RUN/metrics.jsonl and TensorBoard, rank 0) and
``report_log`` (Ray Train's controller appends rank 0's reported metrics to RUN/ray/reported.jsonl).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from dynaip.atomic import writing

from .config import FIDELITY_METRICS, QUALITY_FILTERS

DROP_REASONS = ("pair", *QUALITY_FILTERS)
"""Keys of the ``filtered_by`` metric (``dynaip.train.data.rejected_by``)."""


def append_line(f: Any, path: Any, line: str) -> None:
    """Appends one line to an unbuffered binary file, whole or not at all: a disk that fills up mid-line
    gets the file cut back to where it was (the log stays valid JSON lines) and a ``StorageError``."""
    data = (line + "\n").encode()
    fd = f.fileno()
    with writing(path):
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data) :]
        except OSError:
            os.ftruncate(fd, size)
            raise


class MetricsWriter:
    """Appends JSON lines to RUN/metrics.jsonl and the same numbers to TensorBoard under ``tb_dir``
    (rank 0 only; other ranks hold a no-op)."""

    TB_TAGS = {
        "loss": "train/loss",
        "lr": "train/lr",
        "samples_per_s": "train/samples_per_s",
        "data_wait": "train/data_wait_fraction",
        "grad_norm": "train/grad_norm",
        "skipped": "data/skipped",
        "corrupt_shards": "data/corrupt_shards",
        "filtered": "data/filtered",
        "val_loss": "val/loss",
        "stage_progress": "progress/stage",
        "progress": "progress/total",
        "stage_index": "progress/stage_index",
        **{m: f"fidelity/{m}" for m in FIDELITY_METRICS},
    }

    def __init__(self, path: Path | None, tb_dir: Path | None = None):
        self.path = path
        with writing(path or "metrics.jsonl"):
            self.f = open(path, "ab", buffering=0) if path is not None else None
        self.tb = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(tb_dir))

    def write(self, **row: Any) -> None:
        if self.f is not None:
            append_line(self.f, self.path, json.dumps({"time": round(time.time(), 3), **row}))
        if self.tb is not None and "step" in row:
            for key, tag in self.TB_TAGS.items():
                if isinstance(row.get(key), (int, float)):
                    self.tb.add_scalar(tag, row[key], row["step"])
            for i, (name, n) in enumerate((row.get("samples_per_dataset") or {}).items()):
                self.tb.add_scalar(
                    f"data/samples_per_dataset/{i}_{name.rstrip('/').rsplit('/', 1)[-1]}", n, row["step"]
                )
            for reason, n in (row.get("filtered_by") or {}).items():
                self.tb.add_scalar(f"data/filtered_by/{reason}", n, row["step"])
            if row.get("event") == "stage":
                self.tb.add_text("stage", f"stage '{row['stage']}' starts", row["step"])

    def image(self, tag: str, image, step: int) -> None:
        """``image``: an (H, W, 3) uint8 array."""
        if self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def report_log(path: Path):
    """A Ray Train callback (it runs in the controller) that appends the metrics rank 0 reported."""
    from ray.train import UserCallback

    class ReportLog(UserCallback):
        def __init__(self, target: str):
            self.target = target

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0]:
                with open(self.target, "ab", buffering=0) as f:
                    append_line(f, self.target, json.dumps(metrics[0]))

    return ReportLog(str(path))
