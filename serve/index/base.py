"""The backend-neutral index interface: :class:`FeatureIndex`, its results, errors and shared checks.

An index maps stable int64 ids to L2-normalised feature vectors, each with an item (a string, unique
within the index) and optionally an integer label, and records the model name and preprocessing that
made the vectors, refusing features or queries of another model. Similarity is cosine (inner product
of unit vectors).

Backends (one class each, same methods): ``faiss`` (:class:`serve.index.faiss_backend.FaissIndex`,
in-process, an index folder on disk) and ``milvus`` (:class:`serve.index.milvus_backend.MilvusIndex`,
a Milvus collection: Milvus Lite through a local ``.db`` file, or a Milvus cluster through its URI).
:meth:`FeatureIndex.build` picks the backend by name; :meth:`FeatureIndex.load` picks it from the
index folder's ``meta.json`` (``"backend"``, absent for faiss folders written before there were
backends) or from a ``URI#collection`` location. The server, the CLI and the demo use only this
interface.

Ids are assigned at add time in increasing order (``0..N-1`` at build, then ``next_id`` onwards) and
never reused, so an id keeps meaning the same item for the life of the index.
"""

from __future__ import annotations

import abc
import datetime as _dt
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

FORMAT_NAME = "selfsup-zoo-index"
FORMAT_VERSION = 1
META_FILE = "meta.json"
BACKENDS = ("faiss", "milvus")
URI_SCHEMES = ("http://", "https://", "tcp://", "grpc://", "unix:")


class IndexModelMismatchError(ValueError):
    """Features or queries from a different model than the one that built the index."""


class IndexFileError(ValueError):
    """An index folder that cannot be read: the message names the file and the problem."""


class IndexUnreachableError(RuntimeError):
    """A vector database that cannot be reached: the message names its URI."""


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


# ----------------------------------------------------------------------------- the interface
def is_uri(location: str | os.PathLike) -> bool:
    """Whether ``location`` names a vector-database collection (``URI#collection``, a ``.db`` file or a
    server URI) rather than an index folder."""
    s = os.fspath(location)
    if (Path(s).expanduser() / META_FILE).is_file():
        return False  # an index folder, whatever its name
    return "#" in s or s.startswith(URI_SCHEMES) or s.split("#")[0].endswith(".db")


def backend_class(backend: str) -> type[FeatureIndex]:
    """The :class:`FeatureIndex` subclass of a backend name (``faiss`` or ``milvus``)."""
    if backend == "faiss":
        from serve.index.faiss_backend import FaissIndex

        return FaissIndex
    if backend == "milvus":
        from serve.index.milvus_backend import MilvusIndex

        return MilvusIndex
    raise ValueError(f"unknown index backend {backend!r}; choose from {', '.join(BACKENDS)}")


class FeatureIndex(abc.ABC):
    """What every index backend offers: build, add, remove, search, info, save/load.

    Attributes (all backends): ``backend``, ``model_name``, ``preprocess``, ``dim``, ``ntotal`` (live
    items), ``index_type`` (``flat``/``hnsw``/``ivf``/``ivfpq``), ``search_params`` (the tuned
    ``efSearch``/``nprobe``), ``next_id``, ``meta`` (build record), ``skipped`` (unreadable files
    skipped by :func:`serve.index.build_index`; not persisted). ``ids``, ``items`` and ``labels`` read
    the whole index (fine in-process; a full scan on a database).

    Concurrent :meth:`search` calls are safe on every backend. A database backend also keeps searches
    consistent while an :meth:`add` or :meth:`remove` runs; the faiss backend needs those exclusive.
    """

    backend: ClassVar[str] = ""
    dim: int
    model_name: str
    preprocess: dict[str, Any]
    index_type: str
    search_params: dict[str, Any]
    meta: dict[str, Any]
    skipped: list[str]

    # -- construction
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
        *,
        backend: str | None = None,
        **options: Any,
    ) -> FeatureIndex:
        """Build and tune an index over ``features`` ``[N,D]`` (normalised here) named by ``items``.

        Ids are ``0..N-1`` in the order of ``features``. ``backend`` (default: this class's, ``faiss``
        on :class:`FeatureIndex`) chooses the implementation; ``options`` are the backend's own (for
        ``milvus``: ``uri``, ``collection``). See :mod:`serve.index.auto` for the types, the ``auto``
        rule and the tuning of the search parameter.
        """
        impl = backend_class(backend) if backend else (cls if cls.backend else backend_class("faiss"))
        if cls.backend and backend and impl is not cls:
            raise ValueError(f"{cls.__name__}.build cannot build a {backend!r} index")
        return impl._build(
            features, items, model_name, preprocess, index_type=index_type, memory_budget_mb=memory_budget_mb,
            target_recall=target_recall, labels=labels, seed=seed, progress=progress, model_source=model_source,
            **options,
        )

    @classmethod
    @abc.abstractmethod
    def _build(cls, features: Any, items: Sequence[str], model_name: str, preprocess: Mapping[str, Any] | None,
               **kwargs: Any) -> FeatureIndex:
        """The backend's build (arguments as :meth:`build`)."""

    @classmethod
    def load(cls, location: str | os.PathLike) -> FeatureIndex:
        """Open an index: an index folder (backend from its ``meta.json``) or ``URI#collection``."""
        if is_uri(location):
            from serve.index.milvus_backend import MilvusIndex

            uri, _, collection = os.fspath(location).partition("#")
            return MilvusIndex.open(uri, collection or None)
        from serve.index.schema import read_meta

        folder = Path(location).expanduser()
        meta = read_meta(folder)
        impl = backend_class(meta.get("backend", "faiss"))
        if cls.backend and impl is not cls:
            raise IndexFileError(f"{folder / META_FILE}: a {impl.backend!r} index, not {cls.backend!r}")
        return impl._load(folder, meta)

    @classmethod
    @abc.abstractmethod
    def _load(cls, folder: Path, meta: dict[str, Any]) -> FeatureIndex:
        """Open the index of ``folder`` whose validated ``meta.json`` is ``meta``."""

    # -- what it holds
    @property
    @abc.abstractmethod
    def ntotal(self) -> int:
        """Number of live items."""

    @property
    @abc.abstractmethod
    def next_id(self) -> int:
        """The id the next added item gets (ids are never reused)."""

    @property
    @abc.abstractmethod
    def ids(self) -> np.ndarray:
        """Sorted live ids (int64)."""

    @property
    @abc.abstractmethod
    def items(self) -> dict[int, str]:
        """id -> item (a new dict)."""

    @property
    @abc.abstractmethod
    def labels(self) -> dict[int, int] | None:
        """id -> label (``-1`` for items added without one), or ``None`` when the index has no labels."""

    @abc.abstractmethod
    def item_ids(self, items: Iterable[str]) -> list[int]:
        """Ids of the given items (``KeyError`` naming the first unknown one)."""

    @abc.abstractmethod
    def contains(self, items: Sequence[str]) -> np.ndarray:
        """``bool [len(items)]``: which items are in the index."""

    # -- operations
    @abc.abstractmethod
    def search(self, queries: Any, k: int = 10, model_name: str | None = None) -> SearchResult:
        """The ``k`` most similar items of each query vector (``[Q,D]`` or ``[D]``; normalised here)."""

    @abc.abstractmethod
    def add(self, features: Any, items: Sequence[str], labels: Any = None, model_name: str | None = None,
            progress: bool = False) -> np.ndarray:
        """Add vectors named by ``items`` (unique, not yet in the index); returns their new ids."""

    @abc.abstractmethod
    def remove(self, ids_or_items: Iterable[int | str]) -> int:
        """Remove by id (ints) or by item (strings); returns how many were removed. Unknown ids/items
        raise ``ValueError`` naming them, and nothing is removed."""

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """What the index holds (JSON-ready)."""

    @abc.abstractmethod
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the index folder atomically (for a database backend: its ``meta.json`` pointing at the
        collection, which the database already holds)."""

    def close(self) -> None:  # noqa: B027 - optional: only connection-holding backends need it
        """Release connections (no-op in-process)."""

    # -- shared
    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.index_type}, n={self.ntotal}, dim={self.dim}, "
                f"model={self.model_name!r}, params={self.search_params})")

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


def resolve_ids(ids_or_items: Iterable[int | str], id_of_item: Mapping[str, int] | None,
                has_id: Any) -> tuple[np.ndarray, list[str]]:
    """Sorted unique ids named by ``ids_or_items`` and the unknown ones (for ``remove``).

    ``id_of_item`` maps the items given (strings) to ids; ``has_id(ids)`` says which int ids exist.
    """
    wanted: set[int] = set()
    unknown: list[str] = []
    ints: list[int] = []
    for v in ids_or_items:
        if isinstance(v, (str, os.PathLike)):
            s = os.fspath(v)
            if id_of_item is not None and s in id_of_item:
                wanted.add(int(id_of_item[s]))
            else:
                unknown.append(repr(s))
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            ints.append(int(v))
        else:
            raise ValueError(f"remove takes ids (int) or items (str), got {type(v).__name__}")
    if ints:
        arr = np.array(ints, dtype=np.int64)
        ok = np.asarray(has_id(arr), dtype=bool)
        wanted.update(arr[ok].tolist())
        unknown.extend(str(i) for i in arr[~ok].tolist())
    return np.array(sorted(wanted), dtype=np.int64), unknown
