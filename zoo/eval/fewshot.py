"""Few-shot classification on frozen features: N-way K-shot episodes, nearest centroid (cosine).

The protocol of Prototypical Networks (Snell et al. 2017) and of "A closer look at few-shot
classification" (Chen et al. 2019) applied to a frozen encoder, as in the self-supervised few-shot
evaluations (e.g. Gidaris et al. 2019): each episode draws ``N`` classes, ``K`` support and ``Q``
query images per class (without replacement); the class prototype is the mean of its L2-normalised
support features; a query goes to the prototype of highest cosine similarity. Reported: mean
episode accuracy and the 95 % interval half-width ``1.96 * std / sqrt(episodes)`` (``std`` is the
population standard deviation of the episode accuracies, ``numpy.std``, as in the common few-shot
code bases). Episodes depend only on the labels and the seed, so every model sees the same ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["confidence_interval", "fewshot_eval", "nearest_centroid_accuracy", "sample_episodes"]


def confidence_interval(accuracies: Any) -> tuple[float, float]:
    """``(mean, 1.96 * std / sqrt(n))`` of per-episode accuracies (population std, ``ddof=0``)."""
    acc = np.asarray(accuracies, dtype=np.float64).reshape(-1)
    if acc.size == 0:
        raise ValueError("a confidence interval needs at least one episode")
    return float(acc.mean()), float(1.96 * acc.std() / np.sqrt(acc.size))


def sample_episodes(
    labels: Any, ways: int, shots: int, queries: int = 15, episodes: int = 600, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays ``(support [E, N, K], query [E, N, Q])`` of ``episodes`` seeded N-way K-shot episodes.

    Row ``n`` of an episode holds images of its ``n``-th drawn class. Only classes with at least
    ``shots + queries`` images take part; a ``ValueError`` says so when fewer than ``ways`` do.
    The random stream is ``numpy.random.default_rng([seed, ways, shots, queries])``.
    """
    y = np.asarray(labels).reshape(-1)
    if ways < 2 or shots < 1 or queries < 1 or episodes < 1:
        raise ValueError(f"need ways >= 2, shots >= 1, queries >= 1, episodes >= 1; got {ways}, {shots}, "
                         f"{queries}, {episodes}")
    classes, counts = np.unique(y[y >= 0], return_counts=True)
    eligible = classes[counts >= shots + queries]
    if eligible.size < ways:
        raise ValueError(
            f"{ways}-way {shots}-shot episodes with {queries} queries need {ways} classes with at least "
            f"{shots + queries} images each; only {eligible.size} of {classes.size} classes have that many "
            f"(use fewer ways, shots or queries)"
        )
    by_class = {int(c): np.flatnonzero(y == c) for c in eligible}
    rng = np.random.default_rng([int(seed), int(ways), int(shots), int(queries)])
    support = np.empty((episodes, ways, shots), dtype=np.int64)
    query = np.empty((episodes, ways, queries), dtype=np.int64)
    for e in range(episodes):
        for n, c in enumerate(rng.choice(eligible, ways, replace=False)):
            pick = rng.choice(by_class[int(c)], shots + queries, replace=False)
            support[e, n], query[e, n] = pick[:shots], pick[shots:]
    return support, query


def nearest_centroid_accuracy(features: Any, support: np.ndarray, query: np.ndarray, chunk: int = 64
                              ) -> np.ndarray:
    """Per-episode accuracy ``[E]`` of cosine nearest-centroid classification.

    ``features`` ``[M, D]``; ``support [E, N, K]`` and ``query [E, N, Q]`` index rows of it (row ``n``
    = class ``n`` of the episode). Prototypes are means of L2-normalised support features,
    normalised again; ties go to the lower class row.
    """
    f = np.asarray(features.detach().cpu().numpy() if hasattr(features, "detach") else features, np.float32)
    if f.ndim != 2:
        raise ValueError(f"features must be [M, D], got shape {f.shape}")
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    out = []
    for s in range(0, support.shape[0], chunk):
        sup, qry = support[s : s + chunk], query[s : s + chunk]
        protos = f[sup].mean(axis=2)  # [e, N, D]
        protos /= np.maximum(np.linalg.norm(protos, axis=2, keepdims=True), 1e-12)
        sims = np.einsum("enqd,emd->enqm", f[qry], protos)  # [e, N, Q, N]
        correct = sims.argmax(axis=3) == np.arange(sup.shape[1])[None, :, None]
        out.append(correct.reshape(correct.shape[0], -1).mean(axis=1))
    return np.concatenate(out) if out else np.zeros(0)


def fewshot_eval(
    features: Any,
    labels: Any,
    ways: int = 5,
    shots: int | Iterable[int] = (1, 5),
    queries: int = 15,
    episodes: int = 600,
    seed: int = 0,
) -> dict[str, float]:
    """N-way K-shot accuracy for each ``shots``; keys ``fewshot_{N}way_{K}shot`` and ``..._ci95``.

    Values: mean episode accuracy and its 95 % half-width (:func:`confidence_interval`), on the
    episodes of :func:`sample_episodes`.
    """
    shots = [shots] if isinstance(shots, int) else list(shots)
    if not shots:
        raise ValueError("give at least one shot count")
    out: dict[str, float] = {}
    for k in shots:
        support, query = sample_episodes(labels, ways, int(k), queries, episodes, seed)
        mean, ci = confidence_interval(nearest_centroid_accuracy(features, support, query))
        out[f"fewshot_{ways}way_{k}shot"] = mean
        out[f"fewshot_{ways}way_{k}shot_ci95"] = ci
    return out
