"""Training dashboards (issue #17 item 6): TensorBoard events under RUN/tb, read back with TensorBoard's
own reader. The metrics reported through Ray Train are checked on tests/test_train.py's two-worker run
(test_two_workers_report_their_metrics_through_ray_train), which already runs under Ray Train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dynaip.train.config import set_keys

from train_fixtures import write_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models_yaml):
    root = tmp_path_factory.mktemp("dash")
    data = write_dataset(root / "data", [4], size=64)
    cfg = yaml.safe_load(Path("jobs/configs/tiny.yaml").read_text())
    cfg = set_keys(
        cfg,
        stages=[{"name": "intra", "steps": 2, "pair": "intra"}, {"name": "more", "steps": 1}],
        global_batch_size=2,
        log_every=1,
        eval_every=3,
        sample_every=2,
        sample_steps=2,
        checkpoint_every=0,
    )
    config = root / "dash.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return root, config, data, tiny_models_yaml


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_of_a_tiny_run(setup):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dynaip.train.cli import main

    root, config, data, models = setup
    run = root / "local"
    assert (
        main(["--config", str(config), "--data", str(data), "--out", str(run), "--models", str(models), "--local"]) == 0
    )
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under RUN/tb"
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in (
        "train/loss",
        "train/lr",
        "train/samples_per_s",
        "train/data_wait_fraction",
        "train/grad_norm",
        "progress/stage",
        "progress/total",
        "val/loss",
    ):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    rows = [r for r in _rows(run) if "loss" in r]  # metrics.jsonl stays, with the same numbers
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in rows] == [1, 2, 3]
    assert [round(e.value, 5) for e in loss] == [round(r["loss"], 5) for r in rows]
    assert all(e.value > 0 for e in acc.Scalars("train/grad_norm"))
    assert [round(e.value, 3) for e in acc.Scalars("progress/stage")] == [0.5, 1.0, 1.0]  # 2-step stage, then 1
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 3]
    images = acc.Images("samples")
    assert [e.step for e in images] == [2] and images[0].width > 0 and images[0].height > images[0].width / 4
