"""Many processes writing one Milvus collection: ``zoo embed --uri URI --nproc N`` (``train/embed.py``).

The steps of :meth:`MilvusIndex.build`, split between ranks:

1. :func:`prepare` (rank 0): the same checks as a one-process build, then the staging collection
   (created, or resumed when an unfinished one has the same fingerprint: model, preprocessing,
   source listing, index parameters). The alias users search is not touched.
2. :func:`missing_ids` and :func:`insert` (every rank): a rank's ids are the global positions of
   its contiguous shard of the dataset (or of the sorted file list), so the collection equals a
   one-process build's. Only ids not yet in the collection are embedded and inserted, so a rerun
   after a killed rank inserts what is missing and nothing twice. Features of the wrong dimension
   are refused before anything is written.
3. :func:`finish` (rank 0, after every rank inserted): index, tune (leave-one-out, on a seeded sample
   of at most 1000 rows read back, against exact search streamed over the collection: rank 0 never
   holds the ``N x D`` vectors), point the alias at it, drop the old collection.

Concurrency: against a server URI (``http://``, ``https://``, ``tcp://``, ...) all ranks insert at
once. Milvus Lite (a local ``.db``) allows one process per file, so the ranks take turns: each
opens its client only while holding an exclusive ``fcntl`` lock on ``<file>.db.lock`` (embedding
runs in parallel; only the inserts are serialised).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serve.index.auto import INDEX_TYPES, _build_params
from serve.index.base import _as_matrix, _check_items, _check_labels, _log
from serve.index.milvus_backend import MAX_ITEM, MAX_K, MilvusIndex, _check_name
from serve.index.milvus_connect import _is_local, _norm_uri, _release, connect


@dataclass
class ShardPlan:
    """What every rank needs to write its shard (picklable: rank 0 broadcasts it)."""

    uri: str
    collection: str
    staging: str
    live: str | None
    n_ids: int
    dim: int
    params: dict[str, Any]
    index_type: str
    memory_budget_mb: float
    target_recall: float
    seed: int
    model_source: str
    has_labels: bool
    extra_meta: dict[str, Any] = field(default_factory=dict)


def lock_path(uri: str) -> Path:
    """The lock file that serialises writers of a Milvus Lite file (next to the ``.db``)."""
    return Path(_norm_uri(uri) + ".lock")


@contextmanager
def open_client(uri: str) -> Iterator[Any]:
    """A client for ``uri``; for Milvus Lite only while holding the file's exclusive lock (closed, so the
    embedded engine is stopped and the file free for the next process, before the lock is let go)."""
    import fcntl

    uri = _norm_uri(uri)
    if not _is_local(uri):
        client = connect(uri)
        try:
            yield client
        finally:
            _release(client, uri)
        return
    # Not one client per rank for the whole run: Milvus Lite's engine holds the file while a client is
    # open, and the ranks meet at a barrier after inserting (train/embed.py), so a rank keeping its client
    # would block the others' inserts before that barrier (a deadlock), and holding it from missing_ids on
    # would serialise the embedding. A rank opens the file for its short steps only (rank 0: prepare,
    # missing_ids, insert, finish; the others: missing_ids, insert), ~0.1 s each with 20k rows.
    if not Path(uri).parent.is_dir():
        connect(uri)  # raises the error naming the missing folder
    with open(lock_path(uri), "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # blocks while another rank writes; freed if it dies
        try:
            client = connect(uri)
            try:
                yield client
            finally:
                _release(client, uri)
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def prepare(uri: str, collection: str, *, model_name: str, model_source: str, preprocess: Mapping[str, Any],
            dim: int, n_ids: int, source: Mapping[str, Any], has_labels: bool, index_type: str = "auto",
            memory_budget_mb: float = 1024.0, target_recall: float = 0.95, seed: int = 0,
            progress: bool = False) -> ShardPlan:
    """Rank 0: check everything and create (or find, to resume) the staging collection for ids ``0..n_ids-1``.

    ``source`` (JSON) describes what is embedded, e.g. the dataset and split or the sorted file list:
    with the model and the index parameters it makes the fingerprint that a rerun resumes by.
    """
    if not uri:
        raise ValueError("writing into a collection needs a uri (./zoo.db for Milvus Lite, http://host:19530)")
    _check_name(collection)
    if n_ids < 1:
        raise ValueError("nothing to embed: the source is empty")
    if int(dim) < 1:
        raise ValueError(f"model {model_name!r} reports feature dimension {dim}")
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}; choose from {', '.join(INDEX_TYPES)}")
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    params = _build_params(index_type, n_ids, int(dim), memory_budget_mb)
    uri = _norm_uri(uri)
    if params["type"] == "ivfpq" and _is_local(uri):
        raise ValueError("Milvus Lite has no IVF_PQ index; the auto rule chose IVF-PQ for this memory budget: "
                         "raise --memory-budget-mb (HNSW or IVF-Flat) or use a Milvus server")
    key = ["zoo embed", model_name, model_source, dict(preprocess), dict(source), int(n_ids), int(dim), params,
           int(seed), float(target_recall), bool(has_labels)]
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    with open_client(uri) as client:
        staging, live, _ = MilvusIndex._stage(client, uri, collection, fingerprint, int(n_ids), int(dim), params,
                                              model_name, model_source, preprocess, has_labels, progress,
                                              count_present=False)
    return ShardPlan(uri=uri, collection=collection, staging=staging, live=live, n_ids=int(n_ids), dim=int(dim),
                     params=params, index_type=index_type, memory_budget_mb=float(memory_budget_mb),
                     target_recall=float(target_recall), seed=int(seed), model_source=model_source,
                     has_labels=bool(has_labels))


def _present(client: Any, name: str, ids: Any) -> np.ndarray:
    """Those of ``ids`` already in collection ``name``, sorted: range queries over windows of ``MAX_K`` ids
    (within Milvus's query-result limit), skipping windows that hold none of ``ids``."""
    want = np.unique(np.asarray(ids, dtype=np.int64))
    found: list[int] = []
    s = 0
    while s < len(want):
        a = int(want[s])
        found.extend(int(r["id"]) for r in client.query(name, filter=f"id >= {a} and id < {a + MAX_K}",
                                                        output_fields=["id"], limit=MAX_K))
        s = int(np.searchsorted(want, a + MAX_K))
    return np.intersect1d(want, np.array(found, dtype=np.int64))


def missing_ids(plan: ShardPlan, lo: int, hi: int) -> np.ndarray:
    """The ids in ``[lo, hi)`` not yet in the staging collection (all of them on a fresh build)."""
    with open_client(plan.uri) as client:
        client.load_collection(plan.staging)
        present = _present(client, plan.staging, np.arange(lo, hi))
    return np.setdiff1d(np.arange(lo, hi, dtype=np.int64), present)


def insert(plan: ShardPlan, features: Any, ids: Any, items: Sequence[str], labels: Any = None,
           progress: bool = False, hooks: Mapping[str, Callable[[], None]] | None = None) -> int:
    """Insert a rank's rows as ``ids`` (global positions); ids already there are skipped. Returns rows inserted.

    Checked before anything is written: the dimension (the collection's), the ids (in ``[0, n_ids)``,
    distinct), the items and labels. ``hooks`` (tests): ``{"chunk": called after each inserted chunk}``.
    """
    x = _as_matrix(features, "features") if len(features) else np.zeros((0, plan.dim), np.float32)
    if x.shape[1] != plan.dim:
        raise ValueError(f"features have dimension {x.shape[1]}, collection {plan.collection!r} at {plan.uri} "
                         f"is being built with dimension {plan.dim}; nothing was written")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = len(x)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} feature rows")
    if n and (ids.min() < 0 or ids.max() >= plan.n_ids or len(np.unique(ids)) != n):
        raise ValueError(f"ids must be distinct and in [0, {plan.n_ids})")
    items = _check_items(items, n)
    if any(len(s.encode()) > MAX_ITEM for s in items):
        raise ValueError(f"items longer than {MAX_ITEM} bytes cannot be stored in Milvus")
    lab = _check_labels(labels, n)
    if not n:
        return 0
    with open_client(plan.uri) as client:
        client.load_collection(plan.staging)
        # asked again just before inserting (missing_ids was asked before the embedding): a rerun racing
        # an old one must not insert an id twice
        rows = np.flatnonzero(~np.isin(ids, _present(client, plan.staging, ids)))
        MilvusIndex._insert(client, plan.staging, x, rows, ids[rows], items, lab, progress,
                            f"inserting into {plan.staging}", dict(hooks or {}))
        client.flush(plan.staging)
    return int(len(rows))


def finish(plan: ShardPlan, progress: bool = False, t0: float | None = None,
           hooks: Mapping[str, Callable[[], None]] | None = None) -> dict[str, Any]:
    """Rank 0, once every rank inserted: index, tune and publish the collection. Returns its ``info()``."""
    t0 = time.perf_counter() if t0 is None else t0
    with open_client(plan.uri) as client:
        client.load_collection(plan.staging)
        # Only the ids are read here, not the N x D vectors. The tuning queries are a sample seeded by
        # plan.seed of min(TUNE_QUERIES = 1000, N/10) rows: auto.py's rule for every backend (bounded, and
        # the pass rule subtracts two standard errors of the sample's recall), the same draw as a one-process
        # build's. Only those rows are read back; their exact neighbours come from one streamed pass
        # (serve/index/milvus_exact.py), so the tuning is the same as from all the vectors in memory.
        in_index = np.zeros(plan.n_ids, dtype=bool)
        in_index[_present(client, plan.staging, np.arange(plan.n_ids))] = True
        if not in_index.any():
            raise ValueError(f"nothing was inserted into {plan.staging}: every item was unreadable")
        _log(progress, f"{int(in_index.sum())} rows in {plan.staging}: indexing and tuning")
        index = MilvusIndex._finish(client, plan.uri, plan.collection, plan.staging, plan.live, None, in_index,
                                    plan.params, plan.index_type, plan.memory_budget_mb, plan.target_recall,
                                    plan.seed, progress, plan.model_source, dict(hooks or {}), t0,
                                    extra_meta=plan.extra_meta)
        info = index.info()
        index._closed = True  # the client is released by open_client
    return info
