"""The faiss backend: an in-process faiss index in an index folder (:class:`FaissIndex`).

Index types, the ``auto`` rule and the tuning are in :mod:`serve.index.auto`; the interface is
:class:`serve.index.base.FeatureIndex`.

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


GPU
---
With faiss-gpu (``faiss.get_num_gpus() > 0``), IVF training and adding run on all GPUs
(``index_cpu_to_all_gpus``) and flat / IVF searches use a GPU replica made on first search; the
CPU index stays the master copy and is what gets saved. HNSW and IVF-PQ stay on the CPU.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from serve.index.auto import (
    HNSW_M,
    INDEX_TYPES,
    TUNE_K,
    TUNE_QUERIES,
    _build_params,
    tune_search_param,
)
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
    _faiss,
    _fsync,
    _log,
    _now,
    _read_json,
    _read_npy,
    _use_gpu,
    _write_npy,
    _zoo_version,
)

INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.json"
IDS_FILE = "ids.npy"
LABELS_FILE = "labels.npy"
REMOVED_FILE = "removed.npy"
COMPACT_FRACTION = 0.25
ADD_CHUNK = 65_536


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




# ----------------------------------------------------------------------------- the index
class FaissIndex(FeatureIndex):
    """A faiss index over L2-normalised features with stable ids, items, labels and model metadata.

    Make one with :meth:`build` or :meth:`load`. Attributes: ``model_name``, ``preprocess``, ``dim``,
    ``ntotal`` (live items), ``index_type``, ``search_params``, ``items`` (id -> item), ``labels``
    (id -> label, or ``None``), ``ids`` (sorted live ids), ``meta``.

    Concurrent :meth:`search` calls are safe (each builds its own faiss search parameters); ``add``,
    ``remove``, ``compact`` and ``save`` change the index and need the caller to hold them exclusive.
    """

    backend = "faiss"

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

    def contains(self, items: Sequence[str]) -> np.ndarray:
        lookup = self._lookup()
        return np.array([it in lookup for it in items], dtype=bool)

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
    ) -> FaissIndex:
        """:meth:`FeatureIndex.build` in faiss (no backend options)."""
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
        nlist = faiss_nlist(self._index) if kind in ("ivf", "ivfpq") else None
        tuning = tune_search_param(kind, self._raw_search, x, held, in_index, target_recall, nlist=nlist,
                                   progress=progress)
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
            "backend": self.backend,
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
    def _load(cls, folder: Path, meta: dict[str, Any]) -> FaissIndex:
        """Read an index folder written by :meth:`save` (``meta`` already validated by
        :func:`serve.index.schema.read_meta`; checksums verified, nothing unpickled)."""
        from zoo.checkpoint import file_sha256

        faiss = _faiss()
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


def _add_chunks(index: Any, x: np.ndarray, ids: np.ndarray, progress: bool, desc: str) -> None:
    from tqdm.auto import tqdm

    starts = range(0, len(x), ADD_CHUNK)
    for s in tqdm(starts, desc=desc, disable=not progress or len(x) <= ADD_CHUNK, leave=False, unit="chunk"):
        index.add_with_ids(np.ascontiguousarray(x[s : s + ADD_CHUNK]), np.ascontiguousarray(ids[s : s + ADD_CHUNK]))


