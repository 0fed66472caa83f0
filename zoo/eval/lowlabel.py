"""Low-label evaluation: the standard semi-supervised protocol on frozen features.

A linear probe (and a kNN classifier) is fitted on a fixed fraction of the labelled train split,
1 % and 10 % by default as in SimCLR / BYOL / SwAV's ImageNet 1 % and 10 % results, and scored on
the whole test split. The subsets are published by construction: :func:`lowlabel_indices` is a pure
function of (train labels, fraction, seed), class-stratified, and nested (the 1 % subset is inside
the 10 % subset of the same seed), so every model is compared on the same labelled images.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from zoo.eval.knn import knn_top1
from zoo.eval.linear import linear_probe

__all__ = ["DEFAULT_FRACTIONS", "evaluate_lowlabel", "fraction_tag", "lowlabel_indices"]

DEFAULT_FRACTIONS: tuple[float, ...] = (0.01, 0.1)


def fraction_tag(fraction: float) -> str:
    """``0.01`` -> ``"1pct"``, ``0.1`` -> ``"10pct"``, ``0.005`` -> ``"0.5pct"`` (metric-name suffix)."""
    return f"{100 * fraction:g}pct"


def lowlabel_indices(targets: Any, fraction: float, seed: int = 0) -> np.ndarray:
    """Ascending train indices of the ``fraction`` labelled subset.

    Class c keeps ``max(1, round(fraction * n_c))`` of its ``n_c`` images: the first ones of the
    permutation ``numpy.random.default_rng([seed, c]).permutation`` of its indices. Because every
    fraction takes a prefix of the same per-class permutation, smaller subsets are nested in larger
    ones. ``fraction`` must lie in (0, 1].
    """
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if targets.size == 0 or targets.min() < 0:
        raise ValueError("the low-label protocol needs a labelled train split (labels >= 0)")
    keep = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        n = max(1, int(round(fraction * len(idx))))
        keep.append(np.random.default_rng([int(seed), int(c)]).permutation(idx)[:n])
    return np.sort(np.concatenate(keep))


def evaluate_lowlabel(
    train: dict[str, Any], test: dict[str, Any], fractions: Iterable[float] = DEFAULT_FRACTIONS, seed: int = 0,
    k: int = 20, temperature: float = 0.07, epochs: int = 100, weight_decay: float = 1e-4,
) -> dict[str, float]:
    """Linear probe and kNN trained on each labelled fraction of ``train``, scored on all of ``test``.

    ``train``/``test`` are :func:`zoo.eval.extract_features` dicts. Keys per fraction (tag from
    :func:`fraction_tag`): ``lowlabel_{tag}_linear`` (:func:`zoo.eval.linear_probe`, L-BFGS logistic
    regression on features standardised with the subset's statistics), ``lowlabel_{tag}_knn``
    (weighted kNN, ``min(k, subset size)`` neighbours) and ``lowlabel_{tag}_n`` (labelled images used).
    """
    features = np.asarray(train["features"])
    labels = np.asarray(train["labels"]).reshape(-1)
    out: dict[str, float] = {}
    for fraction in fractions:
        idx = lowlabel_indices(labels, float(fraction), seed)
        tag = fraction_tag(float(fraction))
        probe = linear_probe(features[idx], labels[idx], test["features"], test["labels"], epochs=epochs,
                             weight_decay=weight_decay)
        out[f"lowlabel_{tag}_linear"] = probe["top1"]
        out[f"lowlabel_{tag}_knn"] = knn_top1(features[idx], labels[idx], test["features"], test["labels"],
                                              k=min(k, len(idx)), temperature=temperature)
        out[f"lowlabel_{tag}_n"] = float(len(idx))
    return out
