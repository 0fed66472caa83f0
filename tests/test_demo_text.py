"""The demo's words for image-text models: text search and zero-shot cluster naming, then in Chromium."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

pytest.importorskip("open_clip")
pytest.importorskip("gradio")

from serve.demo_text import LABEL_TEMPLATES, name_clusters, parse_labels, search_text  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
COLOURS = ["red", "green", "blue", "yellow", "magenta", "cyan"]


@pytest.fixture(scope="module")
def session():
    from serve.demo import build_session

    s = build_session("clip_convnet_shapes", data="shapes", split="test", clusters=6, progress=False)
    yield s
    s.close()


def test_search_text_is_nearest_by_cosine(session):
    hits = search_text(session, "a red circle", k=10)
    q = session.model.embed_text(["a red circle"]).numpy()[0]
    expected = np.argsort(-(session.embeddings @ q))[:10]
    assert [h["id"] for h in hits] == expected.tolist()
    shapes, colours = session.dataset.concepts["shape"], session.dataset.concepts["colour"]
    assert all(shapes[h["id"]] == 0 and colours[h["id"]] == 0 for h in hits)
    with pytest.raises(ValueError, match="some words"):
        search_text(session, "  ")


def test_name_clusters_by_best_label(session):
    rows = name_clusters(session, parse_labels("red, green, blue, yellow, magenta, cyan"))
    emb = []
    for c in COLOURS:  # prompt ensemble: normalised mean of the templates' embeddings
        e = session.model.embed_text([t.format(c) for t in LABEL_TEMPLATES]).numpy().mean(0)
        emb.append(e / np.linalg.norm(e))
    emb = np.stack(emb)
    scale = float(session.model.logit_scale.exp())
    for r in rows:  # the label with the highest mean zero-shot probability over the cluster's members
        members = session.members(r["cluster"])
        logits = scale * session.embeddings[members] @ emb.T
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        assert r["label"] == COLOURS[int(p.mean(0).argmax())]
        assert r["score"] == pytest.approx(float(p.mean(0).max()), rel=1e-4)
        assert session.names[r["cluster"]] == r["name"]
    assert len(set(session.names)) == session.num_clusters
    colours = session.dataset.concepts["colour"]
    majority = [COLOURS[np.bincount(colours[session.members(c)], minlength=6).argmax()] for c in range(6)]
    agree = sum(r["label"] == majority[r["cluster"]] for r in rows)
    assert agree >= 5, (rows, majority)  # the names describe what the clusters hold
    with pytest.raises(ValueError, match="comma-separated"):
        parse_labels(" , ")


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"no Chromium at {CHROMIUM}")
def test_text_tab_in_chromium(session):
    pytest.importorskip("playwright.sync_api")
    from playwright.sync_api import expect, sync_playwright

    from serve.demo import launch_demo
    from tests.test_demo_browser import CHROMIUM_ARGS

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch_demo(session, "127.0.0.1", port, block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("tab", name="Text").click()
            page.locator("#text-query textarea, #text-query input").first.fill("a blue square")
            page.locator("#text-go").click()
            expected = search_text(session, "a blue square", k=8)
            captions = page.locator("#text-results .caption-label")
            expect(captions).to_have_count(8)
            assert captions.all_inner_texts()[0].startswith(f"1. {expected[0]['cluster_name']}")
            page.locator("#name-labels textarea, #name-labels input").first.fill(", ".join(COLOURS))
            page.locator("#name-btn").click()
            expect(page.locator("#names-json")).to_contain_text("share")
            page.get_by_role("tab", name="Clusters").click()
            expect(page.locator("#summary")).to_contain_text(session.names[0])
            assert set(session.names) <= set(COLOURS) | {f"{c} ({i})" for c in COLOURS for i in range(2, 7)}
            browser.close()
        assert not errors, errors
    finally:
        demo.close()
