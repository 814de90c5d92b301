"""Precomputed features on the tiny checkpoints: precompute (local and Ray), loss equality with
on-the-fly encoding, a two-worker gloo training run that never loads the encoders, and errors."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from dynaip.train.config import set_keys

from train_fixtures import write_dataset

REPO = Path(__file__).resolve().parents[1]
BUCKETS = [[64, 64], [32, 64]]


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _precompute(dataset: Path, models: Path, config: Path, *extra: str) -> int:
    from dynaip.cli import main

    return main(
        [
            "precompute",
            "--data",
            str(dataset),
            "--models",
            str(models),
            "--config",
            str(config),
            "--no-progress",
            "--batch-size",
            "2",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models_yaml):
    """A dataset (shard 1 starts with an undecodable target), a training config, and its features (local)."""
    root = tmp_path_factory.mktemp("feat")
    data = write_dataset(root / "ds", [3, 3], size=64, corrupt={1: "badimage"})
    raw = root / "raw"  # the same dataset without features, for the on-the-fly and error cases
    shutil.copytree(data, raw)
    cfg = yaml.safe_load((REPO / "jobs/configs/tiny.yaml").read_text())
    cfg = set_keys(
        cfg,
        stages=[{"name": "all", "steps": 2}],
        buckets=BUCKETS,
        features="required",
        eval_every=0,
        sample_every=2,
        sample_steps=2,
        checkpoint_every=0,
        log_every=1,
    )
    config = root / "train.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert _precompute(data, tiny_models_yaml, config, "--executor", "local") == 0
    return root, data, raw, config, tiny_models_yaml


def _feature_root(dataset: Path) -> Path:
    (root,) = (dataset / "features").iterdir()
    return root


# ----------------------------------------------------------------------------- precompute


def test_precompute_writes_keyed_checksummed_shards_and_resumes(setup):
    from safetensors import safe_open

    root, data, _, config, models = setup
    feat = _feature_root(data)
    m = json.loads((feat / "manifest.json").read_text())
    assert m["format"] == "dynaip-features/1" and m["spec"]["buckets"] == BUCKETS
    assert m["spec"]["max_sequence_length"] == 32 and m["spec"]["dtype"] == "fp32"
    assert m["dataset"]["manifest_sha256"] == hashlib.sha256((data / "manifest.json").read_bytes()).hexdigest()
    assert [(s["path"], s["samples"], s["skipped"]) for s in m["shards"]] == [
        ("shards/000000.safetensors", 3, 0),
        ("shards/000001.safetensors", 2, 1),
    ]  # the bad target has no features
    for s in [m["empty_prompt"], *m["shards"]]:
        assert hashlib.sha256((feat / s["path"]).read_bytes()).hexdigest() == s["sha256"]
    with safe_open(str(feat / "shards/000000.safetensors"), framework="pt") as f:  # a standard safetensors file
        names = set(f.keys())
        key = "test-000000-0"
        assert f.get_tensor(f"{key}.t5").shape == (32, 32) and f.get_tensor(f"{key}.pooled").shape == (32,)
        assert f.get_tensor(f"{key}.mean.64x64").shape == (4, 8, 8)
        assert f.get_tensor(f"{key}.logvar.32x64").shape == (4, 4, 8)
    assert len(names) == 3 * (2 + 2 * len(BUCKETS))
    with safe_open(str(feat / "empty.safetensors"), framework="pt") as f:
        assert f.get_tensor("t5").shape == (1, 32, 32) and f.get_tensor("pooled").shape == (1, 32)

    before = _tree(feat)
    (feat / "manifest.json").unlink()  # as if stopped before the end: finished shards are kept, not recomputed
    stamp = {p: (feat / p).stat().st_mtime_ns for p in before if p.startswith("shards/")}
    assert _precompute(data, models, config, "--executor", "local") == 0
    assert _tree(feat) == before
    assert stamp == {p: (feat / p).stat().st_mtime_ns for p in stamp}


def test_ray_job_writes_byte_identical_features(setup, ray_cluster, tmp_path, capsys):
    import re
    import sys

    root, data, raw, config, models = setup
    copy = tmp_path / "ds"
    shutil.copytree(raw, copy)
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import precompute as job  # jobs/precompute.py, as `ray job submit` runs it
    finally:
        sys.path.remove(str(REPO / "jobs"))
    assert job.main(["--data", str(copy), "--models", str(models), "--config", str(config), "--batch-size", "2"]) == 0
    assert _tree(_feature_root(copy)) == _tree(_feature_root(data))
    # issue #35: the driver shows shards done / total and the rate (no terminal here: lines, the last at the end)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("precompute (ray")]
    assert lines and re.match(
        r"precompute \(ray, \d+ actors\): shards (\d+)/\1 \(100%\), [0-9.e+-]+ shards/s, ", lines[-1]
    ), lines


# ----------------------------------------------------------------------------- the two paths agree


def test_stored_posterior_is_sampled_as_diffusers_samples(tiny_models):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from dynaip.train.step import sample_posterior

    params = torch.randn(2, 8, 4, 4) * 3
    dist = DiagonalGaussianDistribution(params)
    want = dist.sample(generator=torch.Generator().manual_seed(7))
    got = sample_posterior(dist.mean, dist.logvar, torch.Generator().manual_seed(7))
    assert torch.equal(want, got)


def _batch(data: Path, features, buckets, ref_size: int, batch_size: int = 4) -> dict:
    from dynaip.train.data import StreamingLoader, StreamSpec, read_manifests

    shards = read_manifests([str(data)])
    if features is not None:
        shards = features.attach(0, shards)
    spec = StreamSpec(shards=shards, batch_size=batch_size, ref_size=ref_size, buckets=buckets, shuffle_block=1)
    return next(iter(StreamingLoader(spec, 0, 1, workers=0)))


def test_feature_loss_equals_on_the_fly_loss(setup, tiny_models):
    from dynaip import DynaIPAdapter, DynaIPConfig
    from dynaip.train.config import TrainConfig
    from dynaip.train.features import resolve_run
    from dynaip.train.step import LossConfig, cfg_dropout, load_frozen, training_loss

    _, data, _, config, _ = setup
    cfg = TrainConfig.from_yaml(config)
    features = resolve_run(cfg, [str(data)], tiny_models.flux)
    assert features.modes() == ["precomputed"] and not features.encoders
    full = load_frozen(tiny_models, torch.device("cpu"), torch.float32)
    lite = load_frozen(tiny_models, torch.device("cpu"), torch.float32, encoders=False, vae_decoder=False)
    assert lite.loaded() == ["clip_vision", "transformer"]
    assert full.loaded() == [
        "clip_vision",
        "text_encoder",
        "text_encoder_2",
        "transformer",
        "vae_decoder",
        "vae_encoder",
    ]
    torch.manual_seed(0)
    adapter = DynaIPAdapter(DynaIPConfig.tiny()).eval()  # eval: no expert dropout
    settings = LossConfig(max_sequence_length=32, drop_text=0.4, drop_image=0.2, drop_both=0.2)
    # a dropout draw that exercises both the stored empty prompt and the stored captions
    seed = next(
        s for s in range(100) if 0 < int(cfg_dropout(4, 0.4, 0.2, 0.2, torch.Generator().manual_seed(s))[0].sum()) < 4
    )

    for bucket in BUCKETS:
        plain = _batch(data, None, [tuple(bucket)], full.clip.image_size)
        stored = _batch(data, features, [tuple(bucket)], full.clip.image_size)
        assert plain["key"] == stored["key"] and "tgt" not in stored and "tgt" in plain
        losses = []
        for frozen, batch in ((full, plain), (lite, stored)):
            adapter.attach(frozen.transformer)
            with torch.no_grad():
                losses.append(
                    training_loss(
                        frozen,
                        adapter,
                        adapter,
                        batch,
                        settings,
                        torch.Generator().manual_seed(1),
                        torch.Generator().manual_seed(seed),
                        empty_text=features.empty_prompt(0),
                    )
                )
            adapter.detach(frozen.transformer)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- training on features


def test_two_gloo_workers_train_on_features_without_loading_the_encoders(setup, ray_cluster):
    from dynaip.train.cli import main

    root, data, _, config, models = setup
    out = root / "run"
    assert main(["--config", str(config), "--data", str(data), "--out", str(out), "--models", str(models)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (setup_row,) = [r for r in rows if r.get("event") == "setup"]
    assert setup_row["features"] == ["precomputed"]
    assert setup_row["frozen_modules"] == [["clip_vision", "transformer", "vae_decoder"]] * 2  # both ranks
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(r["loss"] > 0 for r in rows if "loss" in r)
    assert (out / "samples" / "step-000002" / "00.png").is_file()  # decoder-only VAE, stored captions
    assert (out / "checkpoints" / "step-000002" / "adapter.safetensors").is_file()


# ----------------------------------------------------------------------------- errors


@pytest.fixture()
def broken(setup, tmp_path):
    """A private copy of the dataset with its features, to damage."""
    _, data, _, config, models = setup
    copy = tmp_path / "ds"
    shutil.copytree(data, copy)
    return copy, _feature_root(copy), config, models


def _resolve(dataset: Path, config: Path, models, **overrides):
    from dynaip.train.config import TrainConfig
    from dynaip.train.features import resolve_run

    raw = set_keys(yaml.safe_load(config.read_text()), **overrides)
    return resolve_run(TrainConfig.from_dict(raw), [str(dataset)], models.flux)


def _tensor_offset(path: Path, name: str) -> int:
    """Where tensor ``name``'s bytes start in a safetensors file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return 8 + n + json.loads(data[8 : 8 + n])[name]["data_offsets"][0]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_feature_shard_is_an_error_naming_it(broken, tiny_models):
    from dynaip.features.format import FeatureError

    dataset, feat, config, _ = broken
    shard = feat / "shards" / "000000.safetensors"
    where = _tensor_offset(shard, "test-000001-0.mean.64x64") + 5
    _flip(shard, where)  # one bit pattern inside a tensor: the size still matches
    features = _resolve(dataset, config, tiny_models)  # sizes are checked up front, contents on read
    _batch(dataset, features, [(32, 64)], 56, batch_size=5)  # the damaged tensor is not read: fine
    with pytest.raises(FeatureError, match=f"{shard}.*corrupt.*'test-000001-0.mean.64x64'.*sha256"):
        _batch(dataset, features, [(64, 64)], 56, batch_size=5)  # every sample

    _flip(shard, where)  # repaired; now damage the header
    _flip(shard, 40)
    with pytest.raises(FeatureError, match=f"{shard}.*corrupt.*header"):
        _batch(dataset, _resolve(dataset, config, tiny_models), [(64, 64)], 56)

    shard.write_bytes(shard.read_bytes()[:-100])  # truncated: found before training starts
    with pytest.raises(FeatureError, match=f"{shard}.*corrupt.*bytes"):
        _resolve(dataset, config, tiny_models)


def test_missing_feature_shard_or_sample_is_an_error(broken, tiny_models):
    from dynaip.features.format import FeatureError
    from dynaip.features.store import FeatureReader

    dataset, feat, config, _ = broken
    features = _resolve(dataset, config, tiny_models)
    ref = features.stages[0].refs()[str(dataset / "shards" / "000001.tar")]
    with pytest.raises(FeatureError, match=f"{ref.url}.*no tensor 'test-000099-0.t5'"):
        FeatureReader().batch([(ref, "test-000099-0")], (64, 64))

    shard = feat / "shards" / "000001.safetensors"
    shard.unlink()
    for mode in ("auto", "required"):  # absent files are errors, not a fallback
        with pytest.raises(FeatureError, match=f"{shard} is missing"):
            _resolve(dataset, config, tiny_models, features=mode)
    assert _resolve(dataset, config, tiny_models, features="off").modes() == ["on-the-fly"]

    # a set computed for other settings is stale, not absent: an error in auto mode too
    with pytest.raises(FeatureError, match="none serves this run.*max_sequence_length 32, the run uses 16"):
        _resolve(dataset, config, tiny_models, features="auto", max_sequence_length=16)


def test_required_features_missing_is_a_one_line_error(setup, tiny_models, caplog, tmp_path):
    from dynaip.cli import main

    root, _, raw, config, models = setup
    with caplog.at_level(logging.ERROR, logger="dynaip"):
        rc = main(
            [
                "train",
                "--config",
                str(config),
                "--data",
                str(raw),
                "--out",
                str(tmp_path / "run"),
                "--models",
                str(models),
                "--local",
            ]
        )
    assert rc == 2
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "features: required" in msg and str(raw) in msg and "\n" not in msg
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing started

    auto = tmp_path / "auto.yaml"
    auto.write_text(yaml.safe_dump(set_keys(yaml.safe_load(config.read_text()), features="auto")))
    assert _resolve(raw, auto, tiny_models).notes == [
        f"stage 'all': encoding on the fly (no precomputed features in {[str(raw)]})"
    ]
