"""Scoring: a scripted OpenAI-style judge on loopback (parsing, retries, aggregation, resume), CLIP, DINO, reports."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from dynaip.eval.cases import Case, Subject, write_cases
from dynaip.eval.generate import image_path
from dynaip.eval.judge import (
    ChatJudge,
    DinoPaths,
    EvalConfig,
    JudgeConfig,
    JudgeError,
    dreambench_messages,
    image_part,
    parse_score,
    parse_score_dreambench,
    square_jpeg_data_url,
)
from dynaip.eval.report import write_report
from dynaip.eval.score import ScoreSettings, ScoreStore, run_file, score_method


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Score: 3", 3),
        ("The dog matches well.\nScore: 4", 4),
        ("score:0", 0),
        ("Score: **2**.", 2),
        ("Score: 3 or 4", None),
        ("no score here", None),
        ("Score: 5", None),
        ("Score: -1", None),
        ("Score: 2.5", None),
        ("Score: 3/4", None),
        ("Score:", None),
        ("", None),
        ("Score: 1\nScore: 2", None),
    ],
)
def test_parse_score(answer, expected):
    assert parse_score(answer) == expected


def _red(part: dict) -> int:
    """Red channel of the centre pixel of an ``image_url`` content part."""
    im = Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))).convert("RGB")
    return im.getpixel((im.width // 2, im.height // 2))[0]


def identify(body: dict) -> str:
    """``cp:subj<N>`` or ``pf:case<N>`` of a request. Protocol open (a system message first): from the instruction
    text (``case<N>`` in prompts, ``subj<N>`` in subject names). Protocol dreambench (rubric, acknowledgement, sample):
    PF samples carry the prompt text; CP samples only images, so N is read from the reference's red (50 × N)."""
    messages = body["messages"]
    if messages[0]["role"] == "system":
        text = messages[1]["content"][0]["text"]
        kind = "pf" if "PROMPT FOLLOWING" in text else "cp"
        return f"{kind}:" + re.search(r"(case\d+)" if kind == "pf" else r"(subj\d+)", text).group(1)
    sample = messages[-1]["content"]
    if sample[0]["type"] == "text":
        return "pf:" + re.search(r"case\d+", sample[0]["text"]).group(0)
    return f"cp:subj{round(_red(sample[0]) / 50)}"


class ScriptedJudge:
    """A loopback OpenAI-compatible server. Answers are scripted per (model, item) — or per (model, item, run)
    when ``seed_runs`` maps request seeds to runs — and each request pops the next answer (see ``identify``)."""

    def __init__(self, script: dict[tuple, list[str]], seed_runs: dict[int, int] | None = None):
        self.script = {k: list(v) for k, v in script.items()}
        self.seed_runs = seed_runs or {}
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
                    key = (body["model"], identify(body))
                    if body.get("seed") in judge.seed_runs:
                        key += (judge.seed_runs[body["seed"]],)
                    judge.requests.append(
                        {"path": self.path, "key": key, "body": body, "auth": self.headers.get("Authorization")}
                    )
                    answer = judge.script[key].pop(0)
                data = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}
                        ],
                    }
                ).encode()
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
    return [
        JudgeConfig(name=n, base_url=url, model=f"model-{n}", max_retries=3, retry_backoff_s=0, timeout_s=10, **kw)
        for n in ("a", "b")
    ]


def _single_cases(tmp_path: Path) -> tuple[list[Case], Path]:
    gen = tmp_path / "gen"
    cases = []
    for i, cat in enumerate(["animal", "style", "animal"]):
        ref = tmp_path / f"ref{i}.png"
        Image.new("RGB", (300, 200), (50 * i, 0, 0)).save(ref)
        c = Case(
            id=f"dbpp-{cat}-{i}-p0",
            benchmark="dreambench++",
            category=cat,
            prompt=f"a photo of case{i}",
            seed=i,
            subjects=[Subject(path=str(ref), type=cat, name=f"subj{i}")],
        )
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
    ("model-b", "cp:subj0"): ["Score: 4"],
    ("model-b", "pf:case0"): ["Score: 2"],
    ("model-b", "cp:subj1"): ["Score: 4"],
    ("model-b", "pf:case1"): ["Score: 3"],
    ("model-b", "cp:subj2"): ["Score: 1"],
    ("model-b", "pf:case2"): ["Score: 4"],
}


def test_judges_retry_aggregate_and_resume(tmp_path, caplog):
    cases, gen = _single_cases(tmp_path)
    with ScriptedJudge(SCRIPT) as server:
        cfg = EvalConfig(judges=_judges(server.base_url), protocol="open")
        settings = ScoreSettings(method="ours", metrics=("cp", "pf"), concurrency=3)
        with caplog.at_level(logging.WARNING):
            s = score_method(cases, gen, tmp_path / "scores", cfg, settings)
        # retry counts: 4 attempts for the 3-malformed item, 2 for "2.5", 4 (= 1 + max_retries) for the failure
        assert server.count(("model-a", "cp:subj0")) == 4 and server.count(("model-a", "cp:subj1")) == 2
        assert server.count(("model-a", "cp:subj2")) == 4 and len(server.requests) == 4 + 1 + 2 + 1 + 4 + 1 + 6
        assert "run 1: dbpp-animal-2-p0|a|cp@0 gave no parsable score in 4 tries" in caplog.text
        temps = [r["body"]["temperature"] for r in server.requests if r["key"] == ("model-a", "cp:subj0")]
        assert temps == [0.0, 0.7, 0.7, 0.7]
        # request format: OpenAI chat completions with base64 PNG data URLs resized to 512 px
        first = next(r for r in server.requests if r["key"] == ("model-b", "cp:subj0"))
        assert first["path"] == "/v1/chat/completions" and first["auth"] is None
        parts = first["body"]["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
        sizes = [
            Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))).size for p in parts[1:]
        ]
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
        assert s["runs"] == 1 and s["protocol"] == "open" and g["overall"]["cp_std"] is None  # open: 1 run by default
        assert not (tmp_path / "scores" / "scores.jsonl").exists() and not run_file(tmp_path / "scores", 2).exists()
        store = ScoreStore(run_file(tmp_path / "scores", 1))
        rec = store.records["dbpp-animal-0-p0|a|cp@0"]
        assert (rec["score"], rec["value"], rec["attempts"], len(rec["answers"])) == (3, 0.75, 4, 4)
        assert (rec["run"], rec["protocol"]) == (1, "open")
        assert json.loads((tmp_path / "scores" / "summary.json").read_text())["groups"] == s["groups"]


def test_multi_subject_cp_is_mean_over_subjects(tmp_path):
    ref = tmp_path / "r.png"
    Image.new("RGB", (32, 32)).save(ref)
    case = Case(
        id="dib-01-x-000",
        benchmark="dynaip-bench",
        category="human+object",
        prompt="case7 scene",
        seed=1,
        subjects=[
            Subject(path=str(ref), type="human", name="subj7"),
            Subject(path=str(ref), type="object", name="subj8"),
        ],
        layout=["left", "right"],
    )
    image_path(tmp_path / "gen", case.id).parent.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(image_path(tmp_path / "gen", case.id))
    script = {
        ("model-a", "cp:subj7"): ["Score: 4"],
        ("model-a", "cp:subj8"): ["Score: 2"],
        ("model-a", "pf:case7"): ["Score: 3"],
    }
    with ScriptedJudge(script) as server:
        cfg = EvalConfig(judges=_judges(server.base_url)[:1], protocol="open")
        s = score_method(
            [case], tmp_path / "gen", tmp_path / "sc", cfg, ScoreSettings(method="m", metrics=("cp", "pf"))
        )
        cp_text = [
            r["body"]["messages"][1]["content"][0]["text"] for r in server.requests if r["key"][1].startswith("cp")
        ]
    assert all("judge ONLY the subject shown in Image 1" in t for t in cp_text) and len(cp_text) == 2
    g = s["groups"]
    assert list(g) == ["human+object", "2 subjects", "overall"]
    assert (g["overall"]["cp"], g["overall"]["pf"], g["overall"]["cp_pf"]) == pytest.approx((0.75, 0.75, 0.5625))

    from dynaip.eval.report import write_report

    write_report([tmp_path / "sc"], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert (
        "| Method | 2 Subjects CP | 2 Subjects PF | 2 Subjects CP·PF | Overall CP | Overall PF | Overall CP·PF |" in md
    )
    assert "| m | 0.750 | 0.750 | 0.562 | 0.750 | 0.750 | 0.562 |" in md
    assert "| Method | human+object CP·PF |" in md and "| m | 0.562 |" in md
    assert "## dynaip-bench (multi-subject; paper Table 2 layout)" in md and "CP Animal" not in md
    assert not (tmp_path / "rep" / "contact_dynaip-bench.png").exists()  # no cases file recorded: no sheet


def test_http_failures_retry_then_fail_clearly(tmp_path, monkeypatch):
    with ScriptedJudge({("model-a", "pf:case0"): ["Score: 2"]}) as server:
        cfg = _judges(server.base_url)[0]
        judge = ChatJudge(cfg, protocol="open")
        server.fail_next = [500, 503]
        j = judge.ask("PROMPT FOLLOWING case0", [Image.new("RGB", (8, 8))])
        assert (j.score, j.attempts) == (2, 1) and server.fail_next == []
        server.fail_next = [400]
        with pytest.raises(JudgeError, match=r"refused the request: HTTP 400.*model name 'model-a'"):
            judge.ask("PROMPT FOLLOWING case0", [])
        server.fail_next = [500] * 4
        with pytest.raises(JudgeError, match=r"failed 4 times \(last: HTTP 500\).*is the server up"):
            judge.ask("PROMPT FOLLOWING case0", [])
    monkeypatch.setenv("MY_JUDGE_KEY", "sekrit")
    with ScriptedJudge({("model-a", "pf:case0"): ["Score: 1"]}) as server:
        judge = ChatJudge(
            JudgeConfig(name="a", base_url=server.base_url, model="model-a", api_key_env="MY_JUDGE_KEY"),
            protocol="open",
        )
        assert judge.ask("PROMPT FOLLOWING case0", []).score == 1
        assert server.requests[0]["auth"] == "Bearer sekrit"
    with pytest.raises(ValueError, match="NOT_SET_KEY_XYZ.*is not set"):
        ChatJudge(JudgeConfig(name="a", base_url="http://127.0.0.1:9/v1", model="m", api_key_env="NOT_SET_KEY_XYZ"))


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Score: 3", 3),
        ("score:0", 0),
        ("Analysis: fine.\nScore: 4", 4),
        ("Final score: about 2", 2),
        ("Score: 3 or 4", 3),
        ("Score: 2.5", 2),
        ("Score: **2**", None),
        ("SCORE: 2", None),
        ("Score: 1\nScore: 2", None),
        ("Score: 5", None),
        ("no score", None),
        ("", None),
    ],
)
def test_parse_score_dreambench(answer, expected):
    """One ``score:``/``Score:`` match anywhere (an optional word before the number), leading digits only, 0-4."""
    assert parse_score_dreambench(answer) == expected


def test_dreambench_images_are_square_jpeg_exif_rotated_on_white(tmp_path):
    im = Image.new("RGBA", (300, 100), (255, 0, 0, 0))  # transparent left part
    im.paste((0, 0, 255, 255), (150, 0, 300, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    path = tmp_path / "r.png"
    im.save(path, exif=exif)
    url = square_jpeg_data_url(path)
    assert url.startswith("data:image/jpeg;base64,")
    out = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (512, 512))  # squashed, aspect not kept
    top, bottom = out.getpixel((256, 40)), out.getpixel((256, 470))  # upright: the left half is now on top
    assert min(top) > 240 and bottom[2] > 200 and bottom[0] < 40  # transparency → white; the blue half below
    assert image_part(path, "dreambench", 512)["image_url"]["detail"] == "high"
    multi = dreambench_messages("cp-subject", [path, path], multi=True)
    assert "Rate only the one that corresponds to the reference" in multi[0]["content"]
    assert "looking only at the subject that matches the reference" in multi[1]["content"]
    assert "corresponds to the reference" not in dreambench_messages("cp-subject", [path, path])[0]["content"]
    assert image_part(path, "open", 512)["image_url"]["url"].startswith("data:image/png;base64,")


# DreamBench++ cases of the 3-run test: (category, prompt index); subject i has reference red 50 * i
RUN_CASES = [("animal", 0), ("human", 5), ("object", 8), ("style", 2), ("object", 4)]
# scores (0-4) per run and case; None: every try failed in that run
CP = {1: [3, 4, 4, 1, 3], 2: [4, None, 2, 2, 3], 3: [2, 4, 3, 3, 4]}
PF = {1: [4, 2, 3, 3, 1], 2: [3, 2, 2, 4, 2], 3: [4, 3, 3, 3, 1]}
RUN_SCRIPT = {  # what the judge answers, per (item, run); retries pop the next answer
    ("cp:subj0", 1): ["Score: **3**", "Score: 3"],
    ("cp:subj1", 1): ["Score: 4"],
    ("cp:subj2", 1): ["Score: 4"],
    ("cp:subj3", 1): ["Score: 1"],
    ("cp:subj4", 1): ["Score: 3"],
    ("pf:case0", 1): ["Analysis: everything is there.\nScore: 4"],
    ("pf:case1", 1): ["Score: 2"],
    ("pf:case2", 1): ["Score: 3"],
    ("pf:case3", 1): ["Score: 3 or 4"],
    ("pf:case4", 1): ["Score: 1"],
    ("cp:subj0", 2): ["Score: 4"],
    ("cp:subj1", 2): ["nothing", "Score: 1\nScore: 2", "Score: 9", "Score: 4"],
    ("cp:subj2", 2): ["Score: 2"],
    ("cp:subj3", 2): ["Score: 2"],
    ("cp:subj4", 2): ["Score: 3"],
    ("pf:case0", 2): ["Score: 3"],
    ("pf:case1", 2): ["Score: 2"],
    ("pf:case2", 2): ["Score: 2"],
    ("pf:case3", 2): ["Score: 4"],
    ("pf:case4", 2): ["Score: 2"],
    ("cp:subj0", 3): ["score: 2"],
    ("cp:subj1", 3): ["Final score: about 4"],
    ("cp:subj2", 3): ["Score: 3"],
    ("cp:subj3", 3): ["Score: 3"],
    ("cp:subj4", 3): ["Score: 4"],
    ("pf:case0", 3): ["Score: 4"],
    ("pf:case1", 3): ["Score: 3"],
    ("pf:case2", 3): ["Score: 3"],
    ("pf:case3", 3): ["Score: 3"],
    ("pf:case4", 3): ["Score: 1"],
}


def _by_hand(table: dict[int, list], members: list[int]) -> tuple[float, float | None]:
    """Mean and sample std (n - 1) over runs of the per-run means of score / 4 over ``members``."""
    per_run = []
    for r in (1, 2, 3):
        vals = [table[r][i] / 4 for i in members if table[r][i] is not None]
        if vals:
            per_run.append(sum(vals) / len(vals))
    mean = sum(per_run) / len(per_run)
    return mean, (math.sqrt(sum((x - mean) ** 2 for x in per_run) / (len(per_run) - 1)) if len(per_run) > 1 else None)


def _pub(ms: tuple[float, float]) -> str:
    return f"{round(ms[0], 3):.3f} ± {round(ms[1], 3):.3f}"


def test_dreambench_protocol_three_runs_report(tmp_path, caplog):
    gen = tmp_path / "gen"
    cases = []
    for i, (cat, var) in enumerate(RUN_CASES):
        ref = tmp_path / f"ref{i}.jpg"
        Image.new("RGB", (300, 200), (50 * i, 0, 0)).save(ref)
        cases.append(
            Case(
                id=f"dbpp-{cat}-{i:02d}-p{var}",
                benchmark="dreambench++",
                category=cat,
                variation=var,
                prompt=f"a photo of case{i}",
                seed=i,
                subjects=[Subject(path=str(ref), type=cat, name="x")],
            )
        )
        image_path(gen, cases[-1].id).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (640, 480), (0, 50 * i, 0)).save(image_path(gen, cases[-1].id))
    judge = JudgeConfig(name="a", base_url="http://127.0.0.1:9/v1", model="model-a", retry_backoff_s=0, timeout_s=10)
    seed_runs = {
        zlib.crc32(f"{r}|{c.id}|a|{m}|{t}".encode()) & 0x7FFFFFFF: r
        for r in (1, 2, 3)
        for c in cases
        for m in ("cp@0", "pf")
        for t in range(3)
    }
    assert len(seed_runs) == 3 * 5 * 2 * 3  # a distinct seed per run, item and try
    out = tmp_path / "scores"
    script = {("model-a", item, run): answers for (item, run), answers in RUN_SCRIPT.items()}
    with ScriptedJudge(script, seed_runs) as server:
        cfg = EvalConfig(judges=[JudgeConfig(**{**judge.__dict__, "base_url": server.base_url})])
        settings = ScoreSettings(method="dbpp-test", metrics=("cp", "pf"), concurrency=3)
        with caplog.at_level(logging.WARNING):
            s = score_method(cases, gen, out, cfg, settings)
        assert "run 2: dbpp-human-01-p5|a|cp@0 gave no parsable score in 3 tries (left out of this run" in caplog.text
        assert len(server.requests) == (2 + 4 + 5) + (3 + 4 + 5) + 10  # retries: run 1 subj0 ×2, run 2 subj1 ×3
        assert server.count(("model-a", "cp:subj1", 2)) == 3 and server.count(("model-a", "cp:subj0", 1)) == 2

        # the request: rubric turn, acknowledgement, sample; no system message; temperature 1 on every try
        cp_req = next(r["body"] for r in server.requests if r["key"] == ("model-a", "cp:subj4", 3))
        assert [m["role"] for m in cp_req["messages"]] == ["user", "assistant", "user"]
        assert isinstance(cp_req["messages"][0]["content"], str) and "Face" in cp_req["messages"][0]["content"]
        parts = cp_req["messages"][2]["content"]
        assert [p["type"] for p in parts] == ["image_url", "image_url"] and {
            p["image_url"]["detail"] for p in parts
        } == {"high"}
        decoded = [Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))) for p in parts]
        assert [(d.format, d.size) for d in decoded] == [("JPEG", (512, 512))] * 2  # 300×200 and 640×480 squashed
        style_req = next(r["body"] for r in server.requests if r["key"] == ("model-a", "cp:subj3", 1))
        assert "same style" in style_req["messages"][0]["content"]
        pf_req = next(r["body"] for r in server.requests if r["key"] == ("model-a", "pf:case2", 1))
        assert [p["type"] for p in pf_req["messages"][2]["content"]] == ["text", "image_url"]
        assert pf_req["messages"][2]["content"][0]["text"] == "a photo of case2"
        assert "Score: N" in pf_req["messages"][0]["content"] and pf_req["messages"][1]["role"] == "assistant"
        assert {r["body"]["temperature"] for r in server.requests} == {1.0}
        assert "system" not in {m["role"] for r in server.requests for m in r["body"]["messages"]}

        # per-run files
        for r in (1, 2, 3):
            recs = ScoreStore(run_file(out, r)).records
            assert len(recs) == 10 and {(x["run"], x["protocol"]) for x in recs.values()} == {(r, "dreambench")}
        failed = ScoreStore(run_file(out, 2)).records["dbpp-human-01-p5|a|cp@0"]
        assert (failed["score"], failed["value"], failed["attempts"]) == (None, None, 3)
        assert ScoreStore(run_file(out, 1)).records["dbpp-animal-00-p0|a|cp@0"]["attempts"] == 2
        assert s["runs"] == 3 and s["failed_items"] == 1 and s["failed_by_run"] == {"1": 0, "2": 1, "3": 0}

        # mean ± sample std over runs, as computed by hand (the failed item is left out of run 2's means)
        g, pt = s["groups"], s["prompt_types"]
        everyone = list(range(5))
        assert [r["cp"] for r in g["overall"]["runs"]] == pytest.approx([15 / 20, 11 / 16, 16 / 20])
        assert (g["overall"]["cp"], g["overall"]["cp_std"]) == pytest.approx(_by_hand(CP, everyone), abs=1e-12)
        assert (g["overall"]["pf"], g["overall"]["pf_std"]) == pytest.approx(_by_hand(PF, everyone), abs=1e-12)
        assert g["overall"]["n_cp"] == 4 and g["human"]["cp"] == 1.0 and g["human"]["cp_std"] == 0.0  # 2 runs
        assert (pt["style transfer"]["pf"], pt["style transfer"]["pf_std"]) == pytest.approx(_by_hand(PF, [1, 4]))
        assert list(pt) == ["photorealistic", "style transfer", "imaginative"] and pt["imaginative"]["n"] == 1

        # resume: only run 2's failed item is asked again
        n = len(server.requests)
        s = score_method(cases, gen, out, cfg, settings)
        assert len(server.requests) == n + 1 and server.requests[-1]["key"] == ("model-a", "cp:subj1", 2)
        CP2 = {**CP, 2: [4, 4, 2, 2, 3]}
        assert s["failed_items"] == 0
        assert (s["groups"]["overall"]["cp"], s["groups"]["overall"]["cp_std"]) == pytest.approx(
            _by_hand(CP2, everyone)
        )

    with pytest.raises(
        ValueError,
        match=r"judge_run1\.jsonl' was judged with protocol dreambench, this config says "
        r"open",
    ):
        score_method(cases, gen, out, EvalConfig(judges=[judge], protocol="open"), settings)

    # the report: the benchmark's table (CP by category, PF by prompt type, CP·PF of the rounded means) and ours
    write_report([out], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert (
        "| Method | CP Animal | CP Human | CP Object | CP Style | CP Overall | PF Photorealistic | PF Style transfer "
        "| PF Imaginative | PF Overall | CP·PF |"
    ) in md
    cp, pf = _by_hand(CP2, everyone), _by_hand(PF, everyone)
    cp_pf = round(cp[0], 3) * round(pf[0], 3)
    assert f"{cp_pf:.3f}" == "0.512" and f"{cp[0] * pf[0]:.3f}" == "0.511"  # the rounding rule shows here
    row = [
        "dbpp-test",
        _pub(_by_hand(CP2, [0])),
        _pub(_by_hand(CP2, [1])),
        _pub(_by_hand(CP2, [2, 4])),
        _pub(_by_hand(CP2, [3])),
        _pub(cp),
        _pub(_by_hand(PF, [0, 3])),
        _pub(_by_hand(PF, [1, 4])),
        _pub(_by_hand(PF, [2])),
        _pub(pf),
        f"{cp_pf:.3f}",
    ]
    assert "| " + " | ".join(row) + " |" in md
    assert row[1:6] == ["0.750 ± 0.250", "1.000 ± 0.000", "0.792 ± 0.144", "0.500 ± 0.250", "0.767 ± 0.029"]
    assert row[6:] == ["0.875 ± 0.000", "0.458 ± 0.072", "0.667 ± 0.144", "0.667 ± 0.029", "0.512"]
    assert f"| dbpp-test | 0.750 ± 0.250 | {(4 + 4 + 3) / 12:.3f} ± " in md  # ours: animal CP, PF, ...
    assert "protocol dreambench, 3 judging run(s), 0 judge items left out" in md
    csv_rows = (tmp_path / "rep" / "report.csv").read_text().splitlines()
    overall = next(r for r in csv_rows if ",group,overall," in r).split(",")
    assert overall[5] == "3" and (float(overall[11]), float(overall[7])) == pytest.approx((cp_pf, cp[1]), abs=1e-6)


def test_old_score_directories_are_refused_clearly(tmp_path):
    cases, gen = _single_cases(tmp_path)
    out = tmp_path / "old"
    out.mkdir()
    (out / "scores.jsonl").write_text(
        json.dumps({"key": "x|a|pf", "case_id": "x", "source": "a", "metric": "pf", "value": 0.5}) + "\n"
    )
    cfg = EvalConfig(judges=_judges("http://127.0.0.1:9/v1"), protocol="open")
    with pytest.raises(
        ValueError,
        match=r"holds judge scores written before judging runs existed; rename it to "
        r"'.*judge_run1\.jsonl'",
    ):
        score_method(cases, gen, out, cfg, ScoreSettings(method="m", metrics=("cp", "pf")))
    (out / "summary.json").write_text(json.dumps({"format": "dynaip-eval-summary/1"}))
    from dynaip.eval.report import load_summary

    with pytest.raises(ValueError, match="written before judging runs existed; rerun `dynaip eval score`"):
        load_summary(out)
    with pytest.raises(ValueError, match=r"runs=0 must be ≥ 1"):
        ScoreSettings(method="m", runs=0)


def test_cli_score_runs_and_report(tmp_path, capsys, caplog):
    import argparse

    from dynaip.eval.cli import add_eval_parser

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    cases, gen = _single_cases(tmp_path)
    write_cases(tmp_path / "cases.jsonl", cases)
    script = {
        ("model-a", f"{k}:{x}{i}"): ["Score: 4", "Score: 2"]
        for i in range(3)
        for k, x in (("cp", "subj"), ("pf", "case"))
    }
    with ScriptedJudge(script) as server:
        (tmp_path / "judges.yaml").write_text(
            f"protocol: open\njudges:\n  - {{name: a, base_url: '{server.base_url}', "
            "model: model-a, retry_backoff_s: 0}\n"
        )
        argv = [
            "eval",
            "score",
            "--cases",
            str(tmp_path / "cases.jsonl"),
            "--images",
            str(gen),
            "--config",
            str(tmp_path / "judges.yaml"),
            "--metrics",
            "cp,pf",
            "--runs",
            "2",
            "--concurrency",
            "1",
        ]
        args = parser.parse_args(argv)
        with caplog.at_level(logging.WARNING):
            assert args.func(args) == 0
    assert "2 runs with temperature 0 repeat one another" in caplog.text
    out = capsys.readouterr().out
    assert "CP 0.7500 ± 0.3536  PF 0.7500 ± 0.3536" in out and "protocol open, 2 judging run(s)" in out
    assert run_file(gen / "scores", 2).is_file() and not run_file(gen / "scores", 3).exists()
    args = parser.parse_args(["eval", "report", "--scores", str(gen / "scores"), "--out", str(tmp_path / "rep")])
    assert args.func(args) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    # run 1 answered 4 to everything, run 2 answered 2: per group 1.0 and 0.5, mean 0.75, sample std 0.354
    assert (
        "| gen | 0.750 ± 0.354 | – | – | 0.750 ± 0.354 | 0.750 ± 0.354 | 0.750 ± 0.354 | – | – | 0.750 ± 0.354 "
        "| 0.562 |"
    ) in md


SHIPPED = Path(__file__).parent.parent / "jobs" / "configs" / "eval_judges.yaml"


def test_eval_config_yaml(tmp_path):
    repo_cfg = EvalConfig.from_yaml(SHIPPED)
    assert [j.name for j in repo_cfg.judges] == ["internvl3-78b", "qwen3-vl-32b"] and repo_cfg.image_size == 512
    assert repo_cfg.dino.arch == "vit_small_patch16_224" and repo_cfg.protocol == "dreambench"
    assert {(j.temperature, j.retry_temperature, j.max_retries) for j in repo_cfg.judges} == {(1.0, 1.0, 2)}

    # the shipped config as it is, its servers moved to a loopback judge: 3 runs of both judges by default
    cases, gen = _single_cases(tmp_path)
    raw = yaml.safe_load(SHIPPED.read_text())
    script = {}
    with ScriptedJudge(script) as server:
        for j in raw["judges"]:
            j["base_url"] = server.base_url
            for item in ("cp:subj0", "pf:case0"):
                script[(j["model"], item)] = ["Score: 4", "Score: 3", "Score: 2"]
        server.script = script
        raw.pop("dino")
        (tmp_path / "shipped.yaml").write_text(yaml.safe_dump(raw))
        cfg = EvalConfig.from_yaml(tmp_path / "shipped.yaml")
        s = score_method(
            cases[:1],
            gen,
            tmp_path / "sc",
            cfg,  # one request at a time: runs 1, 2, 3 in order
            ScoreSettings(method="m", metrics=("cp", "pf"), concurrency=1),
        )
        bodies = [r["body"] for r in server.requests]
    assert s["runs"] == 3 and s["protocol"] == "dreambench" and len(bodies) == 2 * 2 * 3
    assert all(run_file(tmp_path / "sc", r).is_file() for r in (1, 2, 3))
    assert {b["temperature"] for b in bodies} == {1.0} and all(b["messages"][0]["role"] == "user" for b in bodies)
    o = s["groups"]["overall"]  # both judges answer 4, 3, 2 in turn: the run means are 1, .75, .5
    assert (o["cp"], o["pf"], o["cp_std"]) == pytest.approx((0.75, 0.75, 0.25))

    bad = tmp_path / "bad.yaml"
    for text, error in [
        ("protocol: open\njudges:\n  - {name: a, base_url: localhost:8000, model: m}\n", "must start with http"),
        ("protocol: open\njudge: []\n", r"unknown key 'judge'; did you mean 'judges'\?"),
        ("judges: []\n", r"no 'protocol'; add 'protocol: dreambench'"),
        ("protocol: gpt4\n", r"protocol 'gpt4' is not one of \['dreambench', 'open'\]"),
        ("protocol: dreambench\nimage_size: 768\n", "image_size 768 conflicts with protocol dreambench"),
        (
            "protocol: dreambench\njudges:\n  - {name: a, base_url: 'http://x/v1', model: m, temperature: 0.0}\n",
            r"judge a: \{'temperature': 0\.0\} conflicts with protocol dreambench",
        ),
        ("protocol: [dreambench\n", "is not valid YAML"),
    ]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=error):
            EvalConfig.from_yaml(bad)
    bad.write_text(
        "protocol: open\nimage_size: 768\njudges:\n  - {name: a, base_url: 'http://x/v1', model: m, temperature: 0.2}\n"
    )
    cfg = EvalConfig.from_yaml(bad)
    assert (cfg.image_size, cfg.judges[0].temperature, cfg.judges[0].retry_temperature, cfg.judges[0].max_retries) == (
        768,
        0.2,
        0.7,
        3,
    )


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
        load_dino(
            DinoPaths(
                path=dino_paths.path, arch="vit_small_patch16_224", model_args={**dino_paths.model_args, "depth": 3}
            )
        )

    settings = ScoreSettings(method="tiny", metrics=("clip-i", "clip-t", "dino"), device="cpu")
    with caplog.at_level(logging.WARNING):
        s = score_method(
            cases,
            gen,
            tmp_path / "s0",
            EvalConfig(),
            settings,
            clip_paths=tiny_models.clip_vision,
            cases_file=str(tmp_path / "cases.jsonl"),
        )
    assert "no DINO weights configured" in caplog.text and s["groups"]["overall"]["dino"] is None
    s = score_method(
        cases,
        gen,
        tmp_path / "s1",
        EvalConfig(dino=dino_paths),
        settings,
        clip_paths=tiny_models.clip_vision,
        cases_file=str(tmp_path / "cases.jsonl"),
    )
    expected = clip.clip_i(image_path(gen, cases[1].id), [cases[1].subjects[0].path])
    assert s["groups"]["style"]["clip-i"] == pytest.approx(expected, abs=1e-5)
    assert s["groups"]["overall"]["n_dino"] == 3 and s["groups"]["overall"]["cp"] is None

    # report: a second method with judge scores, both in the Table 1 layout
    with ScriptedJudge(SCRIPT) as server:
        s2 = score_method(
            cases,
            gen,
            tmp_path / "s2",
            EvalConfig(judges=_judges(server.base_url), protocol="open"),
            ScoreSettings(method="judged", metrics=("cp", "pf")),
            cases_file=str(tmp_path / "cases.jsonl"),
        )
    written = write_report([tmp_path / "s1", tmp_path / "s2"], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| Method | Animal CP | Animal PF | Animal CP·PF | Style CP | Style PF | Style CP·PF | Overall CP |" in md
    o = s2["groups"]["overall"]
    assert f"| judged | 0.562 | 0.625 | 0.352 | 0.750 | 0.500 | 0.375 | {o['cp']:.3f} | {o['pf']:.3f} |" in md
    assert "| tiny | – | – | – |" in md and "CLIP-I" in md
    csv_lines = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert csv_lines[0] == (
        "benchmark,method,split,group,n,runs,cp,cp_std,pf,pf_std,cp_pf,cp_pf_published,clip_i,clip_t,dino"
    )
    assert len(csv_lines) == 1 + 2 * (3 + 3)  # 3 groups + 3 prompt types per method
    assert "dreambench++,judged,group,style,1,1,0.750000,,0.500000,,0.375000,0.375000,,," in csv_lines
    assert "dreambench++,judged,prompt_type,imaginative,0,1,,,,,,,,," in csv_lines
    sheet = Image.open(tmp_path / "report" / "contact_dreambenchpp.png")
    assert sheet.size[0] == 3 * (192 + 4) + 4 and len(written) == 3  # reference | tiny | judged
