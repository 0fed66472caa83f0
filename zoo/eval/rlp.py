"""Reverse linear probing: how much do concept labels tell about a representation's clusters?

After Laina, Asano & Vedaldi 2022 ("Measuring the interpretability of unsupervised representations
via quantized reverse probing", ICLR). A normal linear probe maps features to labels; the reverse
probe maps *concept labels* to a *quantised representation*:

1. Quantise: k-means with ``K`` clusters on the L2-normalised train features; every point (train and
   held-out) gets its nearest centroid, ``c in {0..K-1}``.
2. Probe: for a concept set ``S`` (one concept, e.g. ``colour``, or a composition, e.g.
   ``colour&shape``) encode each image's value of ``S`` as a one-hot vector (a composition is the
   one-hot of the *pair* of values, i.e. the logical AND of the two attributes) and fit a multinomial
   logistic regression (scikit-learn, L-BFGS) from that vector to ``c`` on the train points.
3. Score on held-out points, with ``ĉ`` the probe's predicted cluster:

   - ``nmi = NMI(c, ĉ)``: normalised mutual information (arithmetic normalisation,
     :func:`zoo.eval.metrics.nmi`) between the actual and the predicted cluster;
   - ``mi = I(c; ĉ)`` in nats (plug-in estimate from the contingency table);
   - ``acc = mean(ĉ == c)``, the probe's accuracy (chance: the largest cluster's share).

   By the data-processing inequality ``I(c; ĉ) <= I(c; S)``, so ``mi`` is a lower bound on the
   information the concept carries about the clusters, measured through a simple (linear)
   decoder. On a one-hot input a linear probe is a lookup table: ``ĉ`` is (up to the L2
   regularisation ``C``) the most frequent cluster of the concept value in the train points.

Compositions: a representation whose clusters follow the *pair* (e.g. "red square" vs "red
circle" in different clusters, and every colour spread over several clusters) scores the pair
far above either attribute; one whose clusters follow a single attribute scores the pair no
higher than that attribute. ``gain`` of a composition is ``nmi(a&b) - max(nmi(a), nmi(b))``: near
0 (or below: NMI, unlike MI, can drop when a finer concept spreads the predictions over more
clusters without explaining more) when one attribute explains the clusters, clearly positive when
only the combination does.
(The pair probe cannot tell a conjunctive code from two attributes encoded side by side: both make
clusters that split by the pair.)
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from zoo.eval.cluster import _as_float32, _l2_normalize, kmeans
from zoo.eval.metrics import nmi

__all__ = [
    "COMPOSITION_SEP",
    "composition_codes",
    "mutual_information",
    "parse_rlp_key",
    "reverse_linear_probe",
    "rlp_metrics",
    "rlp_table",
]

COMPOSITION_SEP = "&"
_KEY = re.compile(r"^rlp_(nmi|mi|acc|gain)\[(.+)\]$")


def mutual_information(a: Any, b: Any) -> float:
    """Plug-in mutual information ``I(a; b)`` in nats of two label vectors (empirical joint distribution)."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"label vectors differ in length: {a.shape[0]} != {b.shape[0]}")
    if a.size == 0:
        return 0.0
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    ai, bi = ai.reshape(-1), bi.reshape(-1)
    nb = int(bi.max()) + 1
    joint = np.bincount(ai * nb + bi, minlength=(int(ai.max()) + 1) * nb).reshape(-1, nb).astype(np.float64)
    p = joint / a.size
    pa, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float(max(0.0, np.sum(p[nz] * (np.log(p[nz]) - np.log((pa @ pb)[nz])))))


def _as_codes(name: str, values: Any, n: int) -> np.ndarray:
    v = np.asarray(values.detach().cpu().numpy() if hasattr(values, "detach") else values).reshape(-1)
    if v.shape[0] != n:
        raise ValueError(f"concept {name!r} has {v.shape[0]} values for {n} points")
    if not np.issubdtype(v.dtype, np.integer):
        raise ValueError(f"concept {name!r} must hold integer codes, got dtype {v.dtype}")
    if v.size and v.min() < 0:
        raise ValueError(f"concept {name!r} has negative codes (unlabelled points?); RLP needs every point labelled")
    return v.astype(np.int64)


def composition_codes(
    concepts: Mapping[str, Any], compositions: bool = True
) -> dict[str, np.ndarray]:
    """Integer codes of each single concept and (``compositions``) of each unordered pair ``"a&b"``.

    A pair's code is ``a * (max(b) + 1) + b``, one value per combination of the two attributes. Pairs
    follow the mapping's order (``shape``, ``colour`` -> ``"shape&colour"``).
    """
    names = list(concepts)
    if not names:
        raise ValueError("reverse linear probing needs at least one concept")
    for name in names:
        if COMPOSITION_SEP in name:
            raise ValueError(f"concept names must not contain {COMPOSITION_SEP!r}: {name!r}")
    n = len(np.asarray(concepts[names[0]]).reshape(-1))
    codes = {name: _as_codes(name, concepts[name], n) for name in names}
    if compositions:
        for a, b in itertools.combinations(names, 2):
            codes[f"{a}{COMPOSITION_SEP}{b}"] = codes[a] * (int(codes[b].max(initial=0)) + 1) + codes[b]
    return codes


def _fit_probe(train_codes: np.ndarray, train_clusters: np.ndarray, test_codes: np.ndarray, c: float,
               seed: int) -> np.ndarray:
    """Multinomial logistic regression from one-hot(code) to cluster; predictions on ``test_codes``."""
    from sklearn.linear_model import LogisticRegression

    values = np.unique(train_codes)
    if np.unique(train_clusters).size < 2:  # one cluster in train: nothing to learn
        return np.full(test_codes.shape[0], train_clusters[0] if train_clusters.size else 0, dtype=np.int64)

    def one_hot(codes: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(values, codes)
        seen = (pos < values.size) & (values[np.minimum(pos, values.size - 1)] == codes)
        x = np.zeros((codes.shape[0], values.size), dtype=np.float64)
        x[np.flatnonzero(seen), pos[seen]] = 1.0  # a value never seen in train: all zeros (bias only)
        return x

    probe = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    probe.fit(one_hot(train_codes), train_clusters)
    return np.asarray(probe.predict(one_hot(test_codes)), dtype=np.int64)


def reverse_linear_probe(
    features: Any,
    concepts: Mapping[str, Any],
    k: int,
    test_features: Any = None,
    test_concepts: Mapping[str, Any] | None = None,
    test_fraction: float = 0.3,
    compositions: bool = True,
    c: float = 1.0,
    seed: int = 0,
    nredo: int = 3,
) -> dict[str, Any]:
    """Reverse linear probing (Laina et al. 2022) of a representation; see the module docstring.

    Args:
        features: ``[N, D]`` train features (clustered with :func:`zoo.eval.kmeans`, ``nredo`` restarts,
            on L2-normalised features).
        concepts: name -> ``[N]`` integer codes (e.g. ``dataset.concepts`` of ``shapes``).
        k: number of clusters ``K``.
        test_features, test_concepts: held-out points, assigned to the nearest train centroid; when
            omitted, a seeded random ``test_fraction`` of the train points is held out instead (the
            clustering still uses every point; the probe sees only the rest).
        compositions: also probe every pair of concepts (``"a&b"``, one-hot of the pair).
        c: inverse L2 strength of the logistic regression (scikit-learn's ``C``).

    Returns:
        ``{"k", "n_train", "n_test", "cluster_entropy", "scores"}``; ``scores[name]`` holds ``nmi``,
        ``mi`` (nats), ``acc``, ``num_values`` (distinct train values) and, for compositions, ``gain``.
        ``cluster_entropy`` is ``H(c)`` of the held-out clusters in nats (the most ``mi`` can be).
    """
    x = _l2_normalize(_as_float32(features))
    n = x.shape[0]
    if (test_features is None) != (test_concepts is None):
        raise ValueError("give both test_features and test_concepts, or neither")
    codes = composition_codes(concepts, compositions)
    if next(iter(codes.values())).shape[0] != n:
        raise ValueError(f"{n} features but {next(iter(codes.values())).shape[0]} concept values")
    assign, centroids = kmeans(x, k, seed=seed, nredo=nredo)
    if test_features is None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        perm = np.random.default_rng(seed).permutation(n)
        n_test = max(1, int(round(test_fraction * n)))
        test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
        if train_idx.size == 0:
            raise ValueError(f"{n} points leave nothing to fit the probe on with test_fraction={test_fraction}")
        train_codes = {name: v[train_idx] for name, v in codes.items()}
        test_codes = {name: v[test_idx] for name, v in codes.items()}
        train_clusters, test_clusters = assign[train_idx], assign[test_idx]
    else:
        assert test_concepts is not None
        xt = _l2_normalize(_as_float32(test_features))
        if xt.shape[1] != x.shape[1]:
            raise ValueError(f"test features have dimension {xt.shape[1]}, train features {x.shape[1]}")
        if set(test_concepts) != set(concepts):
            raise ValueError(f"train concepts {sorted(concepts)} differ from test concepts {sorted(test_concepts)}")
        # same pair encoding on both sides: codes computed from the joint maxima
        joint = composition_codes(
            {name: np.concatenate([np.asarray(concepts[name]).reshape(-1), np.asarray(test_concepts[name]).reshape(-1)])
             for name in concepts},
            compositions,
        )
        train_codes = {name: v[:n] for name, v in joint.items()}
        test_codes = {name: v[n:] for name, v in joint.items()}
        if next(iter(test_codes.values())).shape[0] != xt.shape[0]:
            raise ValueError(f"{xt.shape[0]} test features but {next(iter(test_codes.values())).shape[0]} concept values")
        train_clusters = assign
        d2 = (xt * xt).sum(1, keepdims=True) - 2.0 * xt @ centroids.T + (centroids * centroids).sum(1)
        test_clusters = d2.argmin(axis=1).astype(np.int64)
    if test_clusters.size == 0:
        raise ValueError("reverse linear probing needs held-out points")

    scores: dict[str, dict[str, float]] = {}
    for name in codes:
        pred = _fit_probe(train_codes[name], train_clusters, test_codes[name], c, seed)
        scores[name] = {
            "nmi": nmi(test_clusters, pred),
            "mi": mutual_information(test_clusters, pred),
            "acc": float((pred == test_clusters).mean()),
            "num_values": int(np.unique(train_codes[name]).size),
        }
    for name in codes:
        if COMPOSITION_SEP in name:
            a, b = name.split(COMPOSITION_SEP)
            scores[name]["gain"] = scores[name]["nmi"] - max(scores[a]["nmi"], scores[b]["nmi"])
    return {
        "k": int(k),
        "n_train": int(train_clusters.size),
        "n_test": int(test_clusters.size),
        "cluster_entropy": mutual_information(test_clusters, test_clusters),
        "scores": scores,
    }


def rlp_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """Flat metrics of a :func:`reverse_linear_probe` result: ``rlp_nmi[shape]``, ``rlp_acc[colour&shape]``, ...

    Plus ``rlp_k`` (the number of clusters, as a float for uniform metric tables).
    """
    out: dict[str, float] = {"rlp_k": float(result["k"])}
    for stat in ("nmi", "mi", "acc", "gain"):
        for name, s in result["scores"].items():
            if stat in s:
                out[f"rlp_{stat}[{name}]"] = float(s[stat])
    return out


def parse_rlp_key(key: str) -> tuple[str, str] | None:
    """``"rlp_nmi[colour&shape]"`` -> ``("nmi", "colour&shape")``; None for other keys."""
    m = _KEY.match(key)
    return (m.group(1), m.group(2)) if m else None


def rlp_table(metrics: Mapping[str, Any], concepts: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows ``{"concepts", "nmi", "mi", "acc", "gain"}`` from flat ``rlp_*`` metrics (for printing)."""
    rows: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        parsed = parse_rlp_key(key)
        if parsed:
            rows.setdefault(parsed[1], {"concepts": parsed[1]})[parsed[0]] = value
    names = list(rows) if concepts is None else [c for c in concepts if c in rows]
    return [rows[name] for name in names]
