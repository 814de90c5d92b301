"""`dynaip serve` in a real headless browser (Debian's chromium + chromedriver through Selenium): both
pages, the demo dataset paged through, one tiny generation with two references and drawn masks, and
what the page shows checked against the Python API's results.

Set DYNAIP_SCREENSHOTS=DIR to keep screenshots of both pages (the README's come from here)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

REPO = Path(__file__).resolve().parents[1]
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and Path(CHROMEDRIVER).is_file()) and not os.environ.get("CI"),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)


TOKEN = "browser-test-token-0123456789"  # the app runs with credentials: every request below carries them


def _get(url: str, token: str | None = TOKEN, timeout: float = 30):
    """urlopen with the app's token as a Bearer header (None: no credentials)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory, tiny_models):
    """The demo's recipe on three bundled photos, plus one unreadable and one too-small input (two rejects)."""
    from pipeline.executor_local import run_local
    from pipeline.recipe import Recipe
    from pipeline.demo_photos import write_sample_photos

    root = tmp_path_factory.mktemp("serve")
    photos = root / "photos"
    write_sample_photos(photos, faces=1, names=["astronaut", "chelsea", "coffee"])
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(data.coffee()).resize((40, 30)).save(photos / "tiny.png")
    recipe = Recipe.from_yaml(REPO / "manifests" / "demo.yaml", source_root=str(photos))
    run_local(recipe, root / "dataset", tiny_models, progress=False)
    return root / "dataset"


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_dataset, tiny_models_yaml):
    from test_inference import _trained_like

    from dynaip import DynaIPAdapter, DynaIPConfig

    root = tmp_path_factory.mktemp("app")
    torch.manual_seed(0)
    adapter = _trained_like(DynaIPAdapter(DynaIPConfig.tiny())).save_pretrained(root / "adapter")
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "DYNAIP_SERVE_TOKEN": TOKEN,
    }  # credentials on loopback are enforced too (README: a shared machine)
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dynaip.cli",
            "serve",
            "--models",
            str(tiny_models_yaml),
            "--adapter",
            str(adapter),
            "--dataset",
            str(demo_dataset),
            "--out",
            str(root / "gen"),
            "--port",
            str(port),
            "--page-size",
            "2",
            "--device",
            "cpu",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=root,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"dynaip serve exited with {proc.returncode}: {(root / 'serve.log').read_text()[-3000:]}"
            )
        try:
            with _get(url + "/", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        proc.terminate()
        raise RuntimeError(f"dynaip serve did not answer within 240 s: {(root / 'serve.log').read_text()[-3000:]}")
    yield {"url": url, "out": root / "gen", "adapter": adapter, "root": root}
    proc.terminate()  # by process id, never by name
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


# The mask editors redraw their WebGL canvases on every animation frame, in software on a machine without a GPU:
# at the browser's 60 frames/s an idle Generate page kept both CI cores busy (1.9 cores measured), slowing every
# WebDriver command to ~3 s and starving the other test process. One frame per 300 ms: 0.42 cores.
FRAME_THROTTLE = """(() => { const raf = window.requestAnimationFrame.bind(window);
  window.requestAnimationFrame = (cb) => setTimeout(() => raf(cb), 300); })();"""


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--disable-gpu",
        "--no-first-run",
    ):
        opts.add_argument(arg)
    if CHROMIUM:
        opts.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": FRAME_THROTTLE})
    yield driver
    driver.quit()


def _wait(driver, fn, timeout=120, what="the page"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # element not there yet, stale, ...
            last = e
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} ({last!r})")


def _shot(driver, name):
    where = os.environ.get("DYNAIP_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        driver.set_window_size(1400, 1800)
        time.sleep(2)
        driver.save_screenshot(str(Path(where) / name))
        driver.set_window_size(1280, 900)


def test_datasets_page_against_the_dataset_api(server, browser, demo_dataset):
    from selenium.webdriver.common.by import By

    from dynaip.serve.datasets import DatasetView

    view = DatasetView.open(demo_dataset)
    s = view.summary()
    for path in ("/", "/config", "/gradio_api/info", "/dataset/shard?root=x&shard=y"):  # no credentials: refused
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(server["url"] + path, token=None)
        assert e.value.code == 401, path
    browser.get(server["url"] + f"/?token={TOKEN}")  # the login link: a session cookie, then the page
    assert TOKEN not in browser.current_url
    body = _wait(browser, lambda: browser.find_element(By.ID, "ds-summary-body"), what="the dataset summary")
    for k in ("inputs", "accepted", "rejected", "samples", "shards"):
        shown = body.find_element(By.CSS_SELECTOR, f'td[data-k="{k}"]').text.replace(",", "")
        assert int(shown) == s[k], k
    for pair, n in s["per_pair"].items():
        assert int(body.find_element(By.CSS_SELECTOR, f'td[data-pair="{pair}"]').text) == n
    for source, n in s["per_source"].items():
        assert int(body.find_element(By.CSS_SELECTOR, f'td[data-source="{source}"]').text) == n
    assert s["rejected"] == 2 and len(view.reject_rows) == 2

    # rejects by stage and reason, with examples (the readable input's image and the reason)
    rejects = browser.find_element(By.ID, "ds-rejects-body")
    assert int(rejects.get_attribute("data-rejected")) == 2
    for row in view.reject_rows:
        assert row["reason"] in rejects.text
    example_imgs = rejects.find_elements(By.CSS_SELECTOR, ".dyn-reject img")
    assert len(example_imgs) == 1  # tiny.png is readable, broken.jpg is not

    # page through the samples (page size 2): the keys are the API's, in its order
    keys = [e.key for e in view.samples()]

    def page_keys():
        box = browser.find_element(By.ID, "ds-samples-body")
        return int(box.get_attribute("data-page")), [
            c.get_attribute("data-key") for c in box.find_elements(By.CSS_SELECTOR, ".dyn-card")
        ]

    assert _wait(browser, lambda: page_keys() == (1, keys[:2]), what="page 1")
    card = browser.find_element(By.CSS_SELECTOR, ".dyn-card")
    assert len(card.find_elements(By.TAG_NAME, "img")) == 3  # reference | target | mask overlay
    assert view.samples()[0].caption in card.text
    _shot(browser, "serve_datasets.png")
    browser.find_element(By.ID, "ds-next").click()
    assert _wait(browser, lambda: page_keys() == (2, keys[2:4]), what="page 2")
    browser.find_element(By.ID, "ds-prev").click()
    assert _wait(browser, lambda: page_keys() == (1, keys[:2]), what="back to page 1")

    # a sample's link leads to its shard and key
    href = browser.find_element(By.CSS_SELECTOR, ".dyn-sample-link").get_attribute("href")
    with _get(href) as r:
        linked = json.loads(r.read())
    first = view.samples()[0]
    assert (linked["shard"], linked["key"], linked["meta"]) == (first.shard, first.key, first.meta)
    with _get(server["url"] + linked["shard_url"]) as r:
        assert r.read() == (demo_dataset / first.shard).read_bytes()


def _draw(browser, canvas_id: str, left: bool):
    """Paints the left or the right half of a mask canvas with the brush."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.ID, canvas_id)
    box.find_element(By.CSS_SELECTOR, 'button[aria-label="Brush"]').click()
    # wait for the editor's canvas to be laid out: strokes on a 0-pixel canvas go nowhere
    canvas = _wait(
        browser,
        lambda: (
            (c := max(box.find_elements(By.TAG_NAME, "canvas"), key=lambda c: c.size["width"] * c.size["height"]))
            and c.size["width"] > 50
            and c
        ),
        what=f"the {canvas_id} canvas",
    )
    w, h = canvas.size["width"], canvas.size["height"]
    side = min(w, h) * 0.8  # the square drawing area, centred
    x = -side * 0.3 if left else side * 0.3  # one thick stroke, top to bottom (every pointer move re-renders)
    chain = ActionChains(browser)
    chain.move_to_element_with_offset(canvas, int(x), int(-side * 0.4)).click_and_hold()
    for k in (1, 2, 3, 4):
        chain.move_to_element_with_offset(canvas, int(x), int(-side * 0.4 + k * side * 0.2))
    chain.release().perform()


def _set_number(browser, elem_id: str, value):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = _wait(
        browser, lambda: browser.find_element(By.CSS_SELECTOR, f'#{elem_id} input[type="number"]'), what=elem_id
    )  # the tab's content renders a few (throttled) frames after the click
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value))
    field.send_keys(Keys.TAB)


def _press_and_read_status(browser, timeout: float = 300) -> str:
    """Presses Generate and returns the status line of *this* press: a MutationObserver counts changes
    under the status block (Gradio's pending overlay comes and goes on every press even when the final
    text repeats the previous one), and the text is read once they have stopped."""
    from selenium.webdriver.common.by import By

    browser.execute_script(
        "window.__statusChanges = 0; if (window.__statusObserver) window.__statusObserver.disconnect();"
        "window.__statusObserver = new MutationObserver(() => { window.__statusChanges += 1; });"
        "window.__statusObserver.observe(document.getElementById('gen-status'),"
        " {subtree: true, childList: true, characterData: true, attributes: true});"
    )
    browser.find_element(By.ID, "gen-go").click()
    deadline, last, still_since = time.time() + timeout, -1, time.time()
    while time.time() < deadline:
        n = browser.execute_script("return window.__statusChanges")
        text = browser.find_element(By.ID, "gen-status").text
        if n != last:
            last, still_since = n, time.time()
        elif n > 0 and ("done" in text or "⚠" in text) and time.time() - still_since > 1.5:
            return text
        time.sleep(0.25)
    raise AssertionError(f"no answer to Generate within {timeout:.0f} s")


@pytest.mark.slow  # a real browser drives two generations through the app's own server process
def test_generate_page_two_references_with_drawn_masks(server, browser, tmp_path, tiny_models):
    from selenium.webdriver.common.by import By

    from dynaip import DynaIPFluxPipeline

    refs = [tmp_path / "cat.png", tmp_path / "astronaut.png"]
    Image.fromarray(data.chelsea()).save(refs[0])
    Image.fromarray(data.astronaut()).resize((256, 256)).save(refs[1])

    browser.get(server["url"] + f"/?token={TOKEN}")
    _wait(browser, lambda: browser.find_element(By.ID, "ds-summary-body"), what="the app")
    browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Generate')]").click()
    prompt = _wait(browser, lambda: browser.find_element(By.CSS_SELECTOR, "#gen-prompt textarea"), what="the prompt")
    prompt.send_keys("a cat next to an astronaut")
    # the numbers first: with mask canvases on the page (WebGL in software) every browser action is slow
    for elem, value in (("gen-seed", 3), ("gen-steps", 2), ("gen-width", 64), ("gen-height", 64)):
        _set_number(browser, elem, value)
    for i, ref in enumerate(refs, start=1):
        browser.find_element(By.CSS_SELECTOR, f"#ref{i} input[type=file]").send_keys(str(ref))
        _wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, f"#ref{i} img"), what=f"reference {i}")
    _wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#mask2 canvas"), what="the mask canvases")
    _draw(browser, "mask1", left=True)
    _draw(browser, "mask2", left=False)
    # the editor exports its strokes asynchronously (software WebGL on a loaded CI machine can lag behind
    # the press); a press that arrives before they do gets the page's own "need one mask each" answer,
    # and a user would draw again and press again
    for attempt in range(3):
        if attempt:
            _draw(browser, "mask1", left=True)
            _draw(browser, "mask2", left=False)
        time.sleep(1)
        status = _press_and_read_status(browser)
        if "need one mask each" not in status:
            break
    assert "done" in status, status
    assert "done" in status, status
    _wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#gen-result img"), what="the result image")
    browser.execute_script("window.scrollTo(0, 0)")
    _shot(browser, "serve_generate.png")

    # the sidecar the page offers for download, and the image the page shows
    sidecars = sorted(server["out"].glob("gen-*.json"))
    assert len(sidecars) == 1
    settings = json.loads(sidecars[0].read_text())
    assert (settings["seed"], settings["num_inference_steps"], settings["height"], settings["width"]) == (3, 2, 64, 64)
    assert settings["num_references"] == 2 and len(settings["masks"]) == 2
    shown_settings = browser.find_element(By.ID, "gen-settings").text
    assert "num_references" in shown_settings and sidecars[0].stem in browser.find_element(By.ID, "gen-status").text
    links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#gen-files a")]
    assert any(h.endswith(".json") for h in links) and any(h.endswith(".png") for h in links)
    src = browser.find_element(By.CSS_SELECTOR, "#gen-result img").get_attribute("src")
    if src.startswith("http"):  # a Gradio file route: behind the credentials too
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(src, token=None)
        assert e.value.code == 401
    with _get(src) as r:
        shown = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))
    masks = [np.asarray(Image.open(p)) for p in settings["masks"]]
    left, right = masks
    assert left[:, :32].sum() > 0 == left[:, 32:].sum() and right[:, 32:].sum() > 0 == right[:, :32].sum()  # as drawn

    # the Python API with the same inputs gives the same picture
    pipe = DynaIPFluxPipeline.from_local(tiny_models, server["adapter"])
    api = pipe(
        settings["prompt"],
        references=settings["references"],
        masks=masks,
        scale=settings["scale"],
        seed=3,
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=settings["guidance_scale"],
    )
    assert np.array_equal(shown, np.asarray(api.images[0].convert("RGB")))
