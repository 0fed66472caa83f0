"""Index types, the ``auto`` rule and search-parameter tuning: the same for every backend.

Similarity is cosine: features are L2-normalised on the way in (build, add, search) and the indexes
use the inner-product metric (IVF-PQ in faiss: L2, equivalent on unit vectors), so a score is the
cosine similarity (approximate for IVF-PQ). The memory figures are those of faiss; a database backend
maps the chosen type to its own index of the same kind (Milvus: ``FLAT``, ``HNSW``, ``IVF_FLAT``,
``IVF_PQ``) with the same build parameters.

Index types and the ``auto`` rule (like autofaiss: size first, then the memory budget)
-------------------------------------------------------------------------------------------
``flat``   exact search (``IndexIDMap2(IndexFlatIP)``), about ``4*D + 56`` bytes per vector.
``hnsw``   ``IndexIDMap2(IndexHNSWFlat(M=32, efConstruction=64))``, about ``4*D + 8*M + 72`` bytes.
``ivf``    ``IndexIVFFlat`` with ``nlist = clip(round(4*sqrt(N)), 1, N/39, 65536)`` spherical k-means
           centroids trained on a random sample of at most ``64*nlist`` vectors; ``4*D + 8`` bytes per
           vector plus the centroids.
``ivfpq``  ``IndexIVFPQ`` with the same number of lists and ``m`` sub-quantizers of 8 bits (fewer bits
           when there are fewer than ~10k training vectors), at least 8 dims per sub-quantizer; ``m + 8``
           bytes per vector. It searches with L2, which ranks unit vectors like inner product and which
           PQ estimates better; its scores are converted back to cosine (``1 - d/2``) and are approximate.

``auto`` picks, for ``N`` vectors of dimension ``D`` and a memory budget (``memory_budget_mb``,
default 1024 MiB; estimates from :func:`estimate_bytes`):

1. ``flat`` when ``N < 20,000`` and it fits (exact and fast enough below that size);
2. else ``hnsw`` when it fits (fastest queries at high recall);
3. else ``ivf`` when it fits;
4. else ``ivfpq`` with the largest ``m`` (a divisor of ``D``, at most ``D/8``) that fits;
5. else ``ValueError`` saying how much memory the smallest IVF-PQ would need.

Search-parameter tuning
-----------------------
The search parameter (``efSearch`` for HNSW, ``nprobe`` for IVF / IVF-PQ) is tuned on the data's own
vectors, held out: ``min(1000, N/10)`` of them, drawn at random, are left out while the index is
built, used as queries, and added afterwards. Recall@10 is measured against exact (brute-force)
inner-product search over the vectors then in the index. The values of a ladder (HNSW ``efSearch``
16, 24, 32, 48 ... 1024; IVF ``nprobe`` 1, 2, 4 ... nlist) are tried in increasing order; a value
passes when its recall minus two standard errors (over the queries) reaches ``target_recall``
(default 0.95), so the target also holds for fresh queries from the same distribution; the first
passing value is refined by bisection (to 1/8 of its size) down to the smallest passing one. When
no value passes (IVF-PQ's quantisation caps recall; climbing stops once two doublings gain nothing),
the smallest value within 0.005 of the best recall seen is kept and a warning says so. The chosen
value, the measured recall and the whole curve are recorded in the index's ``meta.json``
(``search_params``, ``tuning``; for a database backend also in the collection's properties).
``add`` keeps the tuned value. The tuning (:func:`tune_search_param`) only needs the backend's raw
search, so every backend is tuned the same way.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from serve.index.base import _faiss, _log

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")
FLAT_MAX_N = 20_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
TUNE_QUERIES = 1000
TUNE_K = 10
IDMAP2_OVERHEAD = 48  # in-memory reverse map (std::unordered_map) per id, not serialised


def nlist_for(n: int) -> int:
    """IVF list count: ``round(4*sqrt(N))`` bounded to ``[1, min(N // 39, 65536)]``."""
    upper = max(1, min(n // 39, 65536))
    return int(min(max(round(4 * math.sqrt(max(n, 1))), 1), upper))


def _pq_nbits(n: int) -> int:
    # 8-bit codebooks want ~39*256 training vectors; use fewer bits on small data.
    return int(max(1, min(8, math.floor(math.log2(max(n // 39, 2))))))


def _pq_m_options(d: int) -> list[int]:
    """Sub-quantizer counts for IVF-PQ: divisors of ``d`` with at least 8 dims each, largest first.

    (Sub-vectors of 2-4 dims add little recall per byte and faiss trains their codebooks very slowly.)
    """
    return [m for m in range(d // 8, 0, -1) if d % m == 0] or [1]


def estimate_bytes(
    index_type: str, n: int, d: int, nlist: int | None = None, pq_m: int | None = None, hnsw_m: int = HNSW_M
) -> int:
    """Estimated memory of an index in bytes (vectors + ids + structure), used by the ``auto`` rule."""
    if index_type == "flat":
        return n * (4 * d + 8 + IDMAP2_OVERHEAD)
    if index_type == "hnsw":
        # level-0 links (2M int32), upper levels (~M/(M-1) * ... small), levels, offsets, id map
        return n * (4 * d + 8 * hnsw_m + 24 + IDMAP2_OVERHEAD)
    nlist = nlist or nlist_for(n)
    if index_type == "ivf":
        return n * (4 * d + 8) + nlist * (4 * d + 32)
    if index_type == "ivfpq":
        m = pq_m or _pq_m_options(d)[0]
        return n * (m + 8) + nlist * (4 * d + 32) + (1 << _pq_nbits(n)) * d * 4
    raise ValueError(f"unknown index type {index_type!r}; choose from {', '.join(INDEX_TYPES)}")


def choose_index(n: int, d: int, memory_budget_mb: float = 1024.0) -> dict[str, Any]:
    """The ``auto`` rule (module docstring): ``{"type", "estimated_bytes", ...build params}``."""
    if n < 1 or d < 1:
        raise ValueError(f"cannot index N={n} vectors of dimension {d}")
    budget = float(memory_budget_mb) * 2**20
    flat = estimate_bytes("flat", n, d)
    if n < FLAT_MAX_N and flat <= budget:
        return {"type": "flat", "estimated_bytes": flat}
    hnsw = estimate_bytes("hnsw", n, d)
    if hnsw <= budget:
        return {"type": "hnsw", "estimated_bytes": hnsw, "M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}
    nlist = nlist_for(n)
    ivf = estimate_bytes("ivf", n, d, nlist)
    if ivf <= budget:
        return {"type": "ivf", "estimated_bytes": ivf, "nlist": nlist}
    for m in _pq_m_options(d):
        size = estimate_bytes("ivfpq", n, d, nlist, m)
        if size <= budget:
            return {"type": "ivfpq", "estimated_bytes": size, "nlist": nlist, "pq_m": m, "pq_nbits": _pq_nbits(n)}
    smallest = estimate_bytes("ivfpq", n, d, nlist, _pq_m_options(d)[-1])
    raise ValueError(
        f"memory budget of {memory_budget_mb} MB is too small for {n} vectors of dimension {d}: the smallest "
        f"IVF-PQ index needs about {smallest / 2**20:.1f} MB"
    )


def _build_params(index_type: str, n: int, d: int, memory_budget_mb: float) -> dict[str, Any]:
    if index_type == "auto":
        return choose_index(n, d, memory_budget_mb)
    if index_type == "flat":
        return {"type": "flat", "estimated_bytes": estimate_bytes("flat", n, d)}
    if index_type == "hnsw":
        return {"type": "hnsw", "estimated_bytes": estimate_bytes("hnsw", n, d), "M": HNSW_M,
                "efConstruction": HNSW_EF_CONSTRUCTION}
    nlist = nlist_for(n)
    if index_type == "ivf":
        return {"type": "ivf", "estimated_bytes": estimate_bytes("ivf", n, d, nlist), "nlist": nlist}
    if index_type == "ivfpq":
        budget = float(memory_budget_mb) * 2**20
        options = _pq_m_options(d)
        m = next((m for m in options if estimate_bytes("ivfpq", n, d, nlist, m) <= budget), options[-1])
        return {"type": "ivfpq", "estimated_bytes": estimate_bytes("ivfpq", n, d, nlist, m), "nlist": nlist,
                "pq_m": m, "pq_nbits": _pq_nbits(n)}
    raise ValueError(f"unknown index type {index_type!r}; choose from {', '.join(INDEX_TYPES)}")



def _exact_knn(xq: np.ndarray, xb: np.ndarray, k: int) -> np.ndarray:
    """Positions of the exact top-``k`` inner products (faiss brute force, no copy of ``xb``)."""
    faiss = _faiss()
    if hasattr(faiss, "knn"):
        _, idx = faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
        return idx
    out = np.empty((len(xq), k), dtype=np.int64)  # pragma: no cover - old faiss
    for s in range(0, len(xq), 256):  # pragma: no cover
        sims = xq[s : s + 256] @ xb.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(sims, part, 1).argsort(axis=1)[:, ::-1]
        out[s : s + 256] = np.take_along_axis(part, order, 1)
    return out


def _exact_knn_among(xq: np.ndarray, xb: np.ndarray, k: int, allowed: np.ndarray) -> np.ndarray:
    """Exact top-``k`` rows of ``xb`` by inner product among the rows where ``allowed`` is true (no copy)."""
    excluded = int((~allowed).sum())
    out = np.full((len(xq), k), -1, dtype=np.int64)
    todo = np.arange(len(xq))
    kk = min(len(xb), k + max(10, 2 * (k * excluded) // max(len(xb), 1) + k))
    while len(todo):
        found = _exact_knn(np.ascontiguousarray(xq[todo]), xb, kk)
        ok = allowed[np.maximum(found, 0)] & (found >= 0)
        done = ok.sum(1) >= min(k, int(allowed.sum()))
        for r in np.flatnonzero(done):
            row = found[r][ok[r]][:k]
            out[todo[r], : len(row)] = row
        todo = todo[~done]
        if kk >= len(xb):
            break
        kk = min(len(xb), 2 * kk)
    return out




def tune_search_param(
    index_type: str,
    raw_search: Callable[[np.ndarray, int, Mapping[str, Any]], tuple[np.ndarray, np.ndarray]],
    x: np.ndarray | None,
    held: np.ndarray,
    in_index: np.ndarray,
    target_recall: float,
    nlist: int | None = None,
    progress: bool = False,
    leave_one_out: bool = False,
    queries: np.ndarray | None = None,
    exact_knn: Callable[[np.ndarray, int], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Tune efSearch / nprobe on the held-out rows ``held`` of ``x`` (ids = row numbers) against exact
    search over the rows in the index (``in_index``); see the module docstring.

    ``raw_search(queries, k, {"efSearch": v} or {"nprobe": v})`` is the backend's search, returning
    ``(scores, ids)`` ``[Q,k]``; ``nlist`` is the IVF list count. Returns the tuning record with the
    chosen ``"params"``. ``leave_one_out``: the query rows are in the index (``in_index`` true for
    them); each query's own row is left out of its results and of its truth, so the index is tuned
    as it will be searched (a database's segment layout changes when rows are added later).
    ``queries`` (the rows ``held``) and ``exact_knn(queries, k)`` (exact top-``k`` ids over the indexed
    rows) stand in for ``x`` (then None) where the backend streams its rows instead of holding them.
    """
    k = TUNE_K
    if index_type == "flat" or not len(held):
        return {"params": {}, "target_recall": float(target_recall), "recall_at_10": 1.0, "queries": 0,
                "curve": []}
    xq = np.ascontiguousarray(x[held] if queries is None else queries)
    extra = 1 if leave_one_out else 0

    def drop_self(found: np.ndarray) -> list[set[int]]:
        if not leave_one_out:
            return [set(f.tolist()) for f in found]
        return [set([i for i in f.tolist() if i != own][:k]) for f, own in zip(found, held.tolist())]

    truth = drop_self(_exact_knn_among(xq, x, k + extra, in_index) if exact_knn is None
                      else exact_knn(xq, k + extra))

    def recall(value: int) -> tuple[float, float]:
        params = {"efSearch": value} if index_type == "hnsw" else {"nprobe": value}
        _, found = raw_search(xq, k + extra, params)
        per_query = np.array([len(f & t) / k for f, t in zip(drop_self(found), truth)])
        return float(per_query.mean()), float(per_query.std(ddof=1) / math.sqrt(len(per_query)))

    if index_type == "hnsw":
        name, ladder = "efSearch", list(EF_LADDER)
    else:
        name = "nprobe"
        nlist = int(nlist or 1)
        ladder = sorted({min(2**i, nlist) for i in range(0, int(math.log2(nlist)) + 2)})
    curve: dict[int, tuple[float, float]] = {}

    def passes(v: int) -> bool:
        if v not in curve:
            curve[v] = recall(v)
            _log(progress, f"tuning {name}={v}: recall@{k}={curve[v][0]:.4f} (+-{curve[v][1]:.4f})")
        mean, stderr = curve[v]
        return mean - 2 * stderr >= target_recall or mean >= 1.0

    prev: int | None = None
    chosen = None
    for v in ladder:
        if passes(v):
            chosen = v
            break
        # stop climbing once doubling the parameter twice in a row gains nothing (IVF-PQ plateau)
        seen = [curve[u][0] for u in ladder if u in curve]
        if len(seen) >= 3 and seen[-1] - seen[-3] < 0.002:
            break
        prev = v
    if chosen is not None and prev is not None:
        lo, hi = prev, chosen  # lo fails, hi passes: bisect to the smallest passing value (1/8 resolution)
        while hi - lo > max(1, lo // 8):
            mid = (lo + hi) // 2
            if passes(mid):
                hi = mid
            else:
                lo = mid
        chosen = hi
    if chosen is None:
        best = max(m for m, _ in curve.values())
        chosen = min(v for v, (m, _) in curve.items() if m >= best - 0.005)
        warnings.warn(
            f"{index_type} index reaches recall@{k}={best:.3f} at most, below the target {target_recall}"
            + (" (product quantisation loses precision; a larger memory budget allows IVF-Flat or HNSW)"
               if index_type == "ivfpq" else ""),
            stacklevel=4,
        )
    return {
        "params": {name: int(chosen)},
        "target_recall": float(target_recall),
        "recall_at_10": round(curve[chosen][0], 5),
        "recall_stderr": round(curve[chosen][1], 5),
        "queries": int(len(held)),
        "method": ("random sample of the indexed rows, each left out of its own results, "
                   if leave_one_out else "held-out random sample of the data (added after tuning) ")
                  + "vs exact inner-product search; smallest value with recall - 2 stderr >= target",
        "curve": [[int(v), round(m, 5)] for v, (m, _) in sorted(curve.items())],
    }
