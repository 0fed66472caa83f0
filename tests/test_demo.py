"""The Gradio demo (serve/demo.py): ClusterSession logic against independent computations, folder
input and its errors, and the app's API called by name through gradio_client (standalone and
mounted under FastAPI at /demo)."""

from __future__ import annotations

import csv
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gradio")
pytest.importorskip("faiss")

from serve.demo import KMEANS_TEMPERATURE, ClusterSession, build_session  # noqa: E402
from zoo import create_model  # noqa: E402
from zoo.data import load_dataset, transform_for  # noqa: E402
from zoo.eval import cluster_metrics, extract_features  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """Session on the shipped SCAN model (cluster head) over mnist5k test (1000 images)."""
    s = build_session("scan_convnet_mnist5k", data="mnist5k", split="test", progress=False)
    yield s
    s.close()


@pytest.fixture(scope="module")
def test_ds():
    model = create_model("scan_convnet_mnist5k", pretrained=True).eval()
    return model, load_dataset("mnist5k", split="test", transform=transform_for(model))


@pytest.fixture(scope="module")
def simclr_feats():
    model = create_model("simclr_convnet_mnist5k", pretrained=True).eval()
    ds = load_dataset("mnist5k", split="test", transform=transform_for(model))
    out = extract_features(model, ds, progress=False)
    return model, ds, out["features"]


def _write_pngs(ds, idx, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in idx:
        name = f"img_{i:04d}.png"
        ds.get_pil(int(i)).save(folder / name)
        names.append(name)
    return names


# ---------------------------------------------------------------------------- cluster-head session
def test_head_assignments_equal_predict_cluster(head, test_ds):
    model, ds = test_ds
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.inference_mode():
        probs = model.predict_cluster(x).numpy()
    assert head.method == "cluster_head" and head.num_clusters == probs.shape[1] == 10
    assert len(head) == 1000 and head.items[17] == "mnist5k/test/17"
    np.testing.assert_array_equal(head.assignments, probs.argmax(1))
    np.testing.assert_allclose(head.confidences, probs.max(1), atol=1e-5)
    np.testing.assert_array_equal(head.labels, ds.targets)
    assert head.index.ntotal == 1000 and head.index.model_name == "scan_convnet_mnist5k"
    assert "cluster head" in head.method_text


def test_metrics_equal_independent_recomputation(head, test_ds):
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    _, ds = test_ds
    y, p = ds.targets, head.assignments
    table = np.zeros((10, head.num_clusters), np.int64)
    np.add.at(table, (y, p), 1)
    r, c = linear_sum_assignment(-table)
    m = head.metrics()
    assert m == cluster_metrics(y, p)
    assert m["acc"] == pytest.approx(table[r, c].sum() / len(y), abs=1e-12)
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(y, p), abs=1e-9)
    assert m["ari"] == pytest.approx(adjusted_rand_score(y, p), abs=1e-9)
    assert m["acc"] > 0.9  # the shipped model's head ACC is 0.954 on this split
    assert head.confusion_png().stat().st_size > 0


def test_typical_first_ordering(head):
    for c in range(head.num_clusters):
        got = head.members(c)
        idx = np.flatnonzero(head.assignments == c)
        expect = idx[np.lexsort((idx, -head.confidences[idx]))]  # confidence desc, then index
        np.testing.assert_array_equal(got, expect)
    assert sum(len(head.members(c)) for c in range(head.num_clusters)) == len(head)
    np.testing.assert_array_equal(head.sizes(), np.bincount(head.assignments, minlength=10))


def test_classify_and_search_in_process(head):
    emb = head.embeddings
    for i in (0, 123, 777):
        c, p, probs = head.classify(head.pil(i))
        assert c == head.assignments[i] and p == pytest.approx(head.confidences[i], abs=1e-5)
        assert probs.shape == (10,) and probs.sum() == pytest.approx(1.0, abs=1e-5)
        hits = head.search(head.pil(i), k=5)
        sims = emb @ emb[i]
        expect = np.argsort(-sims, kind="stable")[:5]
        assert [h["id"] for h in hits] == expect.tolist()  # flat index: exact cosine neighbours
        assert hits[0]["item"] == head.items[i] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert [h["cluster"] for h in hits] == head.assignments[expect].tolist()
    assert len(head.search(head.pil(0), k=5000)) == len(head)  # k above N: all images
    with pytest.raises(ValueError, match="k must be >= 1"):
        head.search(head.pil(0), k=0)


def test_rename_and_csv(head, tmp_path):
    old = list(head.names)
    try:
        assert head.rename(3, "  threes ") == "threes"
        assert head.names[3] == "threes"
        assert head.rename("threes", "three") == "three"  # by current name
        with pytest.raises(ValueError, match="cannot be empty"):
            head.rename(1, "   ")
        with pytest.raises(ValueError, match="already used by cluster 3"):
            head.rename(1, "three")
        with pytest.raises(ValueError, match="unknown cluster"):
            head.rename(10, "x")
        head.rename(4, "=cmd")
        path = head.to_csv(tmp_path / "out" / "a.csv")
        assert [p.name for p in path.parent.iterdir()] == ["a.csv"]  # no temp file left behind
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert list(rows[0]) == ["item", "cluster", "cluster_name", "confidence", "true_label"]
        assert [r["item"] for r in rows] == head.items
        assert [int(r["cluster"]) for r in rows] == head.assignments.tolist()
        names = np.array(head.names, dtype=object)
        assert [r["cluster_name"].lstrip("'") for r in rows] == names[head.assignments].tolist()
        assert any(r["cluster_name"] == "three" for r in rows)
        assert any(r["cluster_name"] == "'=cmd" for r in rows)  # formula injection neutralised
        np.testing.assert_allclose([float(r["confidence"]) for r in rows], head.confidences, atol=1e-6)
        assert [int(r["true_label"]) for r in rows] == head.labels.tolist()
    finally:
        head.names[:] = old


def _split_like_a_spreadsheet(line: str, sep: str) -> list[str]:
    """How spreadsheet importers split a line: ``sep`` ends a cell only outside double quotes."""
    cells, cell, quoted = [], "", False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            cells.append(cell)
            cell = ""
            continue
        cell += ch
    return [*cells, cell]


def test_csv_quotes_every_cell_so_semicolon_locales_are_safe(head, tmp_path):
    old = list(head.names)
    try:
        head.rename(2, "a;=1+1")
        path = head.to_csv(tmp_path / "q.csv")
        lines = path.read_text(encoding="utf-8").splitlines()
        for line in lines:  # every cell quoted
            assert line.startswith('"') and line.endswith('"') and all(
                c.startswith('"') and c.endswith('"') for c in _split_like_a_spreadsheet(line, ",")), line
        for sep in (";", ","):  # no locale's separator turns part of a name into a formula cell
            for line in lines:
                assert not any(c.lstrip('"').startswith("=") for c in _split_like_a_spreadsheet(line, sep)), line
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        assert sum(r["cluster_name"] == "a;=1+1" for r in rows) == int((head.assignments == 2).sum()) > 0
    finally:
        head.names[:] = old


def test_map_png(head):
    xy = head.coords_2d("pca")
    assert xy.shape == (1000, 2)
    x = head.embeddings - head.embeddings.mean(0)
    from sklearn.decomposition import PCA

    ref = PCA(2).fit_transform(x)
    for j in range(2):  # same projection up to sign
        assert abs(np.corrcoef(xy[:, j], ref[:, j])[0, 1]) > 0.999
    assert head.map_png("pca").stat().st_size > 0
    with pytest.raises(ValueError, match="pca"):
        head.coords_2d("umap")


# ---------------------------------------------------------------------------- k-means sessions
def test_kmeans_with_k_given(simclr_feats):
    model, ds, feats = simclr_feats
    s = build_session(model, data="mnist5k", split="test", clusters=10, progress=False)
    try:
        assert not model.has_cluster_head and s.method == "kmeans" and s.num_clusters == 10
        np.testing.assert_allclose(s.features, feats, atol=1e-5)
        emb = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        sims = emb @ s.centroids.T
        np.testing.assert_allclose(np.linalg.norm(s.centroids, axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(s.assignments, sims.argmax(1))
        z = sims / KMEANS_TEMPERATURE
        probs = np.exp(z - z.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        np.testing.assert_allclose(s.confidences, probs.max(1), atol=1e-4)
        for c in range(10):  # nearest to the centroid first
            idx = np.flatnonzero(s.assignments == c)
            expect = idx[np.lexsort((idx, -sims[idx, c]))]
            got = s.members(c)
            np.testing.assert_allclose(sims[got, c], sims[expect, c], atol=1e-5)
            assert set(got.tolist()) == set(idx.tolist())
        assert s.metrics()["acc"] > 0.5
        assert "K = 10 given" in s.method_text
        # classify agrees with the assignment of the same image
        for i in (5, 500):
            assert s.classify(s.pil(i))[0] == s.assignments[i]
    finally:
        s.close()


def test_kmeans_with_k_chosen_by_silhouette(simclr_feats):
    from sklearn.metrics import silhouette_score

    model, ds, feats = simclr_feats
    items = [f"mnist5k/test/{i}" for i in range(len(ds))]
    s = ClusterSession(model, ds, items, feats, None, ds.targets, clusters=None, k_range=(2, 12))
    try:
        assert s.method == "kmeans" and sorted(s.k_scores) == list(range(2, 13))
        assert s.num_clusters == max(s.k_scores, key=s.k_scores.get)
        # N=1000 <= the 2000-image subsample: the scored run is the final assignment
        emb = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        ref = silhouette_score(emb, s.assignments, metric="cosine")
        assert s.k_scores[s.num_clusters] == pytest.approx(ref, abs=1e-4)
        assert "silhouette" in s.method_text and f"K = {s.num_clusters}" in s.method_text
    finally:
        s.close()


def test_head_model_with_another_k_uses_kmeans(head):
    args = (head.model, head.dataset, head.items, head.features, head.probs, head.labels)
    s = ClusterSession(*args, clusters=4)
    try:
        assert s.method == "kmeans" and s.num_clusters == 4 and "K = 4 given" in s.method_text
        assert set(np.unique(s.assignments).tolist()) <= set(range(4))
    finally:
        s.close()
    s = ClusterSession(*args, clusters=10)  # the head's own K: the head is used
    try:
        assert s.method == "cluster_head"
        np.testing.assert_array_equal(s.assignments, head.assignments)
    finally:
        s.close()


def test_k_out_of_range_is_a_clear_error(simclr_feats):
    model, ds, feats = simclr_feats
    items = [str(i) for i in range(len(ds))]
    with pytest.raises(ValueError, match="K=1001 clusters but there are only 1000 images"):
        ClusterSession(model, ds, items, feats, None, ds.targets, clusters=1001)
    with pytest.raises(ValueError, match=">= 1"):
        ClusterSession(model, ds, items, feats, None, ds.targets, clusters=0)


# ---------------------------------------------------------------------------- folders
def test_folder_input(head, test_ds, tmp_path):
    _, ds = test_ds
    idx = [0, 1, 2, 150, 300, 450, 600, 750, 900, 999]
    names = _write_pngs(ds, idx, tmp_path / "imgs")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    s = build_session("scan_convnet_mnist5k", images=tmp_path / "imgs", progress=False)
    try:
        assert s.items == names  # relative paths, sorted; the corrupt file and the .txt are not items
        assert len(s.skipped) == 1 and s.skipped[0][0].endswith("broken.png") and s.skipped[0][1]
        assert "1 unreadable skipped" in s.source
        assert s.labels is None and s.metrics() is None and s.confusion_png() is None
        np.testing.assert_array_equal(s.assignments, head.assignments[idx])  # same pixels, same clusters
        np.testing.assert_allclose(s.features, head.features[idx], atol=1e-4)
        with open(s.to_csv(), newline="") as fh:
            assert list(csv.DictReader(fh))[0].keys() == {"item", "cluster", "cluster_name", "confidence"}
        with pytest.raises(ValueError, match="K=11 clusters but there are only 10 images"):
            build_session("scan_convnet_mnist5k", images=tmp_path / "imgs", clusters=11, progress=False)
    finally:
        s.close()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no readable images"):
        build_session("scan_convnet_mnist5k", images=empty, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        build_session("scan_convnet_mnist5k", images=tmp_path / "missing", progress=False)
    _write_pngs(ds, [0, 1], tmp_path / "two")
    with pytest.raises(ValueError, match="at least 3 images"):
        build_session("simclr_convnet_mnist5k", images=tmp_path / "two", progress=False)


# ---------------------------------------------------------------------------- the app's API
@pytest.fixture(scope="module")
def app_url(head):
    from serve.demo import launch_demo

    port = _free_port()
    demo = launch_demo(head, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def _client(url: str, tmp_path: Path):
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "dl"))


def test_api_classify_search_rename_export(head, test_ds, app_url, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, ds = test_ds
    client = _client(app_url, tmp_path)
    assert {"/classify", "/search", "/rename", "/export"} <= set(
        client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    idx = [4, 640]
    files = _write_pngs(ds, idx, tmp_path / "q")
    api_clusters = {}
    for i, f in zip(idx, files):
        result, text, label = client.predict(handle_file(str(tmp_path / "q" / f)), api_name="/classify")
        assert result["cluster"] == head.assignments[i]
        assert result["confidence"] == pytest.approx(float(head.confidences[i]), abs=1e-4)
        assert result["cluster_name"] in text and label["label"] == result["cluster_name"]
        assert sum(result["probs"].values()) == pytest.approx(1.0, abs=1e-4)
        api_clusters[head.items[i]] = result["cluster"]

        hits, gallery = client.predict(handle_file(str(tmp_path / "q" / f)), 6, api_name="/search")
        assert len(hits) == 6 and len(gallery) == 6
        assert hits[0]["item"] == head.items[i] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert all(Path(g["image"]).stat().st_size > 0 for g in gallery)

    old = list(head.names)
    try:
        c = int(head.assignments[idx[0]])
        out = client.predict(c, "my cluster", api_name="/rename")
        assert out[0] == {"cluster": c, "name": "my cluster", "names": head.names}
        assert head.names[c] == "my cluster"
        result, _, _ = client.predict(handle_file(str(tmp_path / "q" / files[0])), api_name="/classify")
        assert result["cluster_name"] == "my cluster"  # the new name is used afterwards
        with pytest.raises(AppError, match="cannot be empty"):
            client.predict(c, "  ", api_name="/rename")

        csv_path, info = client.predict(api_name="/export")
        with open(csv_path, newline="") as fh:
            rows = {r["item"]: r for r in csv.DictReader(fh)}
        assert len(rows) == info["rows"] == 1000
        for item, cluster in api_clusters.items():  # the API's clusters are the CSV's
            assert int(rows[item]["cluster"]) == cluster
        assert rows[head.items[idx[0]]]["cluster_name"] == "my cluster"
        counts: dict[str, int] = {}
        for r in rows.values():
            counts[r["cluster_name"]] = counts.get(r["cluster_name"], 0) + 1
        assert counts == info["sizes"]
        assert counts["my cluster"] == int((head.assignments == c).sum())
    finally:
        head.names[:] = old


def test_api_errors_keep_the_app_running(head, app_url, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client = _client(app_url, tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(AppError, match="Truncated|not an image|corrupt"):
        client.predict(handle_file(str(bad)), api_name="/classify")
    with pytest.raises(AppError, match="99 is not in the list of choices"):
        client.predict(99, "x", api_name="/rename")
    good = tmp_path / "good.png"
    head.pil(10).save(good)
    result, _, _ = client.predict(handle_file(str(good)), api_name="/classify")
    assert result["cluster"] == head.assignments[10]
    png = client.predict("pca", api_name="/draw_map")
    assert Path(png).stat().st_size > 0


def test_upload_errors_name_the_users_file_not_the_gradio_cache(head, app_url, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from tests.server.helpers import bomb_png

    client = _client(app_url, tmp_path)
    bad = tmp_path / "my holiday.png"
    bad.write_bytes(b"not an image at all")
    big = tmp_path / "huge scan.png"
    big.write_bytes(bomb_png(12000, 12000))  # 144 Mpx: PIL's bomb *warning* range
    for path, needle in ((bad, "not an image"), (big, "pixels")):
        for api in ("/classify", "/search"):
            args = (handle_file(str(path)),) if api == "/classify" else (handle_file(str(path)), 3)
            with pytest.raises(AppError) as e:
                client.predict(*args, api_name=api)
            msg = str(e.value)
            assert path.name in msg and needle in msg and "/tmp/gradio" not in msg and "internal" not in msg, msg
    good = tmp_path / "good.png"
    head.pil(7).save(good)
    assert client.predict(handle_file(str(good)), api_name="/classify")[0]["cluster"] == head.assignments[7]


def test_mounted_under_fastapi(head, tmp_path):
    import uvicorn
    from fastapi import FastAPI
    from gradio_client import handle_file

    from serve.demo import mount_demo

    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    mount_demo(app, head, path="/demo")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started
        import httpx

        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"ok": True}
        client = _client(f"http://127.0.0.1:{port}/demo/", tmp_path)
        q = tmp_path / "q.png"
        head.pil(42).save(q)
        result, _, _ = client.predict(handle_file(str(q)), api_name="/classify")
        assert result["cluster"] == head.assignments[42]
        hits, _ = client.predict(handle_file(str(q)), 3, api_name="/search")
        assert [h["item"] for h in hits][0] == "mnist5k/test/42" and len(hits) == 3
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_cli_port_in_use_and_bad_folder(tmp_path, capsys):
    from zoo.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["demo", "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is already in use" in capsys.readouterr().err
    (tmp_path / "e").mkdir()
    assert main(["demo", "--images", str(tmp_path / "e"), "--port", str(_free_port())]) == 2
    assert "no readable images" in capsys.readouterr().err
