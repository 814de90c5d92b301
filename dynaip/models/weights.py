"""Reading state dicts without unpickling code: safetensors, or torch.load(weights_only=True)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import CheckpointError, require_file

TORCHSCRIPT_FIX = "Give the release's tensors-only state dict (.safetensors or .pth) instead."


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (``torch.jit.save``): a zip whose top folder holds ``constants.pkl`` or
    ``code/``. Only the zip's directory is read; nothing in it is unpickled or run."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            parts = name.split("/")
            if len(parts) >= 2 and (parts[1] == "constants.pkl" or (parts[1] == "code" and len(parts) > 2)):
                return True
    return False


def load_state_dict(
    model: str, path: str | Path, expected: str, torchscript_fix: str = TORCHSCRIPT_FIX
) -> dict[str, torch.Tensor]:
    """Loads a flat ``{name: tensor}`` dict from ``.safetensors`` or a tensors-only ``.pth/.pt/.bin``.

    Common wrappers (``{"model": ...}``, ``{"state_dict": ...}``) are unwrapped and a
    ``module.`` prefix left by DDP is stripped. A TorchScript archive is refused before it is read:
    ``torch.jit.load`` would compile and run the code stored in it (``torchscript_fix`` says what
    to download instead).
    """
    p = require_file(model, path, expected)
    if p.suffix != ".safetensors" and is_torchscript(p):
        raise CheckpointError(
            model,
            p,
            expected,
            "It is a TorchScript archive, not a state dict; loading it would "
            f"run the code stored in it. {torchscript_fix}",
        )
    try:
        if p.suffix == ".safetensors":
            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, truncated file, pickled code ...
        raise CheckpointError(
            model, p, expected, "The file is corrupt or not a tensors-only checkpoint; re-download it.", e
        ) from e
    for key in ("model", "state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(model, p, expected, "It does not hold a flat dict of tensors.")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_into(
    module: torch.nn.Module,
    sd: dict[str, torch.Tensor],
    model: str,
    path: str | Path,
    expected: str,
    allow_missing: tuple[str, ...] = (),
    skip_unexpected: tuple[str, ...] = (),
) -> None:
    """``load_state_dict(strict)`` that reports mismatches as a CheckpointError (sizes included).

    ``allow_missing``: key prefixes the checkpoint may lack; ``skip_unexpected``: exact names a
    release is known to carry beyond the model (dropped by name; any other extra key still fails).
    """
    own = module.state_dict()
    sd = {k: v for k, v in sd.items() if k not in skip_unexpected or k in own}
    missing = [k for k in own if k not in sd and not any(k.startswith(a) for a in allow_missing)]
    unexpected = [k for k in sd if k not in own]
    wrong = [
        f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} with other shapes (e.g. {wrong[0]})")
        raise CheckpointError(
            model,
            path,
            expected,
            "Its weights do not match the configured architecture: "
            + "; ".join(parts)
            + ". Check the variant/config named in models.yaml.",
        )
    module.load_state_dict(sd, strict=False)
