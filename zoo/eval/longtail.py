"""Long-tailed accuracy: overall, and split into many-, medium- and few-shot classes.

The split of Liu et al. 2019 ("Large-scale long-tailed recognition in an open world", OLTR), used
by PaCo, BCL and most long-tailed papers: a class is *many-shot* with more than 100 training
images, *few-shot* with fewer than 20, *medium-shot* otherwise (20 to 100 inclusive). Each group's
accuracy is the mean of its classes' test accuracies. The thresholds are arguments; the defaults
suit the small long-tailed sets here too: ``mnist5k_lt100`` (400 ... 4 images per class) has 3
many-, 3 medium- and 4 few-shot classes, ``mnist5k_lt50`` 4 / 3 / 3, ``mnist5k_lt10`` (400 ... 40)
6 / 4 / 0. A group with no class reports ``None``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from zoo.eval.knn import knn_predict
from zoo.eval.linear import _fit_linear

__all__ = ["evaluate_longtail", "linear_probe_predict", "shot_accuracy", "shot_groups"]

MANY_SHOT = 100  # more than this many training images: many-shot
FEW_SHOT = 20  # fewer than this: few-shot


def shot_groups(train_counts: Any, many: int = MANY_SHOT, few: int = FEW_SHOT) -> dict[str, np.ndarray]:
    """Class indices of each group: ``many`` (count > many), ``medium`` (few <= count <= many), ``few`` (< few)."""
    counts = np.asarray(train_counts).reshape(-1)
    if few > many:
        raise ValueError(f"few-shot threshold {few} is above the many-shot threshold {many}")
    return {
        "many": np.flatnonzero(counts > many),
        "medium": np.flatnonzero((counts >= few) & (counts <= many)),
        "few": np.flatnonzero(counts < few),
    }


def shot_accuracy(pred: Any, labels: Any, train_counts: Any, many: int = MANY_SHOT, few: int = FEW_SHOT
                  ) -> dict[str, float | None]:
    """Overall and many/medium/few-shot accuracy of predictions on a (balanced) test set.

    Args:
        pred, labels: ``[N]`` predicted and true classes of the test images.
        train_counts: ``[C]`` training images per class (``np.bincount(train_targets)``); class c's group
            comes from ``train_counts[c]``.
        many, few: the thresholds (see the module docstring).

    Returns:
        ``{"overall", "many", "medium", "few"}``: ``overall`` is the fraction of correct test images; each
        group is the mean over its classes of the per-class accuracy (None when the group has no class
        with test images). Plus ``num_many``, ``num_medium``, ``num_few``: how many classes each has.
    """
    pred = np.asarray(pred).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    counts = np.asarray(train_counts).reshape(-1)
    if pred.shape != labels.shape or pred.size == 0:
        raise ValueError(f"pred ({pred.shape}) and labels ({labels.shape}) must be equal, non-empty [N] arrays")
    if labels.min() < 0 or labels.max() >= counts.size:
        raise ValueError(f"test labels must lie in [0, {counts.size}) (one train count per class)")
    correct = pred == labels
    result: dict[str, float | None] = {"overall": float(correct.mean())}
    for group, classes in shot_groups(counts, many, few).items():
        per_class = [float(correct[labels == c].mean()) for c in classes if (labels == c).any()]
        result[group] = float(np.mean(per_class)) if per_class else None
        result[f"num_{group}"] = len(per_class)
    return result


def linear_probe_predict(train_features: Any, train_labels: Any, test_features: Any, epochs: int = 100,
                         weight_decay: float = 1e-4) -> np.ndarray:
    """Test predictions ``[Q]`` of the linear probe of :func:`zoo.eval.linear_probe` (same standardisation,
    same L-BFGS logistic regression from zero, same classes: the unique train labels)."""
    x_train = torch.as_tensor(np.asarray(train_features), dtype=torch.float32)
    x_test = torch.as_tensor(np.asarray(test_features), dtype=torch.float32)
    classes, y = np.unique(np.asarray(train_labels).reshape(-1), return_inverse=True)
    mean = x_train.mean(dim=0, keepdim=True)
    std = x_train.std(dim=0, keepdim=True, correction=0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    model = _fit_linear((x_train - mean) / std, torch.as_tensor(y.reshape(-1), dtype=torch.long),
                        max(len(classes), 2), epochs=epochs, weight_decay=weight_decay)
    with torch.no_grad():
        idx = model((x_test - mean) / std).argmax(dim=1).numpy()
    return classes[np.minimum(idx, len(classes) - 1)]


def evaluate_longtail(
    train: dict[str, Any], test: dict[str, Any], protocols: tuple[str, ...] = ("knn", "linear"), k: int = 20,
    temperature: float = 0.07, num_classes: int | None = None, many: int = MANY_SHOT, few: int = FEW_SHOT,
) -> dict[str, float | None]:
    """kNN and linear-probe accuracy on frozen features, overall and per shot group.

    ``train``/``test`` are :func:`zoo.eval.extract_features` dicts (train: the long-tailed split, test:
    balanced). Keys ``{protocol}_top1``, ``{protocol}_many``, ``{protocol}_medium``, ``{protocol}_few``,
    plus ``num_many``, ``num_medium``, ``num_few``. kNN is :func:`zoo.eval.knn_predict` (cosine, ``k``,
    ``temperature``, weighted vote); linear is :func:`linear_probe_predict`, both fitted on the
    long-tailed train features.
    """
    labels = np.asarray(train["labels"]).reshape(-1)
    num_classes = num_classes or int(max(labels.max(), np.asarray(test["labels"]).max())) + 1
    counts = np.bincount(labels, minlength=num_classes)
    out: dict[str, float | None] = {}
    for protocol in protocols:
        if protocol == "knn":
            pred = knn_predict(train["features"], labels, test["features"], k=k, temperature=temperature,
                               num_classes=num_classes)
        elif protocol == "linear":
            pred = linear_probe_predict(train["features"], labels, test["features"])
        else:
            raise ValueError(f"unknown long-tailed protocol {protocol!r}; use knn or linear")
        acc = shot_accuracy(pred, test["labels"], counts, many, few)
        out.update({f"{protocol}_top1": acc["overall"], **{f"{protocol}_{g}": acc[g] for g in ("many", "medium", "few")}})
        out.update({key: acc[key] for key in ("num_many", "num_medium", "num_few")})
    return out
