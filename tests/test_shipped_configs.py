"""Every file in jobs/configs runs in the suite as shipped, with only its sizes shrunk.

Sizes (model preset, resolution, steps, batch, workers, sequence length, intervals) shrink to the tiny
checkpoints on two CPU workers; every switch — strategy, gradient checkpointing and how many blocks
keep their activations, precision, DataLoader workers, stages and their pair types, CFG dropout,
evaluation and samples — stays as shipped, and the run's own "start" record in metrics.jsonl is
checked to show that each took effect. A new config file without an entry here fails the suite.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dynaip.train.config import get_key, set_keys
from train_fixtures import write_dataset, write_dreambench, write_eval_config

CONFIGS = Path(__file__).resolve().parent.parent / "jobs" / "configs"
TRAIN_CONFIGS = ("tiny.yaml", "paper.yaml")
# configs of other commands, each loaded as shipped by the named test
OTHER_CONFIGS = {"eval_judges.yaml": "tests/test_eval_score.py::test_eval_config_yaml"}
TINY_BLOCKS = 3  # the tiny FLUX: 1 double + 2 single blocks


def test_every_shipped_config_is_run_by_a_test():
    shipped = {p.name for p in CONFIGS.glob("*.yaml")}
    missing = sorted(shipped - set(TRAIN_CONFIGS) - set(OTHER_CONFIGS))
    assert not missing, (
        f"jobs/configs/{missing} has no test: add it to TRAIN_CONFIGS in {Path(__file__).name} "
        "(runs shrunk) or to OTHER_CONFIGS with the test that loads it"
    )
    assert set(TRAIN_CONFIGS) | set(OTHER_CONFIGS) <= shipped


def shrink(raw: dict, steps_per_stage: int = 2, bench: dict | None = None) -> dict:
    """Sizes only: every switch of ``raw`` is kept. ``bench``: the tiny stand-ins of the ``fidelity`` section's
    inputs (``cases``, ``eval_config``; the ``fidelity_inputs`` fixture)."""
    workers = 2
    per_worker = min(get_key(raw, "global_batch_size", 16) // get_key(raw, "workers", 2), 2)
    cfg = set_keys(
        raw,
        adapter_preset="tiny",
        workers=workers,
        cpus_per_worker=1,
        global_batch_size=per_worker * workers,
        use_gpu=False,  # no GPU on the CI machines; precision "auto" then means fp32 (bf16 is tested below)
        buckets=[[64, 64] for _ in get_key(raw, "buckets", [[1024, 1024]])],
        stages=[{**s, "steps": steps_per_stage} for s in raw["stages"]],
        data_workers=min(get_key(raw, "data_workers", 2), 2),
        shuffle_block=8,
        max_sequence_length=32,
        log_every=1,
        eval_samples=2,
        sample_steps=2,
        ray_address=None,
    )
    total = steps_per_stage * len(raw["stages"])
    for key in ("checkpoint_every", "eval_every"):
        if get_key(raw, key):
            cfg = set_keys(cfg, **{key: steps_per_stage})
    if get_key(raw, "sample_every"):
        cfg = set_keys(cfg, sample_every=total)
    if (raw.get("fidelity") or {}).get("every"):  # every evaluation still at a checkpoint step, 3 cases over 2 ranks
        cfg["fidelity"] = {
            **raw["fidelity"],
            **(bench or {}),
            "every": steps_per_stage,
            "limit": 3,
            "steps": 1,
            "size": [16, 16],
        }
    if get_key(raw, "checkpoint_keep_blocks"):  # a third of the tiny model's blocks, as a size
        cfg = set_keys(
            cfg, checkpoint_keep_blocks=max(1, round(get_key(raw, "checkpoint_keep_blocks") / 57 * TINY_BLOCKS))
        )
    return cfg


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs-data")
    return [
        write_dataset(root / "intra", [4, 4], size=64),
        write_dataset(root / "cross", [4, 4], pair="cross", start=100, size=64),
    ]


@pytest.fixture(scope="module")
def fidelity_inputs(tmp_path_factory) -> dict:
    """A DreamBench++-layout pool of two subjects and an eval config with tiny DINO weights."""
    root = tmp_path_factory.mktemp("configs-fidelity")
    return {
        "cases": str(write_dreambench(root / "dbpp", {"animal": 1, "object": 1})),
        "eval_config": str(write_eval_config(root)),
    }


def _run(tmp: Path, name: str, raw: dict, datasets, models: Path, out: str, *extra: str) -> Path:
    from dynaip.train.cli import main

    config = tmp / f"{out}-{name}"
    config.write_text(yaml.safe_dump(raw))
    run = tmp / out
    assert (
        main(
            [
                "--config",
                str(config),
                "--data",
                ",".join(map(str, datasets)),
                "--out",
                str(run),
                "--models",
                str(models),
                *extra,
            ]
        )
        == 0
    )
    return run


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def start_row(run: Path) -> dict:
    return next(r for r in _rows(run) if r.get("event") == "start")


def _check_switches_took_effect(run: Path, raw: dict, shrunk: dict) -> None:
    rows = _rows(run)
    start = next(r for r in rows if r.get("event") == "start")
    strategy = get_key(raw, "strategy", "ddp")
    assert start["strategy"] == strategy and start["world_size"] == 2
    assert start["adapter_sharded"] == (strategy in ("fsdp2_adapter", "fsdp2_full"))
    want_ckpt = (
        TINY_BLOCKS - get_key(shrunk, "checkpoint_keep_blocks", 0) if get_key(raw, "gradient_checkpointing") else 0
    )
    assert start["checkpointed_blocks"] == want_ckpt
    assert start["data_workers"] == get_key(shrunk, "data_workers")
    assert start["dtype"] == "float32"  # precision auto on a CPU
    assert start["compiled_blocks"] == (TINY_BLOCKS if get_key(raw, "compile") else 0)
    assert start["attention"] == ("flash" if get_key(raw, "attention", "auto") == "auto" else get_key(raw, "attention"))
    steps = [r for r in rows if "loss" in r]
    assert [r["stage"] for r in steps] == [s["name"] for s in raw["stages"] for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)


def _check_fidelity(run: Path, raw: dict, shrunk: dict) -> None:
    """The fidelity section as shipped: records at its steps with its metrics, and best.json when keep_best is set."""
    fid = raw.get("fidelity") or {}
    records = [r for r in _rows(run) if r.get("event") == "fidelity"]
    if not fid.get("every"):
        assert records == [] and not (run / "checkpoints" / "best.json").exists()
        return
    every, total = shrunk["fidelity"]["every"], 2 * len(raw["stages"])
    assert [r["step"] for r in records] == list(range(every, total + 1, every))
    assert all(isinstance(r[m], float) for r in records for m in fid["metrics"]) and records[0]["fidelity_cases"] == 3
    metric = (raw.get("checkpoints") or {}).get("keep_best")
    if metric:
        best = json.loads((run / "checkpoints" / "best.json").read_text())
        assert best["value"] == max(r[metric] for r in records) and (run / "checkpoints" / best["checkpoint"]).is_dir()


@pytest.mark.slow  # every switch of each shipped config on two Ray Train workers; paper.yaml adds its sharded resume
@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_shipped_train_config_runs_shrunk_on_two_workers(
    name, ray_cluster, datasets, fidelity_inputs, tiny_models_yaml, tmp_path
):
    from dynaip import DynaIPAdapter

    raw = yaml.safe_load((CONFIGS / name).read_text())
    shrunk = shrink(raw, bench=fidelity_inputs)
    run = _run(tmp_path, name, shrunk, datasets, tiny_models_yaml, "full")
    _check_switches_took_effect(run, raw, shrunk)
    _check_fidelity(run, raw, shrunk)
    final = run / "checkpoints" / f"step-{2 * len(raw['stages']):06d}"
    adapter = DynaIPAdapter.from_pretrained(final)  # a plain adapter.safetensors also from sharded runs
    assert set(load_file(str(final / "adapter.safetensors"))) == set(adapter.state_dict())

    if not start_row(run)["adapter_sharded"]:
        return  # replicated state: its bitwise resume on two workers is tests/test_train.py's
    # exact resume from the first checkpoint (sharded optimizer state included) with two workers
    first = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))[0]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(first, resumed / "checkpoints" / first.name)
    _run(tmp_path, name, shrunk, datasets, tiny_models_yaml, "resumed", "--resume")
    want, got = (
        load_file(str(final / "adapter.safetensors")),
        load_file(str(resumed / "checkpoints" / final.name / "adapter.safetensors")),
    )
    assert all(torch.equal(want[k], got[k]) for k in want), "resume is not bitwise identical"


def test_paper_config_with_its_memory_fallback_trains_in_bf16_on_the_cpu(datasets, tiny_models_yaml, tmp_path):
    """The paper recipe with docs/memory.md's fallback for short memory (gradient checkpointing on, every
    block recomputed) and precision: bf16 — the frozen base in bf16, the adapter's fp32 modules under
    bf16 autocast — which a CPU run of the shipped "auto" would not reach."""
    raw = yaml.safe_load((CONFIGS / "paper.yaml").read_text())
    shrunk = set_keys(
        shrink(raw),
        precision="bf16",
        gradient_checkpointing=True,
        checkpoint_keep_blocks=0,
        eval_every=0,
        sample_every=0,
    )
    shrunk["fidelity"] = {"every": 0}  # evaluations off, as validation and samples (the Ray test runs them)
    shrunk["checkpoints"] = {**shrunk["checkpoints"], "keep_best": None}
    run = _run(tmp_path, "paper.yaml", shrunk, datasets, tiny_models_yaml, "bf16", "--local")
    rows = _rows(run)
    start = next(r for r in rows if r.get("event") == "start")
    assert start["dtype"] == "bfloat16" and start["autocast"] == "bfloat16"
    assert start["checkpointed_blocks"] == TINY_BLOCKS
    assert start["compiled_blocks"] == (TINY_BLOCKS if get_key(raw, "compile") else 0)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 * len(raw["stages"]) and all(torch.isfinite(torch.tensor(v)) for v in losses)
