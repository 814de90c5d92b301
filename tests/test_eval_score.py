"""Scoring: a scripted OpenAI-style judge on loopback (parsing, retries, aggregation, resume), CLIP, DINO, reports."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image

from dynaip.eval.cases import Case, Subject, write_cases
from dynaip.eval.generate import image_path
from dynaip.eval.judge import ChatJudge, DinoPaths, EvalConfig, JudgeConfig, JudgeError, parse_score
from dynaip.eval.score import ScoreSettings, ScoreStore, score_method


@pytest.mark.parametrize("answer, expected", [
    ("Score: 3", 3), ("The dog matches well.\nScore: 4", 4), ("score:0", 0), ("Score: **2**.", 2),
    ("Score: 3 or 4", None), ("no score here", None), ("Score: 5", None), ("Score: -1", None),
    ("Score: 2.5", None), ("Score: 3/4", None), ("Score:", None), ("", None), ("Score: 1\nScore: 2", None),
])
def test_parse_score(answer, expected):
    assert parse_score(answer) == expected


class ScriptedJudge:
    """A loopback OpenAI-compatible server. Answers are scripted per (model, item): the item is found from
    the request text (``case<N>`` in prompts, ``subj<N>`` in subject names); each request pops the next answer."""

    def __init__(self, script: dict[tuple[str, str], list[str]]):
        self.script = {k: list(v) for k, v in script.items()}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.fail_next: list[int] = []  # HTTP status codes to answer before scripted answers
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    if judge.fail_next:
                        code = judge.fail_next.pop(0)
                        self.send_response(code)
                        self.end_headers()
                        self.wfile.write(b'{"error": "scripted failure"}')
                        return
                    text = body["messages"][1]["content"][0]["text"]
                    kind = "pf" if "PROMPT FOLLOWING" in text else "cp"
                    item = re.search(r"(case\d+)" if kind == "pf" else r"(subj\d+)", text).group(1)
                    key = (body["model"], f"{kind}:{item}")
                    judge.requests.append({"path": self.path, "key": key, "body": body,
                                           "auth": self.headers.get("Authorization")})
                    answer = judge.script[key].pop(0)
                data = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def count(self, key):
        return sum(r["key"] == key for r in self.requests)


def _judges(url: str, **kw) -> list[JudgeConfig]:
    return [JudgeConfig(name=n, base_url=url, model=f"model-{n}", max_retries=3, retry_backoff_s=0, timeout_s=10, **kw)
            for n in ("a", "b")]


def _single_cases(tmp_path: Path) -> tuple[list[Case], Path]:
    gen = tmp_path / "gen"
    cases = []
    for i, cat in enumerate(["animal", "style", "animal"]):
        ref = tmp_path / f"ref{i}.png"
        Image.new("RGB", (300, 200), (50 * i, 0, 0)).save(ref)
        c = Case(id=f"dbpp-{cat}-{i}-p0", benchmark="dreambench++", category=cat, prompt=f"a photo of case{i}",
                 seed=i, subjects=[Subject(path=str(ref), type=cat, name=f"subj{i}")])
        image_path(gen, c.id).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (600, 600), (0, 50 * i, 0)).save(image_path(gen, c.id))
        cases.append(c)
    return cases, gen


SCRIPT = {
    ("model-a", "cp:subj0"): ["Score: 3 or 4", "no score here", "Score: 5", "Looks right.\nScore: 3"],
    ("model-a", "pf:case0"): ["Score: 4"],
    ("model-a", "cp:subj1"): ["Score: 2.5", "Score: 2"],
    ("model-a", "pf:case1"): ["Score: 1"],
    ("model-a", "cp:subj2"): ["nothing"] * 4 + ["Score: 2"],  # fails the first run, answers on the rerun
    ("model-a", "pf:case2"): ["Score: 0"],
    ("model-b", "cp:subj0"): ["Score: 4"], ("model-b", "pf:case0"): ["Score: 2"],
    ("model-b", "cp:subj1"): ["Score: 4"], ("model-b", "pf:case1"): ["Score: 3"],
    ("model-b", "cp:subj2"): ["Score: 1"], ("model-b", "pf:case2"): ["Score: 4"],
}


def test_judges_retry_aggregate_and_resume(tmp_path, caplog):
    cases, gen = _single_cases(tmp_path)
    with ScriptedJudge(SCRIPT) as server:
        cfg = EvalConfig(judges=_judges(server.base_url))
        settings = ScoreSettings(method="ours", metrics=("cp", "pf"), concurrency=3)
        with caplog.at_level(logging.WARNING):
            s = score_method(cases, gen, tmp_path / "scores", cfg, settings)
        # retry counts: 4 attempts for the 3-malformed item, 2 for "2.5", 4 (= 1 + max_retries) for the failure
        assert server.count(("model-a", "cp:subj0")) == 4 and server.count(("model-a", "cp:subj1")) == 2
        assert server.count(("model-a", "cp:subj2")) == 4 and len(server.requests) == 4 + 1 + 2 + 1 + 4 + 1 + 6
        assert "gave no parsable score in 4 attempts" in caplog.text
        temps = [r["body"]["temperature"] for r in server.requests if r["key"] == ("model-a", "cp:subj0")]
        assert temps == [0.0, 0.7, 0.7, 0.7]
        # request format: OpenAI chat completions with base64 PNG data URLs resized to 512 px
        first = next(r for r in server.requests if r["key"] == ("model-b", "cp:subj0"))
        assert first["path"] == "/v1/chat/completions" and first["auth"] is None
        parts = first["body"]["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
        sizes = [Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))).size for p in parts[1:]]
        assert sizes == [(512, 341), (512, 512)]  # reference 300×200 → longer side 512; generated 600×600
        style = next(r for r in server.requests if r["key"] == ("model-b", "cp:subj1"))
        assert "STYLE PRESERVATION" in style["body"]["messages"][1]["content"][0]["text"]
        assert "shape" in parts[0]["text"] and "facial features" in parts[0]["text"]

        g = s["groups"]
        # case CP: c0 (3+4)/2/4 = .875, c1 (2+4)/2/4 = .75, c2 only judge b: 1/4; PF: .75, .5, .5
        assert g["animal"]["cp"] == pytest.approx((0.875 + 0.25) / 2) and g["animal"]["pf"] == pytest.approx(0.625)
        assert g["animal"]["cp_pf"] == pytest.approx(0.5625 * 0.625) and g["animal"]["n"] == 2
        assert (g["style"]["cp"], g["style"]["pf"], g["style"]["cp_pf"]) == pytest.approx((0.75, 0.5, 0.375))
        assert g["overall"]["cp"] == pytest.approx(0.625) and g["overall"]["pf"] == pytest.approx(1.75 / 3)
        assert g["overall"]["cp_pf"] == pytest.approx(0.625 * 1.75 / 3)
        assert s["failed_items"] == 1 and list(g) == ["animal", "style", "overall"]
        assert s["per_judge"]["b"]["cp"] == pytest.approx((4 + 4 + 1) / 12)

        # rerun: only the failed item is asked again
        n = len(server.requests)
        s = score_method(cases, gen, tmp_path / "scores", cfg, settings)
        assert len(server.requests) == n + 1 and server.requests[-1]["key"] == ("model-a", "cp:subj2")
        assert s["failed_items"] == 0
        assert s["groups"]["overall"]["cp"] == pytest.approx((0.875 + 0.75 + 0.375) / 3)
        store = ScoreStore(tmp_path / "scores" / "scores.jsonl")
        rec = store.records["dbpp-animal-0-p0|a|cp@0"]
        assert (rec["score"], rec["value"], rec["attempts"], len(rec["answers"])) == (3, 0.75, 4, 4)
        assert json.loads((tmp_path / "scores" / "summary.json").read_text())["groups"] == s["groups"]


def test_multi_subject_cp_is_mean_over_subjects(tmp_path):
    ref = tmp_path / "r.png"
    Image.new("RGB", (32, 32)).save(ref)
    case = Case(id="dib-01-x-000", benchmark="dynaip-bench", category="human+object", prompt="case7 scene", seed=1,
                subjects=[Subject(path=str(ref), type="human", name="subj7"),
                          Subject(path=str(ref), type="object", name="subj8")], layout=["left", "right"])
    image_path(tmp_path / "gen", case.id).parent.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(image_path(tmp_path / "gen", case.id))
    script = {("model-a", "cp:subj7"): ["Score: 4"], ("model-a", "cp:subj8"): ["Score: 2"],
              ("model-a", "pf:case7"): ["Score: 3"]}
    with ScriptedJudge(script) as server:
        cfg = EvalConfig(judges=_judges(server.base_url)[:1])
        s = score_method([case], tmp_path / "gen", tmp_path / "sc", cfg, ScoreSettings(method="m", metrics=("cp", "pf")))
        cp_text = [r["body"]["messages"][1]["content"][0]["text"] for r in server.requests if r["key"][1].startswith("cp")]
    assert all("judge ONLY the subject shown in Image 1" in t for t in cp_text) and len(cp_text) == 2
    g = s["groups"]
    assert list(g) == ["human+object", "2 subjects", "overall"]
    assert (g["overall"]["cp"], g["overall"]["pf"], g["overall"]["cp_pf"]) == pytest.approx((0.75, 0.75, 0.5625))

    from dynaip.eval.report import write_report

    write_report([tmp_path / "sc"], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| Method | 2 Subjects CP | 2 Subjects PF | 2 Subjects CP·PF | Overall CP | Overall PF | Overall CP·PF |" in md
    assert "| m | 0.750 | 0.750 | 0.562 | 0.750 | 0.750 | 0.562 |" in md
    assert "| Method | human+object CP·PF |" in md and "| m | 0.562 |" in md
    assert not (tmp_path / "rep" / "contact_dynaip-bench.png").exists()  # no cases file recorded: no sheet


def test_http_failures_retry_then_fail_clearly(tmp_path, monkeypatch):
    with ScriptedJudge({("model-a", "pf:case0"): ["Score: 2"]}) as server:
        cfg = _judges(server.base_url)[0]
        judge = ChatJudge(cfg)
        server.fail_next = [500, 503]
        j = judge.ask("PROMPT FOLLOWING case0", [Image.new("RGB", (8, 8))])
        assert (j.score, j.attempts) == (2, 1) and server.fail_next == []
        server.fail_next = [400]
        with pytest.raises(JudgeError, match=r"refused the request: HTTP 400.*model name 'model-a'"):
            judge.ask("PROMPT FOLLOWING case0", [])
        server.fail_next = [500] * 4
        with pytest.raises(JudgeError, match=r"failed 4 times .*HTTPError.*is the server up"):
            judge.ask("PROMPT FOLLOWING case0", [])
    monkeypatch.setenv("MY_JUDGE_KEY", "sekrit")
    with ScriptedJudge({("model-a", "pf:case0"): ["Score: 1"]}) as server:
        judge = ChatJudge(JudgeConfig(name="a", base_url=server.base_url, model="model-a", api_key_env="MY_JUDGE_KEY"))
        assert judge.ask("PROMPT FOLLOWING case0", []).score == 1
        assert server.requests[0]["auth"] == "Bearer sekrit"
    with pytest.raises(ValueError, match="NOT_SET_KEY_XYZ.*is not set"):
        ChatJudge(JudgeConfig(name="a", base_url="http://127.0.0.1:9/v1", model="m", api_key_env="NOT_SET_KEY_XYZ"))


def test_eval_config_yaml(tmp_path):
    repo_cfg = EvalConfig.from_yaml(Path(__file__).parent.parent / "jobs" / "configs" / "eval_judges.yaml")
    assert [j.name for j in repo_cfg.judges] == ["internvl3-78b", "qwen3-vl-32b"] and repo_cfg.image_size == 512
    assert repo_cfg.dino.arch == "vit_small_patch16_224"
    bad = tmp_path / "bad.yaml"
    bad.write_text("judges:\n  - {name: a, base_url: localhost:8000, model: m}\n")
    with pytest.raises(ValueError, match="must start with http"):
        EvalConfig.from_yaml(bad)
    bad.write_text("judge: []\n")
    with pytest.raises(ValueError, match=r"unknown keys \['judge'\]"):
        EvalConfig.from_yaml(bad)


def _tiny_dino(path: Path) -> DinoPaths:
    import timm

    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **args)
    torch.save(model.state_dict(), path)  # the official DINO release format: a flat state dict
    return DinoPaths(path=str(path), arch="vit_small_patch16_224", model_args=args)


def test_clip_dino_scores_and_report(tmp_path, tiny_models, caplog):
    from dynaip.eval.metrics import ClipScorer, DinoScorer, load_dino
    from dynaip.eval.report import write_report
    from dynaip.models.errors import CheckpointError

    cases, gen = _single_cases(tmp_path)
    write_cases(tmp_path / "cases.jsonl", cases)
    clip = ClipScorer(tiny_models.clip_vision, "cpu")
    a, b = Image.open(cases[0].subjects[0].path), Image.new("RGB", (40, 60), (0, 0, 255))
    assert clip.clip_i(a, [a]) == pytest.approx(1.0, abs=1e-5) and clip.clip_i(a, [b]) < 0.999
    assert -1 <= clip.clip_t(a, "a photo") <= 1 and clip.clip_t(a, "a photo") != clip.clip_t(a, "another prompt text")

    dino_paths = _tiny_dino(tmp_path / "dino.pth")
    dino = DinoScorer(dino_paths, "cpu")
    assert dino.similarity(a, [a]) == pytest.approx(1.0, abs=1e-5) and dino.similarity(a, [b]) < 0.999
    with pytest.raises(CheckpointError, match="Keys do not match"):
        load_dino(DinoPaths(path=dino_paths.path, arch="vit_small_patch16_224",
                            model_args={**dino_paths.model_args, "depth": 3}))

    settings = ScoreSettings(method="tiny", metrics=("clip-i", "clip-t", "dino"), device="cpu")
    with caplog.at_level(logging.WARNING):
        s = score_method(cases, gen, tmp_path / "s0", EvalConfig(), settings, clip_paths=tiny_models.clip_vision,
                         cases_file=str(tmp_path / "cases.jsonl"))
    assert "no DINO weights configured" in caplog.text and s["groups"]["overall"]["dino"] is None
    s = score_method(cases, gen, tmp_path / "s1", EvalConfig(dino=dino_paths), settings,
                     clip_paths=tiny_models.clip_vision, cases_file=str(tmp_path / "cases.jsonl"))
    expected = clip.clip_i(image_path(gen, cases[1].id), [cases[1].subjects[0].path])
    assert s["groups"]["style"]["clip-i"] == pytest.approx(expected, abs=1e-5)
    assert s["groups"]["overall"]["n_dino"] == 3 and s["groups"]["overall"]["cp"] is None

    # report: a second method with judge scores, both in the Table 1 layout
    with ScriptedJudge(SCRIPT) as server:
        s2 = score_method(cases, gen, tmp_path / "s2", EvalConfig(judges=_judges(server.base_url)),
                          ScoreSettings(method="judged", metrics=("cp", "pf")), cases_file=str(tmp_path / "cases.jsonl"))
    written = write_report([tmp_path / "s1", tmp_path / "s2"], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| Method | Animal CP | Animal PF | Animal CP·PF | Style CP | Style PF | Style CP·PF | Overall CP |" in md
    o = s2["groups"]["overall"]
    assert f"| judged | 0.562 | 0.625 | 0.352 | 0.750 | 0.500 | 0.375 | {o['cp']:.3f} | {o['pf']:.3f} |" in md
    assert "| tiny | – | – | – |" in md and "CLIP-I" in md
    csv_lines = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert csv_lines[0] == "benchmark,method,group,n,cp,pf,cp_pf,clip_i,clip_t,dino" and len(csv_lines) == 1 + 2 * 3
    assert "dreambench++,judged,style,1,0.750000,0.500000,0.375000,,," in csv_lines
    sheet = Image.open(tmp_path / "report" / "contact_dreambenchpp.png")
    assert sheet.size[0] == 3 * (192 + 4) + 4 and len(written) == 3  # reference | tiny | judged
