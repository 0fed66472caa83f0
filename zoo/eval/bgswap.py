"""Background-robustness evaluation on ``shapes``: accuracy when the test images swap backgrounds.

Each test image keeps its foreground (the shape, cut out with the generator's exact mask,
:func:`zoo.data.shapes.shape_layers`) and is pasted onto the clean background of another test
image whose background differs (black, white, gray or noise; the label is the shape, so the swap
keeps it). A classifier that reads the shape is unaffected; one that leans on the background-label
correlation of its training data loses accuracy. The reported figure is the gap: accuracy on the
original test images minus accuracy on the swapped ones, for a linear probe and a kNN classifier
fitted on the (unswapped) train features. In the spirit of Xiao et al. 2021, "Noise or Signal:
the role of image backgrounds in object recognition" (ImageNet-9 ``mixed_rand``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from zoo.eval.knn import knn_top1
from zoo.eval.longtail import linear_probe_predict

__all__ = ["bgswap_partners", "evaluate_bgswap", "swap_backgrounds"]


def bgswap_partners(n: int, background_codes: Any = None, seed: int = 0) -> np.ndarray:
    """``[n]`` partner of each image: a uniformly drawn other image (``numpy.random.default_rng(seed)``),
    restricted to images with a different background code when ``background_codes`` is given (and one
    exists; otherwise any other image)."""
    if n < 2:
        raise ValueError(f"swapping backgrounds needs at least 2 images, got {n}")
    rng = np.random.default_rng(int(seed))
    codes = None if background_codes is None else np.asarray(background_codes).reshape(-1)
    partners = np.empty(n, dtype=np.int64)
    everyone = np.arange(n)
    for i in range(n):
        pool = everyone[codes != codes[i]] if codes is not None else everyone
        if pool.size == 0:
            pool = everyone
        pool = pool[pool != i]
        partners[i] = pool[rng.integers(pool.size)]
    return partners


def swap_backgrounds(images: torch.Tensor, masks: torch.Tensor, backgrounds: torch.Tensor, partners: Any
                     ) -> torch.Tensor:
    """``[N,C,H,W]`` images with image i's foreground (``masks[i]``, bool ``[N,1,H,W]``) over
    ``backgrounds[partners[i]]`` (``[N,C,H,W]``, same dtype as ``images``)."""
    if images.shape != backgrounds.shape or masks.shape != (images.shape[0], 1, *images.shape[2:]):
        raise ValueError(f"images {tuple(images.shape)}, masks {tuple(masks.shape)} and backgrounds "
                         f"{tuple(backgrounds.shape)} do not match")
    partners = torch.as_tensor(np.asarray(partners), dtype=torch.long)
    return torch.where(masks.bool(), images, backgrounds[partners])


def evaluate_bgswap(train: dict[str, Any], test: dict[str, Any], swapped_features: Any, k: int = 20,
                    temperature: float = 0.07, epochs: int = 100, weight_decay: float = 1e-4) -> dict[str, float]:
    """Linear-probe and kNN accuracy on the original and the background-swapped test features.

    ``train``/``test`` are :func:`zoo.eval.extract_features` dicts; ``swapped_features`` ``[N,D]`` are the
    features of the swapped test images, row for row with ``test``. Keys ``bgswap_{linear,knn}_orig``,
    ``bgswap_{linear,knn}_swapped`` and ``bgswap_{linear,knn}_gap`` (orig - swapped).
    """
    swapped_features = np.asarray(swapped_features)
    if swapped_features.shape != np.asarray(test["features"]).shape:
        raise ValueError(f"swapped features {swapped_features.shape} do not match the test features "
                         f"{np.asarray(test['features']).shape}")
    both = np.concatenate([np.asarray(test["features"]), swapped_features])
    labels = np.concatenate([test["labels"], test["labels"]])
    n = len(test["labels"])
    out: dict[str, float] = {}
    # one probe, fitted once, scored on both halves
    pred = linear_probe_predict(train["features"], train["labels"], both, epochs=epochs, weight_decay=weight_decay)
    correct = pred == labels
    out["bgswap_linear_orig"], out["bgswap_linear_swapped"] = float(correct[:n].mean()), float(correct[n:].mean())
    for name, feats in (("orig", test["features"]), ("swapped", swapped_features)):
        out[f"bgswap_knn_{name}"] = knn_top1(train["features"], train["labels"], feats, test["labels"], k=k,
                                             temperature=temperature)
    for protocol in ("linear", "knn"):
        out[f"bgswap_{protocol}_gap"] = out[f"bgswap_{protocol}_orig"] - out[f"bgswap_{protocol}_swapped"]
    return out
