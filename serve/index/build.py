"""From models and images to an index: model loading, dataset embedding, :func:`build_index`.

Index code (:mod:`serve.index.base` and the backends) never loads a model; this module does, and
hands the features to :meth:`FeatureIndex.build` of the chosen backend.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from serve.index.base import FeatureIndex, IndexModelMismatchError
from serve.index.features import read_features


def _load_model(spec: Any) -> tuple[Any, str]:
    """(model, source): a ZooModel as is, or a MODEL argument (registered name, folder, hf-hub:)."""
    import zoo
    from zoo import resolve_model

    if isinstance(spec, zoo.ZooModel):
        return spec, str(spec.pretrained_cfg.get("name") or spec.arch)
    spec = str(spec)
    if Path(spec).is_dir():
        return resolve_model(spec), str(Path(spec).resolve())
    if not spec.startswith("hf-hub:"):
        entry = zoo.get_entry(spec)
        if not entry.weights:
            raise ValueError(f"model {spec!r} has no pretrained weights: an index of a randomly initialised "
                             "model could not be searched later")
    return resolve_model(spec), spec


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
    backend: str = "faiss",
    **backend_options: Any,
) -> FeatureIndex:
    """Embed a folder (``images``) or a bundled dataset (``data``) with the model and build an index.

    ``backend`` (``faiss`` or ``milvus``) and ``backend_options`` (milvus: ``uri``, ``collection``)
    choose where the index lives (:meth:`FeatureIndex.build`).

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
        backend=backend, **backend_options,
    )
    index.meta["source"] = source
    index.skipped = skipped
    return index


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
