"""Every loader reads its model as released, quirks included, and refuses malformed forms in one line.

The tiny set (``dynaip tiny-checkpoints``) is written in the release forms, so these tests and every
other test that loads a model go through the same path as the real files (README.md, "Using real
checkpoints").
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dynaip.models import AestheticPaths, CheckpointError, ModelsConfig


def _one_line(exc: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# ---- FLUX ------------------------------------------------------------------------------------------


def test_flux_tiny_folder_is_split_in_safetensors_shards_like_flux_dev(tiny_models):
    flux = Path(tiny_models.flux)
    for part, stem in (
        ("transformer", "diffusion_pytorch_model"),
        ("text_encoder_2", "model"),
    ):
        index = json.loads((flux / part / f"{stem}.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 2 and all((flux / part / s).is_file() for s in shards)
        assert not (flux / part / f"{stem}.safetensors").exists()
        assert {k for s in shards for k in load_file(flux / part / s)} == set(index["weight_map"])
    assert (flux / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (flux / "text_encoder" / "model.safetensors").is_file()


# ---- Grounding DINO --------------------------------------------------------------------------------


def test_grounding_dino_tiny_checkpoint_has_the_release_wrapper_prefixes_and_extras(
    tiny_models,
):
    raw = torch.load(tiny_models.grounding_dino.checkpoint, map_location="cpu", weights_only=True)
    assert list(raw) == ["model"]
    keys = list(raw["model"])
    assert all(k.startswith("module.") for k in keys)
    for extra in (
        "module.label_enc.weight",
        "module.bert.embeddings.position_ids",
        "module.bert.pooler.dense.weight",
    ):
        assert extra in keys
    assert raw["model"]["module.bert.embeddings.position_ids"].dtype == torch.int64


def test_grounding_dino_release_form_loads_and_any_other_extra_key_fails_in_one_line(tiny_models, tmp_path):
    from dynaip.models.grounding_dino import load_grounding_dino

    model = load_grounding_dino(tiny_models.grounding_dino)
    raw = torch.load(tiny_models.grounding_dino.checkpoint, map_location="cpu", weights_only=True)
    w = raw["model"]["module.transformer.enc_out_bbox_embed.layers.0.weight"]
    torch.testing.assert_close(model.state_dict()["transformer.enc_out_bbox_embed.layers.0.weight"], w)

    raw["model"]["module.some_new_head.weight"] = torch.zeros(2)
    torch.save(raw, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError) as e:
        load_grounding_dino(replace(tiny_models.grounding_dino, checkpoint=str(tmp_path / "extra.pth")))
    _one_line(e, "extra.pth", "1 unexpected (e.g. some_new_head.weight)")


def test_the_published_grounding_dino_config_reads_as_data_like_the_library_reads_it():
    """groundingdino ships the published GroundingDINO_SwinT_OGC.py (IDEA-Research/GroundingDINO,
    groundingdino/config/); read as data it gives what the library's own loader gives by running it."""
    import groundingdino
    from groundingdino.util.slconfig import SLConfig

    from dynaip.models.grounding_dino import read_config

    published = Path(groundingdino.__file__).parent / "config" / "GroundingDINO_SwinT_OGC.py"
    cfg = read_config(published)
    assert (
        cfg["num_queries"],
        cfg["enc_layers"],
        cfg["hidden_dim"],
        cfg["backbone"],
    ) == (900, 6, 256, "swin_T_224_1k")
    assert cfg["return_interm_indices"] == [1, 2, 3] and cfg["backbone_freeze_keywords"] is None
    assert cfg == SLConfig.fromfile(str(published))._cfg_dict.to_dict()  # the package's own file: trusted


@pytest.mark.parametrize(
    ("first_line", "needle"),
    [
        (
            "open(MARKER, 'w').write('ran')",
            "Line 1 is not a `name = literal` assignment (Expr)",
        ),
        (
            "import os; os.system('touch ' + MARKER)",
            "Line 1 is not a `name = literal` assignment (Import)",
        ),
        (
            "batch_size = open(MARKER, 'w').write('ran')",
            "Line 1: the value of 'batch_size' is not a literal",
        ),
        ("_base_ = ['other.py']", "Line 1: config inheritance (_base_) is not read"),
    ],
)
def test_a_grounding_dino_config_with_code_is_refused_in_one_line_and_never_run(
    tiny_models, tmp_path, first_line, needle
):
    from dynaip.models.grounding_dino import load_grounding_dino

    marker = tmp_path / "marker"
    cfg = tmp_path / "config.py"
    cfg.write_text(
        first_line.replace("MARKER", repr(str(marker))) + "\n" + Path(tiny_models.grounding_dino.config).read_text()
    )
    with pytest.raises(CheckpointError) as e:
        load_grounding_dino(replace(tiny_models.grounding_dino, config=str(cfg)))
    _one_line(e, "Grounding DINO config", str(cfg), needle)
    assert not marker.exists()


def test_a_grounding_dino_config_missing_a_key_is_one_line(tiny_models, tmp_path):
    from dynaip.models.grounding_dino import load_grounding_dino

    cfg = tmp_path / "config.py"
    text = Path(tiny_models.grounding_dino.config).read_text()
    cfg.write_text("\n".join(ln for ln in text.splitlines() if not ln.startswith("num_queries")))
    with pytest.raises(CheckpointError) as e:
        load_grounding_dino(replace(tiny_models.grounding_dino, config=str(cfg)))
    _one_line(e, "groundingdino cannot build a model from it", "num_queries")


# ---- OpenCLIP ----------------------------------------------------------------------------------------


def _clip_copy(tiny_models, tmp_path: Path, config: dict | None = None, bin_only: bool = False) -> Path:
    src = Path(tiny_models.clip_vision.path)
    out = tmp_path / "clip"
    shutil.copytree(src, out)
    if bin_only:  # open_clip's other HF weights file: a torch.save'd state dict
        torch.save(
            load_file(out / "open_clip_model.safetensors"),
            out / "open_clip_pytorch_model.bin",
        )
        (out / "open_clip_model.safetensors").unlink()
    if config is not None:
        (out / "open_clip_config.json").write_text(json.dumps(config))
    return out


def test_open_clip_hf_folder_with_either_weights_file_gives_the_same_features(tiny_models, tmp_path):
    from dynaip.models.clip_vision import load_clip_vision

    x = torch.rand(2, 3, 56, 56)
    ref = load_clip_vision(tiny_models.clip_vision, layers=(2, 6))(x)
    other = load_clip_vision(
        replace(
            tiny_models.clip_vision,
            path=str(_clip_copy(tiny_models, tmp_path, bin_only=True)),
        ),
        layers=(2, 6),
    )(x)
    for a, b in zip(ref, other):
        torch.testing.assert_close(a, b)


def test_open_clip_config_without_model_cfg_is_one_line(tiny_models, tmp_path):
    from dynaip.models.clip_vision import load_clip_vision

    folder = _clip_copy(tiny_models, tmp_path, config={"preprocess_cfg": {}})
    with pytest.raises(CheckpointError) as e:
        load_clip_vision(replace(tiny_models.clip_vision, path=str(folder)), layers=(2,))
    _one_line(e, "open_clip_config.json", "no 'model_cfg'")


def test_quick_gelu_has_one_source_of_truth(tiny_models, tmp_path):
    import open_clip

    from dynaip.models.clip_vision import load_open_clip

    def act(paths):
        return type(load_open_clip(paths)[0].visual.transformer.resblocks[0].mlp.gelu).__name__

    # the folder's config says quick_gelu: false; models.yaml leaving it out or agreeing is fine
    assert act(tiny_models.clip_vision) == act(replace(tiny_models.clip_vision, quick_gelu=False)) == "GELU"
    with pytest.raises(CheckpointError) as e:
        load_open_clip(replace(tiny_models.clip_vision, quick_gelu=True))
    _one_line(e, "models.yaml says quick_gelu: true but the model's own config says false")

    # a config without the key: models.yaml decides, and must say
    cfg = json.loads((Path(tiny_models.clip_vision.path) / "open_clip_config.json").read_text())
    del cfg["model_cfg"]["quick_gelu"]
    folder = _clip_copy(tiny_models, tmp_path, config=cfg)
    assert act(replace(tiny_models.clip_vision, path=str(folder), quick_gelu=True)) == "QuickGELU"
    with pytest.raises(CheckpointError) as e:
        load_open_clip(replace(tiny_models.clip_vision, path=str(folder)))
    _one_line(e, "does not say whether the tower uses QuickGELU", "clip_vision.quick_gelu")

    # a bare weights file: model_name's config is the architecture's, -quickgelu names state it
    weights = tmp_path / "vit.safetensors"
    weights.write_bytes(b"x")
    assert open_clip.get_model_config("ViT-L-14-336-quickgelu")["quick_gelu"] is True
    with pytest.raises(CheckpointError) as e:
        load_open_clip(
            replace(
                tiny_models.clip_vision,
                path=str(weights),
                model_name="ViT-L-14-336-quickgelu",
                quick_gelu=False,
            )
        )
    _one_line(e, "model_name ViT-L-14-336-quickgelu", "models.yaml says quick_gelu: false")


def test_openai_torchscript_file_is_refused_in_one_line_naming_the_open_clip_folder(tiny_models, tmp_path):
    """OpenAI's ViT-L-14-336px.pt is a TorchScript archive; ``torch.jit.load`` would compile and run the
    code stored in it, so it is refused before anything in it is read."""
    from dynaip.models.clip_vision import load_open_clip
    from dynaip.models.sam import load_sam

    ts = tmp_path / "ViT-L-14-336px.pt"
    with pytest.warns(FutureWarning):  # torch deprecates TorchScript, which is why it is only refused here
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(ts))
    with pytest.raises(CheckpointError) as e:
        load_open_clip(
            replace(
                tiny_models.clip_vision,
                path=str(ts),
                model_name="ViT-L-14-336",
                quick_gelu=True,
            )
        )
    _one_line(e, str(ts), "TorchScript archive", "timm/vit_large_patch14_clip_336.openai")
    with pytest.raises(CheckpointError) as e:  # any loader: TorchScript where a state dict is expected
        load_sam(replace(tiny_models.sam, checkpoint=str(ts)))
    _one_line(e, "SAM (tiny)", "TorchScript archive, not a state dict")


# ---- SAM ----------------------------------------------------------------------------------------------


def test_sam_tiny_checkpoint_is_a_flat_state_dict_like_the_release(tiny_models):
    raw = torch.load(tiny_models.sam.checkpoint, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in raw.values())
    assert "image_encoder.patch_embed.proj.weight" in raw and "mask_decoder.iou_token.weight" in raw


# ---- aesthetic heads ----------------------------------------------------------------------------------


def _sequential_head(tmp_path: Path, name: str, modules: list[torch.nn.Module]) -> tuple[Path, torch.nn.Sequential]:
    seq = torch.nn.Sequential(*modules).eval()
    path = tmp_path / name
    torch.save({f"layers.{k}": v for k, v in seq.state_dict().items()}, path)
    return path, seq


def test_aesthetic_relu_head_is_detected_from_its_published_layout(tmp_path):
    """ava+logos-l14-reluMSE.pth: Linear, ReLU, Dropout ×3, Linear, ReLU, Linear (indices 0, 3, 6, 9, 11)."""
    from dynaip.models.aesthetic import load_aesthetic_head

    nn = torch.nn
    path, seq = _sequential_head(
        tmp_path,
        "relu.pth",
        [
            nn.Linear(8, 16),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(16, 8),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(8, 4),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(4, 2),
            nn.ReLU(),
            nn.Linear(2, 1),
        ],
    )
    head = load_aesthetic_head(path)
    e = torch.randn(5, 8)
    assert head.activation == "relu"
    torch.testing.assert_close(head(e), seq(e / e.norm(dim=1, keepdim=True))[:, 0])
    with pytest.raises(CheckpointError) as err:
        load_aesthetic_head(path, activation="none")
    _one_line(err, "[0, 3, 6, 9, 11] are the 'relu' layout", "aesthetic.activation: none")


def test_aesthetic_head_of_another_layout_needs_its_activation_declared(tiny_models, tmp_path):
    from test_curation_quality import composed, recipe, texture

    from dynaip.models.aesthetic import load_aesthetic_head
    from pipeline.stages.quality import QualityStage

    nn = torch.nn
    path, seq = _sequential_head(tmp_path, "other.pth", [nn.Linear(32, 6), nn.ReLU(), nn.Linear(6, 1)])
    with pytest.raises(CheckpointError) as err:
        load_aesthetic_head(path)
    _one_line(err, "[0, 2] are not a published layout", "declare aesthetic.activation")

    # declared in models.yaml, the quality stage scores with it
    models = ModelsConfig.from_dict(
        {
            "flux": "f",
            "clip_vision": tiny_models.clip_vision.path,
            "aesthetic": {"path": str(path), "activation": "relu"},
        }
    )
    assert models.aesthetic == AestheticPaths(path=str(path), activation="relu")
    models = replace(models, clip_vision=tiny_models.clip_vision)
    mask = np.zeros((96, 96), bool)
    mask[10:90, 10:90] = True
    items = [composed(texture(seed=s), mask, rid=f"i{s}") for s in range(2)]
    stage = QualityStage(recipe(), models)
    stage(items)
    emb = stage.scorer.embeddings([it.target.image for it in items])
    with torch.no_grad():
        expect = seq(emb / emb.norm(dim=1, keepdim=True))[:, 0]
    assert [it.quality["aesthetic"] for it in items] == [round(float(v), 4) for v in expect]
    with pytest.raises(CheckpointError) as err:
        load_aesthetic_head(path, activation="gelu")
    _one_line(err, "aesthetic.activation is 'gelu'; use one of none, relu")
    with pytest.raises(ValueError) as err:  # and models.yaml refuses it when read
        ModelsConfig.from_dict(
            {
                "flux": "f",
                "clip_vision": "c",
                "aesthetic": {"path": "h.pth", "activation": "gelu"},
            }
        )
    _one_line(err, "'aesthetic.activation' = 'gelu': use one of none, relu")


def test_tiny_models_yaml_leaves_arch_flags_to_the_checkpoints_own_config(
    tiny_models_yaml,
):
    raw = tiny_models_yaml.read_text()
    assert "quick_gelu" not in raw and "activation" not in raw
    cfg = json.loads((tiny_models_yaml.parent / "clip" / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["quick_gelu"] is False and "preprocess_cfg" in cfg


def test_a_grounding_dino_bert_folder_without_weights_is_one_line(tiny_models, tmp_path):
    from dynaip.models.grounding_dino import load_grounding_dino

    bert = tmp_path / "bert"
    shutil.copytree(tiny_models.grounding_dino.bert, bert)
    (bert / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load_grounding_dino(replace(tiny_models.grounding_dino, bert=str(bert)))
    _one_line(
        e,
        "Grounding DINO BERT",
        str(bert),
        "Copy the whole bert-base-uncased directory",
    )
