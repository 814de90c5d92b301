"""The streaming loader without Ray: determinism, coverage, no starvation, exact resume, damage."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from dynaip.train.data import (
    StreamingLoader,
    StreamSpec,
    WorkerPosition,
    consumer_batches,
    iter_tar,
    range_length,
    read_manifests,
)

from train_fixtures import write_dataset


def spec_for(dirs, batch_size=1, **kw) -> StreamSpec:
    kw = {"shuffle_block": 3, "ref_size": 28, "buckets": [(32, 32)], **kw}
    return StreamSpec(shards=read_manifests([str(d) for d in dirs]), batch_size=batch_size, **kw)


def keys(loader: StreamingLoader, n: int) -> list[str]:
    return [k for b in itertools.islice(iter(loader), n) for k in b["key"]]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """13 samples in shards of 5, 1, 7 (uneven), plus 2 cross-pair samples in another dataset."""
    root = tmp_path_factory.mktemp("uneven")
    a = write_dataset(root / "a", [5, 1, 7], size=32)
    b = write_dataset(root / "b", [2], pair="cross", start=100, size=32)
    return a, b


def test_one_epoch_partitions_every_sample_across_consumers(uneven):
    a, _ = uneven
    spec = spec_for([a])
    consumers = 4  # 2 ranks x 2 workers
    k = range_length(spec.total, consumers)
    seen = []
    for c in range(consumers):
        it = consumer_batches(spec, c, consumers, WorkerPosition())
        got = [b["key"][0] for b, _ in itertools.islice(it, k)]
        assert len(got) == k  # every consumer gets exactly K, however the shards fall
        seen += got
    # 16 positions over 13 samples: all 13 appear, 3 wrap-around repeats
    assert set(seen) == {f"test-{i:06d}-0" for i in range(13)}
    assert len(seen) == 16


def test_same_seed_same_sequence_other_seed_or_epoch_differs(uneven):
    a, _ = uneven
    first = keys(StreamingLoader(spec_for([a]), 0, 2, workers=0), 12)
    assert first == keys(StreamingLoader(spec_for([a]), 0, 2, workers=0), 12)
    assert first != keys(StreamingLoader(spec_for([a], seed=1), 0, 2, workers=0), 12)
    assert first[:7] != first[7:14]  # next epoch: new shard order and permutation


def test_no_rank_starves_with_fewer_shards_than_consumers(tmp_path):
    d = write_dataset(tmp_path / "d", [3, 1], size=32)  # 2 shards, 3 ranks x 2 workers = 6 consumers
    spec = spec_for([d], batch_size=2)
    for rank in range(3):
        got = list(itertools.islice(iter(StreamingLoader(spec, rank, 3, workers=2)), 5))
        assert len(got) == 5 and all(b["tgt"].shape == (2, 3, 32, 32) for b in got)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_saved_position_gives_identical_sequence(uneven, workers):
    a, b = uneven
    spec = spec_for([a, b], batch_size=2)
    ref = StreamingLoader(spec, 1, 2, workers=workers)
    want = keys(ref, 12)

    first = StreamingLoader(spec, 1, 2, workers=workers)
    head = keys(first, 7)  # odd count: the next batch comes from logical worker 1
    state = json.loads(json.dumps(first.state_dict()))  # survives JSON, as in a checkpoint
    second = StreamingLoader(spec, 1, 2, workers=workers)
    second.load_state_dict(state)
    assert head + keys(second, 5) == want


def test_resume_refuses_a_different_partition(uneven):
    a, _ = uneven
    state = StreamingLoader(spec_for([a]), 0, 2, workers=2).state_dict()
    with pytest.raises(ValueError, match="same --workers"):
        StreamingLoader(spec_for([a]), 0, 2, workers=1).load_state_dict(state)


def test_pair_selection_keeps_only_that_pair(uneven):
    a, b = uneven
    loader = StreamingLoader(spec_for([a, b], pair="cross"), 0, 1, workers=0)
    got = keys(loader, 4)
    assert set(got) == {"test-000100-0", "test-000101-0"}
    assert loader.filtered >= 13


def test_damaged_shards_and_images_are_skipped_and_counted(tmp_path):
    d = write_dataset(tmp_path / "d", [4, 6, 3], size=32, corrupt={1: "truncate", 2: "badimage"})
    spec = spec_for([d])
    readable = sum(1 for r in iter_tar(str(d / "shards/000001.tar"), count=6) if r is not None)
    assert readable < 6  # the fixture really did cut the shard
    lost = (6 - readable) + 1  # + the bad jpeg
    loader = StreamingLoader(spec, 0, 1, workers=0)
    got = keys(loader, 13 - lost + 1)  # one epoch's good samples, then the first of the next epoch
    assert len(set(got[:-1])) == 13 - lost and "test-000010-0" not in got  # 10 = the bad jpeg
    (pos,) = loader.positions
    assert pos.epoch == 1
    # every consumed position is either emitted or counted as skipped: the whole first epoch's
    # damage is counted, plus whatever damage preceded the first good sample of epoch 1
    assert 13 + pos.offset == len(got) + loader.skipped
    assert loader.skipped >= lost

    # with loader workers the damage is counted too, and training data still flows
    loader = StreamingLoader(spec, 0, 1, workers=2)
    assert len(keys(loader, 2 * 13)) == 26 and loader.skipped >= lost


def test_missing_manifest_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        read_manifests([str(tmp_path)])


def test_buckets_must_be_multiples_of_16(uneven):
    with pytest.raises(ValueError, match="multiples of 16"):
        spec_for([uneven[0]], buckets=[(30, 32)])


def test_an_epoch_streams_each_shard_once_in_the_per_block_order(uneven, monkeypatch):
    from dynaip.train import data, shard_integrity

    a, _ = uneven
    spec = spec_for([a], shuffle_block=2)
    consumers = 2
    k = range_length(spec.total, consumers)
    opens: list[str] = []
    real_open = shard_integrity.ShardGuard.open
    monkeypatch.setattr(shard_integrity.ShardGuard, "open", lambda g: opens.append(g.url) or real_open(g))
    for c in range(consumers):
        pos = WorkerPosition()
        got = [s.key for s in itertools.islice(data.consumer_samples(spec, c, consumers, pos), 2 * k)]
        for epoch in (0, 1):  # the reference: each block read on its own, as the reader once did
            shards, starts = data.epoch_order(spec, epoch)
            want = []
            for b0 in range(0, k, spec.shuffle_block):
                blen = min(spec.shuffle_block, k - b0)
                raws = list(data.iter_positions(shards, starts, c * k + b0, c * k + b0 + blen))
                want += [raws[j]["__key__"].decode() for j in data.block_permutation(spec, epoch, c, b0 // 2, blen)]
            assert got[epoch * k : (epoch + 1) * k] == want
        opens.clear()  # verified by now: an epoch opens each shard its range touches once
        list(itertools.islice(data.consumer_samples(spec, c, consumers, pos), k))
        shards, starts = data.epoch_order(spec, pos.epoch)
        runs = [int(np.searchsorted(starts, p % spec.total, side="right") - 1) for p in range(c * k, c * k + k)]
        segments = [s for i, s in enumerate(runs) if i == 0 or s != runs[i - 1]]
        assert opens == [shards[s].url for s in segments]
    shard_integrity.reset()
