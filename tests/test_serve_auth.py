"""`dynaip serve` authentication (dynaip/serve/auth.py): off loopback it refuses to start without
credentials; with them every route of the app — the pages, the Gradio API and its queue and file routes,
the shard and sample links — answers only requests that carry them."""

from __future__ import annotations

import base64
import logging
import re

import pytest
from train_fixtures import write_dataset

from dynaip.serve import auth

TOKEN = "s3cret-token-for-tests-0123"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("auth") / "ds", [2], size=64)


def _app(dataset, creds):
    from dynaip.serve.app import DatasetCache, build_app, build_blocks

    cache = DatasetCache()
    view = cache.open(str(dataset))
    return build_app(cache, build_blocks(cache, lambda: None), creds), view


def _paths(app) -> list[str]:
    """Every route path of the app, the mounted Gradio app's included, path parameters filled in."""
    from starlette.routing import Mount

    out = []
    for route in app.routes:
        if isinstance(route, Mount):
            out += [route.path + p for p in _paths(route.app)]
        elif hasattr(route, "original_router"):  # a router included by FastAPI (Gradio's /gradio_api/...)
            out += _paths(route.original_router)
        elif hasattr(route, "path"):
            out.append(route.path)
    return sorted({re.sub(r"\{[^}]+\}", "x", p) or "/" for p in out})


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_credentials_from_flags_or_environment():
    assert auth.credentials(env={}) is None
    assert auth.credentials(token=TOKEN, env={}).token == TOKEN
    assert auth.credentials(env={auth.TOKEN_ENV: TOKEN}).token == TOKEN
    c = auth.credentials(env={auth.AUTH_ENV: "ann:correct-horse"})
    assert (c.user, c.password, c.token) == ("ann", "correct-horse", None)
    assert auth.credentials(auth="bob:battery-staple", env={auth.TOKEN_ENV: TOKEN}).user == "bob"  # flags win
    for kwargs, env, message in (
        ({"token": TOKEN, "auth": "a:bbbbbbbb"}, {}, "give --token or --auth, not both"),
        ({"token": "short"}, {}, "--token: use at least 16 characters"),
        ({}, {auth.TOKEN_ENV: "short"}, f"{auth.TOKEN_ENV}: use at least 16"),
        ({"auth": "nopassword"}, {}, "--auth: expected user:password"),
        ({}, {auth.AUTH_ENV: "ann:short"}, f"{auth.AUTH_ENV}: the password needs at least 8"),
    ):
        with pytest.raises(auth.AuthError, match=re.escape(message)) as e:
            auth.credentials(**kwargs, env=env)
        assert "\n" not in str(e.value) and "short" not in str(e.value).split(":", 1)[0]


def test_off_loopback_needs_credentials():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        auth.require_for_host(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.5", "myhost.example"):
        with pytest.raises(auth.AuthError, match=rf"--host {re.escape(host)} serves beyond this machine: give --token"):
            auth.require_for_host(host, None)
        auth.require_for_host(host, auth.Credentials(token=TOKEN))


def test_every_route_refuses_without_the_token_and_serves_with_it(dataset):
    from fastapi.testclient import TestClient

    app, view = _app(dataset, auth.Credentials(token=TOKEN))
    paths = _paths(app)
    assert {"/", "/dataset/sample", "/dataset/shard", "/gradio_api/info", "/config"} <= set(paths)
    assert any(p.startswith("/gradio_api/queue") for p in paths) and any("file" in p for p in paths)
    client = TestClient(app)
    for path in paths:
        for method in ("GET", "POST"):
            r = client.request(method, path)
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.headers["www-authenticate"].startswith("Basic") and r.text.count("\n") == 1
    for bad in (
        {"Authorization": "Bearer wrong-token-0123456789"},
        _basic("x", "wrong"),
        {"Authorization": "Basic !!!"},
        {"Cookie": f"{auth.COOKIE}=forged"},
    ):
        assert client.get("/gradio_api/info", headers=bad).status_code == 401
    good = {"Authorization": f"Bearer {TOKEN}"}
    e = view.samples()[0]
    assert client.get("/", headers=good).status_code == 200
    assert client.get("/gradio_api/info", headers=good).status_code == 200
    assert client.get("/gradio_api/info", headers=_basic("anyone", TOKEN)).status_code == 200
    r = client.get("/dataset/shard", params={"root": view.root, "shard": e.shard}, headers=good)
    assert r.content == (dataset / e.shard).read_bytes()
    r = client.get("/dataset/sample", params={"root": view.root, "shard": e.shard, "key": e.key}, headers=good)
    assert r.json()["key"] == e.key
    # the Gradio API itself: a call of the page's open_dataset function is queued (its result streams from
    # the queue, which runs in a served app: tests/test_serve_browser.py); without the token it is refused
    r = client.post("/gradio_api/call/open_dataset", json={"data": [view.root]}, headers=good)
    assert r.status_code == 200 and r.json()["event_id"], r.text
    assert client.post("/gradio_api/call/open_dataset", json={"data": [view.root]}).status_code == 401


def test_browser_login_by_token_link_sets_a_session_cookie(dataset):
    from fastapi.testclient import TestClient

    app, view = _app(dataset, auth.Credentials(token=TOKEN))
    client = TestClient(app, follow_redirects=False)
    assert client.get("/?token=wrong-token-0123456789").status_code == 401
    r = client.get(f"/dataset/shard?root={view.root}&token={TOKEN}")
    assert r.status_code == 303 and TOKEN not in r.headers["location"]
    assert r.headers["location"].startswith("/dataset/shard?root=")
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    assert client.get("/gradio_api/info").status_code == 200  # the client keeps the cookie
    client.cookies.clear()
    assert client.get("/gradio_api/info").status_code == 401


def test_user_and_password(dataset):
    from fastapi.testclient import TestClient

    app, _ = _app(dataset, auth.Credentials(user="ann", password="correct-horse"))
    client = TestClient(app)
    assert client.get("/gradio_api/info", headers=_basic("ann", "correct-horse")).status_code == 200
    for bad in (
        _basic("ann", "wrong-horse"),
        _basic("bob", "correct-horse"),
        {"Authorization": "Bearer correct-horse"},
        {},
    ):
        assert client.get("/gradio_api/info", headers=bad).status_code == 401


def test_loopback_stays_open_without_credentials(dataset):
    from fastapi.testclient import TestClient

    app, _ = _app(dataset, None)
    assert TestClient(app).get("/gradio_api/info").status_code == 200


def test_serve_command_line_refuses_off_loopback_in_one_line(monkeypatch, dataset, tmp_path, capsys, caplog):
    import uvicorn

    from dynaip.cli import main
    from dynaip.serve import generation

    class Service:  # no model loading: this test is about the switches
        def __init__(self, models, adapter, out, device=None, controlnet=None):
            pass

    seen = {}
    monkeypatch.setattr(generation, "GenerationService", Service)
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: seen.update(app=app, host=host))
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    monkeypatch.delenv(auth.AUTH_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.ERROR)
    assert main(["serve", "--host", "0.0.0.0"]) == 2 and not seen
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "--host 0.0.0.0 serves beyond this machine" in errors[0] and "\n" not in errors[0]
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv(auth.TOKEN_ENV, TOKEN)
    assert main(["serve", "--host", "0.0.0.0", "--dataset", str(dataset)]) == 0 and seen["host"] == "0.0.0.0"
    printed = capsys.readouterr().out
    assert "/?token=<your token>" in printed and TOKEN not in printed
    from fastapi.testclient import TestClient

    client = TestClient(seen["app"])
    assert client.get("/").status_code == 401
    assert client.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    monkeypatch.delenv(auth.TOKEN_ENV)
    assert main(["serve", "--host", "0.0.0.0", "--token", TOKEN]) == 0
    assert TestClient(seen["app"]).get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert TestClient(seen["app"]).get("/").status_code == 401
    assert main(["serve", "--host", "::", "--auth", "ann:correct-horse"]) == 0 and seen["host"] == "::"
