"""``zoo embed --uri URI --nproc N``: two real processes insert their shards into one Milvus Lite collection.

Milvus Lite allows one process per ``.db`` (it takes a non-blocking ``flock``), so without the
writers' lock the second rank's client would fail to open: two ranks finishing proves the turns.
One module fixture runs two launches (each process imports torch: ~10 s on 2 cores):

1. rank 1 dies by SIGKILL after inserting 2 chunks of its shard (the ranks started here with the
   environment torchrun gives them; rank 0 is then stopped, as torchrun would);
2. the real command, ``zoo embed ... --nproc 2`` (torchrun), on the same file: it resumes.

The result is compared with a one-process ``zoo index build``-path build (``build_index``) of the same
data made here, and with exact search in numpy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")
pytest.importorskip("faiss")

ROOT = Path(__file__).resolve().parents[1]
N_CHUNK = 50  # rows per insert in the killed run: rank 1 (177 rows) dies after 100

KILLED = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from serve.index import milvus_backend
    from train.embed import embed_into_collection
    milvus_backend.INSERT_CHUNK = {chunk}
    rank, done = int(os.environ["RANK"]), [0]

    def chunk():
        done[0] += 1
        if rank == 1 and done[0] == 2:  # part of its shard inserted: die without any cleanup
            print("KILLING", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    embed_into_collection({model!r}, {db!r}, "digits", data="digits", split="test", index_type="hnsw",
                          progress=False, hooks={{"chunk": chunk}})
    print("RANK", rank, "DONE", flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _rows(db: str, collection: str | None) -> tuple[list[str], np.ndarray, np.ndarray, list[str], list[int]]:
    """(collections, ids, vectors, items, labels) of the alias ``collection`` (None: the only unfinished build)."""
    from serve.index.milvus_backend import MilvusIndex
    from serve.index.milvus_connect import _release, connect

    client = connect(db)
    try:
        names = sorted(client.list_collections())
        name = collection or next(n for n in names if n.startswith("digits__"))
        client.load_collection(name)
        rows = MilvusIndex._scan(client, client.describe_collection(name)["collection_name"],
                                 ["id", "vector", "item", "label"])
    finally:
        _release(client, db)
    rows.sort(key=lambda r: r["id"])
    return (names, np.array([r["id"] for r in rows], dtype=np.int64),
            np.array([np.asarray(r["vector"], np.float32) for r in rows]), [r["item"] for r in rows],
            [int(r["label"]) for r in rows])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    from serve.index import build_index
    from zoo.checkpoint import save_model_folder
    from zoo.model import ZooModel

    tmp = tmp_path_factory.mktemp("embed_milvus")
    torch.manual_seed(0)
    model = ZooModel("convnet_tiny", {"widths": [8, 16]}, pretrained_cfg={
        "name": "tiny_digits", "input_size": [3, 8, 8], "mean": [0.3] * 3, "std": [0.4] * 3,
        "crop_pct": 1.0, "interpolation": "bilinear"})
    folder = str(save_model_folder(model, tmp / "model"))
    db, ref_db = str(tmp / "two.db"), str(tmp / "one.db")

    # 1. a killed rank: both ranks started as torchrun starts them
    script = tmp / "killed.py"
    script.write_text(KILLED.format(root=str(ROOT), chunk=N_CHUNK, model=folder, db=db))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in (0, 1)]
    try:
        out1, _ = procs[1].communicate(timeout=120)
        time.sleep(0.5)  # rank 0 may be inserting its last chunk: stop it mid-way, as torchrun would
        procs[0].send_signal(signal.SIGTERM)
        out0, _ = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    killed = {"rc1": procs[1].returncode, "out1": out1, "out0": out0, "rows": _rows(db, None)}

    # 2. the same command again, as users run it: it resumes
    cmd = [sys.executable, "-m", "zoo.cli", "embed", folder, "--data", "digits", "--split", "test", "--uri", db,
           "--collection", "digits", "--type", "hnsw", "--nproc", "2", "--quiet"]
    resumed = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]

    # the one-process build of the same data, through the path `zoo index build` takes
    ref = build_index(folder, data="digits", split="test", index_type="hnsw", backend="milvus", uri=ref_db,
                      collection="digits", progress=False)
    ref_info = ref.info()
    ref.close()
    return {"db": db, "ref_db": ref_db, "killed": killed, "resumed": resumed, "ref_info": ref_info}


def test_two_ranks_equal_one_process_build(runs):
    from serve.index import FeatureIndex, IndexModelMismatchError

    _, ids, vecs, items, labels = _rows(runs["db"], "digits")
    _, ref_ids, ref_vecs, ref_items, ref_labels = _rows(runs["ref_db"], "digits")
    n = len(ref_ids)
    assert n == 360 - 5 and np.array_equal(ref_ids, np.arange(n))  # digits' test split
    assert np.array_equal(ids, ref_ids) and items == ref_items == [f"digits/test/{i}" for i in range(n)]
    assert labels == ref_labels and len(set(labels)) == 10
    np.testing.assert_allclose(vecs, ref_vecs, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    two, one = FeatureIndex.load(f"{runs['db']}#digits"), FeatureIndex.load(f"{runs['ref_db']}#digits")
    try:
        info, ref = two.info(), runs["ref_info"]
        for key in ("model_name", "model_source", "preprocess", "dim", "index_type", "has_labels", "ntotal"):
            assert info[key] == ref[key], key
        assert info["processes"] == 2 and info["source"]["data"] == "digits"
        q = ref_vecs[::7]
        exact = np.argsort(-(q @ ref_vecs.T), axis=1, kind="stable")[:, :10]  # numpy, independent of Milvus
        for idx in (two, one):  # as tuned: the recall target against exact search
            found = idx.search(q, 10).ids
            assert np.mean([len(set(x) & set(y)) / 10 for x, y in zip(found.tolist(), exact.tolist())]) >= 0.95
        # HNSW graphs depend on the segments (two ranks: two inserts, one process: one), so the tuned
        # searches may miss different near-ties; with ef = N both graphs are searched exhaustively
        two.search_params = one.search_params = {"efSearch": n}
        a, b = two.search(q, 10), one.search(q, 10)
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.ids, exact) and a.items == b.items
        with pytest.raises(IndexModelMismatchError):
            two.search(q, 10, model_name="another_model")
    finally:
        two.close()
        one.close()


def test_killed_rank_then_rerun_inserts_only_the_missing_ids(runs):
    killed = runs["killed"]
    assert killed["rc1"] == -signal.SIGKILL and "KILLING" in killed["out1"], killed["out1"][-2000:]
    names, ids, _, _, _ = killed["rows"]
    assert "digits" not in names  # no alias: nothing was published
    n = runs["ref_info"]["ntotal"]
    assert len(np.unique(ids)) == len(ids) and 2 * N_CHUNK <= len(ids) < n, len(ids)
    rank1 = np.arange(n // 2, n)
    assert np.isin(rank1[: 2 * N_CHUNK], ids).all() and not np.isin(rank1[2 * N_CHUNK:], ids).any()
    out = runs["resumed"].stdout
    assert f"{n} items" in out and f"inserted {n - len(ids)} row(s) on 2 process(es), {len(ids)} already there" in out
    names, ids, _, _, _ = _rows(runs["db"], "digits")
    assert np.array_equal(ids, np.arange(n))  # every id exactly once
    assert len(names) == 1 and names[0].startswith("digits__")  # one collection: the staged one, published


def test_bad_input_refused_before_anything_is_written(tmp_path):
    from serve.index import IndexUnreachableError, milvus_shards
    from serve.index.milvus_connect import _release, connect

    db = str(tmp_path / "x.db")
    plan = milvus_shards.prepare(db, "c", model_name="m", model_source="m", preprocess={}, dim=8, n_ids=30,
                                 source={"data": "x"}, has_labels=False, index_type="flat")
    x = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="dimension 7.*dimension 8"):
        milvus_shards.insert(plan, x[:, :7], np.arange(10), [str(i) for i in range(10)])
    with pytest.raises(ValueError, match=r"in \[0, 30\)"):
        milvus_shards.insert(plan, x, np.arange(25, 35), [str(i) for i in range(10)])
    client = connect(db)
    try:
        assert client.query(plan.staging, filter="", output_fields=["count(*)"])[0]["count(*)"] == 0
    finally:
        _release(client, db)
    assert milvus_shards.insert(plan, x, np.arange(10, 20), [str(i) for i in range(10)]) == 10
    assert milvus_shards.insert(plan, x, np.arange(10, 20), [str(i) for i in range(10)]) == 0  # nothing twice
    assert milvus_shards.missing_ids(plan, 5, 25).tolist() == [*range(5, 10), *range(20, 25)]
    info = milvus_shards.finish(plan)
    assert info["ntotal"] == 10 and info["next_id"] == 30
    with pytest.raises(IndexUnreachableError, match="nowhere"):
        milvus_shards.prepare(str(tmp_path / "nowhere" / "x.db"), "c", model_name="m", model_source="m",
                              preprocess={}, dim=8, n_ids=3, source={}, has_labels=False)
    with pytest.raises(ValueError, match="IVF_PQ"):
        milvus_shards.prepare(db, "c", model_name="m", model_source="m", preprocess={}, dim=8, n_ids=3, source={},
                              has_labels=False, index_type="ivfpq")


class _CountingClient:
    """A client that counts its queries (the windows asked)."""

    def __init__(self, inner):
        self.inner, self.queries = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def query(self, name, **kw):
        self.queries.append(kw["filter"])
        return self.inner.query(name, **kw)


def test_ids_already_there_are_found_across_windows_and_never_inserted_twice(tmp_path, monkeypatch):
    from serve.index import milvus_shards
    from serve.index.milvus_connect import _release, connect

    monkeypatch.setattr(milvus_shards, "MAX_K", 4)  # many windows on a small collection
    db = str(tmp_path / "w.db")
    plan = milvus_shards.prepare(db, "c", model_name="m", model_source="m", preprocess={}, dim=8, n_ids=40,
                                 source={"data": "w"}, has_labels=False, index_type="flat")
    x = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
    there = np.array([0, 1, 2, 5, 9, 17, 18, 33, 39])
    assert milvus_shards.insert(plan, x[there], there, [str(i) for i in there]) == len(there)
    assert milvus_shards.missing_ids(plan, 0, 40).tolist() == np.setdiff1d(np.arange(40), there).tolist()
    assert milvus_shards.missing_ids(plan, 16, 20).tolist() == [16, 19]
    client = _CountingClient(connect(db))
    try:
        asked = np.array([39, 3, 17, 0, 17])  # unsorted, repeated, far apart
        assert milvus_shards._present(client, plan.staging, asked).tolist() == [0, 17, 39]
        assert len(client.queries) == 3  # windows at 0, 17, 39: the empty ones between are not asked
    finally:
        _release(client.inner, db)
    # a rerun's shard overlapping rows already there (as when racing an old run): only the new ids go in
    ids = np.arange(0, 12)
    assert milvus_shards.insert(plan, x[ids], ids, [str(i) for i in ids]) == len(np.setdiff1d(ids, there))
    client = connect(db)
    try:
        client.load_collection(plan.staging)
        got = sorted(int(r["id"]) for r in client.query(plan.staging, filter="id >= 0", output_fields=["id"],
                                                        limit=100))
    finally:
        _release(client, db)
    assert got == sorted(set(there.tolist()) | set(ids.tolist()))  # each id exactly once


def test_exact_neighbours_streamed_by_windows_equal_numpy(tmp_path):
    from serve.index import milvus_shards
    from serve.index.milvus_connect import _release, connect
    from serve.index.milvus_exact import exact_knn_streamed, rows_by_id

    db = str(tmp_path / "e.db")
    plan = milvus_shards.prepare(db, "c", model_name="m", model_source="m", preprocess={}, dim=8, n_ids=50,
                                 source={"data": "e"}, has_labels=False, index_type="flat")
    x = np.random.default_rng(2).standard_normal((50, 8)).astype(np.float32)
    ids = np.setdiff1d(np.arange(50), [0, 7, 8, 31, 49])  # holes, at a window's edges too
    milvus_shards.insert(plan, x[ids], ids, [str(i) for i in ids])
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = np.random.default_rng(3).standard_normal((9, 8)).astype(np.float32)
    client = connect(db)
    try:
        client.load_collection(plan.staging)
        np.testing.assert_allclose(rows_by_id(client, plan.staging, ids[::-3]), unit[ids[::-3]], atol=1e-6)
        with pytest.raises(ValueError, match=r"no rows with ids \[7\]"):
            rows_by_id(client, plan.staging, np.array([3, 7]))
        for window in (7, 8, 64):  # many windows, and one
            got = exact_knn_streamed(client, plan.staging, q, 11, end=50, window=window)
            want = ids[np.argsort(-(q @ unit[ids].T), axis=1, kind="stable")[:, :11]]  # numpy over the rows there
            assert np.array_equal(got, want), window
        few = exact_knn_streamed(client, plan.staging, q[:2], 50, end=50, window=8)  # k above the 45 rows
        assert (few[:, 45:] == -1).all() and np.array_equal(np.sort(few[:, :45], axis=1), np.tile(ids, (2, 1)))
    finally:
        _release(client, db)


def test_sharded_finish_tunes_as_the_full_vectors_would(tmp_path):
    """finish reads back only the tuning sample (not N x D): the tuning record equals the one computed the
    way it was before, from every vector read back, on the same published index and the same seeded draw."""
    from serve.index import TUNE_K, TUNE_QUERIES, milvus_shards
    from serve.index.auto import tune_search_param
    from serve.index.milvus_backend import _raw_search
    from serve.index.milvus_connect import _release, connect

    n, d = 2000, 64
    x = np.random.default_rng(4).standard_normal((n, d)).astype(np.float32)  # isotropic: HNSW misses some at ef 16
    db = str(tmp_path / "t.db")
    plan = milvus_shards.prepare(db, "c", model_name="m", model_source="m", preprocess={}, dim=d, n_ids=n,
                                 source={"data": "t"}, has_labels=False, index_type="hnsw", seed=5,
                                 target_recall=0.99)
    ids = np.setdiff1d(np.arange(n), np.arange(0, n, 37))  # some items unreadable: holes in the ids
    half = len(ids) // 2
    for part in (ids[:half], ids[half:]):  # two ranks' inserts
        milvus_shards.insert(plan, x[part], part, [str(i) for i in part])
    info = milvus_shards.finish(plan)
    tuning = info["tuning"]
    assert tuning["queries"] == min(TUNE_QUERIES, len(ids) // 10) and len(tuning["curve"]) >= 1

    client = connect(db)
    try:  # before: every vector read back into x, exact truth over x, the same draw from the seed
        name = info["physical_collection"]
        client.load_collection(name)
        full = np.zeros((n, d), np.float32)
        in_index = np.zeros(n, bool)
        for r in client.query(name, filter="id >= 0", output_fields=["id", "vector"], limit=n):
            full[r["id"]], in_index[r["id"]] = r["vector"], True
        assert np.array_equal(np.flatnonzero(in_index), ids)
        assert len(ids) >= 2 * TUNE_K
        sample = np.sort(np.random.default_rng(5).choice(ids, len(ids) // 10, replace=False))

        def raw(q, k, p):
            return _raw_search(client, name, "hnsw", q, k, p, ["id"])[:2]

        before = tune_search_param("hnsw", raw, full, sample, in_index, plan.target_recall, leave_one_out=True)
    finally:
        _release(client, db)
    assert before.pop("params") == info["search_params"] and before == tuning, (before, tuning)


class _RetriedCreateClient:
    """A pymilvus client whose create_index fails as a retried one does after a dropped connection."""

    def __init__(self, existing_type: str | None, error: str = "index already exists"):
        self.existing_type, self.error = existing_type, error

    def list_indexes(self, name):
        return []

    def prepare_index_params(self):
        from pymilvus import MilvusClient

        return MilvusClient.prepare_index_params()

    def create_index(self, name, index_params):
        raise RuntimeError(self.error)

    def describe_index(self, name, field):
        return {"index_type": self.existing_type}


def test_create_index_retried_after_a_dropped_connection_accepts_only_the_same_index():
    from serve.index.milvus_backend import MilvusIndex

    params = {"type": "hnsw", "M": 16, "efConstruction": 100}
    MilvusIndex._create_index(_RetriedCreateClient("HNSW"), "c", params)  # the retry found its own index: fine
    with pytest.raises(RuntimeError, match="already exists"):
        MilvusIndex._create_index(_RetriedCreateClient("IVF_FLAT"), "c", params)  # another index: not ours
    with pytest.raises(RuntimeError, match="disk full"):
        MilvusIndex._create_index(_RetriedCreateClient("HNSW", "disk full"), "c", params)  # other errors raise
