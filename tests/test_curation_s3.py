"""Object storage: curation from a bucket into a bucket on a real S3-compatible server (moto's
server mode, started here on loopback), resume after a stop, `manifest verify` on the bucket,
training from the bucket, and no credential in anything written."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dynaip.train.config import set_keys

from test_curation_dedup import model_free_stages

pytest.importorskip("s3fs")
pytest.importorskip("moto")

KEY_ID, SECRET = "AKIDDYNAIPTEST0000", "dynaip-test-secret-never-written"
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 (its own process, stopped by id); credentials and endpoint in
    the environment only, as a user would set them."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    env = {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "moto server did not start"
                time.sleep(0.2)
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("photos")
        fs.mkdir("out")
        yield fs
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def bucket_photos(s3, tmp_path_factory) -> tuple[str, Path]:
    from pipeline.demo_photos import write_sample_photos

    local = tmp_path_factory.mktemp("s3src") / "photos"
    write_sample_photos(local, faces=1, names=["astronaut", "chelsea", "coffee", "motorcycle"])
    for p in sorted(local.rglob("*")):
        if p.is_file():
            s3.put_file(str(p), f"photos/set/{p.relative_to(local).as_posix()}")
    return "s3://photos/set", local


def _recipe(root: str):
    from pipeline.recipe import Recipe

    raw = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    raw["source"]["root"] = root
    raw["shards"]["inputs_per_shard"] = 2
    raw["filters"]["min_reference_side"] = 16
    return Recipe.from_dict(raw)


class StopAfter:
    """A stage that stops the run (like Ctrl-C) once ``n`` batches have passed."""

    name = "stop"

    def __init__(self, n: int):
        self.n = n

    def __call__(self, items):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt("stopped by the test")
        return items


def test_curate_bucket_to_bucket_resumes_verifies_and_trains(s3, bucket_photos, tmp_path, capsys):
    from dynaip.dataset.manifest import load_manifest
    from pipeline.cli import main
    from pipeline.executor_local import run_local

    src, local_photos = bucket_photos
    recipe = _recipe(src)
    out = "s3://out/ds"
    with pytest.raises(KeyboardInterrupt):  # stopped after two chunks: their shards and markers are in the bucket
        run_local(recipe, out, None, progress=False, stages=model_free_stages(recipe) + [StopAfter(2)])
    assert len([p for p in s3.ls("out/ds/.progress", refresh=True) if p.endswith(("0.json", "1.json"))]) == 2
    assert not s3.exists("out/ds/manifest.json")
    capsys.readouterr()
    m = run_local(recipe, out, None, progress=False, stages=model_free_stages(recipe))
    assert "resuming: 2 finished chunk(s) kept" in capsys.readouterr().err
    # the same bytes as a build from a local folder into a local directory
    ref = run_local(
        _recipe(str(local_photos)), tmp_path / "local", None, progress=False, stages=model_free_stages(recipe)
    )
    assert m["shards"] == ref["shards"] and m["totals"] == ref["totals"] and m["totals"]["samples"] >= 5
    s3.invalidate_cache()  # this fs listed out/ds while the run (another fs instance) was still writing there
    assert s3.cat_file("out/ds/rejects.jsonl") == (tmp_path / "local" / "rejects.jsonl").read_bytes()
    assert m["source"]["root"] == src and load_manifest(out) == m
    # manifest verify on the bucket, then one flipped byte is caught
    assert main(["manifest", "verify", out]) == 0
    shard = f"out/ds/{m['shards'][0]['path']}"
    data = bytearray(s3.cat_file(shard))
    data[700] ^= 0xFF
    s3.pipe_file(f"out/bad/{m['shards'][0]['path']}", bytes(data))
    s3.pipe_file("out/bad/manifest.json", s3.cat_file("out/ds/manifest.json"))
    for s in m["shards"][1:]:
        s3.pipe_file(f"out/bad/{s['path']}", s3.cat_file(f"out/ds/{s['path']}"))
    assert main(["manifest", "verify", "s3://out/bad"]) == 1
    # no credential in anything written
    s3.invalidate_cache()
    for path in s3.find("out/ds"):
        blob = s3.cat_file(path)
        assert KEY_ID.encode() not in blob and SECRET.encode() not in blob, path


def test_train_from_the_bucket(s3, bucket_photos, tiny_models_yaml, tmp_path):
    from dynaip.train.cli import main
    from pipeline.executor_local import run_local

    src, _ = bucket_photos
    recipe = _recipe(src)
    recipe.pairing.kinds = ["intra"]
    out = "s3://out/train-ds"
    m = run_local(recipe, out, None, progress=False, stages=model_free_stages(recipe))
    assert m["totals"]["pairs"].get("intra", 0) >= 3
    cfg = yaml.safe_load((REPO / "jobs" / "configs" / "tiny.yaml").read_text())
    cfg = set_keys(
        cfg,
        stages=[{"name": "intra", "steps": 2, "pair": "intra"}],
        global_batch_size=2,
        workers=1,
        checkpoint_every=2,
        eval_every=100,
        sample_every=100,
    )
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert (
        main(["--config", str(config), "--data", out, "--out", str(run), "--models", str(tiny_models_yaml), "--local"])
        == 0
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert (run / "checkpoints").is_dir()


def test_lease_on_the_bucket_refuses_a_second_run_and_expires(s3):
    """On an object store the run lock is a lease object: a live lease refuses another run; one whose
    holder died (never renewed) is taken over after it expires."""
    from dynaip.dataset.store import Store
    from dynaip.run_lock import LOCK_NAME, RunDirError, RunLock

    store = Store("s3://out/leased")
    with RunLock(store):
        assert store.is_file(LOCK_NAME)
        with pytest.raises(RunDirError, match="in use by another curation run"):
            RunLock(Store("s3://out/leased")).acquire()
    assert not store.is_file(LOCK_NAME)  # released
    dead = RunLock(store, ttl=0.5)
    dead.acquire()
    dead._stop.set()  # its holder "dies": no more renewals, no release
    time.sleep(1.0)
    with RunLock(Store("s3://out/leased")) as taken:
        assert json.loads(store.read_bytes(LOCK_NAME))["token"] == taken.info["token"]
