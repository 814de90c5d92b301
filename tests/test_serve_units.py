"""`dynaip serve` without a browser: the dataset view's filters and pages, the generation service's
input checks, the HTTP links, and the command line's switches and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data

from train_fixtures import write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    d = write_dataset(root / "ds", [3, 2], size=64)
    cross = write_dataset(root / "cross", [2], pair="cross", start=10, size=64)
    # one dataset with both pair types and two rejects (a readable input and an unreadable one)
    manifest = json.loads((d / "manifest.json").read_text())
    extra = json.loads((cross / "manifest.json").read_text())["shards"][0]
    (d / "shards" / "x.tar").write_bytes((cross / extra["path"]).read_bytes())
    manifest["shards"].append({**extra, "path": "shards/x.tar"})
    photos = root / "photos"
    photos.mkdir()
    Image.fromarray(data.coffee()).resize((40, 30)).save(photos / "small.png")
    manifest["source"] = {"kind": "folder", "root": str(photos)}
    manifest["totals"].update(rejected=2, inputs=manifest["totals"]["inputs"] + 2)
    (d / "manifest.json").write_text(json.dumps(manifest))
    (d / "rejects.jsonl").write_text(
        json.dumps({"source": "folder", "id": "small", "stage": "decode", "reason": "image smaller than 64 px"})
        + "\n"
        + json.dumps({"source": "folder", "id": "gone", "stage": "decode", "reason": "not a readable image"})
        + "\n"
    )
    return d


def test_dataset_view_filters_pages_and_rejects(dataset):
    from dynaip.serve.app import rejects_html, samples_html, summary_html
    from dynaip.serve.datasets import DatasetView

    view = DatasetView.open(dataset)
    s = view.summary()
    assert s["per_pair"] == {"cross": 2, "intra": 5} and sum(s["per_source"].values()) == 7
    assert s["rejects_by_stage"] == {"decode": {"image smaller than 64 px": 1, "not a readable image": 1}}
    assert [e.pair for e in view.samples(pair="cross")] == ["cross", "cross"]
    assert view.samples(source="nowhere") == []
    entries = view.samples()
    page, shown, pages = view.page(entries, 9, 3)  # clamped to the last page
    assert (shown, pages) == (3, 3) and page == entries[6:]
    html = samples_html(view, page, shown, pages, len(entries))
    assert f'data-key="{entries[6].key}"' in html and html.count("<img") == 3
    assert 'data-pair="cross"' in summary_html(view)
    assert view.reject_image(view.rejects(reason="image smaller than 64 px")[0]).size == (40, 30)
    assert view.reject_image(view.rejects(reason="not a readable image")[0]) is None
    only = rejects_html(view, "not a readable image")
    assert 'data-id="gone"' in only and 'data-id="small"' not in only
    files = view.sample_files(entries[0].shard, entries[0].key)
    assert {"ref.png", "tgt.jpg", "mask.png", "json"} <= set(files)
    with pytest.raises(ValueError, match="is not a shard of"):
        view.sample_files("../../etc/passwd", "x")
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        DatasetView.open(dataset / "nope")


def test_sample_and_shard_links(dataset):
    from fastapi.testclient import TestClient

    from dynaip.serve.app import DatasetCache, build_app, build_blocks

    cache = DatasetCache()
    view = cache.open(str(dataset))
    client = TestClient(build_app(cache, build_blocks(cache, lambda: None)))
    e = view.samples()[0]
    r = client.get("/dataset/sample", params={"root": view.root, "shard": e.shard, "key": e.key})
    assert r.status_code == 200 and r.json()["meta"] == e.meta
    r = client.get("/dataset/shard", params={"root": view.root, "shard": e.shard})
    assert r.content == (dataset / e.shard).read_bytes()
    assert client.get("/dataset/shard", params={"root": view.root, "shard": "manifest.json"}).status_code == 404
    assert (
        client.get("/dataset/sample", params={"root": "/elsewhere", "shard": e.shard, "key": e.key}).status_code == 404
    )


def test_generation_inputs_are_checked_before_any_model_runs(tiny_models_yaml, tmp_path):
    from dynaip.serve.generation import GenerationService, drawn_mask

    service = GenerationService(tiny_models_yaml, None, tmp_path / "gen", device="cpu")
    ref = Image.fromarray(data.chelsea())
    painted = np.zeros((256, 256, 4), np.uint8)
    painted[:, :100, 3] = 255
    assert drawn_mask({"layers": [painted]})[:, :100].all() and drawn_mask({"layers": [painted * 0]}) is None
    common = dict(
        scales=[1, 1, 1], granularities=[None] * 3, seed=1, steps=1, height=64, width=64, guidance=3.5, image_cfg=1.0
    )
    cases = [
        (dict(prompt="", references=[ref, None, None], masks=[None] * 3, phrases=[""] * 3), "write a prompt"),
        (dict(prompt="x", references=[None] * 3, masks=[None] * 3, phrases=[""] * 3), "at least one reference"),
        (dict(prompt="x", references=[ref, ref, None], masks=[None] * 3, phrases=[""] * 3), "need one mask each"),
        (
            dict(prompt="x", references=[ref, ref, None], masks=[{"layers": [painted]}, None, None], phrases=[""] * 3),
            "draw a mask for reference 2",
        ),
        (
            dict(
                prompt="x",
                references=[ref, ref, None],
                masks=[{"layers": [painted]}, None, None],
                phrases=["", "a cat", ""],
            ),
            "not a mix",
        ),
        (
            dict(prompt="x", references=[ref, ref, None], masks=[None] * 3, phrases=["a cat", "", ""]),
            "a phrase for every reference",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            service.generate(**kwargs, **common)
    with pytest.raises(
        ValueError,
        match=r"^seed 1180591620717411303424 is out of range: give a whole number from 0 "
        r"to 18446744073709551615 \(2\^64 - 1\)$",
    ):  # issue #35: the form sent 2**70
        service.generate("x", [ref, None, None], masks=[None] * 3, phrases=[""] * 3, **{**common, "seed": 2**70})
    with pytest.raises(ValueError, match="seed 1.5 is out of range"):
        service.generate("x", [ref, None, None], masks=[None] * 3, phrases=[""] * 3, **{**common, "seed": 1.5})
    with pytest.raises(ValueError, match="started without a ControlNet"):
        service.generate(
            "x",
            [ref, None, None],
            masks=[None] * 3,
            phrases=[""] * 3,
            control_images=[ref],
            control_scales=[1.0],
            **common,
        )
    with pytest.raises(ValueError, match="at least one of low / mid / high"):
        service.generate(
            "x",
            [ref, None, None],
            masks=[None] * 3,
            phrases=[""] * 3,
            **{**common, "granularities": [(0, 0, 0), None, None]},
        )
    out = service.generate(
        "x",
        [ref, None, None],
        masks=[None] * 3,
        phrases=[""] * 3,
        **{**common, "granularities": [(1, 0, 0), None, None]},
    )
    sidecar = json.loads(open(out.files[1]).read())
    assert sidecar["granularity"] == [[1.0, 0.0, 0.0]] and sidecar["seed"] == 1 and out.image.size == (64, 64)
    # masks found by phrase: the tiny random detector may find a box or not; either way no traceback
    try:
        found = service.generate("x", [ref, ref, None], masks=[None] * 3, phrases=["cat", "cat", ""], **common)
        assert found.settings["auto_mask"] == ["cat", "cat"] and len(found.masks) == 2
    except ValueError as e:
        assert "was not found" in str(e)


def _post_upload(client, size: int):
    return client.post("/gradio_api/upload", files={"files": ("big.png", b"\0" * size, "image/png")})


def test_uploads_over_the_limit_are_refused_in_one_line(dataset):
    from fastapi.testclient import TestClient

    from dynaip.serve.app import DatasetCache, build_app, build_blocks

    cache = DatasetCache()
    client = TestClient(build_app(cache, build_blocks(cache, lambda: None), max_upload_mb=0.25))  # 262144 bytes
    ok = _post_upload(client, 262144)
    assert ok.status_code == 200 and len(ok.json()) == 1
    big = _post_upload(client, 262145)  # gradio's own per-file limit
    assert big.status_code == 413 and big.text == "File size exceeded maximum allowed size of 262144 bytes."
    inline = client.post(
        "/gradio_api/call/generate",
        content=b"x" * (2 * 262144 + 2**20 + 1),
        headers={"content-type": "application/json"},
    )  # from Content-Length, before reading
    assert inline.status_code == 413
    assert (
        inline.text
        == "request body over 1572864 bytes refused; dynaip serve takes files up to 0.25 MB (--max-upload-mb)\n"
    )


def test_body_limit_counts_a_streamed_body_without_content_length():
    from fastapi.testclient import TestClient
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from dynaip.serve.app import BodyLimit

    async def echo(request):
        return JSONResponse({"bytes": len(await request.body())})

    app = Starlette(
        routes=[Route("/echo", echo, methods=["POST"])], middleware=[Middleware(BodyLimit, limit=1000, hint="h")]
    )
    client = TestClient(app)

    def chunks(n):
        for _ in range(n):
            yield b"x" * 300

    assert client.post("/echo", content=chunks(3)).json() == {"bytes": 900}
    r = client.post("/echo", content=chunks(4))
    assert r.status_code == 413 and r.text == "request body over 1000 bytes refused; h\n"


def test_serve_command_line(monkeypatch, dataset, tmp_path, capsys, caplog):
    import uvicorn

    from dynaip.cli import main
    from dynaip.serve import generation

    class Service:  # no model loading: this test is about the switches
        def __init__(self, models, adapter, out, device=None, controlnet=None):
            self.args = (models, adapter, out, device)
            seen["controlnet"] = controlnet

    seen = {}
    monkeypatch.setattr(generation, "GenerationService", Service)
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: seen.update(host=host, port=port, app=app))
    assert (
        main(
            [
                "serve",
                "--dataset",
                str(dataset),
                "--host",
                "127.0.0.2",
                "--port",
                "8123",
                "--page-size",
                "3",
                "--out",
                str(tmp_path / "o"),
                "--max-upload-mb",
                "0.5",
            ]
        )
        == 0
    )
    assert {k: seen[k] for k in ("host", "port")} == {"host": "127.0.0.2", "port": 8123} and seen["controlnet"] is None
    from fastapi.testclient import TestClient

    client = TestClient(seen.pop("app"))
    assert _post_upload(client, 2**19).status_code == 200 and _post_upload(client, 2**19 + 1).status_code == 413
    monkeypatch.chdir(tmp_path)
    assert main(["serve"]) == 0 and seen["host"] == "127.0.0.1" and seen["port"] == 7860  # loopback by default
    assert main(["serve", "--controlnet", str(tmp_path), "--controlnet", str(dataset)]) == 0
    assert seen["controlnet"] == [str(tmp_path), str(dataset)]  # the page then has two control slots
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    for argv, message in (
        (["serve", "--dataset", str(tmp_path / "missing")], "manifest.json not found"),
        (["serve", "--page-size", "0"], "--page-size 0"),
        (["serve", "--port", "70000"], "--port 70000"),
        (["serve", "--max-upload-mb", "0"], "--max-upload-mb 0: give a size above 0"),
        (["serve", "--models", str(tmp_path / "m.yaml")], "does not exist"),
        (["serve", "--controlnet", str(tmp_path / "cn")], "--controlnet"),
    ):
        caplog.clear()
        assert main(argv) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0]
        assert "Traceback" not in capsys.readouterr().err


def test_generate_page_hands_its_control_slots_to_the_service():
    """`dynaip serve --controlnet A --controlnet B`: the page's generate callback (also the `generate` API
    endpoint) passes one control image and scale per ControlNet; without --controlnet it has none."""
    from dynaip.serve.app import DatasetCache, build_blocks
    from dynaip.serve.generation import MAX_REFERENCES

    calls = []

    class Service:  # records what the page sends; the service's own checks are tested in test_controlnet.py
        def generate(self, prompt, references, **kwargs):
            calls.append(kwargs)
            raise ValueError("recorded")

    def page_generate(controlnets: int):
        blocks = build_blocks(DatasetCache(), Service, controlnets=controlnets)
        return next(f for f in blocks.fns.values() if f.api_name == "generate")

    img = Image.new("RGB", (64, 64))
    slot = [None, 1.0, True, 1.0, 1.0, 1.0, None, ""]  # reference, scale, auto granularity, low/mid/high, mask, phrase
    two = page_generate(2)
    assert len(two.inputs) == 7 + 8 * MAX_REFERENCES + 2 * 2
    assert two.fn("x", 0, 1, 64, 64, 3.5, 1.0, *(slot * MAX_REFERENCES), img, 0.5, None, 1.5)[0] == "⚠️ recorded"
    assert calls[-1]["control_images"] == [img, None] and calls[-1]["control_scales"] == [0.5, 1.5]
    none = page_generate(0)
    assert len(none.inputs) == 7 + 8 * MAX_REFERENCES
    none.fn("x", 0, 1, 64, 64, 3.5, 1.0, *(slot * MAX_REFERENCES))
    assert calls[-1]["control_images"] == [] and calls[-1]["control_scales"] == []
