"""Every YAML config shipped in the repository loads through the one loader (dynaip/configs.py), and a
misspelt key in each kind of file is refused in one line naming the nearest valid key
(docs/ARCHITECTURE.md, "Configuration").

The shipped files are globbed, so a recipe or config added later is covered without touching this
file; a recipe whose source kind has no reader module yet is skipped with that reason.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from pathlib import Path

import pytest
import yaml

from dynaip.configs import ConfigError, build, nearest
from dynaip.eval.judge import EvalConfig
from dynaip.models.config import ModelsConfig
from dynaip.train.config import TrainConfig
from pipeline.recipe import SOURCE_KINDS, Recipe, source_options_class

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "manifests").glob("*.yaml"))
JOB_CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def kind_of_job_config(raw: dict) -> str:
    """jobs/configs holds training configs (``stages``) and eval judge configs (``protocol``/``judges``)."""
    if "stages" in raw:
        return "train"
    if "protocol" in raw or "judges" in raw:
        return "judges"
    raise AssertionError(f"unrecognised config shape with keys {sorted(raw)}: teach kind_of_job_config about it")


def load_job_config(path: Path):
    kind = kind_of_job_config(yaml.safe_load(path.read_text()) or {})
    return TrainConfig.from_yaml(path) if kind == "train" else EvalConfig.from_yaml(path)


def _has_reader(kind: str) -> bool:
    sources = REPO / "pipeline" / "sources"
    return (sources / f"{kind}.py").is_file() or (sources / kind / "__init__.py").is_file()  # a module or a package


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    kind = (yaml.safe_load(path.read_text()).get("source") or {}).get("kind")
    if not _has_reader(str(kind)):
        pytest.skip(f"source kind {kind!r} has no reader module pipeline/sources/{kind}.py yet")
    recipe = Recipe.from_yaml(path)
    assert recipe.source.kind == kind
    # the reader reads the same options the loader accepted
    assert dataclasses.is_dataclass(source_options_class(kind))


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_job_config_loads(path):
    cfg = load_job_config(path)
    if isinstance(cfg, TrainConfig):
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # what workers and checkpoints carry round-trips


def test_models_yaml_written_by_tiny_checkpoints_loads(tiny_models_yaml):
    cfg = ModelsConfig.from_yaml(tiny_models_yaml)
    assert Path(cfg.flux).is_absolute() and cfg.source == str(tiny_models_yaml)


def _doc_yaml_blocks() -> list[tuple[str, str]]:
    blocks = []
    for doc in DOCS:
        for i, text in enumerate(re.findall(r"```yaml\n(.*?)```", doc.read_text(), flags=re.S)):
            blocks.append((f"{doc.relative_to(REPO)}#{i}", text))
    return blocks


@pytest.mark.parametrize("name, text", _doc_yaml_blocks(), ids=[n for n, _ in _doc_yaml_blocks()])
def test_yaml_examples_in_the_docs_load(name, text, tmp_path):
    """Whole-file examples (a models.yaml, a recipe, a training or judge config) load as written; a
    fragment (one section shown alone) is checked against that section's dataclass."""
    raw = yaml.safe_load(text)
    path = tmp_path / "example.yaml"
    if "flux" in raw:
        path.write_text(text)
        ModelsConfig.from_yaml(path)
    elif "source" in raw:
        path.write_text(text)
        Recipe.from_yaml(path)
    elif "stages" in raw or "protocol" in raw:
        path.write_text(text)
        if "stages" in raw and set(raw) == {"stages"}:
            TrainConfig.from_dict(raw)
        else:
            load_job_config(path)
    else:
        fields = {f.name: f.type for f in dataclasses.fields(ModelsConfig)}
        if set(raw) <= set(fields):  # a models.yaml section shown alone
            full = {"flux": "/f", "clip_vision": "/c", **raw}
            ModelsConfig.from_dict(full, base=tmp_path)
        else:
            pytest.skip(f"{name}: a fragment of no known config (keys {sorted(raw)})")


# ------------------------------------------------------------------------------------ misspelt keys


def _one_line_naming(exc: pytest.ExceptionInfo, key_path: str, near: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    assert f"unknown key '{key_path}'" in msg and f"did you mean '{near}'?" in msg, msg


def test_misspelt_recipe_key_names_the_nearest(tmp_path):
    path = tmp_path / "r.yaml"
    raw = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    raw["shards"]["inputs_per_shrad"] = raw["shards"].pop("inputs_per_shard")
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as exc:
        Recipe.from_yaml(path)
    _one_line_naming(exc, "shards.inputs_per_shrad", "inputs_per_shard")
    assert str(path) in str(exc.value)
    raw = {"source": {"kind": "folder", "root": "/x"}, "seeed": 1}
    with pytest.raises(ConfigError) as exc:
        Recipe.from_dict(raw)
    _one_line_naming(exc, "seeed", "seed")


def _misspell(name: str) -> str:
    """A typo of ``name`` that is not another option: the last two letters swapped, or a letter doubled."""
    return name[:-2] + name[-1] + name[-2] if name[-1] != name[-2] else name + name[-1]


@pytest.mark.parametrize("kind", [k for k in SOURCE_KINDS if _has_reader(k)])
def test_misspelt_source_option_names_the_nearest(kind):
    """For each source kind: every reader declares its ``Options``, and a typo of one of them fails
    in one line naming it — when the recipe loads and when the reader is handed a mapping."""
    from pipeline.sources import get_reader

    options = [f.name for f in dataclasses.fields(source_options_class(kind))]
    assert options, f"pipeline/sources/{kind}.py: Options lists no option"
    name = max(options, key=len)  # long names have one unambiguous nearest neighbour
    typo = _misspell(name)
    assert nearest(typo, options) == name
    with pytest.raises(ConfigError) as exc:
        Recipe.from_dict({"source": {"kind": kind, "root": "/nonexistent", typo: 1}})
    _one_line_naming(exc, f"source.{typo}", name)
    with pytest.raises(ConfigError) as exc:
        get_reader(kind)({"root": "/nonexistent", typo: 1})
    _one_line_naming(exc, f"source.{typo}", name)


def test_the_sa1b_example_of_the_issue():
    with pytest.raises(ConfigError, match=r"unknown key 'source\.top_kk'; did you mean 'top_k'\?"):
        Recipe.from_dict({"source": {"kind": "sa1b", "root": "/x", "top_kk": 4}})


def test_source_option_types_are_checked_at_load():
    with pytest.raises(ConfigError, match=r"'source\.top_k' = 'many': expected an integer"):
        Recipe.from_dict({"source": {"kind": "sa1b", "root": "/x", "top_k": "many"}})
    # a null for an option that takes none still means its default, as readers always read it
    from pipeline.sources import sa1b
    from pipeline.sources.common import read_options

    recipe = Recipe.from_dict({"source": {"kind": "sa1b", "root": "/x", "top_k": None}})
    assert read_options(recipe.source, sa1b.Options, "sa1b").top_k == 16
    assert recipe.source.options == {"top_k": None}  # kept as written: recipe_hash is unchanged


def test_misspelt_train_config_key_names_the_nearest(tmp_path):
    raw = yaml.safe_load((REPO / "jobs" / "configs" / "tiny.yaml").read_text())
    raw["stages"][1]["filters"] = {"min_sharpnes": 1.0}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as exc:
        TrainConfig.from_yaml(path)
    _one_line_naming(exc, "stages[1].filters.min_sharpnes", "min_sharpness")
    assert str(path) in str(exc.value)
    raw = yaml.safe_load((REPO / "jobs" / "configs" / "tiny.yaml").read_text())
    raw["data"] = {"on_corrupt_shrad": "skip"}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as exc:
        TrainConfig.from_yaml(path)
    _one_line_naming(exc, "data.on_corrupt_shrad", "on_corrupt_shard")


def test_misspelt_models_yaml_key_names_the_nearest(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("flux: f\nclip_vision: {path: c, quick_gelus: true}\n")
    with pytest.raises(ConfigError) as exc:
        ModelsConfig.from_yaml(path)
    _one_line_naming(exc, "clip_vision.quick_gelus", "quick_gelu")
    path.write_text("flux: f\nclip_vision: c\ngrounding_dnio: {config: a, checkpoint: b, bert: c}\n")
    with pytest.raises(ConfigError) as exc:
        ModelsConfig.from_yaml(path)
    _one_line_naming(exc, "grounding_dnio", "grounding_dino")


def test_misspelt_judge_config_key_names_the_nearest(tmp_path):
    path = tmp_path / "judges.yaml"
    path.write_text("protocol: open\njudges:\n  - {name: a, base_url: 'http://x/v1', model: m, timeout: 10}\n")
    with pytest.raises(ConfigError) as exc:
        EvalConfig.from_yaml(path)
    _one_line_naming(exc, "judges[0].timeout", "timeout_s")


# ------------------------------------------------------------------------------------ the loader itself


@dataclasses.dataclass(kw_only=True)
class _Inner:
    SHORTHAND = "path"
    path: str = dataclasses.field(metadata={"path": True})
    size: tuple[int, ...] = (1, 2)


class _Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass(kw_only=True)
class _Outer:
    RETIRED_KEYS = {"old": "was renamed; use 'new'"}
    new: int = 0
    inner: _Inner | None = None
    items: list[_Inner] = dataclasses.field(default_factory=list)
    names: str | list[str] = "a"
    colour: _Colour = _Colour.RED
    pair: tuple[int, str] = (0, "")
    weights: dict[str, float] = dataclasses.field(default_factory=dict)


def test_loader_hooks(tmp_path):
    got = build(_Outer, {"inner": "x", "items": [{"path": "/abs", "size": [3]}], "names": ["a", "b"]}, base=tmp_path)
    assert got.inner.path == str(tmp_path / "x") and got.items[0] == _Inner(path="/abs", size=(3,))
    assert got.names == ["a", "b"] and build(_Outer, {"names": "c"}).names == "c"
    assert build(_Outer, {"inner": "s3://b/k"}, base=tmp_path).inner.path == "s3://b/k"  # URLs stay as written
    with pytest.raises(ConfigError, match=r"^f\.yaml: old was renamed; use 'new'$"):
        build(_Outer, {"old": 1}, where="f.yaml")
    with pytest.raises(ConfigError, match=r"'items\[0\]' needs the key 'items\[0\]\.path'"):
        build(_Outer, {"items": [{"size": [1]}]})
    with pytest.raises(ConfigError, match=r"'names' = 3: expected a string or a list"):
        build(_Outer, {"names": 3})
    with pytest.raises(ConfigError, match=r"'new' = True: expected an integer"):
        build(_Outer, {"new": True})
    typed = build(_Outer, {"colour": "red", "pair": [1, "x"], "weights": {"a": 2}})
    assert (typed.colour, typed.pair, typed.weights) == (_Colour.RED, (1, "x"), {"a": 2.0})
    with pytest.raises(ConfigError, match=r"'colour' = 'blue': use one of red"):
        build(_Outer, {"colour": "blue"})
    with pytest.raises(ConfigError, match=r"'pair' = \[1\]: expected a list of 2"):
        build(_Outer, {"pair": [1]})
    with pytest.raises(ConfigError, match=r"'weights\.a' = 'x': expected a number"):
        build(_Outer, {"weights": {"a": "x"}})


# ------------------------------------------------------------------------------------ training config layout


def test_train_config_sections_and_the_deprecated_flat_layout(caplog):
    from dynaip.train.config import FLAT_KEYS, get_key

    nested = yaml.safe_load((REPO / "jobs" / "configs" / "paper.yaml").read_text())
    assert set(nested) <= {
        "stages",
        "seed",
        "max_steps",
        "model",
        "data",
        "optim",
        "loss",
        "parallel",
        "checkpoints",
        "logging",
        "fidelity",
    }
    # keys newer than the flat layout (the fidelity section, checkpoints.keep_best) never had a flat form
    nested = {k: v for k, v in nested.items() if k != "fidelity"}
    nested["checkpoints"] = {k: v for k, v in nested["checkpoints"].items() if k != "keep_best"}
    flat = {"stages": nested["stages"], "seed": nested["seed"]}
    for key in FLAT_KEYS:
        if get_key(nested, key) is not None:
            flat[key] = get_key(nested, key)
    with caplog.at_level("WARNING", logger="dynaip.train.config"):
        old = TrainConfig.from_dict(flat, where="old.yaml")
    assert old == TrainConfig.from_dict(nested)  # configs written before the sections still mean the same run
    warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and "lr → optim.lr" in warned[0]
    assert "checkpoint_every → checkpoints.every" in warned[0] and warned[0].startswith("old.yaml:")
    with pytest.raises(ConfigError, match=r"'lr' is given flat and as 'optim\.lr'; keep only 'optim\.lr'"):
        TrainConfig.from_dict({**nested, "lr": 1.0})
    with pytest.raises(ConfigError) as exc:
        TrainConfig.from_dict({**nested, "optim": {**nested["optim"], "lrr": 1.0}})
    _one_line_naming(exc, "optim.lrr", "lr")


def test_loss_settings_are_the_loss_section():
    """The step reads the config's ``loss`` section itself: no second declaration of its fields."""
    from dynaip.train import step
    from dynaip.train.config import LossConfig

    assert step.LossConfig is LossConfig and not hasattr(step, "LossSettings")
    cfg = TrainConfig.from_yaml(REPO / "jobs" / "configs" / "paper.yaml")
    assert isinstance(cfg.loss, LossConfig) and cfg.loss.drop_both == 0.05


def test_sampling_defaults_are_defined_once():
    from dynaip.eval.generate import GenerateSettings
    from dynaip.models import sampling
    from dynaip.train.config import LoggingConfig

    assert (sampling.STEPS, sampling.GUIDANCE, sampling.SIZE) == (28, 3.5, 1024)
    logging_defaults = LoggingConfig()
    assert (logging_defaults.sample_steps, logging_defaults.sample_guidance) == (sampling.STEPS, sampling.GUIDANCE)
    gen = GenerateSettings()
    assert (gen.steps, gen.guidance, gen.height, gen.width) == (28, 3.5, 1024, 1024)


def test_retired_executor_keys_name_what_replaced_them(tmp_path):
    """detection and segmentation no longer have actor pools of their own (every stage runs inside the
    chunk workers): a recipe that still sizes them is refused in one line naming the keys to use."""
    raw = yaml.safe_load((REPO / "manifests" / "sa1b.yaml").read_text())
    for key in ("detect_actors", "segment_actors"):
        bad = tmp_path / f"{key}.yaml"
        bad.write_text(yaml.safe_dump({**raw, "executor": {**raw["executor"], key: 2}}))
        with pytest.raises(ConfigError) as e:
            Recipe.from_yaml(bad)
        assert f"executor.{key} is gone" in str(e.value) and "executor.workers" in str(e.value)
        assert "\n" not in str(e.value)


def test_the_stage_list_is_written_once():
    """build_stages is STAGE_ORDER instantiated, in that order (no second list to drift)."""
    from pipeline.stages import STAGE_ORDER, build_stages

    stages = build_stages(Recipe.from_yaml(REPO / "manifests" / "demo.yaml"), None)
    assert [type(s) for s in stages] == list(STAGE_ORDER)
    assert [s.name for s in stages] == [
        "generate",
        "decode",
        "detect",
        "filter",
        "segment",
        "compose",
        "quality",
        "consistency",
        "decontamination",
        "caption",
        "pair",
    ]
