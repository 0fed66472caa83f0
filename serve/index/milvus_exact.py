"""Exact inner-product neighbours over a Milvus collection without holding its ``N x D`` vectors.

The search-parameter tuning measures recall against exact search (:func:`serve.index.auto.tune_search_param`).
A build whose rows were inserted by other processes (``zoo embed --nproc N``,
:func:`serve.index.milvus_shards.finish`) has no copy of them: it reads back only the tuning queries'
rows (a seeded sample of at most ``TUNE_QUERIES``) and streams the collection once, window by window,
keeping each query's best ``k`` so far. In memory: the queries, one window, ``Q x k`` ids and scores.
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUERY_BLOCK = 256  # queries scored at once: a block's score matrix is 256 x window floats (16 MiB at 16,384)


def rows_by_id(client: Any, name: str, ids: np.ndarray, chunk: int = 1000) -> np.ndarray:
    """The vectors of ``ids`` (all present in collection ``name``), in the order of ``ids``."""
    ids = np.asarray(ids, dtype=np.int64)
    got: dict[int, np.ndarray] = {}
    for s in range(0, len(ids), chunk):
        part = [int(i) for i in ids[s : s + chunk]]
        for r in client.query(name, filter=f"id in {part}", output_fields=["id", "vector"], limit=len(part)):
            got[int(r["id"])] = np.asarray(r["vector"], dtype=np.float32)
    missing = [int(i) for i in ids if int(i) not in got]
    if missing:
        raise ValueError(f"collection {name!r} has no rows with ids {missing[:5]}")
    return np.stack([got[int(i)] for i in ids]) if len(ids) else np.zeros((0, 0), np.float32)


def exact_knn_streamed(client: Any, name: str, queries: np.ndarray, k: int, *, end: int, window: int) -> np.ndarray:
    """Ids ``[Q, k]`` of the exact top-``k`` inner products of ``queries`` over every row of collection
    ``name`` (ids below ``end``, read ``window`` ids at a time: at most Milvus's query-result limit),
    best first; ``-1`` where the collection has fewer than ``k`` rows."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    for lo in range(0, end, window):
        rows = client.query(name, filter=f"id >= {lo} and id < {lo + window}", output_fields=["id", "vector"],
                            limit=window)
        if not rows:
            continue
        ids = np.array([r["id"] for r in rows], dtype=np.int64)
        xb = np.array([r["vector"] for r in rows], dtype=np.float32)
        for a in range(0, len(q), QUERY_BLOCK):
            b = min(len(q), a + QUERY_BLOCK)
            s = np.concatenate([best_s[a:b], q[a:b] @ xb.T], axis=1)
            i = np.concatenate([best_i[a:b], np.broadcast_to(ids, (b - a, len(ids)))], axis=1)
            top = np.argpartition(-s, k - 1, axis=1)[:, :k]
            best_s[a:b], best_i[a:b] = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)
