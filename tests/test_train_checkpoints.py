"""Checkpoint directories survive a crash at any point of a save (dynaip/train/checkpoint_files.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dynaip.train import checkpoint_files as cf
from dynaip.train.checkpoints import latest_checkpoint


def _ckpt(path: Path, tag: str) -> Path:
    (path / "resume").mkdir(parents=True)
    (path / "resume" / "state.json").write_text(tag)
    (path / "adapter.safetensors").write_text(tag)
    return path


def test_swap_fsyncs_every_file_and_directory(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(cf.os, "fsync", spy)
    root = tmp_path / "checkpoints"
    tmp = _ckpt(root / ".tmp-step-000002", "new")
    cf.swap_in(tmp, root / "step-000002")
    for p in ("resume/state.json", "adapter.safetensors", "resume", ""):
        assert str(tmp / p).rstrip("/") in synced  # before the rename, under the temporary name
    assert str(root) == synced[-1]  # the rename itself is made durable last
    assert (root / "step-000002" / "resume" / "state.json").read_text() == "new"


def test_a_crash_between_the_renames_leaves_the_old_copy_and_recover_restores_it(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _ckpt(root / "step-000004", "old")
    tmp = _ckpt(root / ".tmp-step-000004", "new")
    real, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real(src, dst)

    monkeypatch.setattr(cf.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        cf.swap_in(tmp, root / "step-000004")
    monkeypatch.setattr(cf.os, "replace", real)
    assert not (root / "step-000004").exists() and (root / ".old-step-000004").is_dir()
    assert cf.recover(root) == ["restored step-000004 from .old-step-000004", "removed unfinished .tmp-step-000004"]
    assert (root / "step-000004" / "resume" / "state.json").read_text() == "old"
    assert latest_checkpoint(tmp_path) == root / "step-000004"


def test_recover_drops_superseded_aside_copies_and_leftover_temporaries(tmp_path):
    root = tmp_path / "checkpoints"
    _ckpt(root / "step-000006", "new")
    _ckpt(root / ".old-step-000006", "old")  # crash after the second rename, before the delete
    _ckpt(root / ".tmp-step-000008", "half")  # crash while writing
    (root / ".state.json.abc.tmp").write_text("x")
    cf.recover(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-000006"]
    assert (root / "step-000006" / "resume" / "state.json").read_text() == "new"


def test_prune_keeps_the_highest_steps_by_number_not_by_name(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (999998, 999999, 1000000, 1000001):
        _ckpt(root / f"step-{s:06d}", str(s))
    assert sorted(p.name for p in cf.prune(root, 2)) == ["step-999998", "step-999999"]
    assert sorted(p.name for p in root.iterdir()) == ["step-1000000", "step-1000001"]
    assert latest_checkpoint(tmp_path) == root / "step-1000001"
