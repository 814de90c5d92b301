"""`dynaip serve`: one local web app (Gradio, mounted on FastAPI, served by uvicorn) with two pages.

- **Datasets**: open a dataset directory or URL; totals, per-source and per-pair-type counts, rejects
  by stage and reason with examples (input image and reason), a paged sample browser (reference |
  target | mask overlay | caption | metadata) with filters by source / pair type / reason, and a
  link from each sample to its shard and key (``/dataset/sample``, ``/dataset/shard``).
- **Generate**: prompt, one to three references, per-reference scale and granularity (low / mid /
  high), masks drawn on a canvas or found by phrase, seed, steps, size, guidance, image CFG; the
  result with its settings and masks, and a download of the PNG with its JSON sidecar. Started with
  ``--controlnet DIR`` (repeatable), the page also takes a control image and a control scale per
  ControlNet (optional: without them FLUX samples without the ControlNet).

Bound to 127.0.0.1 unless ``--host`` says otherwise; any other address needs ``--token`` or ``--auth``
(or ``DYNAIP_SERVE_TOKEN`` / ``DYNAIP_SERVE_AUTH``), then checked on every route (``dynaip/serve/auth.py``).
The page's functions are also Gradio API endpoints (``open_dataset``, ``samples_page``, ``generate``).
An uploaded file over ``--max-upload-mb`` (default 25) is refused with 413 and one line, and so is any
request body over twice that.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import threading
from pathlib import Path
from typing import Any

from PIL import Image

from dynaip.models import sampling

log = logging.getLogger(__name__)

PAGE_SIZE = 4
ALL = "(all)"
MAX_UPLOAD_MB = 25
"""Default ``--max-upload-mb``: a phone photo is a few MB; anything far above is not a reference image."""

CSS = """
.dyn-card {display:flex; gap:10px; border:1px solid #ddd; border-radius:8px; padding:8px; margin:6px 0;}
.dyn-card figure {margin:0; text-align:center; font-size:12px;}
.dyn-card img {width:128px; height:128px; object-fit:contain; background:#f4f4f4; border-radius:4px;}
.dyn-meta {font-size:12px; max-width:420px; overflow:auto;}
.dyn-meta pre {white-space:pre-wrap; margin:0;}
table.dyn-table td, table.dyn-table th {padding:2px 10px; border-bottom:1px solid #eee; text-align:left;}
.dyn-reject {display:inline-block; margin:4px; text-align:center; font-size:12px; width:140px;}
.dyn-reject img {width:128px; height:128px; object-fit:contain; background:#f4f4f4;}
"""


def _b64(img: Image.Image, size: int = 256) -> str:
    im = img.copy()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _esc(x: Any) -> str:
    return html.escape(str(x))


class DatasetCache:
    """Opened datasets by root (the shard links only serve shards of datasets opened here)."""

    def __init__(self):
        self._views: dict[str, Any] = {}
        self._lock = threading.Lock()

    def open(self, root: str):
        from .datasets import DatasetView

        view = DatasetView.open(root)
        with self._lock:
            self._views[view.root] = view
        return view

    def get(self, root: str):
        with self._lock:
            view = self._views.get(root)
        if view is None:
            raise ValueError(f"{root} is not open in this app; open it on the Datasets page first")
        return view


# ---------------------------------------------------------------------- HTML of the Datasets page
def summary_html(view) -> str:
    s = view.summary()
    rows = "".join(
        f'<tr><td>{k}</td><td data-k="{k}">{s[k]:,}</td></tr>' if isinstance(s[k], int) else ""
        for k in ("inputs", "accepted", "rejected", "samples", "shards", "bytes")
    )
    src = "".join(
        f'<tr><td>{_esc(k)}</td><td data-source="{_esc(k)}">{v}</td></tr>' for k, v in s["per_source"].items()
    )
    pairs = "".join(f'<tr><td>{_esc(k)}</td><td data-pair="{_esc(k)}">{v}</td></tr>' for k, v in s["per_pair"].items())
    return (
        f'<div id="ds-summary-body" data-root="{_esc(s["root"])}"><b>{_esc(s["root"])}</b> '
        f"(recipe {_esc(s['recipe'] or '-')})"
        f'<div style="display:flex; gap:30px"><table class="dyn-table"><tr><th>totals</th><th></th></tr>{rows}</table>'
        f'<table class="dyn-table"><tr><th>source</th><th>samples</th></tr>{src}</table>'
        f'<table class="dyn-table"><tr><th>pair type</th><th>samples</th></tr>{pairs}</table></div></div>'
    )


def samples_html(view, entries, page: int, pages: int, total: int) -> str:
    if not entries:
        return '<div id="ds-samples-body" data-page="0" data-pages="0">no sample matches these filters</div>'
    cards = []
    for e in entries:
        try:
            r = view.render(e)
        except ValueError as err:  # a damaged sample: its card says so in one line, the page goes on
            cards.append(f'<div class="dyn-card" data-key="{_esc(e.key)}" data-error="1">⚠️ {_esc(err)}</div>')
            continue
        link = f"/dataset/sample?root={_esc(_q(view.root))}&shard={_esc(_q(e.shard))}&key={_esc(_q(e.key))}"
        shard_link = f"/dataset/shard?root={_esc(_q(view.root))}&shard={_esc(_q(e.shard))}"
        cards.append(
            f'<div class="dyn-card" data-key="{_esc(e.key)}" data-shard="{_esc(e.shard)}" data-pair="{_esc(e.pair)}" '
            f'data-source="{_esc(e.source)}">'
            f'<figure><img src="{_b64(r.reference)}"><figcaption>reference</figcaption></figure>'
            f'<figure><img src="{_b64(r.target)}"><figcaption>target</figcaption></figure>'
            f'<figure><img src="{_b64(r.overlay)}"><figcaption>mask overlay</figcaption></figure>'
            f'<div class="dyn-meta"><div class="dyn-caption"><b>{_esc(e.caption)}</b></div>'
            f'<div><a class="dyn-sample-link" href="{link}" target="_blank">{_esc(e.shard)} · {_esc(e.key)}</a> '
            f'(<a href="{shard_link}">shard</a>)</div>'
            f"<pre>{_esc(json.dumps(e.meta, sort_keys=True))}</pre></div></div>"
        )
    return (
        f'<div id="ds-samples-body" data-page="{page}" data-pages="{pages}" data-total="{total}">'
        f'<div class="dyn-pageinfo">page {page} / {pages} · {total} samples</div>{"".join(cards)}</div>'
    )


def rejects_html(view, reason: str | None) -> str:
    s = view.summary()
    rows = "".join(
        f'<tr><td>{_esc(stage)}</td><td>{_esc(r)}</td><td data-reject="{_esc(stage)}/{_esc(r)}">{n}</td></tr>'
        for stage, reasons in s["rejects_by_stage"].items()
        for r, n in reasons.items()
    )
    if not rows:
        return '<div id="ds-rejects-body" data-rejected="0">no rejects</div>'
    examples = []
    for row in view.rejects(reason=reason)[:12]:
        img = view.reject_image(row)
        pic = f'<img src="{_b64(img, 160)}">' if img is not None else '<div style="height:128px">(no image)</div>'
        examples.append(
            f'<div class="dyn-reject" data-id="{_esc(row.get("id"))}">{pic}<div><b>{_esc(row.get("stage"))}</b>: '
            f"{_esc(row.get('reason'))}</div><div>{_esc(row.get('id'))}</div></div>"
        )
    return (
        f'<div id="ds-rejects-body" data-rejected="{len(view.reject_rows)}"><table class="dyn-table">'
        f"<tr><th>stage</th><th>reason</th><th>inputs</th></tr>{rows}</table>{''.join(examples)}</div>"
    )


def _q(x: str) -> str:
    from urllib.parse import quote

    return quote(str(x), safe="")


# ---------------------------------------------------------------------- the app
def build_blocks(
    datasets: DatasetCache,
    service_factory,
    initial_dataset: str | None = None,
    page_size: int = PAGE_SIZE,
    controlnets: int = 0,
):
    import gradio as gr

    from .generation import MAX_REFERENCES

    service_box: dict[str, Any] = {}

    def service():
        if "s" not in service_box:
            service_box["s"] = service_factory()
        return service_box["s"]

    def _filter(x):
        return None if not x or x == ALL else x

    # ------------------------------------------------------------------ datasets callbacks
    def open_dataset(root: str):
        try:
            view = datasets.open(root)
        except (ValueError, FileNotFoundError) as e:
            return (f"⚠️ {e}", "", "", "", gr.update(), gr.update(), gr.update(), 1, "")
        entries = view.samples()
        page_entries, page, pages = view.page(entries, 1, page_size)
        return (
            f"opened {view.root}",
            summary_html(view),
            samples_html(view, page_entries, page, pages, len(entries)),
            rejects_html(view, None),
            gr.update(choices=[ALL, *view.sources()], value=ALL),
            gr.update(choices=[ALL, *view.pairs()], value=ALL),
            gr.update(choices=[ALL, *view.reasons()], value=ALL),
            page,
            view.root,
        )

    def samples_page(root: str, source: str, pair: str, page: float, delta: int = 0):
        if not root:
            return "open a dataset first", 1
        try:
            view = datasets.get(root)
        except ValueError as e:
            return f"⚠️ {e}", 1
        entries = view.samples(source=_filter(source), pair=_filter(pair))
        page_entries, shown, pages = view.page(entries, int(page or 1) + delta, page_size)
        return samples_html(view, page_entries, shown, pages, len(entries)), shown

    def show_rejects(root: str, reason: str):
        if not root:
            return ""
        return rejects_html(datasets.get(root), _filter(reason))

    # ------------------------------------------------------------------ generate callback
    def generate(prompt, seed, steps, width, height, guidance, image_cfg, *slots):
        per = 8  # image, scale, auto granularity, low, mid, high, mask canvas, phrase
        refs, scales, grans, masks, phrases = [], [], [], [], []
        controls = slots[MAX_REFERENCES * per :]  # control image, control scale per ControlNet
        for i in range(MAX_REFERENCES):
            img, scale, auto_g, low, mid, high, canvas, phrase = slots[i * per : (i + 1) * per]
            refs.append(img)
            scales.append(scale)
            grans.append(None if auto_g else (low, mid, high))
            masks.append(canvas)
            phrases.append(phrase)
        try:
            result = service().generate(
                prompt,
                refs,
                scales=scales,
                granularities=grans,
                masks=masks,
                phrases=phrases,
                seed=None if seed in (None, "") else int(seed),
                steps=int(steps),
                height=int(height),
                width=int(width),
                guidance=float(guidance),
                image_cfg=float(image_cfg),
                control_images=list(controls[0::2]),
                control_scales=[float(c) for c in controls[1::2]],
            )
        except (ValueError, FileNotFoundError) as e:
            return f"⚠️ {e}", None, None, [], None
        except OSError as e:  # a full or read-only --out: the line says which file and what to do
            from dynaip.atomic import storage_error

            full = storage_error(e)
            if full is None:
                raise
            return f"⚠️ {full}", None, None, [], None
        return (
            "done: " + Path(result.files[0]).name,
            result.files[0],
            result.settings,
            [(m, f"mask {k + 1}") for k, m in enumerate(result.masks)],
            result.files,
        )

    with gr.Blocks(title="DynaIP", css=CSS, analytics_enabled=False) as blocks:
        gr.Markdown("## DynaIP")
        root_state = gr.State("")
        with gr.Tabs():
            with gr.Tab("Datasets", id="datasets", elem_id="tab-datasets"):
                with gr.Row():
                    ds_path = gr.Textbox(
                        label="dataset directory or URL", value=initial_dataset or "", elem_id="ds-path", scale=5
                    )
                    ds_open = gr.Button("Open", elem_id="ds-open", variant="primary", scale=1)
                ds_status = gr.Markdown(elem_id="ds-status")
                ds_summary = gr.HTML(elem_id="ds-summary")
                with gr.Row():
                    f_source = gr.Dropdown([ALL], value=ALL, label="source", elem_id="ds-source")
                    f_pair = gr.Dropdown([ALL], value=ALL, label="pair type", elem_id="ds-pair")
                    f_reason = gr.Dropdown([ALL], value=ALL, label="reject reason", elem_id="ds-reason")
                with gr.Row():
                    prev_btn = gr.Button("◀ previous", elem_id="ds-prev", size="sm")
                    page_no = gr.Number(1, label="page", precision=0, elem_id="ds-page", minimum=1)
                    next_btn = gr.Button("next ▶", elem_id="ds-next", size="sm")
                ds_samples = gr.HTML(elem_id="ds-samples")
                gr.Markdown("### Rejects")
                ds_rejects = gr.HTML(elem_id="ds-rejects")

            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                prompt = gr.Textbox(label="prompt", elem_id="gen-prompt", value="")
                slot_inputs: list = []
                with gr.Row():
                    for i in range(MAX_REFERENCES):
                        with gr.Column(elem_id=f"slot{i + 1}"):
                            ref = gr.Image(
                                type="pil",
                                label=f"reference {i + 1}",
                                elem_id=f"ref{i + 1}",
                                sources=["upload", "clipboard"],
                                height=200,
                            )
                            scale = gr.Slider(0, 2, value=1.0, step=0.05, label="scale λ", elem_id=f"scale{i + 1}")
                            auto_g = gr.Checkbox(True, label="granularity: the routers' own", elem_id=f"autog{i + 1}")
                            low = gr.Slider(0, 1, value=1.0, step=0.05, label="low", elem_id=f"low{i + 1}")
                            mid = gr.Slider(0, 1, value=1.0, step=0.05, label="mid", elem_id=f"mid{i + 1}")
                            high = gr.Slider(0, 1, value=1.0, step=0.05, label="high", elem_id=f"high{i + 1}")
                            # a canvas appears with its reference (each one is a WebGL editor: costly when idle)
                            canvas = gr.Sketchpad(
                                label=f"mask {i + 1} (draw where the subject goes)",
                                visible=False,
                                elem_id=f"mask{i + 1}",
                                type="numpy",
                                canvas_size=(256, 256),
                                fixed_canvas=True,
                                layers=False,
                                height=300,
                                brush=gr.Brush(default_size=48, colors=["#ff0000"], color_mode="fixed"),
                            )
                            phrase = gr.Textbox(label="…or find it by phrase", elem_id=f"phrase{i + 1}")
                            slot_inputs += [ref, scale, auto_g, low, mid, high, canvas, phrase]
                            ref.change(
                                lambda img: gr.update(visible=img is not None),
                                [ref],
                                [canvas],
                                api_name=False,
                                show_progress="hidden",
                            )
                control_inputs: list = []
                if controlnets:
                    with gr.Row():
                        for k in range(controlnets):
                            with gr.Column(elem_id=f"control{k + 1}"):
                                control_inputs += [
                                    gr.Image(
                                        type="pil",
                                        label=f"control image {k + 1} (optional: ControlNet {k + 1})",
                                        elem_id=f"control-image{k + 1}",
                                        sources=["upload", "clipboard"],
                                        height=200,
                                    ),
                                    gr.Slider(
                                        0,
                                        2,
                                        value=1.0,
                                        step=0.05,
                                        label="control scale",
                                        elem_id=f"control-scale{k + 1}",
                                    ),
                                ]
                with gr.Row():
                    seed = gr.Number(0, label="seed (empty: random, recorded)", precision=0, elem_id="gen-seed")
                    steps = gr.Slider(1, 50, value=sampling.STEPS, step=1, label="steps", elem_id="gen-steps")
                    width = gr.Slider(64, 2048, value=sampling.SIZE, step=16, label="width", elem_id="gen-width")
                    height = gr.Slider(64, 2048, value=sampling.SIZE, step=16, label="height", elem_id="gen-height")
                    guidance = gr.Slider(
                        0, 10, value=sampling.GUIDANCE, step=0.1, label="guidance", elem_id="gen-guidance"
                    )
                    image_cfg = gr.Slider(
                        0, 5, value=1.0, step=0.1, label="image CFG (1 = off)", elem_id="gen-imagecfg"
                    )
                go = gr.Button("Generate", variant="primary", elem_id="gen-go")
                gen_status = gr.Markdown(elem_id="gen-status")
                with gr.Row():
                    result = gr.Image(
                        label="result", type="filepath", elem_id="gen-result", interactive=False, height=360
                    )
                    masks_out = gr.Gallery(label="masks used", elem_id="gen-masks", height=360, columns=3)
                settings = gr.JSON(label="settings", elem_id="gen-settings")
                files = gr.File(
                    label="download (PNG + JSON sidecar + masks)", file_count="multiple", elem_id="gen-files"
                )

        outs = [ds_status, ds_summary, ds_samples, ds_rejects, f_source, f_pair, f_reason, page_no, root_state]
        ds_open.click(open_dataset, [ds_path], outs, api_name="open_dataset")
        ds_path.submit(open_dataset, [ds_path], outs, api_name=False)
        if initial_dataset:
            blocks.load(open_dataset, [ds_path], outs, api_name=False)
        sp_in = [root_state, f_source, f_pair, page_no]
        prev_btn.click(lambda r, s, p, n: samples_page(r, s, p, n, -1), sp_in, [ds_samples, page_no], api_name=False)
        next_btn.click(lambda r, s, p, n: samples_page(r, s, p, n, +1), sp_in, [ds_samples, page_no], api_name=False)
        page_no.submit(samples_page, sp_in, [ds_samples, page_no], api_name="samples_page")
        for f in (f_source, f_pair):
            f.change(
                lambda r, s, p: samples_page(r, s, p, 1),
                [root_state, f_source, f_pair],
                [ds_samples, page_no],
                api_name=False,
            )
        f_reason.change(show_rejects, [root_state, f_reason], [ds_rejects], api_name=False)
        go.click(
            generate,
            [prompt, seed, steps, width, height, guidance, image_cfg, *slot_inputs, *control_inputs],
            [gen_status, result, settings, masks_out, files],
            api_name="generate",
        )
    return blocks


class BodyLimit:
    """ASGI middleware: an HTTP request whose body is over ``limit`` bytes gets 413 with one line, from
    its Content-Length before a byte is read, else as soon as the streamed body passes the limit. It
    bounds what Gradio's own per-file limit does not see: images sent inline (base64) to the API."""

    class TooLarge(Exception):
        pass

    def __init__(self, app, limit: int, hint: str):
        self.app, self.limit, self.hint = app, limit, hint

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if seen > self.limit:
                raise BodyLimit.TooLarge
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyLimit.TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = f"request body over {self.limit} bytes refused; {self.hint}\n".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def build_app(datasets: DatasetCache, blocks, creds=None, *, max_upload_mb: float = MAX_UPLOAD_MB):
    """FastAPI app: the sample / shard links, then the Gradio UI at /. An uploaded file over
    ``max_upload_mb`` MiB is refused by Gradio (413, "File size exceeded maximum allowed size"), any
    request body over twice that (an image inlined as base64 is 4/3 of its size) by ``BodyLimit``; with
    ``creds`` (``dynaip.serve.auth.Credentials``) every route answers only requests that carry them."""
    import gradio as gr
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse, JSONResponse, RedirectResponse

    max_bytes = int(max_upload_mb * 2**20)
    app = FastAPI(title="DynaIP")
    app.add_middleware(
        BodyLimit,
        limit=2 * max_bytes + 2**20,
        hint=f"dynaip serve takes files up to {max_upload_mb:g} MB (--max-upload-mb)",
    )

    @app.get("/dataset/sample")
    def sample(root: str, shard: str, key: str):
        try:
            view = datasets.get(root)
            files = view.sample_files(shard, key)
        except (ValueError, OSError) as e:
            raise HTTPException(404, str(e)) from None
        meta = json.loads(files.get("json", b"{}") or b"{}")
        return JSONResponse(
            {
                "root": view.root,
                "shard": shard,
                "key": key,
                "files": sorted(files),
                "caption": files.get("txt", b"").decode("utf-8", "replace"),
                "meta": meta,
                "shard_url": f"/dataset/shard?root={_q(view.root)}&shard={_q(shard)}",
            }
        )

    @app.get("/dataset/shard")
    def shard_file(root: str, shard: str):
        try:
            view = datasets.get(root)
        except ValueError as e:
            raise HTTPException(404, str(e)) from None
        if shard not in {s["path"] for s in view.manifest.get("shards", [])}:
            raise HTTPException(404, f"{shard} is not a shard of {root}")
        loc = view.shard_location(shard)
        if "://" in loc:
            return RedirectResponse(loc)
        return FileResponse(loc, media_type="application/x-tar", filename=Path(shard).name)

    import contextlib

    with contextlib.redirect_stdout(io.StringIO()):  # gradio 5.50's mount_gradio_app prints a stray debug line
        app = gr.mount_gradio_app(app, blocks, path="", show_api=True, max_file_size=max_bytes)
    if creds is not None:  # outermost: in front of the links, the pages and the Gradio API alike
        from .auth import AuthMiddleware

        app.add_middleware(AuthMiddleware, creds=creds)
    return app


# ---------------------------------------------------------------------- CLI
def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="local web app: browse datasets, generate with references",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--models",
        default=None,
        help="models.yaml of real checkpoints (default: tiny random ones, written under --out)",
    )
    p.add_argument("--adapter", default=None, help="adapter checkpoint directory (default: a fresh adapter, no effect)")
    p.add_argument(
        "--controlnet",
        action="append",
        default=None,
        metavar="DIR",
        help="FLUX ControlNet directory (diffusers format); repeat for several: the Generate page then "
        "takes a control image per ControlNet",
    )
    p.add_argument("--dataset", default=None, help="dataset directory or URL to open on start")
    p.add_argument("--out", default="serve-out", help="where generations (PNG + JSON) are written (default: serve-out)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only); any other address needs --token or --auth",
    )
    p.add_argument(
        "--token",
        default=None,
        help="require this token on every request (or set DYNAIP_SERVE_TOKEN, "
        "which other users cannot read in `ps`); open /?token=... once",
    )
    p.add_argument(
        "--auth",
        default=None,
        metavar="USER:PASSWORD",
        help="require this user and password on every request (or set DYNAIP_SERVE_AUTH)",
    )
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--page-size", type=int, default=PAGE_SIZE, help=f"samples per page (default {PAGE_SIZE})")
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=MAX_UPLOAD_MB,
        help=f"largest file an upload may be, in MB (default {MAX_UPLOAD_MB}); larger ones are refused",
    )
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if args.page_size < 1:
        raise ValueError(f"--page-size {args.page_size}: give at least 1")
    if not args.max_upload_mb > 0:
        raise ValueError(f"--max-upload-mb {args.max_upload_mb:g}: give a size above 0")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: give a port between 1 and 65535")
    from .auth import credentials, require_for_host

    creds = credentials(args.token, args.auth)
    require_for_host(args.host, creds)  # before any model loads: off loopback, no credentials = no start
    import uvicorn

    from .generation import GenerationService

    if args.models is not None and not Path(args.models).is_file():
        raise FileNotFoundError(f"models file '{args.models}' does not exist")
    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise FileNotFoundError(f"adapter directory '{args.adapter}' does not exist")
    for d in args.controlnet or []:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"--controlnet '{d}' is not a directory (a diffusers FLUX ControlNet)")
    datasets = DatasetCache()
    if args.dataset:
        datasets.open(args.dataset)  # a bad path fails here, in one line, before the server starts
    service = GenerationService(args.models, args.adapter, args.out, device=args.device, controlnet=args.controlnet)
    blocks = build_blocks(
        datasets,
        lambda: service,
        initial_dataset=args.dataset,
        page_size=args.page_size,
        controlnets=len(args.controlnet or []),
    )
    app = build_app(datasets, blocks, creds, max_upload_mb=args.max_upload_mb)
    how = (
        ""
        if creds is None
        else (
            "; open /?token=<your token> once, or send Authorization: Bearer <token>"
            if creds.token is not None
            else "; log in with your user and password"
        )
    )
    print(f"DynaIP app on http://{args.host}:{args.port}/  (Ctrl-C stops it{how})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
