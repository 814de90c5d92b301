"""The trainer on the tiny checkpoints: the step in-process, then two Ray Train workers on the CPU."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dynaip.train.config import set_keys
from safetensors.torch import load_file

from train_fixtures import write_dataset


# ----------------------------------------------------------------------------- the step, in-process


def test_step_overfits_and_changes_only_adapter_parameters(tiny_models, tmp_path):
    from dynaip import DynaIPAdapter, DynaIPConfig
    from dynaip.train.data import StreamingLoader, StreamSpec, read_manifests
    from dynaip.train.step import LossConfig, load_frozen, training_loss

    data = write_dataset(tmp_path / "d", [2], size=64)
    frozen = load_frozen(tiny_models, torch.device("cpu"), torch.float32)
    spec = StreamSpec(
        shards=read_manifests([str(data)]), batch_size=2, ref_size=frozen.clip.image_size, buckets=[(64, 64)]
    )
    batch = next(iter(StreamingLoader(spec, 0, 1, workers=0)))
    torch.manual_seed(0)
    adapter = DynaIPAdapter(DynaIPConfig.tiny())
    adapter.attach(frozen.transformer)
    frozen_before = {f"{n}.{k}": v.clone() for n, m in frozen.modules().items() for k, v in m.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in adapter.state_dict().items()}
    settings = LossConfig(max_sequence_length=32, drop_text=0, drop_image=0, drop_both=0)

    def fixed_loss() -> float:  # same noise, t and samples every time
        adapter.eval()
        with torch.no_grad():
            loss = training_loss(
                frozen,
                adapter,
                adapter,
                batch,
                settings,
                torch.Generator().manual_seed(1),
                torch.Generator().manual_seed(2),
            ).item()
        adapter.train()
        return loss

    start = fixed_loss()
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        loss = training_loss(frozen, adapter, adapter, batch, LossConfig(max_sequence_length=32), gen, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < start - 0.05

    for name, value in frozen_before.items():  # the base is bit-identical
        m, k = name.split(".", 1)
        assert torch.equal(frozen.modules()[m].state_dict()[k], value), name
    assert all(not p.requires_grad for m in frozen.modules().values() for p in m.parameters())
    changed = [k for k, v in adapter.state_dict().items() if not torch.equal(v, adapter_before[k])]
    assert len(changed) > 0.8 * len(adapter_before)  # the adapter did train (a few LayerNorm biases may stay)


# ----------------------------------------------------------------------------- Ray Train, two workers


class Listeners:
    """Samples the listening sockets of this process and its descendants (Ray's GCS, raylet, agents,
    Train workers) every 0.2 s between ``start`` and ``stop``: ``found`` = ``{address: {process names}}``."""

    def __init__(self) -> None:
        self.found: dict[str, set[str]] = {}

    def _sample(self, stop) -> None:
        import psutil

        while not stop.wait(0.2):
            me = psutil.Process()
            for p in [me, *me.children(recursive=True)]:
                try:
                    for c in p.net_connections("inet"):
                        if c.status == psutil.CONN_LISTEN:
                            self.found.setdefault(c.laddr.ip, set()).add(p.name())
                except psutil.Error:  # a process that ended meanwhile
                    pass

    def start(self) -> None:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(self._stop,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def listeners():
    return Listeners()


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory, tiny_models_yaml):
    root = tmp_path_factory.mktemp("trainrun")
    intra = write_dataset(root / "intra", [3, 2], size=64)
    cross = write_dataset(root / "cross", [2, 3], pair="cross", start=50, size=64, corrupt={1: "truncate"})
    cfg = yaml.safe_load(Path("jobs/configs/tiny.yaml").read_text())
    cfg = set_keys(
        cfg,
        stages=[
            {"name": "intra", "steps": 3, "pair": "intra", "data": [str(intra)]},
            {"name": "cross", "steps": 3, "pair": "cross"},
        ],
        lr=1e-2,
        checkpoint_every=2,
        eval_every=6,
        sample_every=6,
        sample_steps=2,
    )
    config = root / "test.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return root, config, cross, tiny_models_yaml


def _train(run_setup, out: str, *extra: str) -> Path:
    from dynaip.train.cli import main

    root, config, cross, models = run_setup
    assert (
        main(["--config", str(config), "--data", str(cross), "--out", str(root / out), "--models", str(models), *extra])
        == 0
    )
    return root / out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


DRIVER_STDERR: dict[str, str] = {}
"""What the driver printed to stderr during ``full_run`` (a module fixture cannot take ``capsys``)."""


@pytest.fixture(scope="module")
def full_run(ray_cluster, run_setup, listeners):
    listeners.start()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return _train(run_setup, "full")
    finally:
        listeners.stop()
        DRIVER_STDERR["full"] = err.getvalue()
        sys.stderr.write(err.getvalue())


@pytest.mark.slow  # shares full_run: one two-worker Ray Train run (worker start-up dominates)
def test_the_embedded_ray_and_its_train_workers_listen_on_loopback_only(full_run, listeners):
    """Issue #33: GCS, raylet, agents, every worker and torch.distributed's rendezvous store and gloo
    connections of a two-worker run bind 127.0.0.1 (Ray Train's own setup put the store on every interface)."""
    assert any("RayTrainWorker" in name for names in listeners.found.values() for name in names), listeners.found
    off = {ip: names for ip, names in listeners.found.items() if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")}
    assert off == {}


@pytest.mark.slow  # shares full_run: one two-worker Ray Train run (worker start-up dominates)
def test_two_workers_report_their_metrics_through_ray_train(full_run):
    """Issue #17 item 6: every worker reports with ``ray.train.report``; the controller callback keeps rank
    0's rows in RUN/ray/reported.jsonl, and they are metrics.jsonl's numbers."""
    reported = [json.loads(line) for line in (full_run / "ray" / "reported.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reported] == [1, 2, 3, 4, 5, 6]
    last = reported[-1]
    assert last["loss"] > 0 and last["grad_norm"] > 0 and last["samples_per_s"] > 0 and last["progress"] == 1.0
    logged = {r["step"]: r for r in _metrics(full_run) if "loss" in r}
    assert all(abs(r["loss"] - logged[r["step"]]["loss"]) < 1e-9 for r in reported)
    assert (full_run / "tb").is_dir()


@pytest.mark.slow  # shares full_run: one two-worker Ray Train run (worker start-up dominates)
def test_ray_training_shows_steps_rate_eta_and_loss_on_the_driver(full_run):
    """Issue #35: the driver of a Ray Train run prints its progress (no terminal here: lines), fed from the
    rows rank 0 reports; the last line is the end state with the last reported loss."""
    lines = [ln for ln in DRIVER_STDERR["full"].splitlines() if ln.startswith("train: steps ")]
    # a line every 5 s from the start (workers starting count too: a Ray Train fit takes longer than that here)
    assert len(lines) >= 2, DRIVER_STDERR["full"][-2000:]
    steps = [int(re.match(r"train: steps (\d+)/6", ln).group(1)) for ln in lines]
    assert steps == sorted(steps)
    last_loss = json.loads((full_run / "ray" / "reported.jsonl").read_text().splitlines()[-1])["loss"]
    assert re.fullmatch(r"train: steps 6/6 \(100%\), [0-9.e+-]+ steps/s, loss (\S+), \d+:\d\d elapsed", lines[-1])
    assert float(lines[-1].split("loss ")[1].split(",")[0]) == pytest.approx(last_loss, rel=1e-3)


@pytest.mark.slow  # shares full_run: one two-worker Ray Train run (worker start-up dominates)
def test_two_workers_train_both_stages_and_write_a_loadable_checkpoint(full_run):
    from dynaip import DynaIPAdapter

    rows = _metrics(full_run)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["stage"] for r in steps] == ["intra"] * 3 + ["cross"] * 3
    assert [r["step"] for r in rows if r.get("event") == "stage"] == [4]  # switch at the configured step
    assert all(r["samples_per_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in steps)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]  # lr 1e-2 overfits the fixed set
    assert steps[-1]["skipped"] > 0  # the truncated cross shard was skipped and counted, not fatal

    ckpt = full_run / "checkpoints" / "step-000006"
    adapter = DynaIPAdapter.from_pretrained(ckpt)
    assert set(load_file(str(ckpt / "adapter.safetensors"))) == set(adapter.state_dict())  # adapter only
    state = json.loads((ckpt / "resume" / "state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 2 and len(state["data"]) == 2
    torch.load(ckpt / "resume" / "optimizer.pt", weights_only=True)  # no pickled code
    torch.load(ckpt / "resume" / "rng.pt", weights_only=True)
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    assert (full_run / "samples" / "step-000006" / "00.png").is_file()


def _same_weights(a: Path, b: Path) -> bool:
    want, got = load_file(str(a / "adapter.safetensors")), load_file(str(b / "adapter.safetensors"))
    return want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(run) if "loss" in r}


@pytest.mark.slow  # shares full_run: one two-worker Ray Train run (worker start-up dominates)
def test_two_workers_resume_from_a_mid_stage_checkpoint_is_bitwise_identical(full_run, run_setup):
    # a fresh run directory holding only the step-4 checkpoint (inside stage 2) is exactly what
    # `--max-steps 4` leaves behind; the stop itself is covered without Ray below (Ray start-up
    # costs ~1 min per fit on the 2-core CI machines)
    root = run_setup[0]
    (root / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_run / "checkpoints" / "step-000004", root / "resumed" / "checkpoints" / "step-000004")
    run = _train(run_setup, "resumed", "--resume")
    assert _same_weights(full_run / "checkpoints" / "step-000006", run / "checkpoints" / "step-000006")
    assert _losses(run) == {s: v for s, v in _losses(full_run).items() if s > 4}


@pytest.fixture(scope="module")
def mix_setup(tmp_path_factory, tiny_models_yaml):
    """run_setup's config with a 3:1 mixture of two scored intra datasets and an aesthetic filter in stage 1."""
    root = tmp_path_factory.mktemp("mixrun")
    score = lambda n: {"aesthetic": float(n % 4), "sharpness": 1.0, "subject_pixels": 100}
    a = write_dataset(root / "a", [3, 2], size=64, quality=score)
    b = write_dataset(root / "b", [2, 2], size=64, start=200, quality=score)
    cross = write_dataset(root / "cross", [2, 3], pair="cross", start=50, size=64)
    cfg = yaml.safe_load(Path("jobs/configs/tiny.yaml").read_text())
    cfg = set_keys(
        cfg,
        stages=[
            {
                "name": "intra",
                "steps": 3,
                "pair": "intra",
                "filters": {"min_aesthetic": 1.0},
                "data": [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}],
            },
            {"name": "cross", "steps": 3, "pair": "cross"},
        ],
        lr=1e-2,
        checkpoint_every=2,
        eval_every=6,
        sample_every=0,
    )
    config = root / "test.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return root, config, cross, tiny_models_yaml


@pytest.mark.parametrize("setup", ["run_setup", "mix_setup"])
def test_max_steps_then_resume_is_bitwise_identical_in_one_process(setup, request):
    run_setup = request.getfixturevalue(setup)
    once = _train(run_setup, "local-once", "--local")
    run = _train(run_setup, "local-split", "--local", "--max-steps", "3")  # stops exactly at the stage switch
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    state = json.loads((run / "checkpoints" / "step-000003" / "resume" / "state.json").read_text())
    assert [d["stage"] for d in state["datasets"]] == ["intra", "cross"]  # the data it was trained on
    assert all(m.startswith("sha256:") for d in state["datasets"] for m in d["manifests"])
    _check_model_card(run / "checkpoints" / "step-000003", state, run_setup)
    _train(run_setup, "local-split", "--local", "--resume")  # resumes from a checkpoint holding its card
    assert _same_weights(once / "checkpoints" / "step-000006", run / "checkpoints" / "step-000006")
    assert _losses(run) == _losses(once)
    assert [r["step"] for r in _metrics(run) if r.get("event") == "stage"] == [4]  # logged once, by the resumed part
    rows = [r for r in _metrics(once) if "loss" in r]
    for r in rows:  # every logged step accounts for every sample per dataset (global batch 4, one process)
        stage_start = 0 if r["stage"] == "intra" else 3
        assert sum(r["samples_per_dataset"].values()) == 4 * (r["step"] - stage_start)
    if setup == "mix_setup":
        intra = rows[2]  # end of the mixed stage: 12 samples, drawn 3:1 in expectation from a and b
        assert list(intra["samples_per_dataset"]) == [str(run_setup[0] / "a"), str(run_setup[0] / "b")]
        assert intra["filtered_by"]["min_aesthetic"] > 0 and intra["filtered_by"]["pair"] == 0


def _check_model_card(ckpt: Path, state: dict, run_setup) -> None:
    """A trainer checkpoint's README.md (issue #29): a model card the hub's ModelCard parses, naming the step,
    the run, every stage's datasets with the sha256 of their manifests (the bytes on disk), the FLUX
    directory and the config."""
    import hashlib

    from huggingface_hub import ModelCard

    from dynaip.models import ModelsConfig

    card = ModelCard.load(ckpt / "README.md")
    assert card.data.pipeline_tag == "text-to-image" and card.data.base_model is None  # the tiny FLUX
    assert f"- step 3 of 6, stage `intra`, run `{state['run_id']}`" in card.text
    for d in state["datasets"]:
        for path, digest in zip(d["dirs"], d["manifests"]):
            assert digest == "sha256:" + hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest()
            assert f"| {d['stage']} | `{path}` | `{digest}` |" in card.text
    assert f"(local copy `{ModelsConfig.from_yaml(run_setup[3]).flux}`)" in card.text
    assert yaml.safe_dump(state["config"], sort_keys=True, width=120).rstrip() in card.text


def test_config_errors_name_the_fix(tmp_path):
    from dynaip.train.config import TrainConfig

    with pytest.raises(ValueError, match="not divisible by parallel.workers"):
        TrainConfig(stages=[{"name": "a", "steps": 1}], data={"global_batch_size": 3}, parallel={"workers": 2})
    with pytest.raises(ValueError, match="unknown key 'learning_rate'"):
        TrainConfig.from_dict({"stages": [{"name": "a", "steps": 1}], "learning_rate": 1})
    paper = TrainConfig.from_yaml("jobs/configs/paper.yaml")
    assert [s.steps for s in paper.stages] == [20000, 80000] and paper.data.global_batch_size == 16
    assert paper.data.buckets == [[1024, 1024]] and paper.optim.lr == 2e-5
    assert paper.stage_at(20000) == 0 and paper.stage_at(20001) == 1
