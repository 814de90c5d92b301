"""`dynaip synth`: diptychs generated with the tiny FLUX at 64 × 32 (2 steps), split, detected, segmented,
compared and written as cross pairs in both directions; every diptych accounted for; a run stopped
and re-run on a local Ray head writes the same bytes as one local run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from pipeline.records import Reject, SourceRecord
from pipeline.sources import synth

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red backpack", "  ", "a blue teapot"]


def tree(root: Path) -> dict[str, str]:
    """Every output file's digest, except the per-chunk markers (they hold wall-clock timings)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".progress" not in p.parts
    }


def tiny_recipe(tmp: Path, **consistency) -> Path:
    """manifests/synth.yaml at 64 × 32, 2 steps, a prompt list, and the loosened detector/filter settings
    of manifests/demo.yaml (the tiny random models' boxes mean nothing)."""
    raw = yaml.safe_load((REPO / "manifests" / "synth.yaml").read_text())
    raw["source"].update({"prompts": PROMPTS, "seeds_per_subject": 2, "width": 64, "height": 32, "steps": 2})
    raw["detection"].update({"box_threshold": 0.05, "text_threshold": 0.05, "image_size": 64, "max_size": 128})
    raw["filters"].update(
        {
            "min_image_side": 16,
            "min_box_area": 0.0,
            "max_box_area": 1.0,
            "max_comparable_subjects": 100,
            "max_mask_components": 1000,
            "min_largest_component": 0.0,
            "min_mask_area": 0.0005,
            "min_reference_side": 2,
        }
    )
    raw["consistency"] = {"min_score": consistency.get("min_score")}
    raw["shards"]["inputs_per_shard"] = 2
    raw["executor"].update({"batch_size": 2, "device": "cpu", "workers": 1, "cpus_per_worker": 2})  # Ray: one actor
    raw["dedup"] = {"max_distance": None}
    path = tmp / f"synth-{consistency.get('min_score')}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_reader_is_deterministic_and_checks_its_options(tmp_path):
    cfg = {"subjects": 5, "seeds_per_subject": 2, "seed": 3}
    a, b = list(synth.read(cfg)), list(synth.read(dict(cfg)))
    assert a == b and len(a) == 10 and all(isinstance(r, SourceRecord) for r in a)
    assert [r.id for r in a[:3]] == ["p000000-s00", "p000000-s01", "p000001-s00"]
    assert len({r.diptych.generate["seed"] for r in a}) == 10
    r = a[0]
    g = r.diptych.generate
    assert (g["width"], g["height"], g["steps"], g["guidance"]) == (1056, 528, 28, 3.5)  # the paper-scale defaults
    assert r.phrase in g["prompt"] and r.extra["subject"] in g["prompt"] and r.pair == "cross"
    assert r.diptych.captions[0].endswith(r.extra["scenes"][0]) and r.extra["scenes"][0] != r.extra["scenes"][1]
    assert list(synth.read({**cfg, "seed": 4}))[0].extra != a[0].extra or True
    assert [x.extra["subject"] for x in synth.read({**cfg, "seed": 4})] != [x.extra["subject"] for x in a]
    # a prompt list: its order, the phrase option, one reject for an empty entry, custom templates and padding
    got = list(
        synth.read(
            {
                "prompts": PROMPTS,
                "phrase": "thing",
                "template": "two views of {subject}: {scene_0} | {scene_1}",
                "caption": "{subject}, {scene}",
                "padding": 2,
                "width": 64,
                "height": 32,
            }
        )
    )
    assert [x.id for x in got] == ["p000000-s00", "p000001", "p000002-s00"]
    assert isinstance(got[1], Reject) and got[1].reason == "prompts[1] is empty"
    assert got[0].phrase == "thing" and got[0].diptych.padding == 2
    assert got[0].diptych.generate["prompt"].startswith("two views of a red backpack: ")
    assert got[0].diptych.captions[0].startswith("a red backpack, ")
    # a grammar of our own
    g = tmp_path / "g.yaml"
    g.write_text(
        yaml.safe_dump({"attributes": ["tiny"], "categories": {"pets": ["hamster"]}, "scenes": ["indoors", "outdoors"]})
    )
    assert {x.extra["subject"] for x in synth.read({"grammar": str(g), "subjects": 3})} == {"tiny hamster"}
    g.write_text("attributes: [x]\n")
    errors = [
        ({"grammar": str(g)}, "needs 'attributes' and 'scenes'"),
        ({"subjcts": 3}, "unknown key 'source.subjcts'; did you mean 'subjects'"),
        ({"width": 1000, "height": 500}, "multiples of 16"),
        ({"width": 512, "height": 512}, "must be 2 × height"),
        ({"steps": 0}, "'steps' = 0: must be >= 1"),
        ({"template": "{what}"}, "bad placeholder"),
        ({"prompts": "a cat"}, "'source.prompts' = 'a cat': expected a list"),
    ]
    for opts, words in errors:
        with pytest.raises(ValueError, match=words):
            synth.read(opts)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        synth.read({"grammar": str(tmp_path / "nope.yaml")})


@pytest.fixture(scope="module")
def stages(tmp_path_factory, tiny_models):
    """Every stage built once: the models load once for the module's local runs."""
    from pipeline.recipe import Recipe
    from pipeline.stages import build_stages

    return build_stages(Recipe.from_yaml(tiny_recipe(tmp_path_factory.mktemp("r"))), tiny_models)


def run(recipe_file: Path, out: Path, tiny_models, stages) -> dict:
    from pipeline.executor_local import run_local
    from pipeline.recipe import Recipe

    recipe = Recipe.from_yaml(recipe_file)
    for stage in stages:  # the same models under this recipe's thresholds
        stage.recipe = recipe
    return run_local(recipe, out, tiny_models, progress=False, stages=stages)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_models, stages):
    """One local run with no consistency threshold."""
    tmp = tmp_path_factory.mktemp("synth")
    recipe = tiny_recipe(tmp)
    run(recipe, tmp / "local", tiny_models, stages)
    return recipe, tmp / "local"


def _samples(out: Path) -> dict[str, dict]:
    from dynaip.dataset.inspect import iter_samples

    return {s["key"]: json.loads(s["json"]) for s in iter_samples(out)}


def test_every_generated_diptych_is_accepted_or_rejected(local_run):
    _, out = local_run
    m = json.loads((out / "manifest.json").read_text())
    t = m["totals"]
    assert t["inputs"] == 5 and t["inputs"] == t["accepted"] + t["rejected"]  # 2 prompts × 2 seeds + 1 empty prompt
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == t["rejected"] >= 1 and all(r["reason"] and r["stage"] for r in rejects)
    assert {"id": "p000001", "reason": "prompts[1] is empty", "source": "synth", "stage": "read"} in rejects
    assert t["accepted"] >= 1 and t["samples"] == 2 * t["accepted"]
    samples = _samples(out)
    for key, meta in samples.items():
        rid, n = key.split("-", 1)[1].rsplit("-", 1)
        twin = samples[f"synth-{rid}-{1 - int(n)}"]
        assert meta["diptych"]["target_panel"] == ("left" if n == "0" else "right")
        assert meta["diptych"]["consistency"] == twin["diptych"]["consistency"]
        ex = meta["extra"]
        assert (ex["width"], ex["height"], ex["steps"], ex["guidance"]) == (64, 32, 2, 3.5)
        assert ex["seed"] == int(rid[1:7]) * 2 + int(rid[-2:]) and ex["prompt"].count(ex["subject"]) == 3
        assert (meta["width"], meta["height"]) == (32, 32) and meta["caption_source"] == "provided"


def test_consistency_threshold_rejects_the_pairs_below_it(local_run, tiny_models, stages, tmp_path):
    """With the threshold between the scores the first run measured, exactly the pairs below it become
    'consistency' rejects carrying their score; the others are kept."""
    _, first = local_run
    scores = {k.rsplit("-", 1)[0].split("-", 1)[1]: v["diptych"]["consistency"] for k, v in _samples(first).items()}
    cut = sorted(scores.values())[len(scores) // 2] if len(set(scores.values())) > 1 else 1.0
    out = tmp_path / "strict"
    run(tiny_recipe(tmp_path, min_score=cut), out, tiny_models, stages)
    rejects = {r["id"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    kept = set(k.rsplit("-", 1)[0].split("-", 1)[1] for k in _samples(out))
    for rid, score in scores.items():
        if score < cut:
            assert rejects[rid]["stage"] == "consistency"
            assert rejects[rid]["reason"] == (
                f"subjects differ: consistency {score:.4f} (OpenCLIP cosine of the two "
                f"cut-outs) < consistency.min_score={cut:g}"
            )
        else:
            assert rid in kept
    assert any(s < cut for s in scores.values())


def test_synth_cli_runs_a_synth_recipe(local_run, tiny_models_yaml, tmp_path, capsys):
    """`dynaip synth RECIPE --out DIR` reaches the curation with the recipe (``--limit 0``: no model loads;
    the runs above cover what the stages do)."""
    from dynaip.cli import main

    recipe, _ = local_run
    out = tmp_path / "cli"
    assert (
        main(
            [
                "synth",
                str(recipe),
                "--out",
                str(out),
                "--models",
                str(tiny_models_yaml),
                "--executor",
                "local",
                "--limit",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert f"{out}: 0 inputs" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["kind"] == "synth" and m["recipe"]["source"]["width"] == 64


def test_synth_refuses_other_recipes(tmp_path, capsys):
    import jobs.synth as job

    assert job.main([str(REPO / "manifests" / "subjects200k.yaml"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "reads source.kind 'subjects200k'" in err and "dynaip curate" in err
    assert not (tmp_path / "x").exists()


def test_ctrl_c_stops_synth_on_ray_which_resumes_to_the_same_bytes(local_run, tiny_models_yaml, ray_cluster, tmp_path):
    """`dynaip synth` (the Ray executor) in its own process on the module's loopback Ray head: Ctrl-C once its
    first chunk is written ends it within 10 s (one line, 130, the lock released, no actor of its job left),
    and the same command run again ends in the local executor's bytes (tests/test_stop_signals_ray.py)."""
    import signal

    from test_stop_signals_ray import (
        assert_clean_stop,
        assert_no_ray_processes_left,
        dynaip,
        joining,
        stop_when,
        unlocked,
    )

    from dynaip.cli import main

    recipe, local = local_run
    out = tmp_path / "ray"
    args = ["synth", str(recipe), "--out", str(out), "--models", str(tiny_models_yaml), "--no-progress"]
    status, took, err, pid = stop_when(
        dynaip(*args),
        joining(ray_cluster),
        lambda: bool(list((out / ".progress").glob("[0-9]*[0-9].json"))),
        signal.SIGINT,
    )
    assert_clean_stop(status, took, err, signal.SIGINT)
    assert_no_ray_processes_left(pid)
    done = len(list((out / ".progress").glob("[0-9]*[0-9].json")))
    assert 1 <= done < 3 and not (out / "manifest.json").exists() and unlocked(out)
    assert main(args) == 0  # in this process, on the same head
    assert tree(out) == tree(local)
    assert not list((out / "shards").glob(".*"))  # no temp files left behind
