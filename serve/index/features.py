"""Feature folders: precomputed features for ``zoo index build MODEL --features DIR``.

A folder of precomputed features, e.g. from sharded extraction (:func:`write_features` writes one):
``features.npy`` float32 ``[N,D]`` (raw or normalised), ``items.json`` (list of ``N`` strings),
optional ``labels.npy`` int64 ``[N]`` and ``meta.json`` ``{"model_name": ..., "preprocess": {...}}``.
Shards are ``features-<s>.npy`` with ``items-<s>.json`` (and ``labels-<s>.npy``) side by side; they
are read in sorted order. A ``meta.json`` whose model differs from the given model is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from serve.index.base import IndexFileError, _check_items, _check_labels, _read_json, _read_npy, _write_npy


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
