"""Subject fidelity while training (``fidelity:``) and the best checkpoint (``checkpoints.keep_best``), issue #36.

One tiny `dynaip train --local` run, stopped at step 2 and resumed to step 4, with every metric on (CLIP-I,
CLIP-T, DINO from tiny weights, CP / PF from a loopback judge whose scores fall): the records land at exactly the evaluated
steps, best.json names the step with the best value, that checkpoint survives ``keep: 1``, the resume keeps
the best, and the weights equal those of the uninterrupted run without fidelity (``local_train_once``):
evaluating draws nothing from the training RNG.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from train_fixtures import local_train, same_adapter, write_dreambench, write_eval_config

METRICS = ["clip_i", "clip_t", "dino", "cp", "pf"]
KEEP_BEST = "cp"  # the judge below scores the first evaluation higher: the best is step 2, which keep: 1 must spare


class FallingJudge:
    """A loopback OpenAI-compatible chat server: "Score: 4" to the first ``first`` requests (one evaluation's
    worth), "Score: 2" to the others — a judge that likes the first evaluation's images best."""

    def __init__(self, first: int):
        self.requests, self.first = 0, first
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                judge.requests += 1
                answer = "Score: 4" if judge.requests <= judge.first else "Score: 2"
                data = json.dumps(
                    {
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}
                        ]
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _records(run: Path) -> list[dict]:
    return [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("event") == "fidelity"
    ]


def test_fidelity_curves_best_checkpoint_keep_and_resume(local_train_once, tiny_models_yaml, tmp_path):
    import torch
    from safetensors.torch import load_file

    from dynaip import DynaIPAdapter
    from dynaip.train.fidelity import load_cases, select_cases

    config, once = local_train_once
    judge = FallingJudge(first=2 * 2)  # 2 cases x (CP + PF)
    try:
        raw = yaml.safe_load(config.read_text())
        raw["fidelity"] = {
            "every": 2,
            "cases": "dbpp",
            "limit": 2,
            "steps": 1,
            "size": [16, 16],
            "metrics": METRICS,
            "eval_config": "eval.yaml",
        }  # relative: against the config's folder
        raw["checkpoints"] = {**raw["checkpoints"], "keep": 1, "keep_best": KEEP_BEST}
        write_dreambench(tmp_path / "dbpp", {"animal": 1, "object": 1})
        write_eval_config(
            tmp_path, [{"name": "falling", "base_url": judge.url, "model": "m", "retry_backoff_s": 0, "timeout_s": 20}]
        )
        cfg = tmp_path / "fidelity.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        run = tmp_path / "run"

        assert local_train(cfg, tiny_models_yaml, run, "--max-steps", "2") == 0
        first = json.loads((run / "checkpoints" / "best.json").read_text())
        assert first["step"] == 2 and first["checkpoint"] == "step-000002" and first["metric"] == KEEP_BEST
        assert local_train(cfg, tiny_models_yaml, run, "--resume") == 0
    finally:
        judge.close()

    records = _records(run)
    assert [r["step"] for r in records] == [2, 4]  # exactly the multiples of fidelity.every, across the restart
    subset = sorted(f"{c.id}.png" for c in select_cases(load_cases(str(tmp_path / "dbpp")), 2))
    assert [(r["cp"], r["pf"]) for r in records] == [(1.0, 1.0), (0.5, 0.5)]  # the judge's scores / 4
    for r in records:
        assert all(isinstance(r[m], float) for m in METRICS) and r["fidelity_cases"] == 2
        images = run / "fidelity" / f"step-{r['step']:06d}" / "images"
        assert sorted(p.name for p in images.glob("*.png")) == subset  # the same fixed subset each time
    assert judge.requests == 2 * 2 * 2  # 2 evaluations x 2 cases x (CP + PF)

    best = json.loads((run / "checkpoints" / "best.json").read_text())
    values = {r["step"]: r[KEEP_BEST] for r in records}
    assert best["step"] == max(values, key=values.get) and best["value"] == values[best["step"]]
    assert best["step"] == 2 < 4  # the resumed run kept the first run's best, which beat step 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.json", "step-000002", "step-000004"]

    # evaluating took nothing from training: the weights are those of the plain uninterrupted run
    assert same_adapter(once / "checkpoints" / "step-000004", run / "checkpoints" / "step-000004")
    # RUN/checkpoints/best loads the checkpoint best.json names (`dynaip generate --adapter`, eval, load_dynaip
    # all load through DynaIPAdapter.from_pretrained)
    assert DynaIPAdapter.resolve_checkpoint(run / "checkpoints" / "best") == run / "checkpoints" / "step-000002"
    loaded = DynaIPAdapter.from_pretrained(run / "checkpoints" / "best").state_dict()
    want = load_file(str(run / "checkpoints" / "step-000002" / "adapter.safetensors"))
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want)


def test_keep_best_rules_and_the_best_record(tmp_path):
    from dynaip import DynaIPAdapter
    from dynaip.configs import ConfigError
    from dynaip.train.best import BestCheckpoint
    from dynaip.train.checkpoint_files import prune
    from dynaip.train.config import TrainConfig
    from dynaip.train.fidelity import select_cases, load_cases

    base = {"stages": [{"name": "a", "steps": 8}], "checkpoints": {"every": 2, "keep_best": "clip_i"}}
    for fidelity, words in (
        ({}, "needs fidelity evaluations"),
        ({"every": 3, "cases": "x"}, "must be a multiple of checkpoints.every=2"),
        ({"every": 4, "cases": "x", "metrics": ["dino"], "eval_config": "e.yaml"}, "is not among fidelity.metrics"),
        ({"every": 4, "cases": "x", "metrics": ["cp"]}, "need fidelity.eval_config"),
        ({"every": 4}, "fidelity.cases is not"),
    ):
        with pytest.raises(ConfigError, match=words):
            TrainConfig.from_dict({**base, "fidelity": fidelity})
    assert TrainConfig.from_dict({**base, "fidelity": {"every": 4, "cases": "x"}}).fidelity.limit == 16

    # pruning spares the best; a better value moves best.json, a worse one leaves it
    root = tmp_path / "checkpoints"
    for s in (2, 4, 6):
        (root / f"step-{s:06d}").mkdir(parents=True)
        (root / f"step-{s:06d}" / "adapter.safetensors").write_bytes(b"")
    best = BestCheckpoint(root, "clip_i")
    assert best.offer(2, 0.5) and not best.offer(4, 0.4) and not best.offer(6, float("nan"))
    assert [p.name for p in prune(root, 1, protect=best.step)] == ["step-000004"]
    again = BestCheckpoint(root, "clip_i")
    again.load()
    assert (again.step, again.value) == (2, 0.5)
    other = BestCheckpoint(root, "dino")
    other.load()
    assert other.step is None  # ranked by another metric: starts over

    # best.json may name only a checkpoint of its own folder
    (root / "best.json").write_text(json.dumps({"checkpoint": "../../elsewhere"}))
    with pytest.raises(ValueError, match="not a checkpoint of its folder"):
        DynaIPAdapter.resolve_checkpoint(root / "best")

    # the subset is fixed by the case ids, not by the order of the source
    pool = load_cases(str(write_dreambench(tmp_path / "dbpp", {"animal": 1, "style": 1})))
    assert select_cases(pool, 5) == select_cases(pool[::-1], 5) and len(select_cases(pool, 5)) == 5


def test_fidelity_inputs_are_checked_before_the_run_starts(local_train_once, tiny_models_yaml, tmp_path, caplog):
    from dynaip.configs import ConfigError
    from dynaip.train.config import TrainConfig

    with pytest.raises(ConfigError, match="did you mean 'limit'"):
        TrainConfig.from_dict({"stages": [{"name": "a", "steps": 2}], "fidelity": {"limt": 2}})
    config, _ = local_train_once
    raw = yaml.safe_load(config.read_text())
    write_dreambench(tmp_path / "dbpp", {"object": 1})
    for fidelity, words in (
        ({"cases": "missing"}, "fidelity.cases '.*missing' does not exist"),
        ({"cases": "dbpp", "metrics": ["dino"], "eval_config": "eval.yaml"}, "names no dino weights"),
        ({"cases": "dbpp", "metrics": ["pf"], "eval_config": "eval.yaml"}, "lists no judges"),
    ):
        (tmp_path / "eval.yaml").write_text("protocol: dreambench\n")
        cfg = tmp_path / "bad.yaml"
        cfg.write_text(yaml.safe_dump({**raw, "fidelity": {"every": 2, **fidelity}}))
        caplog.clear()
        assert local_train(cfg, tiny_models_yaml, tmp_path / "run") == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "\n" not in errors[0] and re.search(words, errors[0]), errors
        assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any worker started


def test_prompts_without_loaded_text_encoders_match_the_loaded_ones(tiny_models):
    """A run on precomputed features has no T5 on its ranks: the fidelity prompts are encoded by text encoders
    loaded for that moment only, to the same numbers the loaded pipeline gives."""
    from types import SimpleNamespace

    import torch

    from dynaip.models.flux import load_flux_pipeline
    from dynaip.train.fidelity import FidelityEval
    from dynaip.train.step import encode_prompts

    frozen = SimpleNamespace(pipe=SimpleNamespace(text_encoder_2=None), device=torch.device("cpu"), dtype=torch.float32)
    evaluator = FidelityEval.__new__(FidelityEval)  # only the prompt encoding, without a training run around it
    evaluator.models, evaluator.frozen = tiny_models, frozen
    got = evaluator._encode_prompts(["a photo of the object 0", "a dog"], 32)
    pipe = load_flux_pipeline(tiny_models.flux)
    for (t5, pooled), prompt in zip(got, ["a photo of the object 0", "a dog"]):
        want_t5, want_pooled, _ = encode_prompts(pipe, [prompt], torch.device("cpu"), 32)
        assert t5.shape == (1, 32, want_t5.shape[-1]) and torch.equal(t5, want_t5) and torch.equal(pooled, want_pooled)
