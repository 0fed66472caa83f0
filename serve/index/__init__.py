"""Image index: build from a model's features, tune, search, add, remove, save/load, on any backend.

One interface (:class:`FeatureIndex`, in :mod:`serve.index.base`) and two backends behind it:

- ``faiss`` (:mod:`serve.index.faiss_backend`): an in-process faiss index in an index folder.
- ``milvus`` (:mod:`serve.index.milvus_backend`): a Milvus collection (Milvus Lite through a local
  ``.db`` file, or a Milvus cluster), with the index folder's ``meta.json`` pointing at it.

The index types, the ``auto`` rule and the search-parameter tuning are shared
(:mod:`serve.index.auto`); ``meta.json`` is validated against :mod:`serve.index.schema`; feature
folders are :mod:`serve.index.features`; model loading and dataset embedding are
:mod:`serve.index.build`; the ``zoo index`` command is :mod:`serve.index.cli`. The server, the CLI
and the demo use only :class:`FeatureIndex` (``FeatureIndex.build(..., backend=...)`` and
``FeatureIndex.load(folder_or_uri)``).
"""

from __future__ import annotations

from serve.index.auto import (
    EF_LADDER,
    FLAT_MAX_N,
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    INDEX_TYPES,
    TUNE_K,
    TUNE_QUERIES,
    _pq_m_options,
    _pq_nbits,
    choose_index,
    estimate_bytes,
    nlist_for,
    tune_search_param,
)
from serve.index.base import (
    BACKENDS,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    FeatureIndex,
    IndexFileError,
    IndexModelMismatchError,
    IndexUnreachableError,
    SearchResult,
    backend_class,
    is_uri,
)
from serve.index.build import build_index, embed_images
from serve.index.cli import cli_index
from serve.index.faiss_backend import FaissIndex
from serve.index.features import read_features, write_features
from serve.index.schema import validate_meta

__all__ = [
    "BACKENDS",
    "EF_LADDER",
    "FLAT_MAX_N",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HNSW_EF_CONSTRUCTION",
    "HNSW_M",
    "INDEX_TYPES",
    "META_FILE",
    "TUNE_K",
    "TUNE_QUERIES",
    "FaissIndex",
    "FeatureIndex",
    "IndexFileError",
    "IndexModelMismatchError",
    "IndexUnreachableError",
    "SearchResult",
    "_pq_m_options",
    "_pq_nbits",
    "backend_class",
    "build_index",
    "choose_index",
    "cli_index",
    "embed_images",
    "estimate_bytes",
    "is_uri",
    "nlist_for",
    "read_features",
    "tune_search_param",
    "validate_meta",
    "write_features",
]
