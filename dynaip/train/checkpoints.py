"""Where the trainer's checkpoints are: ``OUT/checkpoints/step-NNNNNN/`` (``adapter.safetensors`` +
``config.json`` for inference, ``resume/`` for exact continuation). Kept apart from ``trainer`` so
that ``preflight`` can check a resume without importing the trainer (which imports ``preflight``)."""

from __future__ import annotations

import re
from pathlib import Path

SHARDED_ADAPTER = ("fsdp2_adapter", "fsdp2_full")
"""Strategies whose adapter (and optimizer state) is sharded: a resume must stay within this group."""
STEP_DIR = re.compile(r"^step-(\d{6,})$")


def latest_checkpoint(out: Path) -> Path | None:
    """The newest ``OUT/checkpoints/step-*`` with a complete ``resume/state.json``, or None."""
    root = out / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted(
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := STEP_DIR.match(p.name)) and (p / "resume" / "state.json").is_file()
    )
    return steps[-1][1] if steps else None
