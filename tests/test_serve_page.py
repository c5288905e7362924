"""The browser page in a real browser: headless Chromium (Debian's package) driven by Playwright. Load a DICOM,
see the preview equal `render`'s output pixel for pixel, ask, watch the answer stream in, ask a follow-up in
the same conversation (its prefix reused), with the research-use notice visible and nothing fetched elsewhere."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from helpers import ServeProcess, run_cli
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "page-test-key-0123456789abcdef"

# counts the updates of each answer: more than one means the text arrived in pieces
OBSERVE = """() => { window.updates = 0;
  new MutationObserver(() => { window.updates += 1; })
    .observe(document.getElementById('conversation'), {childList: true, subtree: true, characterData: true}); }"""
PREVIEW_BYTES = """async () => { const r = await fetch(document.getElementById('preview').src);
  return Array.from(new Uint8Array(await r.arrayBuffer())); }"""


def test_page_dicom_preview_streamed_answer_and_follow_up(tiny_bundle: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright
    from pydicom.data import get_testdata_file

    from medgemma_edge.bundle import open_bundle

    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (make test installs it)")
    dicom = Path(get_testdata_file("CT_small.dcm"))
    rendered = tmp_path / "seen.png"
    size = open_bundle(tiny_bundle).config["vision"]["image_size"]
    res = run_cli("render", dicom, "-o", rendered, "--size", str(size))
    assert res.returncode == 0, res.stderr
    keys = tmp_path / "keys.txt"
    keys.write_text(KEY + "\n")
    server = ServeProcess("--bundle", tiny_bundle, "--api-key-file", keys)
    elsewhere: list[str] = []
    problems: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
            try:
                # the browser's own way to send the key: HTTP Basic, the key as password
                context = browser.new_context(http_credentials={"username": "radiologist", "password": KEY})
                page = context.new_page()
                page.on("request", lambda r: None if r.url.startswith(server.url) else elsewhere.append(r.url))
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.goto(server.url + "/", timeout=30_000)
                notice = page.locator("#notice")
                assert notice.is_visible() and "Research use only" in notice.inner_text()

                page.set_input_files("#file", str(dicom))
                page.wait_for_selector("#preview:not([hidden])", timeout=30_000)
                png = bytes(page.evaluate(PREVIEW_BYTES))
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(Image.open(rendered)))

                page.evaluate(OBSERVE)
                page.fill("#question", "Describe this CT slice")
                page.click("#ask")
                page.wait_for_function("() => document.querySelectorAll('.answer').length === 1 && "
                                       "document.querySelector('.answer').textContent.length > 0", timeout=60_000)
                page.wait_for_function("() => !document.getElementById('ask').disabled", timeout=60_000)
                assert page.evaluate("() => window.updates") > 2  # the answer grew piece by piece
                assert "time to first token" in page.inner_text("#timings")
                assert "(0 reused)" in page.inner_text("#timings")  # a fresh server: nothing to reuse yet

                page.fill("#question", "Is there any contrast?")
                page.press("#question", "Enter")
                page.wait_for_function("() => document.querySelectorAll('.answer').length === 2 && "
                                       "document.querySelectorAll('.answer')[1].textContent.length > 0", timeout=60_000)
                page.wait_for_function("() => !document.getElementById('ask').disabled", timeout=60_000)
                turns = page.locator(".turn").all_inner_texts()
                assert len(turns) == 4 and turns[0].startswith("[image] Describe") and turns[2] == "Is there any contrast?"
                assert not page.locator(".error").count(), page.locator(".error").all_inner_texts()
                timings = page.inner_text("#timings")
                reused = int(timings.split(" reused")[0].rsplit("(", 1)[1])
                assert reused > 16, timings  # the follow-up reused the first turn, image included
                assert notice.is_visible()
            finally:
                browser.close()
    finally:
        assert server.stop() == 0, server.stderr
    assert not elsewhere, elsewhere  # no CDN, no external asset
    assert not problems, problems  # no script error, no Content-Security-Policy violation
