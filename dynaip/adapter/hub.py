"""Where an adapter named by the user is: a local directory, or a Hugging Face repo id (``owner/name``)
found in the local hub cache, as diffusers' loaders resolve a ``pretrained_model_name_or_path``.

``resolve_adapter_dir(name)``:

1. an existing local path wins (also when it looks like ``owner/name``), and a ``Path`` is always a path;
2. a string of the form ``owner/name`` is looked up in the hub cache only —
   ``huggingface_hub.snapshot_download(repo_id, local_files_only=True)``: the snapshot that ``refs/main``
   names under ``HF_HUB_CACHE/models--owner--name/`` (the cache layout of the huggingface_hub docs,
   "Understand caching"). Nothing is downloaded: a repo not in the cache is a one-line
   ``FileNotFoundError`` naming the cache and the command that fetches it;
3. anything else is returned as the path it names (the caller's own "missing files" error follows).

The cache is ``HF_HUB_CACHE``, else ``HF_HOME/hub``, read when called (so a process that changes them
is honoured), else huggingface_hub's default. The snapshot is read like any local adapter directory:
``adapter.safetensors`` (safetensors, no pickle) and ``config.json`` (JSON); nothing in it is run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
"""A hub repo id ``owner/name`` (the characters the hub allows; ``..`` and ``--`` are refused below)."""


def hub_cache() -> str:
    """The hub cache directory in force now (see the module doc)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def is_repo_id(name: str) -> bool:
    return bool(REPO_ID.fullmatch(name)) and ".." not in name and "--" not in name


def resolve_adapter_dir(name: str | os.PathLike) -> Path:
    """The directory ``name`` stands for: a local path, or the cached snapshot of the hub repo ``name``."""
    if isinstance(name, os.PathLike):
        return Path(name)
    path = Path(name).expanduser()
    if path.exists() or not is_repo_id(str(name)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache()
    try:
        return Path(snapshot_download(repo_id=str(name), cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"adapter {name!r} is neither a local directory nor a Hugging Face repo in the hub cache {cache}; "
            f"download it first (`huggingface-cli download {name}`, HF_HUB_CACHE={cache}) — loading is offline "
            "and reads the cache only"
        ) from None


__all__ = ["hub_cache", "is_repo_id", "resolve_adapter_dir"]
