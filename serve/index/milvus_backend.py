"""The Milvus backend: a collection in Milvus (:class:`MilvusIndex`), same interface as faiss.

``uri`` is what ``pymilvus.MilvusClient`` takes: a local file ``./zoo.db`` runs Milvus Lite, the
embedded engine, in this process (one process at a time per file; for tests and a single machine);
``http://host:19530`` is a Milvus server or cluster (shards and replicas; see docs/scaling.md). The
client code is the same for both.

Collection
----------
Fields: ``id`` (INT64 primary key: the stable id), ``vector`` (FLOAT_VECTOR, L2-normalised),
``item`` (VARCHAR), ``label`` (INT64, ``-1`` when unknown). The metric is inner product (cosine).
The index type is chosen by the same ``auto`` rule as faiss (:mod:`serve.index.auto`) and mapped to
Milvus's (``FLAT``, ``HNSW`` with M=32/efConstruction=64, ``IVF_FLAT`` / ``IVF_PQ`` with the same
``nlist``); ``ef``/``nprobe`` are tuned by the same ladder for recall@10 >= target, on a random
sample of the indexed vectors, each left out of its own results (leave-one-out, on the finished
collection: Milvus indexes each segment on its own, so the final segment layout is what is tuned).
What faiss keeps in ``meta.json`` lives in the collection's properties (``zoo.*``): model name and
source, preprocessing, index type, search parameters, ``next_id``, the build record. Ids are
reserved (``zoo.next_id`` raised) before the rows are inserted, so they are never reused, even
after a crash. One writer per collection at a time; any number of searchers.

Names, builds and crashes
-------------------------
The name users see (``collection``) is a Milvus alias. A build writes a new collection
``<collection>__<millis>`` (recording a fingerprint of its input), tunes it, and only then points
the alias at it (``alter_alias``, atomic) and drops the previous collection. A build killed at any
point leaves the alias, and so what searches see, as it was; run again with the same input, it
resumes the unfinished collection (rows already there are not inserted again); with other input it
drops it and starts over.

An index folder for this backend holds only ``meta.json`` (``"backend": "milvus"``, ``uri``,
``collection`` and the same keys as a faiss folder); ``FeatureIndex.load`` also takes
``URI#collection`` directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from serve.index.auto import INDEX_TYPES, TUNE_K, TUNE_QUERIES, _build_params, tune_search_param
from serve.index.base import (
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    FeatureIndex,
    IndexFileError,
    SearchResult,
    _as_matrix,
    _check_items,
    _check_labels,
    _fsync,
    _log,
    _now,
    _zoo_version,
    resolve_ids,
)
from serve.index.milvus_connect import _is_local, _norm_uri, _release, connect
from serve.index.milvus_exact import exact_knn_streamed, rows_by_id

MILVUS_TYPES = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT", "ivfpq": "IVF_PQ"}
INSERT_CHUNK = 5_000
QUERY_CHUNK = 1_000
SEARCH_CHUNK = 1_024
MAX_K = 16_384  # Milvus's topk limit
MAX_ITEM = 4_096
PROP = "zoo."
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")


def _props(client: Any, name: str) -> dict[str, str]:
    return dict(client.describe_collection(name).get("properties") or {})


def _check_name(collection: str) -> str:
    if not isinstance(collection, str) or not _NAME.match(collection) or "__" in collection:
        raise ValueError(f"collection name {collection!r}: use letters, digits and single underscores, starting "
                         "with a letter or _ (Milvus's rule; '__' is kept for zoo's own staging names)")
    return collection


def _quote(items: Sequence[str]) -> str:
    return "[" + ",".join(json.dumps(s) for s in items) + "]"


# ----------------------------------------------------------------------------- the index
class MilvusIndex(FeatureIndex):
    """A Milvus collection with stable ids, items, labels and model metadata (see the module docstring)."""

    backend = "milvus"

    def __init__(self, client: Any, uri: str, collection: str, physical: str, props: Mapping[str, str]):
        if props.get(PROP + "format") != FORMAT_NAME:
            raise ValueError(f"Milvus collection {collection!r} at {uri} is not a selfsup-zoo index "
                             "(no zoo.format property)")
        self._client = client
        self.uri = uri
        self.collection = collection
        self._physical = physical
        self.model_name = props[PROP + "model_name"]
        self.preprocess = json.loads(props.get(PROP + "preprocess") or "{}")
        self.dim = int(props[PROP + "dim"])
        self.index_type = props[PROP + "index_type"]
        self.search_params = json.loads(props.get(PROP + "search_params") or "{}")
        self._has_labels = props.get(PROP + "has_labels") == "1"
        self.meta: dict[str, Any] = json.loads(props.get(PROP + "meta") or "{}")
        self.skipped: list[str] = []
        self._write_lock = threading.Lock()
        self._closed = False

    # -- open / close
    @classmethod
    def open(cls, uri: str, collection: str | None = None) -> MilvusIndex:
        """The index in ``collection`` (an alias made by :meth:`build`) at ``uri``. Without a name, the
        one zoo index the database holds."""
        uri = _norm_uri(uri)
        client = connect(uri)
        try:
            if collection is None:
                names = sorted(a for c in client.list_collections() for a in client.list_aliases(c).get("aliases", []))
                if len(names) != 1:
                    raise ValueError(f"Milvus at {uri} holds {len(names)} zoo indexes ({', '.join(names) or 'none'}); "
                                     f"name one as {uri}#COLLECTION")
                collection = names[0]
            if not client.has_collection(collection):
                raise ValueError(f"Milvus at {uri} has no collection {collection!r}")
            physical = client.describe_collection(collection)["collection_name"]
            self = cls(client, uri, collection, physical, _props(client, physical))
            client.load_collection(physical)
            return self
        except BaseException:
            _release(client, uri)
            raise

    @classmethod
    def _load(cls, folder: Path, meta: dict[str, Any]) -> MilvusIndex:
        self = cls.open(meta["uri"], meta["collection"])
        if (self.model_name, self.dim) != (meta["model_name"], meta["dim"]):
            got = (self.model_name, self.dim)
            self.close()
            raise IndexFileError(f"{folder / META_FILE}: describes model {meta['model_name']!r} (dim {meta['dim']}), "
                                 f"but collection {meta['collection']!r} at {meta['uri']} holds {got[0]!r} (dim {got[1]})")
        return self

    def close(self) -> None:
        """Close the connection (and stop the embedded engine when no other index in this process uses it)."""
        if not self._closed:
            self._closed = True
            _release(self._client, self.uri)

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # -- build
    @classmethod
    def _build(
        cls,
        features: Any,
        items: Sequence[str],
        model_name: str,
        preprocess: Mapping[str, Any] | None,
        index_type: str = "auto",
        memory_budget_mb: float = 1024.0,
        target_recall: float = 0.95,
        labels: Any = None,
        seed: int = 0,
        progress: bool = False,
        model_source: str | None = None,
        uri: str | None = None,
        collection: str = "zoo_index",
        hooks: Mapping[str, Callable[[], None]] | None = None,
    ) -> MilvusIndex:
        """:meth:`FeatureIndex.build` into Milvus: ``uri`` (required) and ``collection`` (an alias).

        Everything is checked before anything is written. ``hooks`` (tests) are called at named steps.
        """
        if not uri:
            raise ValueError("the milvus backend needs a uri (./zoo.db for Milvus Lite, http://host:19530)")
        _check_name(collection)
        x = _as_matrix(features, "features")
        n, d = x.shape
        if n == 0:
            raise ValueError("no features to index")
        if index_type not in INDEX_TYPES:
            raise ValueError(f"unknown index type {index_type!r}; choose from {', '.join(INDEX_TYPES)}")
        if not 0.0 < target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        items = _check_items(items, n)
        if any(len(s.encode()) > MAX_ITEM for s in items):
            raise ValueError(f"items longer than {MAX_ITEM} bytes cannot be stored in Milvus")
        lab = _check_labels(labels, n)
        params = _build_params(index_type, n, d, memory_budget_mb)
        kind = params["type"]
        uri = _norm_uri(uri)
        if kind == "ivfpq" and _is_local(uri):
            raise ValueError("Milvus Lite has no IVF_PQ index; the auto rule chose IVF-PQ for this memory budget: "
                             "raise --memory-budget-mb (HNSW or IVF-Flat) or use a Milvus server")
        hooks = dict(hooks or {})
        client = connect(uri)
        try:
            return cls._build_in(client, uri, collection, x, items, lab, model_name, preprocess, params,
                                 index_type, memory_budget_mb, target_recall, seed, progress, model_source, hooks)
        except BaseException:
            _release(client, uri)
            raise

    @classmethod
    def _build_in(cls, client: Any, uri: str, collection: str, x: np.ndarray, items: list[str],
                  lab: np.ndarray | None, model_name: str, preprocess: Mapping[str, Any] | None,
                  params: dict[str, Any], index_type: str, memory_budget_mb: float, target_recall: float,
                  seed: int, progress: bool, model_source: str | None,
                  hooks: dict[str, Callable[[], None]]) -> MilvusIndex:
        n, d = x.shape
        digest = hashlib.sha256()
        for part in (x.tobytes(), json.dumps(items).encode(), b"" if lab is None else lab.tobytes(),
                     json.dumps([model_name, params, seed, target_recall], sort_keys=True, default=str).encode()):
            digest.update(part)
        staging, live, present = cls._stage(client, uri, collection, digest.hexdigest(), n, d, params, model_name,
                                            model_source, preprocess, lab is not None, progress)
        t0 = time.perf_counter()
        todo = np.setdiff1d(np.arange(n), present)
        cls._insert(client, staging, x, todo, todo, items, lab, progress, f"inserting into {staging}", hooks)
        return cls._finish(client, uri, collection, staging, live, x, np.ones(n, dtype=bool), params, index_type,
                           memory_budget_mb, target_recall, seed, progress, model_source or model_name, hooks, t0)

    @classmethod
    def _stage(cls, client: Any, uri: str, collection: str, fingerprint: str, n: int, d: int,
               params: Mapping[str, Any], model_name: str, model_source: str | None,
               preprocess: Mapping[str, Any] | None, has_labels: bool, progress: bool,
               count_present: bool = True) -> tuple[str, str | None, np.ndarray]:
        """(staging collection, live collection or None, ids already in the staging collection).

        An unfinished build with the same ``fingerprint`` is resumed, other unfinished ones dropped;
        ids run ``0..n-1`` (``next_id = n``). ``count_present=False`` skips listing the ids."""
        if client.has_collection(collection) and collection in client.list_collections():
            raise ValueError(f"Milvus at {uri} has a collection {collection!r} that zoo did not make (not an "
                             "alias); choose another --collection")
        live = client.describe_alias(collection)["collection_name"] if client.has_collection(collection) else None
        staging = None
        present = np.zeros(0, np.int64)
        for name in sorted(client.list_collections()):  # unfinished builds (killed): resume the same, drop others
            if name.startswith(f"{collection}__") and name[len(collection) + 2:].isdigit() and name != live:
                if staging is None and _props(client, name).get(PROP + "fingerprint") == fingerprint:
                    staging = name
                    client.load_collection(name)
                    if count_present:
                        present = cls._all_ids(client, name)
                        _log(progress, f"resuming the build of {collection}: {len(present)} of {n} rows already there")
                else:
                    client.drop_collection(name)
        if staging is None:
            staging = f"{collection}__{int(time.time() * 1000)}"
            cls._create(client, staging, d, params, {
                "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "model_name": model_name,
                "model_source": model_source or model_name, "preprocess": json.dumps(dict(preprocess or {})),
                "dim": str(d), "index_type": params["type"], "search_params": "{}", "next_id": str(n),
                "has_labels": "1" if has_labels else "0", "fingerprint": fingerprint, "meta": "{}",
            })
        return staging, live, present

    @classmethod
    def _finish(cls, client: Any, uri: str, collection: str, staging: str, live: str | None, x: np.ndarray | None,
                in_index: np.ndarray, params: Mapping[str, Any], index_type: str, memory_budget_mb: float,
                target_recall: float, seed: int, progress: bool, model_source: str,
                hooks: Mapping[str, Callable[[], None]], t0: float,
                extra_meta: Mapping[str, Any] | None = None) -> MilvusIndex:
        """Index, tune and publish the staging collection that holds row ``i`` of ``x`` as id ``i`` for every
        ``in_index[i]`` (``x`` None: not held here): the alias then names it (atomically) and the previous
        collection is dropped."""
        kind = params["type"]
        client.flush(staging)
        cls._create_index(client, staging, params)
        _wait_indexed(client, staging, progress)  # tune the index itself, not a brute-force fallback
        build_s = time.perf_counter() - t0
        # Tuned on the final collection, leave-one-out: Milvus indexes each segment separately, so rows
        # held out and added after tuning would land in a small segment of their own, indexed differently.
        rng = np.random.default_rng(seed)
        rows = np.flatnonzero(in_index)
        n_tune = 0 if kind == "flat" or len(rows) < 2 * TUNE_K else min(TUNE_QUERIES, len(rows) // 10)
        sample = np.sort(rng.choice(rows, n_tune, replace=False)) if n_tune else np.zeros(0, np.int64)
        t1 = time.perf_counter()
        queries = exact = None
        if x is None and len(sample):  # rows inserted by other processes: their sample read back, truth streamed
            queries = rows_by_id(client, staging, sample)
            exact = partial(exact_knn_streamed, client, staging, end=len(in_index), window=MAX_K)

        def raw(q: np.ndarray, k: int, p: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
            return _raw_search(client, staging, kind, q, k, p, ["id"])[:2]

        tuning = tune_search_param(kind, raw, x, sample, in_index, target_recall, nlist=params.get("nlist"),
                                   progress=progress, leave_one_out=True, queries=queries, exact_knn=exact)
        tune_s = time.perf_counter() - t1
        search_params = tuning.pop("params")
        meta = {
            "model_source": model_source,
            "build_params": {k: v for k, v in params.items() if k != "estimated_bytes"},
            "estimated_bytes": int(params["estimated_bytes"]),
            "memory_budget_mb": float(memory_budget_mb),
            "requested_type": index_type,
            "tuning": tuning,
            "build_seconds": round(build_s, 3),
            "tune_seconds": round(tune_s, 3),
            "created_at": _now(),
            "seed": int(seed),
            **dict(extra_meta or {}),
        }
        client.alter_collection_properties(staging, properties={
            PROP + "search_params": json.dumps(search_params), PROP + "meta": json.dumps(meta)})
        hooks.get("before_swap", lambda: None)()
        if live is not None:
            client.alter_alias(staging, collection)  # atomic: searches see the old or the new index
            client.drop_collection(live)
        else:
            client.create_alias(staging, collection)
        return cls(client, uri, collection, staging, _props(client, staging))

    @staticmethod
    def _create(client: Any, name: str, d: int, params: Mapping[str, Any], props: Mapping[str, str]) -> None:
        """The collection, without its vector index yet: it is created once the rows are in
        (:meth:`_create_index`), so each segment's index is built once, not as every flush seals it."""
        from pymilvus import DataType

        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=d)
        schema.add_field("item", DataType.VARCHAR, max_length=MAX_ITEM)
        schema.add_field("label", DataType.INT64)
        client.create_collection(name, schema=schema, consistency_level="Strong",
                                 properties={PROP + k: v for k, v in props.items()})

    @staticmethod
    def _create_index(client: Any, name: str, params: Mapping[str, Any]) -> None:
        if client.list_indexes(name):  # a resumed build whose index was already made
            return
        kind = params["type"]
        build: dict[str, Any] = {}
        if kind == "hnsw":
            build = {"M": int(params["M"]), "efConstruction": int(params["efConstruction"])}
        elif kind in ("ivf", "ivfpq"):
            build = {"nlist": int(params["nlist"])}
            if kind == "ivfpq":
                build.update(m=int(params["pq_m"]), nbits=int(params["pq_nbits"]))
        index_params = client.prepare_index_params()
        index_params.add_index("vector", index_type=MILVUS_TYPES[kind], metric_type="IP", params=build)
        try:
            client.create_index(name, index_params)
        except Exception as e:  # noqa: BLE001 - pymilvus's MilvusException
            # A long synchronous build (Milvus Lite, HNSW on 1M rows: ~400 s) can outlive the gRPC
            # connection (GOAWAY); pymilvus retries and the server answers that the index exists.
            desc = client.describe_index(name, "vector") if "already exists" in str(e) else {}
            if desc.get("index_type") != MILVUS_TYPES[kind]:
                raise

    @staticmethod
    def _insert(client: Any, name: str, x: np.ndarray, rows: np.ndarray, ids: np.ndarray, items: Sequence[str],
                lab: np.ndarray | None, progress: bool, desc: str, hooks: Mapping[str, Callable[[], None]]) -> None:
        from tqdm.auto import tqdm

        starts = range(0, len(rows), INSERT_CHUNK)
        for s in tqdm(starts, desc=desc, disable=not progress or len(rows) <= INSERT_CHUNK, leave=False,
                      unit="chunk"):
            r, i = rows[s : s + INSERT_CHUNK], ids[s : s + INSERT_CHUNK]
            client.insert(name, [{"id": int(a), "vector": x[b], "item": items[b],
                                  "label": int(lab[b]) if lab is not None else -1} for a, b in zip(i, r)])
            hooks.get("chunk", lambda: None)()

    @staticmethod
    def _all_ids(client: Any, name: str) -> np.ndarray:
        return np.sort(np.array([r["id"] for r in MilvusIndex._scan(client, name, ["id"])], dtype=np.int64))

    @staticmethod
    def _scan(client: Any, name: str, fields: list[str]) -> list[dict[str, Any]]:
        """Every row, by windows of ids below ``next_id`` (each window within Milvus's query-result limit)."""
        end = int(_props(client, name)[PROP + "next_id"])
        out: list[dict[str, Any]] = []
        for lo in range(0, end, MAX_K):
            out.extend(client.query(name, filter=f"id >= {lo} and id < {lo + MAX_K}", output_fields=fields,
                                    limit=MAX_K))
        return out

    # -- what it holds
    @property
    def ntotal(self) -> int:
        res = self._client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    @property
    def next_id(self) -> int:
        return int(_props(self._client, self._physical)[PROP + "next_id"])

    def _rows(self) -> list[dict[str, Any]]:
        return sorted(self._scan(self._client, self._physical, ["id", "item", "label"]), key=lambda r: r["id"])

    @property
    def ids(self) -> np.ndarray:
        return np.array([r["id"] for r in self._rows()], dtype=np.int64)

    @property
    def items(self) -> dict[int, str]:
        return {int(r["id"]): r["item"] for r in self._rows()}

    @property
    def labels(self) -> dict[int, int] | None:
        return {int(r["id"]): int(r["label"]) for r in self._rows()} if self._has_labels else None

    def _ids_of(self, items: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in range(0, len(items), QUERY_CHUNK):
            part = list(items[s : s + QUERY_CHUNK])
            for r in self._client.query(self.collection, filter=f"item in {_quote(part)}", output_fields=["id", "item"]):
                out[r["item"]] = int(r["id"])
        return out

    def _has_ids(self, ids: np.ndarray) -> np.ndarray:
        found: set[int] = set()
        for s in range(0, len(ids), QUERY_CHUNK):
            part = [int(i) for i in ids[s : s + QUERY_CHUNK]]
            found.update(int(r["id"]) for r in self._client.query(self.collection, filter=f"id in {part}",
                                                                  output_fields=["id"]))
        return np.array([int(i) in found for i in ids], dtype=bool)

    def item_ids(self, items: Iterable[str]) -> list[int]:
        items = list(items)
        lookup = self._ids_of(items)
        for it in items:
            if it not in lookup:
                raise KeyError(f"item {it!r} is not in the index")
        return [lookup[it] for it in items]

    def contains(self, items: Sequence[str]) -> np.ndarray:
        lookup = self._ids_of(list(items))
        return np.array([it in lookup for it in items], dtype=bool)

    # -- search
    def search(self, queries: Any, k: int = 10, model_name: str | None = None) -> SearchResult:
        self._check_model(model_name)
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = int(k)
        if k > MAX_K:
            raise ValueError(f"k must be at most {MAX_K} with the milvus backend, got {k}")
        q = _as_matrix(queries, "queries")
        self._check_dim(q, "queries")
        fields = ["item", "label"] if self._has_labels else ["item"]
        scores, ids, rows = _raw_search(self._client, self.collection, self.index_type, q, k, self.search_params,
                                        fields)
        items = [[h["item"] for h in r] for r in rows]
        labels = [[int(h["label"]) for h in r] for r in rows] if self._has_labels else None
        return SearchResult(scores=scores, ids=ids, items=items, labels=labels)

    # -- add / remove
    def add(self, features: Any, items: Sequence[str], labels: Any = None, model_name: str | None = None,
            progress: bool = False) -> np.ndarray:
        self._check_model(model_name)
        x = _as_matrix(features, "features")
        self._check_dim(x, "features")  # before anything is written
        n = len(x)
        items = _check_items(items, n)
        lab = _check_labels(labels, n)
        if any(len(s.encode()) > MAX_ITEM for s in items):
            raise ValueError(f"items longer than {MAX_ITEM} bytes cannot be stored in Milvus")
        with self._write_lock:
            dup = [it for it, c in zip(items, self.contains(items)) if c]
            if dup:
                raise ValueError(f"{len(dup)} item(s) already in the index (remove them first): "
                                 + ", ".join(repr(s) for s in dup[:5]))
            start = self.next_id
            new_ids = np.arange(start, start + n, dtype=np.int64)
            if n == 0:
                return new_ids
            props = {PROP + "next_id": str(start + n)}  # reserved first: a crash mid-insert never reuses ids
            if lab is not None and not self._has_labels:
                props[PROP + "has_labels"] = "1"
            self._client.alter_collection_properties(self._physical, properties=props)
            self._has_labels = self._has_labels or lab is not None
            self._insert(self._client, self._physical, x, np.arange(n), new_ids, items, lab, progress, "adding", {})
        return new_ids

    def remove(self, ids_or_items: Iterable[int | str]) -> int:
        keys = list(ids_or_items)
        names = [os.fspath(v) for v in keys if isinstance(v, (str, os.PathLike))]
        with self._write_lock:
            rm, unknown = resolve_ids(keys, self._ids_of(names) if names else {}, self._has_ids)
            if unknown:
                raise ValueError(f"not in the index: {', '.join(unknown[:10])}" + (" ..." if len(unknown) > 10 else ""))
            if len(rm):
                self._client.delete(self._physical, ids=rm.tolist())
        return int(len(rm))

    # -- info / save
    def info(self) -> dict[str, Any]:
        try:
            from importlib.metadata import version

            pymilvus_version = version("pymilvus")
        except Exception:  # noqa: BLE001
            pymilvus_version = "unknown"
        desc = self._client.describe_index(self._physical, "vector")
        out = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "backend": self.backend,
            "uri": self.uri,
            "collection": self.collection,
            "physical_collection": self._physical,
            "model_name": self.model_name,
            "preprocess": self.preprocess,
            "index_type": self.index_type,
            "milvus_index": {k: desc[k] for k in ("index_type", "metric_type") if k in desc},
            "metric": "inner_product",
            "normalized": True,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "next_id": self.next_id,
            "has_labels": self._has_labels,
            "search_params": self.search_params,
            "zoo_version": _zoo_version(),
            "pymilvus_version": pymilvus_version,
        }
        out.update({k: v for k, v in self.meta.items() if k not in out})
        return out

    def save(self, folder: str | os.PathLike) -> Path:
        from zoo.checkpoint import atomic_folder

        folder = Path(folder).expanduser()
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"{folder} exists and is not a folder; refusing to replace it with an index")
            if any(folder.iterdir()) and not (folder / META_FILE).is_file():
                raise ValueError(f"{folder} is a non-empty folder that is not an index (no {META_FILE}); "
                                 "refusing to replace it")
        self.meta.setdefault("created_at", _now())
        self._client.alter_collection_properties(self._physical, properties={PROP + "meta": json.dumps(self.meta)})
        meta = self.info()
        meta["updated_at"] = _now()
        with atomic_folder(folder) as tmp:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            _fsync(tmp / META_FILE)
        return folder


def _raw_search(client: Any, name: str, kind: str, q: np.ndarray, k: int, params: Mapping[str, Any],
                fields: list[str]) -> tuple[np.ndarray, np.ndarray, list[list[dict[str, Any]]]]:
    """Scores and ids ``[Q,k]`` (``-inf``/``-1`` where no result) and each query's hits' fields."""
    sp: dict[str, Any] = {}
    if kind == "hnsw":
        sp = {"ef": max(int(params.get("efSearch", 16)), k)}
    elif kind in ("ivf", "ivfpq"):
        sp = {"nprobe": int(params.get("nprobe", 1))}
    nq = len(q)
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    ids = np.full((nq, k), -1, dtype=np.int64)
    rows: list[list[dict[str, Any]]] = []
    for s in range(0, nq, SEARCH_CHUNK):
        res = client.search(name, data=q[s : s + SEARCH_CHUNK], limit=k, output_fields=fields,
                            search_params={"metric_type": "IP", "params": sp}, consistency_level="Strong")
        for r, hits in enumerate(res):
            hits = list(hits)[:k]
            ids[s + r, : len(hits)] = [h["id"] for h in hits]
            scores[s + r, : len(hits)] = [h["distance"] for h in hits]
            rows.append([h.get("entity", {}) for h in hits])
    return scores, ids, rows


def _wait_indexed(client: Any, name: str, progress: bool, timeout_s: float = 3600.0) -> None:
    """Wait until Milvus has built the index of every sealed segment.

    Milvus builds them in the background after a flush and searches a segment without its index by
    brute force meanwhile. Loading a released collection builds (or reads) every segment's index
    before it returns (Milvus Lite reports its indexes finished at once, so this is what waits there);
    a cluster also reports pending rows, polled below.
    """
    client.release_collection(name)
    client.load_collection(name)
    t0 = time.perf_counter()
    while True:
        desc = client.describe_index(name, "vector")
        pending = int(desc.get("pending_index_rows", 0) or 0)
        if pending <= 0 and str(desc.get("state", "Finished")) in ("Finished", "3", "IndexState.Finished"):
            return
        if time.perf_counter() - t0 > timeout_s:
            raise RuntimeError(f"Milvus collection {name}: index still building after {timeout_s:.0f} s "
                               f"({pending} rows pending)")
        _log(progress and time.perf_counter() - t0 > 5, f"waiting for Milvus to index {pending} rows")
        time.sleep(0.2)
