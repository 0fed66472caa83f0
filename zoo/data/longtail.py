"""Long-tailed versions of the labelled datasets: ``mnist5k_lt100``, ``shapes_lt10``, ``cifar10_lt50``, ...

The train split keeps an exponentially decaying number of images per class, the profile of the
CIFAR-LT benchmarks (Cui et al. 2019, "Class-balanced loss based on effective number of samples";
Cao et al. 2019, LDAM):

    n_c = floor(n_max * (1 / imbalance) ** (c / (C - 1)))      for class c = 0 .. C-1

so class 0 keeps ``n_max`` images and class C-1 keeps ``n_max / imbalance``. ``n_max`` is the size of
the smallest class of the balanced train split (400 for mnist5k, 5,000 for CIFAR-10, 500 for
CIFAR-100; shapes draws its classes at random, so its smallest class), which every class can supply.
Which images a class keeps is a uniform random subset drawn with ``numpy.random.default_rng([lt_seed, c])``
(kept in the original order), so the subset is fixed by ``lt_seed`` (default 0). The test split is
the base dataset's, unchanged and balanced.

Names: ``<base>_lt<imbalance>`` for base in :data:`LONGTAIL_BASES` and imbalance in
:data:`IMBALANCE_FACTORS` (10, 50, 100), plus ``<base>_lt`` for the default imbalance 100 (the usual
benchmark setting; recipes are named after it). ``load_dataset("mnist5k_lt100", "train", lt_seed=1)``
draws another subset; other keyword arguments go to the base dataset (``shapes``: ``seed``,
``n_train``, ``n_test``; CIFAR: ``root``, ``download``).

Train counts for mnist5k (n_max = 400): imbalance 10 keeps 1,630 images
(400, 309, 239, 185, 143, 111, 86, 66, 51, 40), 50 keeps 1,116
(400, 258, 167, 108, 70, 45, 29, 19, 12, 8), 100 keeps 988 (400, 239, 143, 86, 51, 30, 18, 11, 6, 4).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np
import torch

from zoo.data.base import InMemoryImageDataset, Transform

LONGTAIL_BASES: tuple[str, ...] = ("cifar10", "cifar100", "mnist5k", "shapes")
IMBALANCE_FACTORS: tuple[int, ...] = (10, 50, 100)
DEFAULT_IMBALANCE = 100
_NAME = re.compile(r"^(?P<base>[a-z0-9]+)_lt(?P<imbalance>\d*)$")


def longtail_names() -> list[str]:
    """Every long-tailed dataset name :func:`zoo.data.load_dataset` accepts."""
    return [f"{base}_lt{suffix}" for base in LONGTAIL_BASES for suffix in ("", *map(str, IMBALANCE_FACTORS))]


def parse_longtail_name(name: str) -> tuple[str, int] | None:
    """``"mnist5k_lt50"`` -> ``("mnist5k", 50)``; ``"mnist5k_lt"`` -> ``("mnist5k", 100)``; None if not long-tailed."""
    match = _NAME.match(name)
    if match is None or match["base"] not in LONGTAIL_BASES:
        return None
    imbalance = int(match["imbalance"]) if match["imbalance"] else DEFAULT_IMBALANCE
    return match["base"], imbalance


def longtail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Images kept per class: ``floor(n_max * (1/imbalance) ** (c / (C-1)))`` for ``c = 0 .. C-1``.

    ``imbalance`` = n_0 / n_{C-1} >= 1 (1 keeps the data balanced); ``num_classes`` >= 2.
    """
    if imbalance < 1:
        raise ValueError(f"imbalance factor must be >= 1 (largest / smallest class), got {imbalance}")
    if num_classes < 2 or n_max < 1:
        raise ValueError(f"need num_classes >= 2 and n_max >= 1, got {num_classes} and {n_max}")
    return [int(n_max * (1 / imbalance) ** (c / (num_classes - 1))) for c in range(num_classes)]


def longtail_indices(targets: np.ndarray, imbalance: float, seed: int = 0, num_classes: int | None = None
                     ) -> np.ndarray:
    """Indices (ascending) of a long-tailed subset of a labelled split.

    Class c keeps ``longtail_counts(n_max, C, imbalance)[c]`` of its images, chosen uniformly with
    ``numpy.random.default_rng([seed, c])``; ``n_max`` is the smallest class size, ``C`` is
    ``num_classes`` (default ``max(targets) + 1``). Every class must have at least one image.
    """
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    if targets.size == 0 or targets.min() < 0:
        raise ValueError("a long-tailed subset needs labelled data (labels >= 0)")
    num_classes = int(targets.max()) + 1 if num_classes is None else num_classes
    per_class = [np.flatnonzero(targets == c) for c in range(num_classes)]
    sizes = [len(idx) for idx in per_class]
    if min(sizes) == 0:
        raise ValueError(f"class {sizes.index(0)} has no images; cannot build a long-tailed subset")
    counts = longtail_counts(min(sizes), num_classes, imbalance)
    keep = [np.sort(np.random.default_rng([seed, c]).permutation(idx)[:n]) for c, (idx, n) in
            enumerate(zip(per_class, counts))]
    return np.sort(np.concatenate(keep))


def load_longtail(
    name: str, split: str, transform: Transform | None, lt_seed: int = 0, **base_kwargs: Any
) -> Any:
    """The long-tailed dataset ``name`` (see the module docstring); ``base_kwargs`` go to the base dataset.

    The train split is an :class:`InMemoryImageDataset` named ``name`` with ``.indices`` (rows of the base
    train split), ``.class_counts`` (numpy ``[C]``), ``.imbalance`` and ``.base``. The test split is the
    base test split renamed ``name``.
    """
    from zoo.data import load_dataset

    parsed = parse_longtail_name(name)
    if parsed is None:
        raise ValueError(f"{name!r} is not a long-tailed dataset name; known: {', '.join(longtail_names())}")
    base, imbalance = parsed
    ds = load_dataset(base, split, transform=transform, **base_kwargs)
    ds.name = name
    ds.imbalance = imbalance
    ds.base = base
    if split != "train":
        return ds
    num_classes = len(ds.classes) or int(ds.targets.max()) + 1
    idx = longtail_indices(ds.targets, imbalance, seed=lt_seed, num_classes=num_classes)
    images = ds.images[torch.as_tensor(idx)]
    if images.shape[1] not in (1, 3):  # not expected for the bases above; keeps the error readable
        raise ValueError(f"{base}: unexpected image layout {tuple(images.shape)}")
    out = InMemoryImageDataset(name, split, images.contiguous(), ds.targets[idx], ds.classes, transform)
    out.indices = idx
    out.class_counts = np.bincount(out.targets, minlength=num_classes)
    out.imbalance = imbalance
    out.base = base
    if callable(getattr(ds, "layers", None)):  # shapes: the exact masks / backgrounds of the kept images
        out.layers = functools.partial(_subset_layers, ds.layers, torch.as_tensor(idx))
    return out


def _subset_layers(layers: Any, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows ``idx`` of each tensor ``layers()`` returns (a module-level function: datasets stay picklable)."""
    return tuple(t[idx] for t in layers())
