"""The judge client against loopback stub servers: one retry budget, a whole-request deadline,
no credentials across origins, no key in any error or log line (dynaip/eval/judge_http.py)."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dynaip.eval.judge import ChatJudge, JudgeConfig, JudgeError

KEY = "sk-test-0123456789abcdef"


class Stub:
    """A loopback server; ``handle(handler, n)`` answers request ``n`` (0-based) and records it."""

    def __init__(self, handle):
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                n = len(stub.requests)
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                handle(self, n)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def answer(h: BaseHTTPRequestHandler, text: str, status: int = 200) -> None:
    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


def fail(h: BaseHTTPRequestHandler, status: int, body: bytes = b'{"error": "x"}') -> None:
    h.send_response(status)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def judge(url: str, **kw) -> ChatJudge:
    kw = {"max_retries": 3, "retry_backoff_s": 0, "timeout_s": 5, **kw}
    return ChatJudge(JudgeConfig(name="j", base_url=url + "/v1", model="m", **kw), protocol="open")


def test_three_server_errors_and_an_unscorable_answer_cost_four_requests_not_sixteen():
    def handle(h, n):
        fail(h, 500) if n < 3 else answer(h, "no score in here")

    with Stub(handle) as s:
        j = judge(s.url).ask("PROMPT", [])
    assert len(s.requests) == 4  # 1 + max_retries in all; the nested retries used to send 16
    assert (j.score, j.attempts, j.requests) == (None, 1, 4)

    def flaky(h, n):
        fail(h, 503) if n == 0 else answer(h, "Score: 9" if n == 1 else "Score: 2")

    with Stub(flaky) as s:
        j = judge(s.url).ask("PROMPT", [])
    assert (j.score, j.attempts, j.requests, len(s.requests)) == (2, 2, 3, 3)
    temps = [r["body"]["temperature"] for r in s.requests]
    assert temps == [0.0, 0.0, 0.7]  # a failed request is re-sent unchanged; a re-ask is at retry_temperature


def test_a_server_dripping_its_headers_cannot_outlast_the_deadline():
    def drip(h, n):
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        h.wfile.flush()
        try:
            for _ in range(100):  # a header byte every 0.2 s: every socket read succeeds in time
                h.wfile.write(b"X")
                h.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass

    with Stub(drip) as s:
        t0 = time.monotonic()
        with pytest.raises(JudgeError, match=r"failed 2 times \(last: DeadlineExceeded"):
            judge(s.url, timeout_s=1.0, max_retries=1).ask("PROMPT", [])
        elapsed = time.monotonic() - t0
    assert len(s.requests) == 2 and elapsed < 4  # 2 × 1 s deadline, not 2 × 20 s of dripping


def test_a_cross_origin_redirect_does_not_carry_the_key(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    with Stub(lambda h, n: answer(h, "Score: 3")) as other:

        def redirect(h, n):
            h.send_response(307)
            h.send_header("Location", other.url + "/v1/chat/completions" if n == 0 else "/v1/elsewhere")
            h.send_header("Content-Length", "0")
            h.end_headers()

        with Stub(redirect) as first:
            assert judge(first.url, api_key_env="JUDGE_KEY").ask("PROMPT", []).score == 3
            assert first.requests[0]["auth"] == f"Bearer {KEY}"
            assert other.requests[0]["auth"] is None  # another port is another origin
            assert other.requests[0]["body"]["model"] == "m"  # the POST and its body were re-sent

    def same_origin(h, n):
        if n == 0:
            h.send_response(308)
            h.send_header("Location", "/v2/chat/completions")
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            answer(h, "Score: 1")

    with Stub(same_origin) as s:
        assert judge(s.url, api_key_env="JUDGE_KEY").ask("PROMPT", []).score == 1
    assert [r["auth"] for r in s.requests] == [f"Bearer {KEY}"] * 2 and s.requests[1]["path"] == "/v2/chat/completions"


def test_the_key_never_reaches_an_error_or_a_log_line(monkeypatch, caplog):
    monkeypatch.setenv("JUDGE_KEY", KEY)

    def echo_401(h, n):
        fail(h, 401, f'{{"error": "invalid key {h.headers.get("Authorization")}"}}'.encode())

    with Stub(echo_401) as s, caplog.at_level(logging.DEBUG):
        with pytest.raises(JudgeError, match="refused the request: HTTP 401") as e:
            judge(s.url, api_key_env="JUDGE_KEY").ask("PROMPT", [])
    assert KEY not in str(e.value) and "Bearer ***" in str(e.value)

    def echo_500_then_answer(h, n):
        if n < 2:
            fail(h, 500, f"upstream rejected {h.headers.get('Authorization')}".encode())
        else:
            answer(h, f"your key is {KEY}, no score")

    with Stub(echo_500_then_answer) as s, caplog.at_level(logging.DEBUG):
        j = judge(s.url, api_key_env="JUDGE_KEY", max_retries=2).ask("PROMPT", [])
    assert j.score is None and len(s.requests) == 3 and all(KEY not in a for a in j.answers)
    assert KEY not in caplog.text and "request failed" in caplog.text and "***" in caplog.text
