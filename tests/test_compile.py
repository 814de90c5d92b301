"""Regional compilation (``parallel.compile``, ``dynaip generate --compile``) on the tiny checkpoints.

On the CPU the blocks compile with the ``aot_eager`` backend (dynaip/models/compiled.py says why);
the comparisons are in fp32 with rtol 1e-5 / atol 1e-6 — the tolerance the GPU's inductor kernels
would need too, though on the CPU the graphs replay the same kernels and agree exactly.
"""

from __future__ import annotations

import pytest
import torch

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def step_inputs(tiny_models, tmp_path_factory):
    from dynaip.train.data import StreamingLoader, StreamSpec, read_manifests
    from dynaip.train.step import load_frozen
    from train_fixtures import write_dataset

    data = write_dataset(tmp_path_factory.mktemp("compile") / "d", [2], size=64)
    frozen = load_frozen(tiny_models, torch.device("cpu"), torch.float32)
    spec = StreamSpec(
        shards=read_manifests([str(data)]), batch_size=2, ref_size=frozen.clip.image_size, buckets=[(64, 64)]
    )
    return frozen, next(iter(StreamingLoader(spec, 0, 1, workers=0)))


def _loss(frozen, adapter, batch) -> torch.Tensor:
    from dynaip.train.step import LossConfig, training_loss

    settings = LossConfig(max_sequence_length=32, drop_text=0, drop_image=0, drop_both=0)
    torch.manual_seed(5)  # expert dropout
    return training_loss(
        frozen, adapter, adapter, batch, settings, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    )


def _loss_and_grads(frozen, adapter, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    adapter.zero_grad(set_to_none=True)
    loss = _loss(frozen, adapter, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}


def test_compiled_blocks_give_the_eager_loss_and_gradients_with_and_without_checkpointing(step_inputs):
    from torch._dynamo.utils import counters

    from dynaip import DynaIPAdapter, DynaIPConfig
    from dynaip.models.compiled import compile_blocks, compiled_blocks
    from dynaip.train.step import disable_checkpointing, enable_checkpointing

    frozen, batch = step_inputs
    tr = frozen.transformer
    torch.manual_seed(0)
    adapter = DynaIPAdapter(DynaIPConfig.tiny())
    with torch.no_grad():  # V is zero-initialised: give every CA a nonzero output so its gradient path counts
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    adapter.attach(tr)
    adapter.train()
    try:
        want_loss, want_grads = _loss_and_grads(frozen, adapter, batch)
        graphs = counters["stats"]["unique_graphs"]
        # as the trainer compiles (load_frozen(compile_blocks=True)): grad-mode calls only
        assert compile_blocks(tr, frozen.device, grad_only=True) == 3 == compiled_blocks(tr)  # 1 double + 2 single
        for keep in (None, 1, 0):  # no checkpointing; the first two blocks recomputed; diffusers' (every block)
            if keep is not None:
                disable_checkpointing(tr)
                enable_checkpointing(tr, keep)
            loss, grads = _loss_and_grads(frozen, adapter, batch)
            torch.testing.assert_close(loss, want_loss, rtol=RTOL, atol=ATOL)
            assert grads.keys() == want_grads.keys() and len(grads) > 0
            for name, g in grads.items():
                torch.testing.assert_close(g, want_grads[name], rtol=RTOL, atol=ATOL, msg=name)
        assert counters["stats"]["unique_graphs"] > graphs  # the blocks did run through dynamo
        graphs = counters["stats"]["unique_graphs"]
        with torch.no_grad():  # a validation loss: eager, nothing new traced
            loss = _loss(frozen, adapter, batch)
        torch.testing.assert_close(loss, want_loss, rtol=RTOL, atol=ATOL)
        assert counters["stats"]["unique_graphs"] == graphs
        assert compiled_blocks(tr) == 3  # undoing checkpointing kept the compiled forwards
    finally:
        disable_checkpointing(tr)
        adapter.detach(tr)


def test_generate_compile_gives_the_uncompiled_image_and_refuses_what_it_does_not_compile(tiny_models_yaml, tmp_path):
    """``dynaip generate --compile`` as shipped, against the same command without it."""
    import json

    import numpy as np
    from PIL import Image
    from skimage import data

    from dynaip import DynaIPAdapter, DynaIPConfig
    from dynaip.cli import main

    adapter = DynaIPAdapter(DynaIPConfig.tiny())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # zero-init V would make the references no-ops
        for name, p in adapter.named_parameters():
            if "to_v" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    adapter.save_pretrained(tmp_path / "adapter")
    ref = tmp_path / "cat.png"
    Image.fromarray(data.chelsea()).save(ref)
    common = [
        "generate",
        "--models",
        str(tiny_models_yaml),
        "--adapter",
        str(tmp_path / "adapter"),
        "--prompt",
        "a cat",
        "--ref",
        str(ref),
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--seed",
        "3",
        "--max-sequence-length",
        "32",
        "--device",
        "cpu",
    ]
    assert main([*common, "--out", str(tmp_path / "eager.png")]) == 0
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    assert main([*common, "--out", str(tmp_path / "compiled.png"), "--compile"]) == 0
    assert counters["stats"]["unique_graphs"] > graphs  # sampling (no grad) traced graphs of its own
    assert json.loads((tmp_path / "compiled.json").read_text())["compile"] is True
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("eager", "compiled"))
    assert a.shape == b.shape == (64, 64, 3)
    assert np.abs(a - b).max() <= 1  # fp32; one level of rounding at most
    assert main([*common, "--out", str(tmp_path / "q.png"), "--compile", "--quantize", "int8"]) != 0
