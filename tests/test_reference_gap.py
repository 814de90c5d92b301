"""The adapter learns from its references (issue #12 item 5): a short run of
benchmarks/bench_reference_gap.py through the real trainer on the tiny checkpoints.

After training, the flow-matching loss of held-out samples (other crops than the trained ones) is
lower with each sample's own reference than with the references permuted within the batch, and
lower than with no reference (λ = 0), under the same noise and t.

How we checked that the test can fail (bench_reference_gap.py ``--control``, seeds 0-2, 600 steps,
numbers in BENCHMARKS.md):

* untrained adapter: own = permuted = off exactly (zero-initialised V), so both ratio asserts fail;
* training without references (``--control no-refs``: image CFG dropout 1.0, as training at λ = 0):
  the adapter stays a no-op, own = permuted = off: both fail;
* training on references that tell nothing about their targets (``--control shuffled-refs``, each
  reference cut from an unrelated photo): permuted/own 0.9999-1.0011, below PERMUTED_MARGIN, so
  the permuted assert fails. off/own still reaches ~1.55 there (a reference-independent correction),
  which is why the off assert alone would not show that the reference is used.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from train_fixtures import write_dataset

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_reference_gap.py"

# Measured at step 600 of the benchmark's runs (BENCHMARKS.md, "Reference-conditional loss gap (#12)";
# the test's run is the first 600 steps of the benchmark's, same seed), seeds 0-4:
#   permuted/own 1.0046 mean, 0.0014 std, 1.0025 min, 1.0062 max (seed 0: 1.0047);
#   off/own 1.5705 mean, 1.5495 min (seed 0: 1.5938).
# With shuffled training references (the control above) permuted/own reached at most 1.0011, so
# PERMUTED_MARGIN sits between that control's maximum and every real seed's minimum.
STEPS = 600
PERMUTED_MARGIN = 0.002
OFF_MARGIN = 0.3


def _bench():
    spec = importlib.util.spec_from_file_location("bench_reference_gap", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """The tiny models run fastest on one thread, and the suite shares two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_trained_adapter_prefers_its_own_reference_on_held_out_samples(tiny_models_yaml, tmp_path, one_thread):
    bench = _bench()
    settings = bench.GapSettings(steps=STEPS, eval_at=())
    train, held = bench.write_data(tmp_path, settings)
    r = bench.measure(0, tiny_models_yaml, train, held, tmp_path / "run", settings)
    untrained, trained = r["untrained"], r["trained"]
    print(f"held-out losses after {STEPS} steps: {trained}")  # shown with pytest -s

    # zero-initialised V: before training the reference cannot matter at all
    assert untrained["own"] == untrained["permuted"] == untrained["off"]
    # no reference is the bare frozen base, which training leaves untouched
    assert trained["off"] == pytest.approx(untrained["off"], abs=1e-6)

    assert trained["permuted_over_own"] > 1 + PERMUTED_MARGIN, trained
    assert trained["off_over_own"] > 1 + OFF_MARGIN, trained


def test_probe_differs_only_in_the_reference(tiny_models, tmp_path):
    """Own, permuted and no reference share VAE sample, noise and t: with one reference for the whole
    batch, permuting changes nothing at all; with different ones it does."""
    from dynaip import DynaIPAdapter, DynaIPConfig
    from dynaip.train.data import StreamingLoader, StreamSpec, read_manifests
    from dynaip.train.probe import reference_loss_gap
    from dynaip.train.step import LossConfig, load_frozen

    data = write_dataset(tmp_path / "d", [3], size=64)
    frozen = load_frozen(tiny_models, torch.device("cpu"), torch.float32)
    spec = StreamSpec(
        shards=read_manifests([str(data)]),
        batch_size=3,
        ref_size=frozen.clip.image_size,
        buckets=[(64, 64)],
        shuffle_block=1,
    )
    batch = next(iter(StreamingLoader(spec, 0, 1, workers=0)))
    torch.manual_seed(0)
    adapter = DynaIPAdapter(DynaIPConfig.tiny())
    for module in adapter.modules():  # a non-zero V, as after training: the reference now matters
        if hasattr(module, "to_v"):
            torch.nn.init.normal_(module.to_v.weight, std=0.5)
    adapter.attach(frozen.transformer)
    settings = LossConfig(max_sequence_length=16)

    mixed = reference_loss_gap(frozen, adapter, batch, settings, seeds=(0, 1))
    assert mixed.own != mixed.permuted and mixed.own != mixed.off
    one_ref = {**batch, "ref": batch["ref"][:1].expand_as(batch["ref"]).clone()}
    same = reference_loss_gap(frozen, adapter, one_ref, settings, seeds=(0, 1))
    assert same.own == same.permuted
    assert same.off == mixed.off  # no reference: whichever references the batch holds
    assert adapter.training  # put back in the mode it had
    with pytest.raises(ValueError, match="at least 2"):
        reference_loss_gap(frozen, adapter, {k: v[:1] for k, v in batch.items()}, settings)
