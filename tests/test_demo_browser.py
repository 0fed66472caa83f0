"""The demo in a real browser: headless Chromium (the system's /usr/bin/chromium, never a downloaded
one) driven by Playwright uploads an image and reads the predicted cluster and the neighbours."""

from __future__ import annotations

import os
import re
import socket

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"no Chromium at {CHROMIUM} (Debian package `chromium`; scripts/setup.sh --tests installs it)",
)
pytest.importorskip("playwright.sync_api")
pytest.importorskip("gradio")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app():
    from serve.demo import build_session, launch_demo

    session = build_session("scan_convnet_mnist5k", data="mnist5k", split="test", progress=False)
    port = _free_port()
    demo = launch_demo(session, "127.0.0.1", port, block=False)
    yield session, f"http://127.0.0.1:{port}/"
    demo.close()
    session.close()


@pytest.fixture()
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1280, "height": 1600})
            pg.set_default_timeout(30_000)
            yield pg
        finally:
            browser.close()


def test_galleries_rename_then_upload_shows_cluster_and_k_neighbours(app, page, tmp_path):
    from playwright.sync_api import expect

    session, url = app
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    expect(page.locator("#header")).to_contain_text("Unsupervised classification")

    # Clusters tab: cluster 0's gallery shows its most typical images first
    top = session.members(0)[:16]
    captions = page.locator("#cluster-0 .caption-label")
    expect(captions).to_have_count(len(top))
    assert captions.all_inner_texts() == [f"{i} · {session.confidences[i]:.2f}" for i in top]

    # rename cluster 0 (the dropdown's default) in the page; the new name shows up everywhere
    page.locator("#rename-name textarea, #rename-name input").first.fill("curly fours")
    page.locator("#rename-btn").click()
    expect(page.locator("#rename-status")).to_contain_text("curly fours")
    expect(page.locator("#cluster-0 label").first).to_contain_text("curly fours")
    expect(page.locator("#summary")).to_contain_text("curly fours")
    assert session.names[0] == "curly fours"

    # Search tab: upload an image of cluster 0 with k=5
    i, k = int(session.members(0)[7]), 5
    query = tmp_path / "query.png"
    session.pil(i).save(query)
    page.get_by_role("tab", name="Search").click()
    k_box = page.locator("#k input[type=number]")
    k_box.fill(str(k))
    k_box.press("Enter")
    page.locator("#query input[type=file]").set_input_files(str(query))  # upload runs classify + search

    predicted = page.locator("#predicted-cluster textarea, #predicted-cluster input").first
    expect(predicted).to_have_value(re.compile(r"^curly fours \(cluster 0\), confidence [01]\.\d{3}$"))
    conf = float(predicted.input_value().rsplit(" ", 1)[1])
    assert conf == pytest.approx(float(session.confidences[i]), abs=1e-3)
    thumbs = page.locator("#neighbours img")
    expect(thumbs).to_have_count(k)
    for j in range(k):
        expect(thumbs.nth(j)).to_have_js_property("complete", True)
        assert thumbs.nth(j).evaluate("img => img.naturalWidth") > 0  # the image really loaded
    emb = session.embeddings
    nearest = np.argsort(-(emb @ emb[i]), kind="stable")[:k]
    expect(page.locator("#neighbours .caption-label").first).to_contain_text("1. ")
    assert session.items[int(nearest[1])] in page.locator("#neighbours-json").inner_text()

    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.is_file() and shot.stat().st_size > 0
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not errors, errors
