"""A real two-node Ray cluster on this machine: `ray start --head` and a second `ray start` joining
it (separate processes, loopback only, every port chosen free). The second node alone offers the
custom resource ``curate``, so the curation workers — and with them the models — run there. A
curation job submitted with the job API writes the same bytes as the local executor; a training job
then runs one Ray Train worker on each node."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from dynaip.train.config import set_keys

sys.path.insert(0, str(Path(__file__).parent))
from ray_nodes import REPO, free_port, node_env, start_node, stop_nodes

# setup (two nodes, the local run, the Ray job) is inside the first test's time; a loaded 2-core
# CI machine can take several times the ~3 minutes of a quiet one
pytestmark = pytest.mark.timeout(1200)


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".progress" not in p.parts
    }


def _phase(name: str, t0: float) -> None:
    # printed, so a failing run's captured output says where the time went
    print(f"[two-node] {name}: {time.time() - t0:.1f} s", flush=True)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def _wait_alive(address: str, count: int, until: float, node, stopping: threading.Event) -> list:
    """The cluster's alive nodes once there are exactly ``count`` of them (a node stopped after a
    late registration stays alive in the GCS until its health checks fail), or whatever is alive at
    ``until`` or when the node being started has exited."""
    from ray.util.state import list_nodes

    while True:
        try:
            nodes = [n for n in list_nodes(address=address) if n.state == "ALIVE"]
        except Exception as e:  # noqa: BLE001 - the state API can time out while the node registers on a busy machine
            print(f"[two-node] list_nodes: {type(e).__name__}: {str(e)[:300]}", flush=True)
            nodes = []
        if len(nodes) == count or node.poll() is not None or time.time() > until or stopping.is_set():
            return nodes
        time.sleep(2)


def _start_two_nodes(temp: Path, procs: list, stopping: threading.Event) -> tuple:
    """Head (1 CPU, runs the job drivers) + worker node (1 CPU and ``curate: 1``); returns the job
    client, the dashboard address and the second node's id once both nodes are alive."""
    from ray.job_submission import JobSubmissionClient

    log = temp / "nodes.log"
    port, dash = free_port(), free_port()
    t0 = time.time()
    # the second node's session lives under the head's temp dir too (Ray reads it from the head)
    procs.append(
        start_node(
            [
                "--head",
                f"--port={port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--ray-client-server-port={free_port()}",
                "--num-cpus=1",
                f"--temp-dir={temp}",
                "--include-dashboard=true",
            ],
            log,
        )
    )  # the job API is served by the dashboard
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 600  # minutes on a loaded 2-core machine
    while True:
        try:
            client = JobSubmissionClient(address)
            client.list_jobs()
            break
        except Exception:  # noqa: BLE001 - connection refused, HTTP errors, RuntimeError: all mean "not yet"
            assert procs[0].poll() is None, f"the Ray head exited:\n{_tail(log)}"
            assert time.time() < deadline and not stopping.is_set(), f"the Ray head did not come up:\n{_tail(log)}"
            time.sleep(2)
    _phase("head up", t0)
    for attempt in range(3):
        # `ray start` gives a joining raylet 30 s (fixed in Ray) to register with the GCS; on an
        # overloaded machine that can pass, so a node that has not joined is stopped and started again
        procs.append(start_node([f"--address=127.0.0.1:{port}", "--num-cpus=1", '--resources={"curate": 1}'], log))
        nodes = _wait_alive(address, 2, min(deadline, time.time() + 150), procs[-1], stopping)
        if len(nodes) == 2 or stopping.is_set():
            break
        print(f"[two-node] second node did not join (attempt {attempt + 1}); restarting it", flush=True)
        stop_nodes([procs.pop()])
    assert len(nodes) == 2, f"the second node did not join: {nodes}\n{_tail(log)}"
    _phase("second node joined", t0)
    return client, address, next(n.node_id for n in nodes if not n.is_head_node)


@pytest.fixture(scope="module")
def two_nodes():
    """A future of `_start_two_nodes`: the nodes start in a thread (mostly waiting on subprocesses)
    while the test computes the local executor's reference output, which saves a minute."""
    temp = Path(tempfile.mkdtemp(prefix="r2", dir="/tmp"))  # short: Ray's socket paths are limited to 107 bytes
    procs: list = []
    stopping = threading.Event()
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = node_env()["RAY_AUTH_MODE"]  # the job client must present the cluster's token
    pool = ThreadPoolExecutor(1)
    try:
        yield pool.submit(_start_two_nodes, temp, procs, stopping)
    finally:
        stopping.set()  # a start still waiting gives up, so its node list is final before stopping
        pool.shutdown(wait=True)
        stop_nodes(procs)
        if old is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old
        shutil.rmtree(temp, ignore_errors=True)


def _submit(client, entry: str) -> str:
    deadline = time.time() + 120
    while True:  # the head's job agent comes up a little after the dashboard answers
        try:
            return client.submit_job(entrypoint=entry)  # PYTHONPATH etc. come from the nodes' environment
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def _wait(client, job: str, timeout: float = 480) -> str:
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    status = None
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1)
    raise TimeoutError(f"job {job} still {status} after {timeout}s:\n{client.get_job_logs(job)[-3000:]}")


@pytest.fixture(scope="module")
def curated(two_nodes, tiny_models, tiny_models_yaml, tmp_path_factory):
    from ray.job_submission import JobStatus

    from pipeline.executor_local import run_local
    from pipeline.recipe import Recipe
    from pipeline.demo_photos import write_sample_photos

    d = tmp_path_factory.mktemp("twonode")
    write_sample_photos(d / "photos", faces=0, names=["astronaut", "chelsea", "coffee", "rocket"])
    raw = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    raw["source"]["root"] = str(d / "photos")
    raw["shards"]["inputs_per_shard"] = 1
    raw["executor"].update(batch_size=1, resources={"curate": 1})  # workers only where `curate` is offered
    recipe_file = d / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(raw))
    local = d / "local"
    t0 = time.time()
    run_local(Recipe.from_yaml(recipe_file), local, tiny_models, progress=False)
    _phase("local executor", t0)
    client, _, second = two_nodes.result()
    t0 = time.time()
    out = d / "ray"
    job = _submit(
        client,
        f"{sys.executable} {REPO / 'jobs' / 'curate.py'} --recipe {recipe_file} --out {out} "
        f"--models {tiny_models_yaml} --no-progress",
    )
    status = _wait(client, job)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
    _phase("Ray curation job", t0)
    return local, out, second


def test_two_node_curation_job_writes_the_local_bytes_from_the_second_node(curated):
    local, out, second = curated
    assert _tree(out) == _tree(local)
    markers = [json.loads(p.read_text()) for p in (out / ".progress").glob("[0-9]*[0-9].json")]
    assert len(markers) == 4 and {m["node"] for m in markers} == {second}  # written where the models ran


def test_two_node_training_job_runs_one_worker_per_node(two_nodes, curated, tiny_models_yaml, tmp_path):
    from ray.job_submission import JobStatus
    from ray.util.state import list_actors

    client, address, _ = two_nodes.result()
    _, data, _ = curated
    cfg = yaml.safe_load((REPO / "jobs" / "configs" / "tiny.yaml").read_text())
    cfg = set_keys(
        cfg,
        stages=[{"name": "intra", "steps": 2, "pair": "intra"}],
        global_batch_size=2,
        workers=2,
        cpus_per_worker=1,
        checkpoint_every=2,
        eval_every=100,
        sample_every=100,
    )
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    t0 = time.time()
    job = _submit(
        client,
        f"{sys.executable} {REPO / 'jobs' / 'train.py'} --config {config} --data {data} "
        f"--out {run} --models {tiny_models_yaml}",
    )
    assert _wait(client, job) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
    _phase("training job", t0)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2]
    workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True)
    assert len({w.node_id for w in workers}) == 2, workers  # one CPU per node: one worker on each
