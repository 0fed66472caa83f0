"""serve.index: the auto rule, tuned recall vs exact search, ids through add/remove, atomic save/load, CLI."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from serve import index as sindex  # noqa: E402
from serve.index import (  # noqa: E402
    FeatureIndex,
    IndexFileError,
    IndexModelMismatchError,
    build_index,
    choose_index,
    estimate_bytes,
    write_features,
)

ROOT = Path(__file__).resolve().parents[1]
N, D, NQ = 20_000, 64, 400


def blobs(n: int, d: int = D, centers: int = 200, sigma: float = 0.6, seed: int = 0) -> np.ndarray:
    """Gaussian blobs around random unit centres (clustered, like real features)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    lab = rng.integers(centers, size=n)
    return (c[lab] + sigma * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at_10(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(ids, truth)]))


@pytest.fixture(scope="module")
def data():
    x = blobs(N + NQ)
    db, q = x[:N], x[N:]
    # exact neighbours computed independently: numpy dot products of the normalised vectors, argsort
    truth = np.argsort(-(unit(q) @ unit(db).T), axis=1, kind="stable")[:, :10]
    items = [f"img/{i:05d}.png" for i in range(N)]
    return db, q, truth, items


@pytest.fixture(scope="module")
def built(data):
    db, _, _, items = data
    out = {}
    out["auto"] = FeatureIndex.build(db, items, "m", {"input_size": [3, 8, 8]}, labels=np.arange(N) % 7)
    out["ivf"] = FeatureIndex.build(db, items, "m", {}, index_type="ivf")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out["ivfpq"] = FeatureIndex.build(db, items, "m", {}, memory_budget_mb=2)
    out["ivfpq_warnings"] = [str(m.message) for m in w]
    return out


# ----------------------------------------------------------------------------- auto rule
@pytest.mark.parametrize(
    "n,d,budget,expect",
    [
        (5_000, 256, 1024, "flat"),
        (19_999, 64, 1024, "flat"),
        (20_000, 64, 1024, "hnsw"),
        (100_000, 256, 1024, "hnsw"),
        (1_000_000, 256, 1024, "ivf"),  # HNSW ~1.4 GB does not fit, IVF-Flat ~1.0 GB does
        (1_000_000, 256, 2048, "hnsw"),
        (10_000_000, 256, 1024, "ivfpq"),
        (5_000, 256, 1, "ivfpq"),  # small but the budget forbids raw vectors
    ],
)
def test_auto_choice(n, d, budget, expect):
    choice = choose_index(n, d, budget)
    assert choice["type"] == expect
    assert choice["estimated_bytes"] <= budget * 2**20
    if expect == "ivfpq":
        m = choice["pq_m"]
        assert d % m == 0 and d // m >= 8
        # the largest m that fits: the next larger option would not
        larger = [o for o in sindex._pq_m_options(d) if o > m]
        if larger:
            assert estimate_bytes("ivfpq", n, d, choice["nlist"], min(larger)) > budget * 2**20
    if expect in ("ivf", "ivfpq"):
        assert choice["nlist"] == sindex.nlist_for(n)


def test_auto_choice_refuses_impossible_budget_and_nlist_bounds():
    with pytest.raises(ValueError, match="too small .* needs about"):
        choose_index(100_000_000, 256, 100)
    assert sindex.nlist_for(1_000_000) == 4000
    assert sindex.nlist_for(100) == 2  # at least 39 training points per list
    assert sindex.nlist_for(10**12) == 65536


def test_estimate_matches_serialized_size(built):
    for name in ("auto", "ivf", "ivfpq"):
        idx = built[name]
        size = faiss.serialize_index(idx._index).nbytes
        est = idx.meta["estimated_bytes"]
        # the estimate also counts the in-memory id map, which is not serialised
        assert 0.8 * size <= est <= 1.35 * size + 200_000, (name, size, est)


# ----------------------------------------------------------------------------- recall vs exact search
def test_auto_and_hnsw_recall(data, built):
    db, q, truth, items = data
    idx = built["auto"]
    assert idx.index_type == "hnsw" and "efSearch" in idx.search_params
    tuning = idx.meta["tuning"]
    assert tuning["recall_at_10"] >= 0.95 and tuning["queries"] == 1000
    res = idx.search(q, 10)
    assert recall_at_10(res.ids, truth) >= 0.95
    # scores are the cosine similarities of the returned items
    cos = np.einsum("qd,qkd->qk", unit(q), unit(db)[res.ids])
    np.testing.assert_allclose(res.scores, cos, atol=1e-5)
    assert res.items[0] == [items[i] for i in res.ids[0]]
    assert res.labels[0] == [i % 7 for i in res.ids[0]]


def test_ivf_recall(data, built):
    _, q, truth, _ = data
    idx = built["ivf"]
    assert idx.index_type == "ivf" and idx.search_params["nprobe"] >= 1
    assert recall_at_10(idx.search(q, 10).ids, truth) >= 0.95
    # the tuning is not vacuous: a single probe is much worse than the tuned value
    _, one = idx._raw_search(unit(q).astype(np.float32), 10, {"nprobe": 1})
    assert recall_at_10(one, truth) < 0.9


def test_ivfpq_recall_lower_bar(data, built):
    _, q, truth, _ = data
    idx = built["ivfpq"]
    assert idx.index_type == "ivfpq"
    # 8 bytes per vector on 64-d blobs: quantisation caps recall; the bar is 0.4, and the tuner says so
    assert recall_at_10(idx.search(q, 10).ids, truth) >= 0.4
    assert any("below the target" in w for w in built["ivfpq_warnings"])


def test_flat_is_exact_and_small_k(data):
    db, q, truth, items = data
    idx = FeatureIndex.build(db[:5000], items[:5000], "m", {})
    assert idx.index_type == "flat"
    t5 = np.argsort(-(unit(q) @ unit(db[:5000]).T), axis=1)[:, :10]
    res = idx.search(q, 10)
    assert recall_at_10(res.ids, t5) >= 0.999
    # more neighbours than items: -1 / -inf padding, items only for valid results
    tiny = FeatureIndex.build(db[:3], items[:3], "m", {})
    r = tiny.search(q[:2], 5)
    assert (r.ids[:, 3:] == -1).all() and np.isneginf(r.scores[:, 3:]).all() and len(r.items[0]) == 3


def test_higher_target_gives_higher_recall(data):
    db, q, truth, items = data
    lo = FeatureIndex.build(db[:8000], items[:8000], "m", {}, index_type="ivf", target_recall=0.8)
    hi = FeatureIndex.build(db[:8000], items[:8000], "m", {}, index_type="ivf", target_recall=0.99)
    assert lo.search_params["nprobe"] < hi.search_params["nprobe"]
    t8 = np.argsort(-(unit(q) @ unit(db[:8000]).T), axis=1)[:, :10]
    assert recall_at_10(hi.search(q, 10).ids, t8) >= 0.98


# ----------------------------------------------------------------------------- save / load
def test_save_load_identical(tmp_path, data, built):
    _, q, _, _ = data
    for name in ("auto", "ivf", "ivfpq"):
        idx = built[name]
        folder = idx.save(tmp_path / name)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["index.faiss", "ids.npy", "items.json", "meta.json"] + (["labels.npy"] if name == "auto" else []))
        back = FeatureIndex.load(folder)
        a, b = idx.search(q, 10), back.search(q, 10)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert a.items == b.items and a.labels == b.labels
        assert back.search_params == idx.search_params and back.index_type == idx.index_type
        assert back.model_name == "m" and back.dim == D and back.ntotal == N
        meta = json.loads((folder / "meta.json").read_text())
        for key in ("model_name", "preprocess", "index_type", "search_params", "dim", "metric", "created_at",
                    "zoo_version", "tuning", "files"):
            assert key in meta
    assert FeatureIndex.load(tmp_path / "auto").preprocess == {"input_size": [3, 8, 8]}


def test_model_mismatch_and_dim_errors(data, built):
    _, q, _, _ = data
    idx = built["ivf"]
    with pytest.raises(IndexModelMismatchError, match="'m'.*'other'"):
        idx.search(q, 5, model_name="other")
    with pytest.raises(IndexModelMismatchError):
        idx.add(q[:1], ["x"], model_name="other")
    with pytest.raises(ValueError, match="dimension 32, the index has dimension 64"):
        idx.search(q[:, :32], 5)
    with pytest.raises(ValueError, match="NaN"):
        idx.search(np.full((1, D), np.nan), 5)
    with pytest.raises(ValueError, match="k must be"):
        idx.search(q, 0)
    assert idx.search(q[0], 3, model_name="m").ids.shape == (1, 3)


def _small(n=3000, index_type="flat", seed=1):
    x = blobs(n, 16, centers=30, seed=seed)
    return x, FeatureIndex.build(x, [f"a/{i}" for i in range(n)], "m", {}, index_type=index_type,
                                 labels=np.arange(n) % 3)


def test_corrupt_and_missing_files(tmp_path):
    _, idx = _small(500)
    good = idx.save(tmp_path / "good")

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(good, dst)
        return dst

    bad = copy("flipped")
    raw = bytearray((bad / "index.faiss").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (bad / "index.faiss").write_bytes(bytes(raw))
    with pytest.raises(IndexFileError, match=r"index\.faiss: checksum mismatch"):
        FeatureIndex.load(bad)

    trunc = copy("truncated")  # a truncated file whose checksum was updated: faiss itself must refuse it
    (trunc / "index.faiss").write_bytes((trunc / "index.faiss").read_bytes()[:100])
    meta = json.loads((trunc / "meta.json").read_text())
    meta["files"]["index.faiss"] = hashlib.sha256((trunc / "index.faiss").read_bytes()).hexdigest()
    (trunc / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match=r"index\.faiss: cannot be read by faiss"):
        FeatureIndex.load(trunc)

    gone = copy("missing")
    (gone / "items.json").unlink()
    with pytest.raises(IndexFileError, match=r"items\.json: file missing"):
        FeatureIndex.load(gone)

    garbled = copy("garbled")
    (garbled / "meta.json").write_text("{not json")
    with pytest.raises(IndexFileError, match=r"meta\.json: corrupt JSON"):
        FeatureIndex.load(garbled)

    with pytest.raises(IndexFileError, match="not found"):
        FeatureIndex.load(tmp_path / "nope")


def test_load_never_unpickles(tmp_path):
    _, idx = _small(300)
    folder = idx.save(tmp_path / "i")
    with open(folder / "labels.npy", "wb") as fh:  # an object array needs pickle to load
        np.save(fh, np.array([object()] * 300, dtype=object), allow_pickle=True)
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"]["labels.npy"] = hashlib.sha256((folder / "labels.npy").read_bytes()).hexdigest()
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match=r"labels\.npy: not a readable \.npy array"):
        FeatureIndex.load(folder)


def test_atomic_replace(tmp_path, monkeypatch):
    x, old = _small(400)
    folder = old.save(tmp_path / "idx")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    _, new = _small(600, seed=2)

    def half_write(index, path):  # writes part of the file, then dies
        Path(path).write_bytes(b"\0" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", half_write)
    with pytest.raises(OSError, match="disk full"):
        new.save(folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp folder left behind

    real_rename = os.rename
    calls = []

    def failing_rename(src, dst):  # the old index is moved aside, then moving the new one in fails
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        new.save(folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    assert FeatureIndex.load(folder).ntotal == 400

    new.save(folder)  # and a successful replace
    assert FeatureIndex.load(folder).ntotal == 600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("x")
    with pytest.raises(ValueError, match="not an index"):
        new.save(precious)
    assert (precious / "thesis.txt").exists()


# ----------------------------------------------------------------------------- ids through add / remove
@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_add_remove_keeps_ids_consistent(tmp_path, index_type):
    x, idx = _small(3000, index_type)
    extra = blobs(200, 16, centers=30, seed=5)
    new_ids = idx.add(extra, [f"b/{i}" for i in range(200)], labels=np.full(200, 9))
    np.testing.assert_array_equal(new_ids, np.arange(3000, 3200))
    allx = np.concatenate([x, extra])
    with pytest.raises(ValueError, match="already in the index"):
        idx.add(extra[:1], ["b/0"])

    rng = np.random.default_rng(0)
    gone_ids = rng.choice(3200, 300, replace=False)
    gone_items = ["a/7", "b/3"]
    with pytest.raises(ValueError, match="not in the index: 99999"):
        idx.remove([99999, 1])
    assert idx.ntotal == 3200  # nothing removed by the failed call
    assert idx.remove(list(gone_ids)) == 300
    assert idx.remove(gone_items) == 2
    removed = set(gone_ids.tolist()) | {7, 3003}
    live = np.array(sorted(set(range(3200)) - removed))
    assert idx.ntotal == len(live) and set(idx.items) == set(live.tolist())
    assert idx.items[3001] == "b/1" and idx.labels[3001] == 9 and idx.labels[5] == 5 % 3

    def check(index):
        res = index.search(allx, 20)
        assert not set(res.ids.ravel().tolist()) & removed
        # every live vector still finds itself first, under its own id and item
        top = res.ids[live, 0]
        assert (top == live).mean() >= 0.99
        ok = top == live
        names = [f"a/{i}" if i < 3000 else f"b/{i - 3000}" for i in live]
        assert all(res.items[i][0] == names[j] for j, i in enumerate(live) if ok[j])

    check(idx)
    back = FeatureIndex.load(idx.save(tmp_path / "i"))
    check(back)
    np.testing.assert_array_equal(back.search(allx[:50], 10).ids, idx.search(allx[:50], 10).ids)
    assert back.add(extra[:1], ["c/0"])[0] == 3200  # ids are never reused


def test_hnsw_tombstones_then_compaction():
    x, idx = _small(2000, "hnsw")
    assert idx.remove(list(range(0, 2000, 10))) == 200  # 10%: tombstones, graph unchanged
    assert len(idx._removed) == 200 and idx._index.ntotal == 2000
    res = idx.search(x[:50], 30)
    assert not (res.ids % 10 == 0).any() and (res.ids >= 0).all()  # still k live results per query
    idx.remove(list(range(1, 2000, 10)) + list(range(2, 2000, 10)))  # 30% removed: graph rebuilt
    assert len(idx._removed) == 0 and idx._index.ntotal == 1400 == idx.ntotal
    live = np.array([i for i in range(2000) if i % 10 > 2])
    assert (idx.search(x[live], 1).ids[:, 0] == live).mean() >= 0.99


# ----------------------------------------------------------------------------- feature folders
def test_feature_folder_build(tmp_path):
    x = blobs(500, 16, centers=10)
    write_features(tmp_path / "f", x[:300], [f"s0/{i}" for i in range(300)], "m", {"input_size": [3, 8, 8]},
                   labels=np.arange(300) % 4, shard="00000")
    write_features(tmp_path / "f", x[300:], [f"s1/{i}" for i in range(200)], "m", {"input_size": [3, 8, 8]},
                   labels=np.arange(200) % 4, shard="00001")
    idx = build_index(features=tmp_path / "f", progress=False)
    assert idx.model_name == "m" and idx.ntotal == 500 and idx.items[300] == "s1/0" and idx.labels[301] == 1
    assert idx.preprocess == {"input_size": [3, 8, 8]}
    with pytest.raises(IndexModelMismatchError, match="holds features of model 'm'"):
        build_index("scan_convnet_mnist5k", features=tmp_path / "f", progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        build_index("scan_convnet_mnist5k", data="mnist5k", features=tmp_path / "f")


# ----------------------------------------------------------------------------- CLI
def _zoo(*args):
    from zoo.cli import main

    return main([str(a) for a in args])


def test_cli_build_search_add_remove_info(tmp_path, capsys):
    from zoo.data import load_dataset

    ds = load_dataset("mnist5k", split="test")
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    for i in range(24):
        ds.get_pil(i).save(imgs / ("sub" if i % 2 else "") / f"d{i}.png")
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    out = tmp_path / "idx"

    assert _zoo("index", "build", "scan_convnet_mnist5k", "--images", imgs, "--out", out) == 0
    cap = capsys.readouterr()
    assert "skipped 1 unreadable image file" in cap.err and "broken.png" in cap.err
    assert "24 items" in cap.out

    assert _zoo("index", "search", out, imgs / "sub" / "d3.png", imgs / "d4.png", "-k", "5", "--json") == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["results"][0]["item"] for r in res] == ["sub/d3.png", "d4.png"]
    assert all(abs(r["results"][0]["score"] - 1.0) < 1e-4 for r in res)
    assert all(len(r["results"]) == 5 for r in res)

    # a dataset index, queried with PNG files of its images: same preprocessing, score ~1
    out2 = tmp_path / "idx2"
    assert _zoo("index", "build", "scan_convnet_mnist5k", "--data", "mnist5k", "--split", "test",
                "--out", out2) == 0
    capsys.readouterr()
    assert _zoo("index", "search", out2, imgs / "d4.png", "-k", "3") == 0
    table = capsys.readouterr().out
    first = table.splitlines()[3].split()
    assert first[0] == "1" and float(first[1]) > 0.9999 and first[3] == "mnist5k/test/4" and first[4] == str(
        int(ds.targets[4]))

    assert _zoo("index", "remove", out, "sub/d3.png", "0") == 0
    assert "removed 2" in capsys.readouterr().out
    assert _zoo("index", "search", out, imgs / "sub" / "d3.png", "-k", "30", "--json") == 0
    got = json.loads(capsys.readouterr().out)[0]["results"]
    assert len(got) == 22 and "sub/d3.png" not in {r["item"] for r in got} and 0 not in {r["id"] for r in got}

    (imgs / "new").mkdir()
    ds.get_pil(30).save(imgs / "new" / "n30.png")
    assert _zoo("index", "add", out, "--images", imgs) == 0
    cap = capsys.readouterr()
    assert "added 3 item(s)" in cap.out  # the two removed files come back under new ids, plus the new one
    assert _zoo("index", "info", out) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ntotal"] == 25 and info["next_id"] == 27 and info["model_name"] == "scan_convnet_mnist5k"
    assert info["index_type"] == "flat" and info["source"]["images"] == str(imgs.resolve())

    assert _zoo("index", "info", tmp_path / "missing") == 2
    assert "not found" in capsys.readouterr().err
    assert _zoo("index", "search", out, imgs / "broken.png") == 2
    assert "broken.png" in capsys.readouterr().err


def test_cli_search_refuses_other_model(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((50, 256)).astype(np.float32)
    idx = FeatureIndex.build(x, [str(i) for i in range(50)], "simclr_convnet_mnist5k", None)
    idx.meta["model_source"] = "scan_convnet_mnist5k"  # the recorded source now loads a different model
    idx.save(tmp_path / "i")
    from zoo.data import load_dataset

    load_dataset("mnist5k", split="test").get_pil(0).save(tmp_path / "q.png")
    assert _zoo("index", "search", tmp_path / "i", tmp_path / "q.png") == 2
    assert "scan_convnet_mnist5k" in capsys.readouterr().err


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "b.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "index.py"), "--sizes", "3000", "--types", "flat,hnsw,ivf",
           "--queries", "100", "--splits", "test", "--json", str(out), "--png", str(tmp_path / "b.png"), "--threads", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["type"] for r in rows] == ["flat", "hnsw", "ivf"]
    assert rows[0]["recall_at_10"] == pytest.approx(1.0)
    for r in rows:
        assert r["n"] == 3000 and r["qps"] > 0 and r["bytes_per_vector"] > 0 and r["recall_at_10"] >= 0.9
    assert (tmp_path / "b.png").stat().st_size > 0


@pytest.mark.parametrize("key,value,expect", [
    ("dim", None, r'"dim" must be an integer >= 1, got null'),
    ("dim", 0, r'"dim" must be an integer >= 1, got 0'),
    ("dim", True, r'"dim" must be an integer >= 1, got true'),
    ("next_id", "x", r'"next_id" must be an integer >= 0, got "x"'),
    ("index_type", "annoy", r'"index_type" must be one of'),
    ("preprocess", [1, 2], r'"preprocess" must be a JSON object or null'),
    ("search_params", {"efSearch": "64"}, r'"search_params" must be an object of integer parameters'),
    ("files", {"index.faiss": 3}, r'"files" must be an object of file name -> SHA-256'),
    ("format_version", 99, r'"format_version" must be an integer between 1 and'),
    ("model_name", "", r'"model_name" must be a non-empty string'),
    ("backend", "annoy", r'"backend" must be one of'),
])
def test_meta_json_is_validated_against_the_schema(tmp_path, capsys, key, value, expect):
    """Issue 18.7: a malformed meta.json is an IndexFileError naming the file and the key, in the API
    and on the command line (exit 2, no traceback)."""
    _, idx = _small(200)
    folder = idx.save(tmp_path / "i")
    meta = json.loads((folder / "meta.json").read_text())
    meta[key] = value
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match=r"meta\.json: " + expect):
        FeatureIndex.load(folder)
    assert _zoo("index", "info", folder) == 2
    err = capsys.readouterr().err
    assert str(folder / "meta.json") in err and f'"{key}"' in err and "Traceback" not in err


def test_meta_json_missing_keys_and_cli_subprocess(tmp_path):
    _, idx = _small(200)
    folder = idx.save(tmp_path / "i")
    meta = json.loads((folder / "meta.json").read_text())
    del meta["dim"]
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match=r"meta\.json: missing keys \['dim'\]"):
        FeatureIndex.load(folder)
    meta["dim"] = None  # the reported case, through the real command: a clear error, exit 2
    (folder / "meta.json").write_text(json.dumps(meta))
    r = subprocess.run([sys.executable, "-m", "zoo.cli", "index", "info", str(folder)], capture_output=True,
                       text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f'{folder / "meta.json"}: "dim" must be an integer >= 1, got null' in r.stderr
