"""faiss image index: build from a model's features, tune, search, add, remove, save/load atomically.

Similarity is cosine: features are L2-normalised on the way in (build, add, search) and the indexes
use the inner-product metric (IVF-PQ: L2, equivalent on unit vectors), so a score is the cosine
similarity (approximate for IVF-PQ).

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
(``search_params``, ``tuning``). ``add`` keeps the tuned value.

Ids, add and remove
-------------------
Ids are int64, assigned at add time in increasing order (0, 1, 2, ...) and never reused, so an id
keeps meaning the same item for the life of the index. Each id has an item (a string: a path
relative to the indexed folder, ``"mnist5k/train/17"`` for a bundled dataset) and, when known, an
integer label. Items are unique within an index. ``flat`` and ``ivf``/``ivfpq`` remove vectors from
faiss directly (``remove_ids``). HNSW graphs cannot remove nodes, so a removed id becomes a
tombstone: searches pass an ``IDSelectorNot`` of the tombstones, so removed ids are never returned
and every query still gets ``k`` live results; when tombstones exceed 25% of the graph, the graph
is rebuilt from the live vectors (same ids), which also restores its recall.

On disk (one folder, written atomically)
----------------------------------------
``index.faiss`` (faiss's own binary format, ``faiss.write_index``; always the CPU index),
``ids.npy`` (int64, sorted live ids), ``items.json`` (the items, aligned with ``ids.npy``),
``labels.npy`` (int64, optional, aligned), ``removed.npy`` (HNSW tombstones, optional) and
``meta.json``: model name and source, preprocessing config, index type, faiss description, search
and build parameters, tuning record, dim, metric, ``next_id``, ``created_at``/``updated_at``, zoo
and faiss versions, and the SHA-256 of every other file. :meth:`FeatureIndex.save` writes a new
folder beside the target and renames it into place (the old folder is renamed aside first and
deleted last), so an interrupted save never leaves a half-written index under the real name. Load
checks every checksum and never unpickles (``np.load(allow_pickle=False)``, JSON); a missing or
corrupt file is an :class:`IndexFileError` naming it.

Feature folders (``zoo index build MODEL --features DIR``)
----------------------------------------------------------
A folder of precomputed features, e.g. from sharded extraction (:func:`write_features` writes one):
``features.npy`` float32 ``[N,D]`` (raw or normalised), ``items.json`` (list of ``N`` strings),
optional ``labels.npy`` int64 ``[N]`` and ``meta.json`` ``{"model_name": ..., "preprocess": {...}}``.
Shards are ``features-<s>.npy`` with ``items-<s>.json`` (and ``labels-<s>.npy``) side by side; they
are read in sorted order. A ``meta.json`` whose model differs from the given model is refused.

GPU
---
With faiss-gpu (``faiss.get_num_gpus() > 0``), IVF training and adding run on all GPUs
(``index_cpu_to_all_gpus``) and flat / IVF searches use a GPU replica made on first search; the
CPU index stays the master copy and is what gets saved. HNSW and IVF-PQ stay on the CPU.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FeatureIndex",
    "IndexFileError",
    "IndexModelMismatchError",
    "SearchResult",
    "build_index",
    "choose_index",
    "cli_index",
    "embed_images",
    "estimate_bytes",
    "nlist_for",
    "read_features",
    "write_features",
]

FORMAT_NAME = "selfsup-zoo-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
ITEMS_FILE = "items.json"
IDS_FILE = "ids.npy"
LABELS_FILE = "labels.npy"
REMOVED_FILE = "removed.npy"

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")
FLAT_MAX_N = 20_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
TUNE_QUERIES = 1000
TUNE_K = 10
COMPACT_FRACTION = 0.25
ADD_CHUNK = 65_536
IDMAP2_OVERHEAD = 48  # in-memory reverse map (std::unordered_map) per id, not serialised


class IndexModelMismatchError(ValueError):
    """Features or queries from a different model than the one that built the index."""


class IndexFileError(ValueError):
    """An index folder that cannot be read: the message names the file and the problem."""


# ----------------------------------------------------------------------------- helpers
def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a serve dependency
        raise ImportError("the image index needs faiss: pip install faiss-cpu (or faiss-gpu)") from e
    return faiss


def _use_gpu(faiss: Any) -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _as_matrix(x: Any, what: str) -> np.ndarray:
    """float32 C-contiguous ``[N,D]``, finite, L2-normalised (a new array)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{what} must be a [N,D] array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{what} must be numeric, got dtype {x.dtype}")
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.maximum(norms, 1e-12)
    return x


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _zoo_version() -> str:
    # zoo.__version__ when zoo is already imported; else the installed distribution's (importing zoo
    # would pull in torch just to write a version string)
    zoo = sys.modules.get("zoo")
    if zoo is not None and hasattr(zoo, "__version__"):
        return str(zoo.__version__)
    try:
        from importlib.metadata import version

        return version("selfsup-zoo")
    except Exception:  # noqa: BLE001 - not installed (source tree)
        return "unknown"


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


def _new_faiss_index(params: Mapping[str, Any], d: int) -> Any:
    faiss = _faiss()
    kind = params["type"]
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    if kind == "hnsw":
        h = faiss.IndexHNSWFlat(d, int(params["M"]), ip)
        h.hnsw.efConstruction = int(params["efConstruction"])
        return faiss.IndexIDMap2(h)
    quantizer = faiss.IndexFlatIP(d)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, int(params["nlist"]), ip)
    elif kind == "ivfpq":
        # L2 on unit vectors ranks like inner product, and PQ estimates it better (it accounts for the
        # norm of the reconstruction); scores are converted back to cosine = 1 - d/2 in _raw_search.
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFPQ(quantizer, d, int(params["nlist"]), int(params["pq_m"]), int(params["pq_nbits"]),
                                 faiss.METRIC_L2)
    else:  # pragma: no cover - validated before
        raise ValueError(f"unknown index type {kind!r}")
    index.cp.spherical = True  # centroids on the unit sphere, like the (normalised) data
    return index


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


# ----------------------------------------------------------------------------- results
@dataclass
class SearchResult:
    """``scores`` ``[Q,k]`` float32 (cosine; ``-inf`` where no result), ``ids`` ``[Q,k]`` int64 (``-1``
    where no result), ``items[q]`` the items of the valid results of query ``q`` in rank order (shorter
    than ``k`` only when the index holds fewer than ``k`` items), ``labels`` likewise when known."""

    scores: np.ndarray
    ids: np.ndarray
    items: list[list[str]]
    labels: list[list[int]] | None = None

    def to_list(self) -> list[list[dict[str, Any]]]:
        """Per query, ``[{"rank", "id", "item", "score"[, "label"]}, ...]`` (JSON-ready)."""
        out = []
        for q, items in enumerate(self.items):
            rows = []
            for r, item in enumerate(items):
                row: dict[str, Any] = {"rank": r + 1, "id": int(self.ids[q, r]), "item": item,
                                       "score": float(self.scores[q, r])}
                if self.labels is not None:
                    row["label"] = int(self.labels[q][r])
                rows.append(row)
            out.append(rows)
        return out


# ----------------------------------------------------------------------------- the index
class FeatureIndex:
    """A faiss index over L2-normalised features with stable ids, items, labels and model metadata.

    Make one with :meth:`build` or :meth:`load`. Attributes: ``model_name``, ``preprocess``, ``dim``,
    ``ntotal`` (live items), ``index_type``, ``search_params``, ``items`` (id -> item), ``labels``
    (id -> label, or ``None``), ``ids`` (sorted live ids), ``meta``.

    Concurrent :meth:`search` calls are safe (each builds its own faiss search parameters); ``add``,
    ``remove``, ``compact`` and ``save`` change the index and need the caller to hold them exclusive.
    """

    def __init__(
        self,
        faiss_index: Any,
        *,
        dim: int,
        model_name: str,
        preprocess: Mapping[str, Any] | None,
        index_type: str,
        ids: np.ndarray,
        items: list[str],
        labels: np.ndarray | None,
        next_id: int,
        search_params: Mapping[str, Any],
        meta: Mapping[str, Any] | None = None,
        removed: np.ndarray | None = None,
    ):
        self._index = faiss_index
        self.dim = int(dim)
        self.model_name = str(model_name)
        self.preprocess = dict(preprocess or {})
        self.index_type = index_type
        self._ids = np.asarray(ids, dtype=np.int64)
        self._items = list(items)
        self._labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self._next_id = int(next_id)
        self.search_params = dict(search_params)
        self.meta: dict[str, Any] = dict(meta or {})
        self._removed = np.zeros(0, np.int64) if removed is None else np.unique(np.asarray(removed, np.int64))
        self._item_to_id: dict[str, int] | None = None
        self._gpu_index: Any = None
        self.skipped: list[str] = []  # unreadable files skipped by build_index (not persisted)

    # -- properties
    @property
    def ntotal(self) -> int:
        return int(len(self._ids))

    def __len__(self) -> int:
        return self.ntotal

    @property
    def ids(self) -> np.ndarray:
        return self._ids.copy()

    @property
    def items(self) -> dict[int, str]:
        """id -> item (a new dict)."""
        return dict(zip(self._ids.tolist(), self._items))

    @property
    def labels(self) -> dict[int, int] | None:
        """id -> label (a new dict; ``-1`` for items added without a label), or ``None``."""
        if self._labels is None:
            return None
        return dict(zip(self._ids.tolist(), self._labels.tolist()))

    @property
    def next_id(self) -> int:
        return self._next_id

    def __repr__(self) -> str:
        return (f"FeatureIndex({self.index_type}, n={self.ntotal}, dim={self.dim}, model={self.model_name!r}, "
                f"params={self.search_params})")

    def item_ids(self, items: Iterable[str]) -> list[int]:
        """Ids of the given items (``KeyError`` naming the first unknown one)."""
        lookup = self._lookup()
        out = []
        for it in items:
            if it not in lookup:
                raise KeyError(f"item {it!r} is not in the index")
            out.append(lookup[it])
        return out

    def _lookup(self) -> dict[str, int]:
        if self._item_to_id is None:
            self._item_to_id = dict(zip(self._items, self._ids.tolist()))
        return self._item_to_id

    def _check_model(self, model_name: str | None) -> None:
        if model_name is not None and model_name != self.model_name:
            raise IndexModelMismatchError(
                f"this index holds features of model {self.model_name!r}; refusing features/queries of "
                f"model {model_name!r}"
            )

    def _check_dim(self, x: np.ndarray, what: str) -> None:
        if x.shape[1] != self.dim:
            raise ValueError(f"{what} have dimension {x.shape[1]}, the index has dimension {self.dim} "
                             f"(model {self.model_name!r})")

    # -- build
    @classmethod
    def build(
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
    ) -> FeatureIndex:
        """Build and tune an index over ``features`` ``[N,D]`` (normalised here) named by ``items``.

        Ids are ``0..N-1`` in the order of ``features``. See the module docstring for the types, the
        ``auto`` rule and the tuning of the search parameter.
        """
        faiss = _faiss()
        x = _as_matrix(features, "features")
        n, d = x.shape
        if n == 0:
            raise ValueError("no features to index")
        if index_type not in INDEX_TYPES:
            raise ValueError(f"unknown index type {index_type!r}; choose from {', '.join(INDEX_TYPES)}")
        if not 0.0 < target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        items = _check_items(items, n)
        lab = _check_labels(labels, n)
        params = _build_params(index_type, n, d, memory_budget_mb)
        kind = params["type"]
        index = _new_faiss_index(params, d)
        t0 = time.perf_counter()
        ids = np.arange(n, dtype=np.int64)
        rng = np.random.default_rng(seed)
        gpu = _use_gpu(faiss) and kind in ("flat", "ivf")
        # faiss-gpu: train and add on all GPUs, then keep the CPU copy as the master (what gets saved)
        work = faiss.index_cpu_to_all_gpus(index) if gpu else index  # pragma: no cover (gpu)
        if kind in ("ivf", "ivfpq"):
            ntrain = min(n, max(64 * params["nlist"], 39 * (1 << params.get("pq_nbits", 0))))
            sample = x if ntrain >= n else x[np.sort(rng.choice(n, ntrain, replace=False))]
            _log(progress, f"training {kind} (nlist={params['nlist']}) on {len(sample)} vectors")
            work.train(sample)
        # Tuning queries are held out: added only after the search parameter has been tuned on them.
        n_tune = 0 if kind == "flat" or n < 2 * TUNE_K else min(TUNE_QUERIES, n // 10)
        held = np.sort(rng.choice(n, n_tune, replace=False)) if n_tune else np.zeros(0, np.int64)
        in_index = np.ones(n, dtype=bool)
        in_index[held] = False
        first = ids[in_index] if n_tune else ids
        _add_chunks(work, x[first] if n_tune else x, first, progress, desc=f"adding to {kind}")
        build_s = time.perf_counter() - t0
        if gpu:  # pragma: no cover
            index = faiss.index_gpu_to_cpu(work)
        self = cls(
            index, dim=d, model_name=model_name, preprocess=preprocess, index_type=kind, ids=ids, items=items,
            labels=lab, next_id=n, search_params={},
        )
        self.meta = {"build_params": {k: v for k, v in params.items() if k != "estimated_bytes"}}
        t1 = time.perf_counter()
        tuning = self._tune(x, held, in_index, target_recall, progress=progress)
        tune_s = time.perf_counter() - t1
        self.search_params = tuning.pop("params")
        if n_tune:
            t2 = time.perf_counter()
            self._index.add_with_ids(np.ascontiguousarray(x[held]), held)
            self._gpu_index = None
            build_s += time.perf_counter() - t2
        self.meta = {
            "model_source": model_source or model_name,
            "build_params": {k: v for k, v in params.items() if k != "estimated_bytes"},
            "estimated_bytes": int(params["estimated_bytes"]),
            "memory_budget_mb": float(memory_budget_mb),
            "requested_type": index_type,
            "tuning": tuning,
            "build_seconds": round(build_s, 3),
            "tune_seconds": round(tune_s, 3),
            "created_at": _now(),
            "seed": int(seed),
        }
        return self

    # -- tuning
    def _tune(
        self, x: np.ndarray, held: np.ndarray, in_index: np.ndarray, target_recall: float, progress: bool = False
    ) -> dict[str, Any]:
        """Tune efSearch / nprobe on the held-out rows ``held`` of ``x`` (ids = row numbers) against exact
        search over the rows in the index (``in_index``); see the module docstring."""
        k = TUNE_K
        if self.index_type == "flat" or not len(held):
            return {"params": {}, "target_recall": float(target_recall), "recall_at_10": 1.0, "queries": 0,
                    "curve": []}
        xq = np.ascontiguousarray(x[held])
        truth = [set(r) for r in _exact_knn_among(xq, x, k, in_index)]

        def recall(value: int) -> tuple[float, float]:
            params = {"efSearch": value} if self.index_type == "hnsw" else {"nprobe": value}
            _, found = self._raw_search(xq, k, params)
            per_query = np.array([len(set(f.tolist()) & t) / k for f, t in zip(found, truth)])
            return float(per_query.mean()), float(per_query.std(ddof=1) / math.sqrt(len(per_query)))

        if self.index_type == "hnsw":
            name, ladder = "efSearch", list(EF_LADDER)
        else:
            name = "nprobe"
            nlist = faiss_nlist(self._index)
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
                f"{self.index_type} index reaches recall@{k}={best:.3f} at most, below the target {target_recall}"
                + (" (product quantisation loses precision; a larger memory budget allows IVF-Flat or HNSW)"
                   if self.index_type == "ivfpq" else ""),
                stacklevel=3,
            )
        return {
            "params": {name: int(chosen)},
            "target_recall": float(target_recall),
            "recall_at_10": round(curve[chosen][0], 5),
            "recall_stderr": round(curve[chosen][1], 5),
            "queries": int(len(held)),
            "method": "held-out random sample of the data (added after tuning) vs exact inner-product search; "
                      "smallest value with recall - 2 stderr >= target",
            "curve": [[int(v), round(m, 5)] for v, (m, _) in sorted(curve.items())],
        }

    # -- search
    def _faiss_params(self, k: int, params: Mapping[str, Any] | None = None) -> tuple[Any, list[Any]]:
        """faiss search parameters (a new object per call: thread-safe) and the objects it points to."""
        faiss = _faiss()
        params = self.search_params if params is None else params
        if self.index_type == "hnsw":
            p = faiss.SearchParametersHNSW()
            p.efSearch = max(int(params.get("efSearch", 16)), k)
            keep: list[Any] = []
            if len(self._removed):
                batch = faiss.IDSelectorBatch(self._removed)
                sel = faiss.IDSelectorNot(batch)
                p.sel = sel
                keep = [batch, sel]  # the C++ parameters hold raw pointers to these
            return p, keep
        if self.index_type in ("ivf", "ivfpq"):
            p = faiss.SearchParametersIVF()
            p.nprobe = int(params.get("nprobe", 1))
            return p, []
        return None, []

    def _raw_search(self, x: np.ndarray, k: int, params: Mapping[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        if _use_gpu(faiss) and self.index_type in ("flat", "ivf"):  # pragma: no cover - needs faiss-gpu
            if self._gpu_index is None:
                self._gpu_index = faiss.index_cpu_to_all_gpus(self._index)
            if self.index_type == "ivf":
                nprobe = int((params or self.search_params).get("nprobe", 1))
                faiss.GpuParameterSpace().set_index_parameter(self._gpu_index, "nprobe", nprobe)
            return self._gpu_index.search(x, k)
        p, keep = self._faiss_params(k, params)
        if p is None:
            return self._index.search(x, k)
        dist, ids = self._index.search(x, k, params=p)
        del keep
        if self.index_type == "ivfpq":  # squared L2 between unit vectors -> cosine
            dist = 1.0 - dist / 2.0
        return dist, ids

    def search(self, queries: Any, k: int = 10, model_name: str | None = None) -> SearchResult:
        """The ``k`` most similar items of each query vector (``[Q,D]`` or ``[D]``; normalised here)."""
        self._check_model(model_name)
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = int(k)
        q = _as_matrix(queries, "queries")
        self._check_dim(q, "queries")
        nq = len(q)
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        if self.ntotal and nq:
            kk = min(k, self.ntotal)
            dist, found = self._raw_search(q, kk)
            ids[:, :kk] = found
            scores[:, :kk] = np.where(found >= 0, dist, -np.inf)
        pos = np.minimum(np.searchsorted(self._ids, np.maximum(ids, 0)), max(self.ntotal - 1, 0))
        if self.ntotal and not np.all((self._ids[pos] == ids) | (ids < 0)):  # pragma: no cover - a bug guard
            raise RuntimeError("faiss returned an id this index does not hold (ids out of step)")
        items: list[list[str]] = []
        labels: list[list[int]] | None = [] if self._labels is not None else None
        for r in range(nq):
            valid = ids[r] >= 0
            items.append([self._items[p] for p in pos[r][valid]])
            if labels is not None:
                labels.append(self._labels[pos[r][valid]].tolist())
        return SearchResult(scores=scores, ids=ids, items=items, labels=labels)

    # -- add / remove
    def add(self, features: Any, items: Sequence[str], labels: Any = None, model_name: str | None = None,
            progress: bool = False) -> np.ndarray:
        """Add vectors named by ``items`` (unique, not yet in the index); returns their new ids."""
        self._check_model(model_name)
        x = _as_matrix(features, "features")
        self._check_dim(x, "features")
        n = len(x)
        items = _check_items(items, n)
        lookup = self._lookup()
        dup = [it for it in items if it in lookup]
        if dup:
            raise ValueError(f"{len(dup)} item(s) already in the index (remove them first): "
                             + ", ".join(repr(s) for s in dup[:5]))
        lab = _check_labels(labels, n)
        new_ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        if n == 0:
            return new_ids
        _add_chunks(self._index, x, new_ids, progress, desc="adding")
        self._gpu_index = None
        if self._labels is None and lab is not None:
            self._labels = np.full(len(self._ids), -1, dtype=np.int64)
        if self._labels is not None:
            self._labels = np.concatenate([self._labels, lab if lab is not None else np.full(n, -1, np.int64)])
        self._ids = np.concatenate([self._ids, new_ids])
        self._items.extend(items)
        lookup.update(zip(items, new_ids.tolist()))
        self._next_id += n
        return new_ids

    def remove(self, ids_or_items: Iterable[int | str]) -> int:
        """Remove by id (ints) or by item (strings); returns how many were removed.

        Unknown ids/items raise ``ValueError`` naming them, and nothing is removed.
        """
        wanted: set[int] = set()
        unknown: list[str] = []
        lookup = self._lookup()
        for v in ids_or_items:
            if isinstance(v, (str, os.PathLike)):
                s = os.fspath(v)
                if s in lookup:
                    wanted.add(lookup[s])
                else:
                    unknown.append(repr(s))
            elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
                i = int(v)
                p = int(np.searchsorted(self._ids, i))
                if p < len(self._ids) and self._ids[p] == i:
                    wanted.add(i)
                else:
                    unknown.append(str(i))
            else:
                raise ValueError(f"remove takes ids (int) or items (str), got {type(v).__name__}")
        if unknown:
            raise ValueError(f"not in the index: {', '.join(unknown[:10])}" + (" ..." if len(unknown) > 10 else ""))
        if not wanted:
            return 0
        rm = np.array(sorted(wanted), dtype=np.int64)
        if self.index_type == "hnsw":
            self._removed = np.union1d(self._removed, rm)
        else:
            removed = int(self._index.remove_ids(rm))
            if removed != len(rm):  # pragma: no cover - ids and faiss out of step would be a bug
                raise RuntimeError(f"faiss removed {removed} of {len(rm)} ids")
        keep = ~np.isin(self._ids, rm)
        self._ids = self._ids[keep]
        self._items = [it for it, k in zip(self._items, keep) if k]
        if self._labels is not None:
            self._labels = self._labels[keep]
        self._item_to_id = None
        self._gpu_index = None
        if self.index_type == "hnsw" and len(self._removed) > COMPACT_FRACTION * max(self._index.ntotal, 1):
            self.compact()
        return int(len(rm))

    def compact(self) -> None:
        """Rebuild an HNSW graph without its tombstones (same ids); no-op for other types."""
        if self.index_type != "hnsw" or not len(self._removed):
            return
        faiss = _faiss()
        hnsw = faiss.downcast_index(self._index.index)
        all_ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        vectors = faiss.downcast_index(hnsw.storage).reconstruct_n(0, hnsw.ntotal)
        keep = ~np.isin(all_ids, self._removed)
        params = {"type": "hnsw", "M": int(self.meta.get("build_params", {}).get("M", HNSW_M)),
                  "efConstruction": int(hnsw.hnsw.efConstruction)}
        index = _new_faiss_index(params, self.dim)
        _add_chunks(index, np.ascontiguousarray(vectors[keep]), all_ids[keep], False, desc="compacting")
        self._index = index
        self._removed = np.zeros(0, np.int64)

    # -- info
    def info(self) -> dict[str, Any]:
        """What the index holds (meta.json content without the file checksums)."""
        faiss = _faiss()
        out = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model_name": self.model_name,
            "preprocess": self.preprocess,
            "index_type": self.index_type,
            "faiss_index": _describe(self._index),
            "metric": "inner_product",
            "normalized": True,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "tombstones": int(len(self._removed)),
            "next_id": self._next_id,
            "has_labels": self._labels is not None,
            "search_params": self.search_params,
            "zoo_version": _zoo_version(),
            "faiss_version": getattr(faiss, "__version__", "unknown"),
        }
        out.update({k: v for k, v in self.meta.items() if k not in out and k != "files"})
        return out

    # -- save / load
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the index folder atomically (temp folder beside it, then rename; see module docstring)."""
        from zoo.checkpoint import atomic_folder, file_sha256

        faiss = _faiss()
        folder = Path(folder).expanduser()
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"{folder} exists and is not a folder; refusing to replace it with an index")
            if any(folder.iterdir()) and not (folder / META_FILE).is_file():
                raise ValueError(f"{folder} is a non-empty folder that is not an index (no {META_FILE}); "
                                 "refusing to replace it")
        with atomic_folder(folder) as tmp:
            files: dict[str, str] = {}
            faiss.write_index(self._index, str(tmp / INDEX_FILE))
            _write_npy(tmp / IDS_FILE, self._ids)
            (tmp / ITEMS_FILE).write_text(json.dumps(self._items, ensure_ascii=False), encoding="utf-8")
            names = [INDEX_FILE, IDS_FILE, ITEMS_FILE]
            if self._labels is not None:
                _write_npy(tmp / LABELS_FILE, self._labels)
                names.append(LABELS_FILE)
            if len(self._removed):
                _write_npy(tmp / REMOVED_FILE, self._removed)
                names.append(REMOVED_FILE)
            for name in names:
                _fsync(tmp / name)
                files[name] = file_sha256(tmp / name)
            meta = self.info()
            meta["created_at"] = self.meta.get("created_at") or _now()
            meta["updated_at"] = _now()
            meta["files"] = files
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            _fsync(tmp / META_FILE)
        self.meta = {k: v for k, v in meta.items() if k in self.meta or k in ("created_at", "updated_at")}
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> FeatureIndex:
        """Read an index folder written by :meth:`save` (checksums verified, nothing unpickled)."""
        from zoo.checkpoint import file_sha256

        faiss = _faiss()
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            hint = ""
            if folder.parent.is_dir():
                aside = sorted(folder.parent.glob(f".{folder.name}.old-*"))
                if aside:
                    hint = f" (an interrupted save left the previous index at {aside[-1]})"
            raise IndexFileError(f"index folder {folder} not found{hint}")
        meta = _read_json(folder / META_FILE)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise IndexFileError(f"{folder / META_FILE}: not a selfsup-zoo index (format {meta.get('format')!r})"
                                 if isinstance(meta, dict) else f"{folder / META_FILE}: expected a JSON object")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise IndexFileError(f"{folder / META_FILE}: format version {meta['format_version']} is newer than "
                                 f"this zoo reads ({FORMAT_VERSION}); upgrade selfsup-zoo")
        required = ("model_name", "index_type", "dim", "next_id", "files")
        missing = [k for k in required if k not in meta]
        if missing:
            raise IndexFileError(f"{folder / META_FILE}: missing keys {missing}")
        files = meta["files"]
        for name in (INDEX_FILE, IDS_FILE, ITEMS_FILE):
            if name not in files:
                raise IndexFileError(f"{folder / META_FILE}: no checksum recorded for {name}")
        for name, digest in files.items():
            path = folder / name
            if not path.is_file():
                raise IndexFileError(f"{path}: file missing from the index folder")
            if file_sha256(path) != digest:
                raise IndexFileError(f"{path}: checksum mismatch (file corrupt or modified since it was saved)")
        try:
            index = faiss.read_index(str(folder / INDEX_FILE))
        except Exception as e:  # noqa: BLE001 - faiss raises RuntimeError with C++ text
            raise IndexFileError(f"{folder / INDEX_FILE}: cannot be read by faiss ({str(e).splitlines()[0]})") from None
        ids = _read_npy(folder / IDS_FILE)
        items = _read_json(folder / ITEMS_FILE)
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items) or len(items) != len(ids):
            raise IndexFileError(f"{folder / ITEMS_FILE}: expected a list of {len(ids)} strings")
        labels = _read_npy(folder / LABELS_FILE) if LABELS_FILE in files else None
        if labels is not None and len(labels) != len(ids):
            raise IndexFileError(f"{folder / LABELS_FILE}: {len(labels)} labels for {len(ids)} ids")
        removed = _read_npy(folder / REMOVED_FILE) if REMOVED_FILE in files else None
        n_removed = 0 if removed is None else len(removed)
        if len(ids) and (np.any(np.diff(ids) <= 0) or ids[-1] >= int(meta["next_id"])):
            raise IndexFileError(f"{folder / IDS_FILE}: ids must be increasing and below next_id")
        if index.d != int(meta["dim"]) or index.ntotal != len(ids) + n_removed:
            raise IndexFileError(
                f"{folder / INDEX_FILE}: holds {index.ntotal} vectors of dimension {index.d}, but {IDS_FILE} and "
                f"{META_FILE} describe {len(ids) + n_removed} of dimension {meta['dim']}"
            )
        keys = ("model_source", "build_params", "estimated_bytes", "memory_budget_mb", "requested_type", "tuning",
                "build_seconds", "tune_seconds", "created_at", "updated_at", "seed", "source")
        return cls(
            index, dim=int(meta["dim"]), model_name=meta["model_name"], preprocess=meta.get("preprocess"),
            index_type=meta["index_type"], ids=ids, items=items, labels=labels, next_id=int(meta["next_id"]),
            search_params=meta.get("search_params") or {}, meta={k: meta[k] for k in keys if k in meta},
            removed=removed,
        )


def faiss_nlist(index: Any) -> int:
    faiss = _faiss()
    return int(faiss.extract_index_ivf(index).nlist)


def _describe(index: Any) -> str:
    faiss = _faiss()
    name = type(index).__name__
    inner = getattr(index, "index", None)
    if inner is not None and name.startswith("IndexIDMap"):
        return f"{name}({_describe(faiss.downcast_index(inner))})"
    if name == "IndexHNSWFlat":
        return f"IndexHNSWFlat(M={index.hnsw.nb_neighbors(1)})"
    if name in ("IndexIVFFlat", "IndexIVFPQ"):
        extra = f", m={index.pq.M}, nbits={index.pq.nbits}" if name == "IndexIVFPQ" else ""
        return f"{name}(nlist={index.nlist}{extra})"
    return name


def _check_items(items: Sequence[str], n: int) -> list[str]:
    items = [os.fspath(s) if isinstance(s, os.PathLike) else s for s in items]
    if len(items) != n:
        raise ValueError(f"{len(items)} items for {n} feature vectors")
    bad = [s for s in items if not isinstance(s, str)]
    if bad:
        raise ValueError(f"items must be strings, got {type(bad[0]).__name__}")
    if len(set(items)) != n:
        seen: set[str] = set()
        dups = [s for s in items if s in seen or seen.add(s)]
        raise ValueError(f"items must be unique; repeated: {', '.join(repr(s) for s in dups[:5])}")
    return items


def _check_labels(labels: Any, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    lab = np.asarray(labels)
    if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be {n} integers, got shape {lab.shape} dtype {lab.dtype}")
    return lab.astype(np.int64)


def _add_chunks(index: Any, x: np.ndarray, ids: np.ndarray, progress: bool, desc: str) -> None:
    from tqdm.auto import tqdm

    starts = range(0, len(x), ADD_CHUNK)
    for s in tqdm(starts, desc=desc, disable=not progress or len(x) <= ADD_CHUNK, leave=False, unit="chunk"):
        index.add_with_ids(np.ascontiguousarray(x[s : s + ADD_CHUNK]), np.ascontiguousarray(ids[s : s + ADD_CHUNK]))


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _write_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise IndexFileError(f"{path}: not a readable .npy array ({e})") from None
    if arr.ndim != 1 or arr.dtype != np.int64:
        raise IndexFileError(f"{path}: expected a 1-D int64 array, got {arr.dtype} {arr.shape}")
    return arr


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise IndexFileError(f"{path}: file missing from the index folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFileError(f"{path}: corrupt JSON ({e})") from None


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


# ----------------------------------------------------------------------------- feature folders
def write_features(
    folder: str | os.PathLike,
    features: Any,
    items: Sequence[str],
    model_name: str,
    preprocess: Mapping[str, Any] | None = None,
    labels: Any = None,
    shard: str | None = None,
) -> Path:
    """Write a feature folder (module docstring): ``features[-shard].npy``, ``items[-shard].json``, ... ."""
    from zoo.checkpoint import atomic_write, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x = np.ascontiguousarray(np.asarray(features), dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be [N,D], got shape {x.shape}")
    items = _check_items(items, len(x))
    suffix = f"-{shard}" if shard is not None else ""
    atomic_write(folder / f"features{suffix}.npy", lambda tmp: _write_npy(Path(tmp), x))
    if labels is not None:
        lab = _check_labels(labels, len(x))
        atomic_write(folder / f"labels{suffix}.npy", lambda tmp: _write_npy(Path(tmp), lab))
    atomic_write_text(folder / f"items{suffix}.json", json.dumps(items, ensure_ascii=False))
    meta = {"model_name": model_name, "preprocess": dict(preprocess or {}), "dim": int(x.shape[1])}
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2) + "\n")
    return folder


def read_features(folder: str | os.PathLike) -> dict[str, Any]:
    """Read a feature folder: ``{"features", "items", "labels" (or None), "meta" (dict, maybe empty)}``."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise IndexFileError(f"feature folder {folder} not found")
    shards = sorted(folder.glob("features*.npy"))
    if not shards:
        raise IndexFileError(f"{folder}: no features.npy (or features-<shard>.npy) files")
    feats, items, labels = [], [], []
    any_labels = False
    for path in shards:
        suffix = path.name[len("features") : -len(".npy")]
        try:
            x = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise IndexFileError(f"{path}: not a readable .npy array ({e})") from None
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
            raise IndexFileError(f"{path}: expected a [N,D] float array, got {x.dtype} {x.shape}")
        it = _read_json(folder / f"items{suffix}.json")
        if not isinstance(it, list) or len(it) != len(x) or not all(isinstance(s, str) for s in it):
            raise IndexFileError(f"{folder / f'items{suffix}.json'}: expected a list of {len(x)} strings")
        lab_path = folder / f"labels{suffix}.npy"
        lab = _read_npy(lab_path) if lab_path.is_file() else None
        if lab is not None and len(lab) != len(x):
            raise IndexFileError(f"{lab_path}: {len(lab)} labels for {len(x)} features")
        any_labels |= lab is not None
        feats.append(x.astype(np.float32))
        items.extend(it)
        labels.append(lab if lab is not None else np.full(len(x), -1, np.int64))
    dims = {f.shape[1] for f in feats}
    if len(dims) != 1:
        raise IndexFileError(f"{folder}: shards have different dimensions {sorted(dims)}")
    meta = _read_json(folder / "meta.json") if (folder / "meta.json").is_file() else {}
    if not isinstance(meta, dict):
        raise IndexFileError(f"{folder / 'meta.json'}: expected a JSON object")
    return {"features": np.concatenate(feats), "items": items,
            "labels": np.concatenate(labels) if any_labels else None, "meta": meta}


# ----------------------------------------------------------------------------- from models and images
def _load_model(spec: Any) -> tuple[Any, str]:
    """(model, source): a ZooModel as is, or a MODEL argument (registered name, folder, hf-hub:)."""
    import zoo
    from zoo.cli import load_model_arg

    if isinstance(spec, zoo.ZooModel):
        return spec, str(spec.pretrained_cfg.get("name") or spec.arch)
    spec = str(spec)
    if Path(spec).is_dir():
        return load_model_arg(spec), str(Path(spec).resolve())
    if not spec.startswith("hf-hub:"):
        entry = zoo.get_entry(spec)
        if not entry.weights:
            raise ValueError(f"model {spec!r} has no pretrained weights: an index of a randomly initialised "
                             "model could not be searched later")
    return load_model_arg(spec), spec


def _model_name(model: Any) -> str:
    return str(model.pretrained_cfg.get("name") or model.arch)


def _preprocess_config(model: Any) -> dict[str, Any]:
    from serve.preprocess import Preprocessor

    return Preprocessor(model.pretrained_cfg).config()


def _embed_source(
    model: Any, images: str | os.PathLike | None, data: str | None, split: str, batch_size: int,
    device: Any, progress: bool, item_root: Path | None = None,
) -> tuple[np.ndarray, list[str], np.ndarray | None, list[str], str | None, Any]:
    """Features, items, labels, skipped files, folder root, dataset for ``--images`` or ``--data``."""
    from zoo.data import load_dataset, transform_for
    from zoo.eval import extract_features

    tf = transform_for(model)
    skipped: list[str] = []
    root: str | None = None
    if images is not None:
        root_path = Path(images).expanduser().resolve()
        with warnings.catch_warnings(record=True):  # reported by the caller from ds.skipped instead
            warnings.simplefilter("always")
            ds = load_dataset("imagefolder", root=root_path, transform=tf, full_check=True)
        base = (item_root or root_path)
        items = [_item_name(Path(p), base) for p in ds.paths]
        skipped = list(ds.skipped)
        root = str(root_path)
    elif data is not None:
        ds = load_dataset(data, split=split, transform=tf)
        items = [f"{data}/{split}/{i}" for i in range(len(ds))]
    else:
        raise ValueError("give images (a folder), data (a dataset name) or features (a feature folder)")
    out = extract_features(model, ds, batch_size=batch_size, device=device, progress=progress)
    labels = out["labels"] if np.any(out["labels"] >= 0) else None
    return out["features"], items, labels, skipped, root, ds


def _item_name(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base).as_posix()
    except ValueError:
        return str(path.resolve())


def build_index(
    model_spec_or_model: Any = None,
    images: str | os.PathLike | None = None,
    data: str | None = None,
    split: str = "train",
    index_type: str = "auto",
    *,
    features: str | os.PathLike | None = None,
    memory_budget_mb: float = 1024.0,
    target_recall: float = 0.95,
    batch_size: int = 128,
    device: Any = None,
    seed: int = 0,
    progress: bool = True,
) -> FeatureIndex:
    """Embed a folder (``images``) or a bundled dataset (``data``) with the model and build an index.

    ``features`` (a feature folder, see :func:`read_features`) skips embedding; the model (when given)
    must match its ``meta.json``. Unreadable image files are skipped; their paths are in ``.skipped``.
    Items are paths relative to ``images`` or ``"<data>/<split>/<i>"``.
    """
    sources = [s is not None for s in (images, data, features)]
    if sum(sources) != 1:
        raise ValueError("give exactly one of images (a folder), data (a dataset name) or features (a folder)")
    source: dict[str, Any]
    if features is not None:
        feat = read_features(features)
        meta = feat["meta"]
        name = meta.get("model_name")
        preprocess = meta.get("preprocess")
        model_source = meta.get("model_source", name)
        if model_spec_or_model is not None:
            model, model_source = _load_model(model_spec_or_model)
            if name is not None and name != _model_name(model):
                raise IndexModelMismatchError(f"feature folder {features} holds features of model {name!r}, "
                                              f"not {_model_name(model)!r}")
            name = _model_name(model)
            preprocess = preprocess or _preprocess_config(model)
            if feat["features"].shape[1] != model.num_features:
                raise ValueError(f"feature folder {features} has dimension {feat['features'].shape[1]}, model "
                                 f"{name!r} gives {model.num_features}")
        if name is None:
            raise ValueError(f"feature folder {features} has no meta.json naming its model; give the model")
        x, items, labels, skipped = feat["features"], feat["items"], feat["labels"], []
        source = {"features": str(Path(features).resolve())}
        embedded = meta.get("source")
        if isinstance(embedded, dict):  # what `zoo embed` embedded: keeps `zoo index add` naming items alike
            source.update({k: embedded[k] for k in ("images", "data", "split", "skipped") if k in embedded})
    else:
        model, model_source = _load_model(model_spec_or_model)
        name, preprocess = _model_name(model), _preprocess_config(model)
        x, items, labels, skipped, root, ds = _embed_source(model, images, data, split, batch_size, device, progress)
        source = {"images": root} if images is not None else {"data": data, "split": split}
        if getattr(ds, "classes", None):
            source["classes"] = list(ds.classes)
        if skipped:
            source["skipped"] = len(skipped)
    index = FeatureIndex.build(
        x, items, name, preprocess, index_type=index_type, memory_budget_mb=memory_budget_mb,
        target_recall=target_recall, labels=labels, seed=seed, progress=progress, model_source=model_source,
    )
    index.meta["source"] = source
    index.skipped = skipped
    return index


# ----------------------------------------------------------------------------- CLI
def _report_skipped(skipped: list[str]) -> None:
    """Print the unreadable files that were skipped, with the reason, on stderr."""
    if skipped:
        from zoo.data.folder import check_image

        lines = [f"{p} ({check_image(p, full=True) or 'unreadable'})" for p in skipped[:20]]
        more = f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        print(f"skipped {len(skipped)} unreadable image file(s):\n  " + "\n  ".join(lines) + more, file=sys.stderr)


def _summary(index: FeatureIndex) -> str:
    tuning = index.meta.get("tuning") or {}
    params = ", ".join(f"{k}={v}" for k, v in index.search_params.items()) or "exact"
    rec = tuning.get("recall_at_10")
    rec_s = f", tuned recall@10={rec:.3f}" if rec is not None and index.index_type != "flat" else ""
    return f"{index.ntotal} items, {index.index_type} ({params}{rec_s}), dim {index.dim}, model {index.model_name}"


def _model_for_index(index: FeatureIndex) -> Any:
    """The model recorded in the index, checked against its name and preprocessing."""
    source = index.meta.get("model_source") or index.model_name
    try:
        model, _ = _load_model(source)
    except (KeyError, ValueError, FileNotFoundError) as first:
        if source == index.model_name:
            raise
        try:  # the recorded model folder moved: fall back to the registered name
            model, _ = _load_model(index.model_name)
        except (KeyError, ValueError, FileNotFoundError):
            raise ValueError(f"cannot load the index's model {index.model_name!r} from {source!r} ({first})") from None
    if _model_name(model) != index.model_name:
        raise IndexModelMismatchError(f"{source!r} is model {_model_name(model)!r}, the index was built with "
                                      f"{index.model_name!r}")
    prep = json.loads(json.dumps(_preprocess_config(model)))  # tuples -> lists, as stored
    if index.preprocess and prep != index.preprocess:
        raise ValueError(f"model {index.model_name!r} now preprocesses with {prep}, the index was built with "
                         f"{index.preprocess}; rebuild the index")
    return model.eval()


def embed_images(model: Any, paths: Sequence[str | os.PathLike], preprocess: Mapping[str, Any] | None = None,
                 batch_size: int = 64) -> np.ndarray:
    """Features ``[N,D]`` of image files, decoded and preprocessed exactly as the server does."""
    import torch

    from serve.preprocess import Preprocessor, decode_image

    prep = Preprocessor({**model.pretrained_cfg, **(preprocess or {})})
    imgs = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"query image {path} not found")
        imgs.append(decode_image(path.read_bytes(), name=str(path)))
    device = next((q.device for q in model.parameters()), torch.device("cpu"))
    out = []
    with torch.inference_mode():
        for s in range(0, len(imgs), batch_size):
            batch = torch.from_numpy(prep.batch(imgs[s : s + batch_size])).to(device)
            out.append(model.forward_features(batch).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.num_features), np.float32)


def _print_results(paths: Sequence[str], result: SearchResult, as_json: bool) -> None:
    rows = result.to_list()
    if as_json:
        print(json.dumps([{"query": str(p), "results": r} for p, r in zip(paths, rows)], indent=2))
        return
    from zoo.cli import format_table

    for p, r in zip(paths, rows):
        print(f"query: {p}")
        cols = ["rank", "score", "id", "item"] + (["label"] if result.labels is not None else [])
        print(format_table(r, cols))
        print()


def cli_index(args: Any) -> int:
    """``zoo index build|search|add|remove|info`` (flags in serve/cli.py)."""
    cmd = args.index_cmd
    if cmd == "build":
        t0 = time.perf_counter()
        index = build_index(
            args.model, images=args.images, data=args.data, split=args.split, index_type=args.type,
            features=args.features, memory_budget_mb=args.memory_budget_mb, target_recall=args.target_recall,
            batch_size=args.batch_size, progress=True,
        )
        _report_skipped(index.skipped)
        path = index.save(args.out)
        print(f"built {path}: {_summary(index)} in {time.perf_counter() - t0:.1f} s")
        return 0
    index = FeatureIndex.load(args.index)
    if cmd == "info":
        info = index.info()
        info["size_bytes"] = sum(p.stat().st_size for p in Path(args.index).iterdir() if p.is_file())
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    if cmd == "search":
        model = _model_for_index(index)
        q = embed_images(model, args.images, index.preprocess)
        result = index.search(q, k=args.k, model_name=_model_name(model))
        _print_results(args.images, result, args.json)
        return 0
    if cmd == "add":
        model = _model_for_index(index)
        root = (index.meta.get("source") or {}).get("images")
        x, items, labels, skipped, _, _ = _embed_source(
            model, args.images, args.data, args.split, getattr(args, "batch_size", 128), None, True,
            item_root=Path(root) if root else None,
        )
        _report_skipped(skipped)
        present = index._lookup()
        keep = np.array([it not in present for it in items], dtype=bool)
        if not keep.all():
            print(f"{int((~keep).sum())} item(s) already in the index, not added again", file=sys.stderr)
        new = index.add(x[keep], [it for it, k in zip(items, keep) if k],
                        labels=None if labels is None else labels[keep], model_name=_model_name(model))
        index.save(args.index)
        print(f"added {len(new)} item(s) (ids {new[0]}..{new[-1]}): {_summary(index)}" if len(new)
              else f"nothing added: {_summary(index)}")
        return 0
    if cmd == "remove":
        lookup = index._lookup()
        keys: list[int | str] = []
        for tok in args.items:
            # an existing item name wins over an id reading of the same token
            keys.append(tok if tok in lookup or not tok.lstrip("-").isdigit() else int(tok))
        n = index.remove(keys)
        index.save(args.index)
        print(f"removed {n} item(s): {_summary(index)}")
        return 0
    raise ValueError(f"unknown index command {cmd!r}")  # pragma: no cover - argparse restricts it
