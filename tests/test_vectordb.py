"""The Milvus index backend (Milvus Lite, the embedded engine, through a local .db file): same interface as
faiss, consistent with exact search, stable ids, restarts, crashes, bad input, /search, CLI and demo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from serve.index import (  # noqa: E402
    FaissIndex,
    FeatureIndex,
    IndexFileError,
    IndexModelMismatchError,
    IndexUnreachableError,
)
from serve.index.milvus_backend import MilvusIndex  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
D = 32


def blobs(n: int, d: int = D, centers: int = 60, sigma: float = 0.6, seed: int = 0) -> np.ndarray:
    """Gaussian blobs around random unit centres (clustered, like real features), unit-normalised."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(centers, size=n)] + sigma * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top(xq: np.ndarray, xb: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k by inner product, numpy only (independent of both backends)."""
    sims = xq @ xb.T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def data():
    x = blobs(4300)
    return x[:4000], x[4000:]  # fresh queries from the same distribution (not in the index)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return str(tmp_path_factory.mktemp("milvus") / "zoo.db")


@pytest.fixture(scope="module")
def hnsw(data, db):
    x, _ = data
    idx = FeatureIndex.build(x, [f"img/{i}.png" for i in range(len(x))], "m", {"size": 28}, index_type="hnsw",
                             labels=np.arange(len(x)) % 7, backend="milvus", uri=db, collection="hnsw")
    yield idx
    idx.close()


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_top10_matches_exact_search(data, db, hnsw, kind):
    """On the same clustered features: Milvus top-10 vs exact top-10 (faiss flat and numpy) >= 0.95."""
    x, q = data
    idx = hnsw if kind == "hnsw" else FeatureIndex.build(x, [str(i) for i in range(len(x))], "m", {}, index_type="ivf",
                                                         backend="milvus", uri=db, collection="ivf")
    assert isinstance(idx, MilvusIndex) and idx.index_type == kind and idx.ntotal == len(x)
    key = "efSearch" if kind == "hnsw" else "nprobe"
    assert idx.search_params[key] >= 1 and idx.meta["tuning"]["recall_at_10"] >= 0.95
    flat = FeatureIndex.build(x, [str(i) for i in range(len(x))], "m", {}, index_type="flat")
    assert isinstance(flat, FaissIndex)
    truth = flat.search(q, 10).ids
    assert (truth == exact_top(q, x, 10)).mean() > 0.99  # faiss flat is the exact search
    got = idx.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.ids.tolist(), truth.tolist())])
    assert recall >= 0.95, recall
    np.testing.assert_allclose(got.scores, np.take_along_axis(q @ x.T, got.ids, 1), atol=1e-5)  # cosine scores
    assert np.all(np.diff(got.scores, axis=1) <= 1e-6)
    if kind == "ivf":
        idx.close()


def test_items_labels_model_and_bad_input(data, hnsw):
    x, q = data
    res = hnsw.search(x[[5, 77]], 3, model_name="m")
    assert res.ids[:, 0].tolist() == [5, 77] and res.items[0][0] == "img/5.png" and res.labels[1][0] == 77 % 7
    assert hnsw.model_name == "m" and hnsw.preprocess == {"size": 28} and hnsw.dim == D
    with pytest.raises(IndexModelMismatchError, match="holds features of model 'm'"):
        hnsw.search(q[:1], 3, model_name="other")
    with pytest.raises(IndexModelMismatchError):
        hnsw.add(q[:1], ["x"], model_name="other")
    with pytest.raises(ValueError, match="dimension 16, the index has dimension 32"):
        hnsw.search(np.ones((1, 16)), 3)
    with pytest.raises(ValueError, match="k must be"):
        hnsw.search(q[:1], 0)
    with pytest.raises(ValueError, match="NaN"):
        hnsw.search(np.full((1, D), np.nan), 3)


def test_ids_stable_across_add_remove_and_restart(tmp_path):
    db = str(tmp_path / "ids.db")
    x = blobs(400, seed=3)
    idx = FeatureIndex.build(x[:300], [f"a/{i}" for i in range(300)], "m", None, backend="milvus", uri=db,
                             collection="ids")
    assert idx.index_type == "flat" and idx.next_id == 300
    # a dimension mismatch is refused before anything is written
    with pytest.raises(ValueError, match="dimension 8"):
        idx.add(np.ones((5, 8)), [f"bad/{i}" for i in range(5)])
    assert idx.ntotal == 300 and idx.next_id == 300 and not idx.contains(["bad/0"]).any()
    with pytest.raises(ValueError, match="already in the index"):
        idx.add(x[:1], ["a/0"])
    new = idx.add(x[300:350], [f"b/{i}" for i in range(50)], labels=np.full(50, 4))
    assert new.tolist() == list(range(300, 350))
    assert idx.remove(["a/3", 349, 10]) == 3
    with pytest.raises(ValueError, match="not in the index: 349"):
        idx.remove([349])
    with pytest.raises(ValueError, match="not in the index: 'nope'"):
        idx.remove(["a/4", "nope"])
    assert idx.contains(["a/4"]).all()  # nothing removed by the refused call
    again = idx.add(x[350:360], [f"c/{i}" for i in range(10)])
    assert again.tolist() == list(range(350, 360))  # 349 was removed: never reused
    items = idx.items
    assert len(items) == 357 and items[300] == "b/0" and 349 not in items and 3 not in items
    assert idx.labels[300] == 4 and idx.labels[0] == -1
    assert idx.item_ids(["c/9", "a/0"]) == [359, 0]
    before = idx.search(x[[0, 305, 355]], 5)
    folder = idx.save(tmp_path / "idx")
    idx.close()  # the last client of the file: stops the embedded engine
    from milvus_lite.server_manager import server_manager_instance

    assert os.path.abspath(db) not in server_manager_instance._servers
    again = FeatureIndex.load(folder)  # a fresh engine reads the file back
    assert isinstance(again, MilvusIndex) and again.next_id == 360 and again.ntotal == 357
    after = again.search(x[[0, 305, 355]], 5)
    assert after.ids.tolist() == before.ids.tolist() and after.items == before.items
    np.testing.assert_allclose(after.scores, before.scores, atol=1e-6)
    assert again.add(x[360:361], ["d/0"]).tolist() == [360]
    again.close()
    by_uri = FeatureIndex.load(f"{db}#ids")
    assert by_uri.ntotal == 358
    by_uri.close()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["backend"] == "milvus" and meta["uri"] == os.path.abspath(db) and meta["collection"] == "ids"
    meta["model_name"] = "other"  # the folder and the collection disagree: refused, naming both
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match="meta.json: describes model 'other'.*holds 'm'"):
        FeatureIndex.load(folder)


def test_unreachable_uri_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    uri = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with pytest.raises(IndexUnreachableError, match=f"cannot reach Milvus at {uri}"):
        FeatureIndex.build(blobs(50), [str(i) for i in range(50)], "m", None, backend="milvus", uri=uri)
    with pytest.raises(IndexUnreachableError, match=f"cannot reach Milvus at {uri}"):
        FeatureIndex.load(f"{uri}#images")
    assert time.perf_counter() - t0 < 30
    missing = tmp_path / "no" / "such" / "x.db"
    with pytest.raises(IndexUnreachableError, match=str(missing)):
        FeatureIndex.load(f"{missing}#c")
    with pytest.raises(ValueError, match="needs a uri"):
        FeatureIndex.build(blobs(5), list("abcde"), "m", None, backend="milvus")


def test_concurrent_searches_during_add_are_consistent(tmp_path):
    """Searches while another thread adds: every hit is a real (id, item, score) of the index, k of them."""
    x = blobs(3000, seed=5)
    items = [f"r/{i}" for i in range(len(x))]
    idx = FeatureIndex.build(x[:1000], items[:1000], "m", None, backend="milvus", uri=str(tmp_path / "c.db"),
                             collection="conc")
    assert idx.index_type == "flat"
    q = blobs(3020, seed=5)[3000:]
    errors: list[str] = []
    stop = threading.Event()
    rounds = [0]

    def searcher() -> None:
        while not stop.is_set():
            res = idx.search(q, 10)
            for r in range(len(q)):
                ids = res.ids[r].tolist()
                if len(set(ids)) != 10 or min(ids) < 0:
                    errors.append(f"bad ids {ids}")
                if [items[i] for i in ids] != res.items[r]:
                    errors.append(f"items out of step with ids {ids}")
                if not np.allclose(res.scores[r], x[ids] @ q[r], atol=1e-5):
                    errors.append("scores are not the vectors' cosine")
                # exact (flat) search over a superset of the first 1000 rows: never worse than their top-10
                if res.scores[r, -1] < np.sort(x[:1000] @ q[r])[-10] - 1e-5:
                    errors.append("lost pre-existing neighbours")
            rounds[0] += 1

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    for s in range(1000, 3000, 250):
        assert idx.add(x[s : s + 250], items[s : s + 250]).tolist() == list(range(s, s + 250))
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert rounds[0] >= 3
    final = idx.search(q, 10).ids
    assert (final == exact_top(q, x, 10)).mean() > 0.99  # flat: exact once the adds are in
    idx.close()


KILLER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {root!r})
    from serve.index import FeatureIndex
    from serve.index import milvus_backend
    from tests.test_vectordb import blobs
    milvus_backend.INSERT_CHUNK = 500
    x = blobs(4000, seed=9)
    done = [0]

    def chunk():
        done[0] += 1
        if done[0] == 3:  # mid-way through inserting: die without any cleanup
            print("KILLING", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    FeatureIndex.build(x, [f"new/{{i}}" for i in range(len(x))], "m", None, index_type="hnsw", backend="milvus",
                       uri={db!r}, collection="killed", hooks={{"chunk": chunk}})
""")


def test_killed_build_leaves_the_collection_as_it_was_then_resumes(tmp_path, monkeypatch):
    db = str(tmp_path / "k.db")
    old = blobs(200, seed=8)
    first = FeatureIndex.build(old, [f"old/{i}" for i in range(200)], "m", None, backend="milvus", uri=db,
                               collection="killed")
    before = first.search(old[:5], 5)
    first.close()
    script = tmp_path / "kill.py"
    script.write_text(KILLER.format(root=str(ROOT), db=db))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == -9 and "KILLING" in r.stdout, r.stderr[-2000:]
    after = FeatureIndex.load(f"{db}#killed")  # the engine recovers the file; the alias still names the old index
    assert after.ntotal == 200 and after.index_type == "flat"
    assert after.search(old[:5], 5).ids.tolist() == before.ids.tolist()
    after.close()
    # the same build again resumes: only the rows the killed run did not insert are inserted
    from serve.index import milvus_backend

    monkeypatch.setattr(milvus_backend, "INSERT_CHUNK", 500)
    inserted = [0]
    orig = milvus_backend.MilvusIndex._insert

    def counting(client, name, x, rows, *a, **k):
        inserted[0] += len(rows)
        return orig(client, name, x, rows, *a, **k)

    monkeypatch.setattr(milvus_backend.MilvusIndex, "_insert", staticmethod(counting))
    x = blobs(4000, seed=9)
    idx = FeatureIndex.build(x, [f"new/{i}" for i in range(len(x))], "m", None, index_type="hnsw", backend="milvus",
                             uri=db, collection="killed")
    assert inserted[0] <= 4000 - 1000 and idx.ntotal == 4000 and idx.index_type == "hnsw"
    assert sorted(idx.ids.tolist()) == list(range(4000))
    assert idx.search(x[:20], 1).ids[:, 0].tolist() == list(range(20))
    names = idx._client.list_collections()
    assert len([n for n in names if n.startswith("killed__")]) == 1  # the old one dropped after the swap
    idx.close()


def test_cli_server_and_demo_on_milvus(tmp_path, capsys):
    """`zoo index build --backend milvus`, `zoo index search/info/remove` on the folder, /search, the demo."""
    import torch

    import zoo
    from serve import demo
    from serve.onnx import OnnxEncoder, export_onnx
    from serve.server import create_app
    from zoo.cli import main
    from zoo.data import load_dataset, transform_for

    ds = load_dataset("mnist5k", split="test")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(40):
        ds.get_pil(i).save(imgs / f"d{i:02d}.png")
    out, db = tmp_path / "idx", tmp_path / "cli.db"
    assert main(["index", "build", "scan_convnet_mnist5k", "--images", str(imgs), "--out", str(out),
                 "--backend", "milvus", "--uri", str(db)]) == 0
    assert "40 items" in capsys.readouterr().out
    assert main(["index", "search", str(out), str(imgs / "d04.png"), "-k", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)[0]["results"]
    assert res[0]["item"] == "d04.png" and res[0]["id"] == 4 and res[0]["score"] > 0.9999
    assert main(["index", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "milvus" and info["ntotal"] == 40 and info["collection"] == "idx"
    assert main(["index", "remove", str(out), "d39.png"]) == 0
    assert main(["index", "search", f"{db}#idx", str(imgs / "d39.png"), "--json"]) == 0  # by URI
    res = json.loads(capsys.readouterr().out.split("\n", 1)[1])[0]["results"]
    assert "d39.png" not in [r["item"] for r in res] and len(res) == 10
    assert main(["index", "build", "scan_convnet_mnist5k", "--images", str(imgs), "--out", str(tmp_path / "x"),
                 "--backend", "milvus"]) == 2
    assert "needs --uri" in capsys.readouterr().err

    # the server's /search on the folder's index (loaded the way `zoo serve --index` loads it)
    from fastapi.testclient import TestClient

    model = zoo.create_model("scan_convnet_mnist5k", pretrained=True).eval()
    index = FeatureIndex.load(out)
    encoder = OnnxEncoder(export_onnx(model, tmp_path / "m.onnx"), threads=1)
    with TestClient(create_app(encoder, index)) as client:
        r = client.post("/search", files={"file": ("q.png", (imgs / "d07.png").read_bytes(), "image/png")},
                        params={"k": 4})
        assert r.status_code == 200, r.text
        nb = r.json()["neighbours"]
        assert nb[0]["item"] == "d07.png" and nb[0]["id"] == 7 and len(nb) == 4
    index.close()

    # the demo's search through a Milvus index gives what its faiss index gives
    tf = transform_for(model)
    with torch.no_grad():
        feats = model.forward_features(torch.stack([tf(ds.get_pil(i)) for i in range(40)])).numpy()
    session = demo.ClusterSession(model, ds, [f"mnist5k/test/{i}" for i in range(40)], feats, None,
                                  np.asarray(ds.targets[:40]), clusters=4)
    want = session.search(ds.get_pil(9), k=5)
    session.index = FeatureIndex.build(session.features, session.items, session.model_name,
                                       session.preprocessor.config(), backend="milvus", uri=str(db),
                                       collection="demo")
    got = session.search(ds.get_pil(9), k=5)
    assert [h["item"] for h in got] == [h["item"] for h in want] and got[0]["item"] == "mnist5k/test/9"
    assert [h["cluster"] for h in got] == [h["cluster"] for h in want]
    session.index.close()
    session.close()
