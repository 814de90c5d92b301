"""Curation on a real local Ray cluster through `ray job submit`'s API; same bytes as the local executor."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from ray_nodes import stop_nodes

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(root: Path) -> dict[str, str]:
    """Every output file's digest, except the per-chunk markers (they hold wall-clock timings)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".progress" not in p.parts
    }


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    from pipeline.demo_photos import write_sample_photos

    d = tmp_path_factory.mktemp("raycur")
    write_sample_photos(d / "photos", faces=1, names=["astronaut", "chelsea", "coffee", "rocket", "camera"])
    shutil.copy(d / "photos" / "astronaut.jpg", d / "photos" / "zz_astronaut_copy.jpg")  # a duplicate, 6 chunks later
    raw = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    raw["source"]["root"] = str(d / "photos")
    raw["shards"]["inputs_per_shard"] = 1  # seven chunks: room to stop a job between them
    raw["executor"]["batch_size"] = 1
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def local_build(recipe_file, tiny_models, tmp_path_factory) -> Path:
    from pipeline.executor_local import run_local
    from pipeline.recipe import Recipe

    out = tmp_path_factory.mktemp("local") / "ds"
    run_local(Recipe.from_yaml(recipe_file), out, tiny_models, progress=False)
    return out


@pytest.fixture(scope="module")
def cluster():
    """`ray start --head` on loopback in a temp dir (token auth on, as Ray's default), stopped afterwards."""
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    # --block keeps `ray start` as the parent of the head's processes, in a session of its own, so
    # teardown stops this cluster only (never other Ray instances on the machine). Every port is
    # chosen free so a second Ray on the machine cannot collide with it.
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
            "--num-cpus=2",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
            "--include-dashboard=true",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"  # the job client must present the cluster's token
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 120
        while True:
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dash}")
                client.list_jobs()
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(2)
        yield client
    finally:
        stop_nodes([head])  # the test's data is in temp dirs: a short grace, then SIGKILL of the whole tree
        if old is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old
        shutil.rmtree(temp, ignore_errors=True)


def _submit(client, recipe_file: Path, out: Path, models_yaml: Path, progress: str = "--no-progress") -> str:
    entry = (
        f"{sys.executable} {REPO / 'jobs' / 'curate.py'} --recipe {recipe_file} --out {out} "
        f"--models {models_yaml} {progress}"
    )
    deadline = time.time() + 120
    while True:  # the head's job agent comes up a little after the dashboard answers
        try:
            return client.submit_job(entrypoint=entry, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def _wait(client, job: str, timeout: float = 420) -> str:
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1)
    raise TimeoutError(f"job {job} still {status} after {timeout}s:\n{client.get_job_logs(job)[-3000:]}")


def test_ray_job_equals_local_executor(cluster, recipe_file, local_build, tiny_models_yaml, tmp_path):
    from ray.job_submission import JobStatus

    out = tmp_path / "ray"
    job = _submit(cluster, recipe_file, out, tiny_models_yaml, progress="--progress-every 0.5")
    status = _wait(cluster, job)
    logs = cluster.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert (out / "manifest.json").is_file()
    assert _tree(out) == _tree(local_build)
    # the copy of the astronaut, six chunks later, was removed as a duplicate by both executors
    assert '"reason": "duplicate of folder-astronaut-0"' in (out / "rejects.jsonl").read_text()
    # progress lines in the job log: chunks done / total, images/s, rejects so far
    assert "curate (ray): chunks 7/7 (100%), 7 inputs, " in logs and "images/s" in logs, logs[-3000:]
    # the shards were written by the workers, not by the driver: each marker names a Ray node
    markers = [json.loads(p.read_text()) for p in (out / ".progress").glob("[0-9]*[0-9].json")]
    assert len(markers) == 7 and all(m["node"] for m in markers)


def test_stopped_job_resubmitted_resumes_to_the_same_dataset(
    cluster, recipe_file, local_build, tiny_models_yaml, tmp_path
):
    from ray.job_submission import JobStatus

    out = tmp_path / "ray"
    job = _submit(cluster, recipe_file, out, tiny_models_yaml)
    deadline = time.time() + 300
    while not list((out / ".progress").glob("[0-9]*[0-9].json")):  # wait for the first finished chunk
        assert time.time() < deadline, cluster.get_job_logs(job)[-3000:]
        assert cluster.get_job_status(job) not in (JobStatus.FAILED,), cluster.get_job_logs(job)[-3000:]
        time.sleep(0.5)
    cluster.stop_job(job)
    assert _wait(cluster, job) in (JobStatus.STOPPED, JobStatus.SUCCEEDED)
    finished_before = len(list((out / ".progress").glob("[0-9]*[0-9].json")))
    stopped_early = not (out / "manifest.json").exists()
    job2 = _submit(cluster, recipe_file, out, tiny_models_yaml)
    assert _wait(cluster, job2) == JobStatus.SUCCEEDED, cluster.get_job_logs(job2)[-3000:]
    logs = cluster.get_job_logs(job2)
    assert _tree(out) == _tree(local_build)  # nothing lost, nothing duplicated
    if stopped_early:
        assert "finished chunk(s) kept" in logs, logs[-2000:]
        assert 1 <= finished_before < 7
    assert not list((out / "shards").glob(".*"))  # no temp files left behind
