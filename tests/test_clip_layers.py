"""The adapter's config is the one source of truth for its CLIP layers, in the order it names them."""

from __future__ import annotations

import pytest
import torch

from dynaip import DynaIPAdapter, DynaIPConfig


def _direct(tower, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """Hidden state of one 1-based layer, asked for alone."""
    x = tower.visual._embeds(pixels)
    _, (h,) = tower.visual.transformer.forward_intermediates(x, indices=[layer - 1], stop_early=True)
    return h


@pytest.mark.parametrize("layers", [(5, 1, 3), (1, 3, 6), (6, 2)])
def test_each_expert_gets_the_hidden_state_of_the_layer_it_names(tiny_models, layers):
    from dynaip.train.step import clip_hidden_states, load_frozen

    frozen = load_frozen(tiny_models, torch.device("cpu"), torch.float32, clip_layers=layers)
    assert frozen.clip.layers == layers
    ref = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    hidden = clip_hidden_states(frozen, ref)
    adapter = DynaIPAdapter(DynaIPConfig.tiny(clip_layers=layers)).eval()
    seen: list[torch.Tensor] = []
    hooks = [e.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for e in adapter.hmoe.experts]
    adapter.encode_reference(hidden)
    for h in hooks:
        h.remove()
    pixels = frozen.clip.normalize(ref.float() / 255)
    assert len(seen) == len(layers)
    for i, layer in enumerate(layers):  # expert i (the i-th named layer) saw exactly that layer
        torch.testing.assert_close(seen[i], _direct(frozen.clip, pixels, layer), rtol=0, atol=0)


def test_bad_layer_lists_are_refused_in_one_line(tiny_models):
    from dynaip.models.clip_vision import load_clip_vision

    with pytest.raises(ValueError, match=r"CLIP layers \[9\] out of range: this tower has layers 1..6"):
        load_clip_vision(tiny_models.clip_vision, (2, 9))
    with pytest.raises(ValueError, match="without repeats"):
        DynaIPConfig.tiny(clip_layers=(2, 2, 4))


def test_training_takes_the_layers_from_the_adapter_config(tiny_models_yaml, tmp_path):
    """A layer ablation in the training config reaches the CLIP tower (not models.yaml's 2/4/6)."""
    import json

    import yaml

    from dynaip.train.cli import main
    from dynaip.train.config import set_keys
    from train_fixtures import write_dataset

    data = write_dataset(tmp_path / "d", [2], size=64)
    cfg = set_keys(
        {},
        **{
            "adapter_preset": "tiny",
            "adapter": {"clip_layers": [5, 1, 3]},
            "stages": [{"name": "a", "steps": 1}],
            "global_batch_size": 2,
            "workers": 1,
            "data_workers": 0,
            "buckets": [[64, 64]],
            "max_sequence_length": 16,
            "eval_every": 0,
            "sample_every": 0,
            "checkpoint_every": 0,
        },
    )
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert (
        main(
            [
                "--config",
                str(tmp_path / "c.yaml"),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "run"),
                "--models",
                str(tiny_models_yaml),
                "--local",
            ]
        )
        == 0
    )
    start = next(
        json.loads(l)
        for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if json.loads(l).get("event") == "start"
    )
    assert start["clip_layers"] == [5, 1, 3]
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-000001" / "config.json").read_text())
    assert saved["config"]["clip_layers"] == [5, 1, 3]
