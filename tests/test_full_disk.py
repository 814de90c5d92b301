"""A full disk (ENOSPC), a read-only file system (EROFS) or a missing permission (EACCES) while writing:
every writer turns it into one line naming the path and what to do, leaves what was there before intact,
and the same command resumes once space is back (dynaip/atomic.py: ``StorageError``, ``writing``).

The errors are injected as the ``OSError`` the kernel gives (``OSError(28, ...)``) at the writer's own
system call, so the code under test runs as it would on a full disk."""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from dynaip import atomic
from dynaip.atomic import StorageError, storage_error

CODES = [errno.ENOSPC, errno.EROFS, errno.EACCES]


def refuse(code: int = errno.ENOSPC) -> OSError:
    return OSError(code, os.strerror(code))


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if ".tmp" in p.name)


# ------------------------------------------------------------------------------ the shared helper


@pytest.mark.parametrize("code", CODES)
def test_atomic_write_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch, code):
    """Manifests, chunk markers, precompute markers and eval results (dynaip.eval.cases re-exports it) go
    through atomic_write_bytes; generate outputs through atomic_save_image."""
    from dynaip.eval.cases import atomic_write_bytes as eval_write

    target = tmp_path / "out" / "manifest.json"
    target.parent.mkdir()
    target.write_bytes(b"old")

    def full_fsync(fd):
        raise refuse(code)

    monkeypatch.setattr(atomic.os, "fsync", full_fsync)
    writers = {
        "atomic_write_bytes": lambda p: atomic.atomic_write_bytes(p, b"new"),
        "atomic_save_image (generate)": lambda p: atomic.atomic_save_image(Image.new("RGB", (4, 4)), p),
        "eval results": lambda p: eval_write(p, b"{}"),
    }
    for name, write in writers.items():
        with pytest.raises(StorageError) as e:
            write(target)
        msg = str(e.value)
        assert msg.startswith(f"cannot write {target}: ") and "\n" not in msg, name
        assert os.strerror(code).split()[0].lower() in msg.lower() or "read-only" in msg, msg
        assert "run the same command again" in msg and e.value.errno == code
        assert target.read_bytes() == b"old" and leftovers(tmp_path) == [], name
    monkeypatch.undo()
    atomic.atomic_write_bytes(target, b"new")  # space is back
    assert target.read_bytes() == b"new"


def test_storage_error_is_found_inside_wrapped_errors():
    class RayTaskError(Exception):  # what Ray raises in the driver: the worker's exception as .cause
        def __init__(self, cause):
            super().__init__("remote traceback ...")
            self.cause = cause

    inner = OSError(errno.ENOSPC, "No space left on device", "/data/ds/shards/x.tar")
    assert str(storage_error(RayTaskError(inner))).startswith("cannot write /data/ds/shards/x.tar: no space left")
    try:
        try:
            raise refuse(errno.EROFS)
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        assert "read-only" in str(storage_error(e, "/x"))
    assert storage_error(OSError(errno.ENOENT, "missing")) is None and storage_error(ValueError("x")) is None


def test_the_cli_prints_one_line_and_exits_2(monkeypatch, caplog, capsys, tmp_path):
    from dynaip.cli import main
    from dynaip.models import tiny

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt" / "flux" / "x.safetensors"))

    monkeypatch.setattr(tiny, "write_tiny_checkpoints", full)
    caplog.set_level(logging.ERROR)
    assert main(["tiny-checkpoints", "--out", str(tmp_path / "ckpt")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    want = (
        f"cannot write {tmp_path / 'ckpt' / 'flux' / 'x.safetensors'}: no space left on the device; free "
        "space there (or write elsewhere), then run the same command again: what was written before is intact "
        "and the run resumes from it"
    )
    assert errors == [want]
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------- curation


def test_curation_shard_write_on_a_full_disk_then_resume_gives_the_same_bytes(tmp_path, monkeypatch):
    """Shards, ledgers (chunk markers), rejects.jsonl and the manifest of a curation run: the run stops with
    the error naming the shard, nothing half-written is left, and a rerun ends in the uninterrupted bytes."""
    from test_curation_reliability import make_recipe, run, tree, write_images

    from dynaip.dataset import store as store_mod

    root = write_images(tmp_path / "src", 0, names=("a", "b", "c", "d"))
    run(make_recipe(root), tmp_path / "clean")
    real_write = store_mod.HashingWriter.write
    calls = {"n": 0}

    def write(self, data):
        calls["n"] += 1
        if calls["n"] == 3:  # the third write: a later chunk's shard, after earlier chunks were finished
            raise refuse()
        return real_write(self, data)

    monkeypatch.setattr(store_mod.HashingWriter, "write", write)
    out = tmp_path / "ds"
    with pytest.raises(StorageError, match=rf"^cannot write {out}/shards/.*\.tar: no space left on the device"):
        run(make_recipe(root), out)
    assert leftovers(out) == [] and not (out / "manifest.json").exists()
    monkeypatch.undo()
    resumed, _ = run(make_recipe(root), out)

    def dataset(d: Path) -> tuple[dict, dict]:  # shards and rejects byte for byte, the manifest as JSON
        files = {k: v for k, v in tree(d).items() if k.startswith("shards/") or k == "rejects.jsonl"}
        return files, json.loads((d / "manifest.json").read_text())

    assert dataset(out) == dataset(tmp_path / "clean") and resumed["totals"]["inputs"] == 4


# --------------------------------------------------------------------------------------- training


def test_metrics_line_is_whole_or_absent(tmp_path, monkeypatch):
    from dynaip.train import metrics

    path = tmp_path / "metrics.jsonl"
    w = metrics.MetricsWriter(path)
    w.write(step=1, loss=0.5)
    real = os.write

    def half_then_full(fd, data):
        real(fd, data[: len(data) // 2])
        raise refuse()

    monkeypatch.setattr(metrics.os, "write", half_then_full)
    with pytest.raises(StorageError, match=rf"^cannot write {path}: no space left"):
        w.write(step=2, loss=0.4)
    monkeypatch.undo()
    w.write(step=3, loss=0.3)
    w.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 3]


def test_train_checkpoint_on_a_full_disk_keeps_the_last_one_and_resumes_bitwise(
    tmp_path, tiny_models_yaml, local_train_once, monkeypatch, caplog
):
    """`dynaip train --local`: the step-4 checkpoint cannot be written — one line, exit 2, step 2 intact and
    no partial directory; `--resume` once space is back ends at the weights of an uninterrupted run."""
    from train_fixtures import local_train, same_adapter

    import dynaip.train.resume as resume_mod

    config, once = local_train_once
    real_save = resume_mod.torch.save

    def save(obj, f, *a, **k):
        if ".tmp-step-000004" in str(f):
            raise refuse()
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(resume_mod.torch, "save", save)
    caplog.set_level(logging.ERROR)
    run = tmp_path / "run"
    assert local_train(config, tiny_models_yaml, run) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"cannot write {run / 'checkpoints' / 'step-000004'}: no space")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    monkeypatch.undo()
    assert local_train(config, tiny_models_yaml, run, "--resume") == 0
    assert same_adapter(once / "checkpoints" / "step-000004", run / "checkpoints" / "step-000004")


# ------------------------------------------------------------------------------------- precompute


def test_feature_shard_on_a_full_disk_leaves_nothing_behind(tmp_path, monkeypatch):
    import torch

    from dynaip.features import format as fmt

    path = tmp_path / "features" / "shard-000000.safetensors"
    w = fmt.ShardWriter(path)
    w.add("a", torch.zeros(4))

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise refuse()

        def __getattr__(self, name):
            return getattr(self.f, name)

    w._data = FullFile(w._data)  # the data file's next write meets a full disk
    with pytest.raises(StorageError, match=rf"^cannot write {path}: no space left"):
        w.add("b", torch.ones(4))
    assert leftovers(tmp_path) == [] and not path.exists()


def test_serve_generation_on_a_full_disk_writes_nothing(tmp_path, monkeypatch):
    """The web app's Generate page: the PNG and its sidecar are written atomically; a full --out is the one
    line the page shows (dynaip/serve/app.py), and no file of the generation is left."""
    from types import SimpleNamespace

    from dynaip.serve.generation import GenerationService

    service = GenerationService.__new__(GenerationService)  # no models: only the writing is under test
    service.out_dir, service.models_yaml, service.adapter, service.device = tmp_path, None, None, "cpu"
    out = SimpleNamespace(images=[Image.new("RGB", (8, 8))], masks=[], settings={})

    def full_fsync(fd):
        raise refuse()

    monkeypatch.setattr(atomic.os, "fsync", full_fsync)
    with pytest.raises(StorageError, match=rf"^cannot write {tmp_path}/gen-[0-9-]+\.png: no space left"):
        service._save(out, [Image.new("RGB", (8, 8))], [0])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    saved = service._save(out, [Image.new("RGB", (8, 8))], [0])
    assert all(Path(f).is_file() for f in saved.files)


# ------------------------------------------------------------------------- precompute, end to end


@contextmanager
def small_disk(folder: Path, size: str, monkeypatch) -> Iterator[Callable[[], None]]:
    """``folder`` on a tmpfs of ``size`` (a real full disk: the kernel's ENOSPC wherever it comes); yields
    the function that gives the space back (a remount to 64 MiB). Where tmpfs cannot be mounted (not root,
    no mount namespace) the third feature shard's data file is the one that meets a full disk instead, at
    the same call a small tmpfs fails (the close that flushes its buffered tail)."""
    import subprocess

    from dynaip.features import format as fmt

    folder.mkdir(parents=True)
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, check=False
        ).returncode
        == 0
    )
    if mounted:
        try:
            yield lambda: subprocess.run(["mount", "-o", "remount,size=64m", str(folder)], check=True)
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return

    class FullOnClose:
        def __init__(self, f):
            self.f = f

        def close(self):
            self.f.close()
            raise refuse()

        def __getattr__(self, name):
            return getattr(self.f, name)

    real_init = fmt.ShardWriter.__init__

    def init(self, path):
        real_init(self, path)
        if Path(path).name == "000002.safetensors":
            self._data = FullOnClose(self._data)

    monkeypatch.setattr(fmt.ShardWriter, "__init__", init)
    yield monkeypatch.undo


def test_precompute_on_a_full_disk_says_where_and_resumes_to_the_same_bytes(
    tmp_path, tiny_models_yaml, local_train_once, monkeypatch, caplog
):
    """`dynaip precompute` with DATASET/features on a 48 KiB tmpfs: the run fails in one line naming the
    file and what to do (exit 2), every finished feature shard and marker is intact and no temporary file
    is left; once the space is back the same command ends in the bytes of a run that never met a full disk."""
    import shutil

    from train_fixtures import write_dataset

    from dynaip.cli import main

    config, _ = local_train_once
    data = write_dataset(tmp_path / "ds", [1] * 6, size=64)
    clean = tmp_path / "clean"
    shutil.copytree(data, clean)

    def precompute(dataset: Path) -> int:
        return main(
            [
                "precompute",
                "--data",
                str(dataset),
                "--models",
                str(tiny_models_yaml),
                "--config",
                str(config),
                "--executor",
                "local",
                "--no-progress",
                "--batch-size",
                "1",
            ]
        )

    assert precompute(clean) == 0
    (want,) = (clean / "features").iterdir()
    caplog.set_level(logging.ERROR)
    with small_disk(data / "features", "48k", monkeypatch) as space_is_back:
        assert precompute(data) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, errors
        assert errors[0].startswith(f"cannot write {data / 'features'}/") and "\n" not in errors[0]
        assert (
            "no space left on the device; free space there" in errors[0] and "run the same command again" in errors[0]
        )
        (feat,) = (data / "features").iterdir()
        assert leftovers(data) == [] and not (feat / "manifest.json").exists()
        done = sorted(p.relative_to(feat).as_posix() for p in feat.rglob("*.safetensors"))
        assert 1 <= len([p for p in done if p.startswith("shards/")]) < 6, done
        assert all((feat / p).read_bytes() == (want / p).read_bytes() for p in done)  # what was written is intact
        space_is_back()
        assert precompute(data) == 0
        got = {p.relative_to(feat).as_posix(): p.read_bytes() for p in sorted(feat.rglob("*")) if p.is_file()}
    assert got == {p.relative_to(want).as_posix(): p.read_bytes() for p in sorted(want.rglob("*")) if p.is_file()}
