"""Shards are checked against the manifest's sha256 while they stream (dynaip/train/shard_integrity.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from dynaip.train import shard_integrity
from dynaip.train.data import StreamingLoader, StreamSpec, iter_tar, read_manifests
from dynaip.train.shard_integrity import ShardIntegrityError

from train_fixtures import write_dataset


@pytest.fixture(autouse=True)
def _fresh_verdicts():
    shard_integrity.reset()
    yield
    shard_integrity.reset()


def _spec(d: Path, policy: str = "error") -> StreamSpec:
    return StreamSpec(
        shards=read_manifests([str(d)]),
        batch_size=1,
        shuffle_block=3,
        ref_size=28,
        buckets=[(32, 32)],
        on_corrupt_shard=policy,
    )


def _flip_a_byte(shard: Path) -> None:
    """Same size, same tar structure, different bytes: only the hash can tell."""
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))


def _keys(loader: StreamingLoader, n: int) -> list[str]:
    return [k for b in itertools.islice(iter(loader), n) for k in b["key"]]


def test_a_good_shard_verifies_once_and_then_streams(tmp_path):
    d = write_dataset(tmp_path / "d", [3], size=32)
    (shard,) = read_manifests([str(d)])
    assert [r["__key__"] for r in iter_tar(shard.url, count=1, sha256=shard.sha256)] == [b"test-000000-0"]
    assert shard_integrity._VERDICTS[(shard.url, shard.sha256)] is True  # whole shard hashed on the first open
    assert len(list(iter_tar(shard.url, skip=1, count=2, sha256=shard.sha256))) == 2


def test_hashing_reader_hashes_every_byte_once_through_forward_seeks(tmp_path):
    import hashlib
    import io

    data = bytes(range(256)) * 40
    r = shard_integrity.HashingReader(io.BytesIO(data))
    r.read(10)
    r.seek(5000)  # forward: read through
    r.read(100)
    r.drain()
    assert r.ordered and r.h.hexdigest() == hashlib.sha256(data).hexdigest()


def test_changed_bytes_are_an_error_naming_the_shard_and_the_fix(tmp_path):
    d = write_dataset(tmp_path / "d", [3, 3], size=32)
    _flip_a_byte(d / "shards" / "000001.tar")
    with pytest.raises(ShardIntegrityError, match=r"000001\.tar has sha256 .*data\.on_corrupt_shard: skip"):
        _keys(StreamingLoader(_spec(d), 0, 1, workers=0), 12)


def test_changed_bytes_with_skip_drop_the_shard_and_count_it(tmp_path):
    d = write_dataset(tmp_path / "d", [3, 3], size=32)
    _flip_a_byte(d / "shards" / "000001.tar")
    loader = StreamingLoader(_spec(d, "skip"), 0, 1, workers=0)
    got = _keys(loader, 9)  # three epochs of the good shard
    assert set(got) == {"test-000000-0", "test-000001-0", "test-000002-0"}  # nothing of shard 1 (keys 3-5)
    assert loader.corrupt_shards == 1  # counted once per process, not once per block
    assert loader.skipped >= 3


def test_with_loader_workers_the_error_reaches_the_trainer(tmp_path):
    d = write_dataset(tmp_path / "d", [2, 2], size=32)
    _flip_a_byte(d / "shards" / "000000.tar")
    with pytest.raises(ShardIntegrityError, match=r"000000\.tar has sha256"):
        _keys(StreamingLoader(_spec(d), 0, 1, workers=1, mp_context="spawn"), 8)


def test_missing_shard_is_an_error_by_default_and_counted_with_skip(tmp_path):
    d = write_dataset(tmp_path / "d", [2, 2], size=32)
    (d / "shards" / "000000.tar").unlink()
    with pytest.raises(ShardIntegrityError, match=r"000000\.tar listed in the manifest does not exist"):
        _keys(StreamingLoader(_spec(d), 0, 1, workers=0), 4)
    shard_integrity.reset()
    loader = StreamingLoader(_spec(d, "skip"), 0, 1, workers=0)
    assert set(_keys(loader, 4)) == {"test-000002-0", "test-000003-0"}
    assert loader.corrupt_shards == 1


def test_truncated_shard_matching_its_hash_keeps_the_old_skip_behaviour(tmp_path):
    # the manifest hash of a truncated tar (written after the damage) matches: tar-level damage is
    # still skipped and counted, not an integrity error
    d = write_dataset(tmp_path / "d", [4, 6], size=32, corrupt={1: "truncate"})
    loader = StreamingLoader(_spec(d), 0, 1, workers=0)
    assert len(_keys(loader, 5)) == 5 and loader.skipped > 0 and loader.corrupt_shards == 0


def test_config_data_section_is_typed():
    from dynaip.train.config import TrainConfig

    cfg = TrainConfig.from_dict({"stages": [{"name": "a", "steps": 1}], "data": {"on_corrupt_shard": "skip"}})
    assert cfg.data.on_corrupt_shard == "skip"
    assert TrainConfig.from_dict(cfg.to_dict()).data.on_corrupt_shard == "skip"  # round trip (RunSpec)
    assert TrainConfig(stages=[{"name": "a", "steps": 1}]).data.on_corrupt_shard == "error"
    with pytest.raises(ValueError, match=r"unknown key 'data\.on_corupt_shard'; did you mean 'on_corrupt_shard'\?"):
        TrainConfig.from_dict({"stages": [{"name": "a", "steps": 1}], "data": {"on_corupt_shard": "skip"}})
    with pytest.raises(ValueError, match="choose one of"):
        TrainConfig.from_dict({"stages": [{"name": "a", "steps": 1}], "data": {"on_corrupt_shard": "warn"}})


def test_the_error_inside_a_ray_failure_is_cut_to_its_own_line():
    from dynaip.train.trainer import _integrity_line

    worker = RuntimeError(
        'Traceback (most recent call last):\n  File "x.py", line 1\n'
        "dynaip.train.shard_integrity.ShardIntegrityError: shard /d/000001.tar has sha256 ab…; "
        "restore it\n"
    )
    try:
        try:
            raise worker
        except RuntimeError as e:
            raise Exception("Training failed: a worker group failed") from e
    except Exception as wrapped:
        assert _integrity_line(wrapped) == "shard /d/000001.tar has sha256 ab…; restore it"
    assert _integrity_line(RuntimeError("out of memory")) is None
