"""Reliability of the curation run and of dataset directories (#19): source identity and content
fingerprints, the output lock, a manifest that never shrinks, input bounds, file modes, deterministic
reasons and reading only inside a dataset.

The runs here use a model-free stage list (decode + a stage that turns each decoded image into one
sample), so each takes well under a second: what is tested is the orchestration, not the models
(tests/test_curation_e2e.py runs the real stages)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.recipe import Recipe
from pipeline.sample import Sample, sample_key
from pipeline.writer import OutputDirError


class OneSample:
    """Every decoded image becomes one sample (whole image as target, reference and mask)."""

    name = "pair"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, items):
        for it in items:
            if not it.ok:
                continue
            self.seen.append(it.record.id)
            img = it.target.image
            it.samples = [
                Sample(
                    key=sample_key(it.record.source, it.record.id),
                    ref=img,
                    tgt=img,
                    mask=np.ones(img.shape[:2], bool),
                    caption="x",
                    meta={"pair": "intra", "source_id": it.record.id},
                )
            ]
        return items


def make_recipe(root: Path, **filters) -> Recipe:
    r = Recipe.from_dict(
        {
            "source": {"kind": "folder", "root": str(root)},
            "filters": {"min_image_side": 8, **filters},
            "dedup": {"max_distance": None},
            "shards": {"inputs_per_shard": 1},
        }
    )
    return r


def write_images(root: Path, seed: int, names=("a", "b", "c")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for n in names:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"{n}.png")
    return root


def run(recipe: Recipe, out: Path, limit: int | None = None) -> tuple[dict, OneSample]:
    from pipeline.executor_local import run_local
    from pipeline.stages import DecodeStage

    pair = OneSample()
    m = run_local(recipe, out, None, limit=limit, progress=False, stages=[DecodeStage(recipe), pair])
    return m, pair


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".dynaip.lock"
    }


# ---- data mixing --------------------------------------------------------------------------------


def test_another_source_root_into_a_finished_dataset_is_refused(tmp_path):
    a, b = write_images(tmp_path / "a", 0), write_images(tmp_path / "b", 1)  # same names, other pictures
    out = tmp_path / "ds"
    m, _ = run(make_recipe(a), out)
    before = tree(out)
    with pytest.raises(OutputDirError, match="built from source folder:.*/a, not folder:.*/b; pass a new --out"):
        run(make_recipe(b), out)
    assert tree(out) == before
    assert len(m["dataset_id"]) == 16


def test_changed_input_content_rebuilds_exactly_its_chunk(tmp_path):
    root = write_images(tmp_path / "src", 0)
    out = tmp_path / "ds"
    m1, first = run(make_recipe(root), out)
    assert sorted(first.seen) == ["a", "b", "c"]
    m2, again = run(make_recipe(root), out)
    assert again.seen == [] and m2 == m1  # nothing changed: nothing rebuilt
    assert not (out / ".dynaip.lock").exists()  # released with the run
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(root / "b.png")  # same name, another picture
    m3, third = run(make_recipe(root), out)
    assert third.seen == ["b"]
    old = {s["path"]: s["sha256"] for s in m1["shards"]}
    new = {s["path"]: s["sha256"] for s in m3["shards"]}
    assert [p for p in new if new[p] != old[p]] == ["shards/000001.tar"]


def test_fingerprint_sees_a_same_size_edit_with_the_mtime_restored(tmp_path):
    from pipeline.inputs import input_fingerprint
    from pipeline.records import ImageRef, SourceRecord

    f = tmp_path / "x.jpg"
    f.write_bytes(b"A" * 1000)
    st = os.stat(f)
    rec = [SourceRecord(source="folder", id="x", image=ImageRef(path=str(f)))]
    fp = input_fingerprint(rec)
    f.write_bytes(b"B" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert input_fingerprint(rec) != fp


# ---- one run per directory; no shrinking ---------------------------------------------------------


def test_second_run_into_a_locked_directory_is_refused_and_a_dead_holder_is_not_a_lock(tmp_path):
    root = write_images(tmp_path / "src", 0)
    out = tmp_path / "ds"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, os, sys, time\n"
                f"fd = os.open({str(out / '.dynaip.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                'os.write(fd, b\'{"host": "h", "pid": %d, "time": 0}\' % os.getpid())\n'
                "print('locked', flush=True)\n"
                "time.sleep(60)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirError, match=f"in use by another curation run \\(pid {holder.pid} on host h"):
            run(make_recipe(root), out)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # the holder dies without releasing: its lock goes with it
        holder.wait()
    m, built = run(make_recipe(root), out)
    assert m["totals"]["inputs"] == 3


def test_stale_pidfile_lock_of_a_dead_process_is_taken_over(tmp_path, monkeypatch):
    """Where flock is unavailable the lock file itself is the lock; a dead pid on this host is stale."""
    import fcntl
    import socket

    from dynaip.dataset.store import Store
    from dynaip.run_lock import RunDirError, RunLock

    def no_flock(*a):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "ds"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".dynaip.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "time": 0}))
    with RunLock(Store(out)):
        with pytest.raises(RunDirError, match="in use by another curation run"):
            RunLock(Store(out)).acquire()
    assert not (out / ".dynaip.lock").exists()


def test_limit_run_into_a_larger_finished_dataset_is_refused(tmp_path):
    root = write_images(tmp_path / "src", 0)
    out = tmp_path / "ds"
    m, _ = run(make_recipe(root), out)
    before = tree(out)
    with pytest.raises(OutputDirError, match="holds a finished dataset of 3 inputs; this run covers only 1"):
        run(make_recipe(root), out, limit=1)
    assert tree(out) == before
    (root / "c.png").unlink()  # a source that lost inputs shrinks the dataset too: refused at the end
    with pytest.raises(OutputDirError, match="of 3 inputs; this run covers only 2"):
        run(make_recipe(root), out)
    assert json.loads((out / "manifest.json").read_text()) == m


# ---- bounds ----------------------------------------------------------------------------------------


def test_oversized_file_is_rejected_from_its_size_before_reading(tmp_path):
    root = write_images(tmp_path / "src", 0, names=("a",))
    (root / "big.jpg").write_bytes(b"\xff\xd8" + b"\0" * 5000)
    m, _ = run(make_recipe(root, max_file_bytes=2000), tmp_path / "ds")
    rejects = [json.loads(line) for line in (tmp_path / "ds" / "rejects.jsonl").read_text().splitlines()]
    assert m["totals"]["accepted"] == 1 and len(rejects) == 1
    assert rejects[0]["id"] == "big" and rejects[0]["reason"].startswith(
        "file too large: big.jpg is 5002 bytes, above filters.max_file_bytes=2000"
    )


def test_symlink_leaving_the_source_root_is_rejected(tmp_path):
    root = write_images(tmp_path / "src", 0, names=("a",))
    outside = write_images(tmp_path / "elsewhere", 1, names=("secret",))
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "inner.png").symlink_to(root / "a.png")  # a link that stays inside is fine
    m, pair = run(make_recipe(root), tmp_path / "ds")
    rejects = [json.loads(line) for line in (tmp_path / "ds" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(pair.seen) == ["a", "inner"]
    assert rejects == [
        {
            "source": "folder",
            "id": "link.png",
            "stage": "read",  # the folder reader names the file
            "reason": "link.png is a symlink resolving outside the source root; copy the file "
            "into the root instead of linking it",
        }
    ]


def test_video_frames_go_through_the_pixel_guard(tmp_path):
    from fixtures_sources import pan_frames, write_video
    from pipeline.sources.video import VideoReadError, read_frame

    path = tmp_path / "v.mp4"
    write_video(path, pan_frames("astronaut", n=2))
    assert read_frame(path, 0, max_pixels=64 * 96).shape == (64, 96, 3)
    with pytest.raises(
        VideoReadError, match="declared frame size 96x64 = 6144 pixels exceeds filters.max_image_pixels=6000"
    ):
        read_frame(path, 0, max_pixels=6000)


def test_readers_refuse_shard_paths_outside_the_dataset(tmp_path):
    from dynaip.dataset.inspect import iter_samples, verify
    from dynaip.dataset.manifest import load_manifest

    root = write_images(tmp_path / "src", 0, names=("a",))
    out = tmp_path / "ds"
    m, _ = run(make_recipe(root), out)
    (tmp_path / "outside.tar").write_bytes((out / "shards" / "000000.tar").read_bytes())
    for bad in ("../outside.tar", str(tmp_path / "outside.tar"), "shards/../../outside.tar"):
        m2 = {**m, "shards": [{**m["shards"][0], "path": bad}]}
        (out / "manifest.json").write_text(json.dumps(m2))
        for read in (load_manifest, verify, lambda d: list(iter_samples(d))):
            with pytest.raises(ValueError, match="a shard path must be relative and inside the dataset"):
                read(out)


# ---- output hygiene --------------------------------------------------------------------------------


def test_files_follow_the_umask_and_crash_leftovers_are_removed(tmp_path):
    root = write_images(tmp_path / "src", 0)
    out = tmp_path / "ds"
    old = os.umask(0o022)
    try:
        run(make_recipe(root), out)
        (out / "shards" / ".000000.tar.x1y2.tmp").write_bytes(b"half a shard")  # a crashed writer's leftovers
        (out / ".manifest.json.abc.tmp").write_bytes(b"{")
        (out / ".progress" / "000000.json").unlink()
        run(make_recipe(root), out)
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file() and p.name != ".dynaip.lock"]
    assert files and {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {"0o644"}
    assert not list(out.rglob("*.tmp"))


def test_atomic_writes_use_the_umask(tmp_path):
    from dynaip.atomic import atomic_write_bytes

    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640


def test_reject_reasons_carry_no_memory_addresses(tmp_path):
    from pipeline.records import Reject
    from pipeline.stages.decode import DecodeError, decode_image

    with pytest.raises(DecodeError) as e:
        decode_image(b"not an image at all")
    r = Reject(source="s", id="i", stage="decode", reason=str(e.value))
    assert "0x" not in r.reason and "<_io.BytesIO>" in r.reason
    root = write_images(tmp_path / "src", 0, names=("a",))
    (root / "junk.png").write_bytes(b"junk" * 10)
    run(make_recipe(root), tmp_path / "one")
    run(make_recipe(root), tmp_path / "two")
    assert (tmp_path / "one" / "rejects.jsonl").read_bytes() == (tmp_path / "two" / "rejects.jsonl").read_bytes()
    assert b"0x" not in (tmp_path / "one" / "rejects.jsonl").read_bytes()


# ---- embedded Ray -----------------------------------------------------------------------------------


def test_embedded_ray_listens_on_loopback_only(tmp_path):
    """Every listening socket of the embedded local Ray (GCS, raylet, agents, workers) is on 127.0.0.1."""
    pytest.importorskip("ray")
    script = (
        "import json, psutil, ray\n"
        "from dynaip.cluster import connect\n"
        "connect(None, num_cpus=1)\n"
        "ray.get(ray.remote(lambda: 1).remote())\n"
        "found = set()\n"
        "for p in psutil.Process().children(recursive=True):\n"
        "    try:\n"
        "        found |= {c.laddr.ip for c in p.net_connections('inet') if c.status == psutil.CONN_LISTEN}\n"
        "    except psutil.Error:\n"
        "        pass\n"
        "print(json.dumps(sorted(found)))\n"
        "ray.shutdown()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RAY_ADDRESS": ""}
    p = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert p.returncode == 0, p.stderr[-2000:]
    found = json.loads(p.stdout.strip().splitlines()[-1])
    assert found and set(found) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, found
