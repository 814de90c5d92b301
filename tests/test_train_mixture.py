"""Weighted dataset mixtures and quality filters in the streaming loader (no Ray, no models)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from dynaip.train.config import FilterConfig, StageConfig, TrainConfig
from dynaip.train.data import ShardInfo, StreamingLoader, StreamSpec, read_manifests
from dynaip.train.mixture import SCHEDULE_CHUNK, schedule_chunk
from dynaip.train.preflight import PreflightError, check_scores

from train_fixtures import write_dataset


def spec_for(dirs, batch_size=1, **kw) -> StreamSpec:
    kw = {"shuffle_block": 3, "ref_size": 28, "buckets": [(32, 32)], **kw}
    return StreamSpec(shards=read_manifests([str(d) for d in dirs]), batch_size=batch_size, **kw)


def ids(loader: StreamingLoader, n: int) -> list[int]:
    """Sample numbers (``test-{n}-0``) of the next ``n`` batches; dataset a holds 0..99, b holds 100.."""
    return [int(k[5:11]) for b in itertools.islice(iter(loader), n) for k in b["key"]]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """a: 8 samples in shards of 5 and 3; b: 4 samples in shards of 1 and 3 (both divisible by 4 consumers)."""
    root = tmp_path_factory.mktemp("mix")
    return write_dataset(root / "a", [5, 3], size=32), write_dataset(root / "b", [1, 3], start=100, size=32)


# ----------------------------------------------------------------------------- config


def test_stage_data_entries_plain_or_weighted():
    plain = StageConfig(name="s", steps=1, data=["/d/a", "/d/b"])
    assert plain.paths == ["/d/a", "/d/b"] and plain.weights is None  # plain paths: today's concatenation
    mixed = StageConfig(name="s", steps=1, data=["/d/a", {"path": "/d/b", "weight": 3}])
    assert mixed.weights == [1.0, 3.0]  # a plain path in a weighted list weighs 1
    cfg = TrainConfig.from_dict(
        {
            "stages": [
                {
                    "name": "s",
                    "steps": 1,
                    "data": [{"path": "/d/a", "weight": 2}],
                    "filters": {"min_aesthetic": 4.5, "min_sharpness": 0.1, "min_subject_pixels": 900},
                }
            ]
        }
    )
    again = TrainConfig.from_dict(cfg.to_dict())  # what workers and checkpoints carry
    assert again.stages[0].weights == [2.0]
    assert again.stages[0].filters.active() == {"aesthetic": 4.5, "sharpness": 0.1, "subject_pixels": 900.0}
    assert FilterConfig().active() == {}


@pytest.mark.parametrize(
    "stage, message",
    [
        (
            {"data": [{"path": "/d/a", "weigth": 3}]},
            r"unknown key 'stages\[0\]\.data\[0\]\.weigth'; did you mean 'weight'\?",
        ),
        ({"data": [{"path": "/d/a", "weight": 0}]}, "weight must be a number > 0"),
        ({"data": ["/d/a", {"path": "/d/a", "weight": 2}]}, "lists /d/a more than once"),
        (
            {"filters": {"min_aesthetics": 3}},
            r"unknown key 'stages\[0\]\.filters\.min_aesthetics'; did you mean 'min_aesthetic'\?",
        ),
        ({"datasets": ["/d/a"]}, r"unknown key 'stages\[0\]\.datasets'; did you mean 'data'\?"),
    ],
)
def test_config_errors_name_the_key_and_the_fix(stage, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({"stages": [{"name": "s", "steps": 1, **stage}]})


# ----------------------------------------------------------------------------- plain streams unchanged


def test_plain_stream_is_the_one_before_mixtures(tmp_path):
    # keys produced by the loader before mixtures existed (main at adc4153), same fixture and seed
    a = write_dataset(tmp_path / "a", [5, 1, 7], size=32)
    b = write_dataset(tmp_path / "b", [2], pair="cross", start=100, size=32)
    want = [
        [101, 100, 0, 3, 2, 1, 4, 6, 101, 100, 0, 2, 3, 1, 4, 6, 6, 101, 100, 7],
        [7, 9, 8, 11, 10, 12, 5, 100, 7, 8, 9, 12, 11, 10, 5, 100, 12, 0, 5, 2],
    ]
    spec = spec_for([a, b], seed=3)
    assert [ids(StreamingLoader(spec, rank, 2, workers=0), 20) for rank in range(2)] == want


# ----------------------------------------------------------------------------- mixtures


def test_schedule_follows_the_weights_within_binomial_error():
    # Slot picks are i.i.d. with p = 3/4 for dataset 0, so over n slots the share of dataset 0 has
    # std sqrt(p (1 - p) / n); we allow 4 std (two-sided chance of a false failure ~6e-5 per check).
    spec = StreamSpec(
        shards=[ShardInfo("a", 1, dataset=0), ShardInfo("b", 1, dataset=1)], batch_size=1, weights=[3.0, 1.0]
    )
    n = 25 * SCHEDULE_CHUNK
    tol = 4 * math.sqrt(0.75 * 0.25 / n)  # 0.0054
    for consumer in range(4):
        picks = np.concatenate([schedule_chunk(spec, consumer, c) for c in range(25)])
        assert abs((picks == 0).mean() - 0.75) < tol, (consumer, (picks == 0).mean(), tol)


def test_three_to_one_mixture_draws_samples_three_to_one(two):
    a, b = two
    loader = StreamingLoader(spec_for([a, b], batch_size=16, weights=[3, 1], shuffle_block=8), 0, 1, workers=0)
    n = 50 * 16
    got = ids(loader, 50)
    share = sum(i < 100 for i in got) / n
    tol = 4 * math.sqrt(0.75 * 0.25 / n)  # binomial std of the share, 0.0153 at n = 800; 4 std = 0.061
    assert abs(share - 0.75) < tol, (share, tol)
    assert loader.seen == {0: sum(i < 100 for i in got), 1: sum(i >= 100 for i in got)}
    # every dataset repeats on its own: b (4 samples) ran through ~50 epochs, each a permutation of b
    bs = [i for i in got if i >= 100]
    assert all(sorted(bs[e * 4 : (e + 1) * 4]) == [100, 101, 102, 103] for e in range(len(bs) // 4))
    assert bs[:4] != bs[4:8] or bs[4:8] != bs[8:12]  # new shuffle per epoch


def test_same_seed_same_mixture_other_seed_differs(two):
    a, b = two
    first = ids(StreamingLoader(spec_for([a, b], weights=[3, 1]), 1, 2, workers=0), 24)
    assert first == ids(StreamingLoader(spec_for([a, b], weights=[3, 1]), 1, 2, workers=0), 24)
    assert first != ids(StreamingLoader(spec_for([a, b], weights=[3, 1], seed=1), 1, 2, workers=0), 24)


def test_ranks_and_workers_split_each_dataset_without_duplicates_or_losses(two):
    # 2 ranks x 2 loader workers = 4 consumers; per dataset d each consumer's first K_d = N_d / 4 draws
    # from d are its range of d's first epoch, so together they are d exactly once
    a, b = two
    spec = spec_for([a, b], weights=[1, 1])
    per_dataset: dict[int, list[int]] = {0: [], 1: []}
    for rank in range(2):
        got = ids(StreamingLoader(spec, rank, 2, workers=2), 40)  # batch i comes from logical worker i % 2
        for worker in range(2):
            mine = got[worker::2]
            per_dataset[0] += [i for i in mine if i < 100][:2]  # K_a = 8 / 4
            per_dataset[1] += [i for i in mine if i >= 100][:1]  # K_b = 4 / 4
    assert sorted(per_dataset[0]) == list(range(8))
    assert sorted(per_dataset[1]) == [100, 101, 102, 103]


@pytest.mark.parametrize("workers", [0, 2])
def test_mixture_resume_from_saved_position_gives_identical_sequence(two, workers):
    a, b = two
    spec = spec_for([a, b], batch_size=2, weights=[3, 1])
    want = ids(StreamingLoader(spec, 1, 2, workers=workers), 12)
    first = StreamingLoader(spec, 1, 2, workers=workers)
    head = ids(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # survives JSON, as in a checkpoint
    assert [p["slot"] for p in state["positions"]] == ([14] if workers == 0 else [8, 6])
    second = StreamingLoader(spec, 1, 2, workers=workers)
    second.load_state_dict(state)
    assert head + ids(second, 5) == want
    assert second.seen[0] + second.seen[1] == 24


def test_mixture_refuses_a_dataset_without_samples(two, tmp_path):
    a, _ = two
    with pytest.raises(ValueError, match="no samples or no weight"):
        spec_for([a], weights=[1, 1])


# ----------------------------------------------------------------------------- quality filters


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """12 samples with aesthetic = n % 4 (0, 1, 2, 3, ...) and a dataset without scores."""
    root = tmp_path_factory.mktemp("scored")
    score = lambda n: {"aesthetic": float(n % 4), "sharpness": n / 10, "subject_pixels": 100 * n}
    return write_dataset(root / "s", [6, 6], size=32, quality=score), write_dataset(root / "u", [4], start=100, size=32)


@pytest.mark.parametrize(
    "filters, keep",
    [
        ({"aesthetic": 2.0}, lambda n: n % 4 >= 2),
        ({"sharpness": 0.5}, lambda n: n / 10 >= 0.5),
        ({"subject_pixels": 700, "aesthetic": 1.0}, lambda n: n >= 7 and n % 4 >= 1),
    ],
)
def test_filters_drop_samples_below_threshold_and_count_them(scored, filters, keep):
    s, _ = scored
    loader = StreamingLoader(spec_for([s], filters=filters), 0, 1, workers=0)
    kept = [n for n in range(12) if keep(n)]
    got = ids(loader, len(kept) + 1)  # one epoch, then the first of the next: epoch 0's drops are all counted
    assert sorted(got[:-1]) == kept
    assert loader.filtered == sum(loader.dropped.values()) >= 12 - len(kept)
    assert set(loader.dropped) <= {f"min_{name}" for name in filters}


def test_filters_count_unscored_samples_as_dropped_and_preflight_refuses_them(scored):
    s, u = scored
    loader = StreamingLoader(spec_for([s, u], filters={"aesthetic": 0.0}), 0, 1, workers=0)
    got = ids(loader, 13)  # one epoch, then the first of the next
    assert sorted(got[:-1]) == list(range(12))  # u's 4 samples have no score: never emitted
    assert loader.dropped["min_aesthetic"] >= 4
    check_scores("st", [str(s)], {"aesthetic": 0.0, "sharpness": 0.0, "subject_pixels": 0})
    with pytest.raises(PreflightError, match=r"stage 'st' filters on quality.aesthetic but dataset '.*u' stores no"):
        check_scores("st", [str(s), str(u)], {"aesthetic": 0.0})


def test_preflight_checks_a_filtered_stage_before_the_run(scored):
    from dynaip.train.preflight import check_stages

    s, u = scored
    stage = {"name": "q", "steps": 1, "filters": {"min_sharpness": 0.2}}
    ok = TrainConfig.from_dict({"stages": [{**stage, "data": [{"path": str(s), "weight": 2}]}]})
    assert list(check_stages(ok, [])) == ["q"]
    bad = TrainConfig.from_dict({"stages": [stage]})  # the run's --data: s and the unscored u
    with pytest.raises(PreflightError, match="quality.sharpness .*drop min_sharpness"):
        check_stages(bad, [str(s), str(u)])
