"""One error type for every model that fails to load, with a message a user can act on."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(RuntimeError):
    """A model checkpoint is missing, incomplete or corrupt.

    The message is one line: which model, which path, what was expected, what to do.
    """

    def __init__(self, model: str, path: str | Path, expected: str, fix: str, cause: BaseException | None = None):
        detail = ""
        if cause is not None:  # keep the message on one line: the cause's first line, shortened
            first = next((ln.strip() for ln in str(cause).splitlines() if ln.strip()), "")
            detail = f" ({type(cause).__name__}: {first[:160]})"
        super().__init__(f"{model}: cannot load '{path}': expected {expected}{detail}. {fix}")
        self.model = model
        self.path = str(path)


class SetupError(RuntimeError):
    """A curation stage cannot start (missing/corrupt checkpoint, bad config): stops the job, never a
    reject. Defined here, beside CheckpointError, so the `dynaip` CLI can name it without importing
    the curation stages (tests/test_layering.py)."""


FIX_HINT = "Point models.yaml at the released checkpoint, or run `dynaip tiny-checkpoints --out DIR` for test weights."


def require_file(model: str, path: str | Path, expected: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(
            model, p, expected, f"It is a directory, not a file: name the checkpoint file inside it. {FIX_HINT}"
        )
    if not p.is_file():
        raise CheckpointError(model, p, expected, f"The file does not exist. {FIX_HINT}")
    if p.stat().st_size == 0:
        raise CheckpointError(model, p, expected, f"The file is empty (interrupted download?). {FIX_HINT}")
    return p


def require_dir(model: str, path: str | Path, expected: str) -> Path:
    p = Path(path)
    if p.is_file():
        raise CheckpointError(model, p, expected, f"It is a file, not a directory. {FIX_HINT}")
    if not p.is_dir():
        raise CheckpointError(model, p, expected, f"The directory does not exist. {FIX_HINT}")
    return p
