"""Run the evaluation protocols on frozen features.

Default protocols (:data:`PROTOCOLS`): kNN, linear probe, k-means (plus the cluster head whenever
the model has one). Others, asked for by name (:data:`ALL_PROTOCOLS`): ``rlp`` (reverse linear
probing of the dataset's concept labels, :mod:`zoo.eval.rlp`), ``fewshot`` (N-way K-shot nearest
centroid, :mod:`zoo.eval.fewshot`), ``longtail`` (many/medium/few-shot accuracy on a ``*_lt``
dataset, :mod:`zoo.eval.longtail`), ``lowlabel`` (linear probe and kNN on fixed 1 % / 10 % labelled
subsets, :mod:`zoo.eval.lowlabel`), ``bgswap`` (accuracy with backgrounds swapped between test
images by their exact masks, ``shapes`` only, :mod:`zoo.eval.bgswap`), and for image-text models
``zeroshot`` (prompted class names) and ``retrieval`` (text-to-image recall on held-out captions),
:mod:`zoo.eval.zeroshot`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from zoo.eval.cluster import kmeans_metrics
from zoo.eval.features import extract_features
from zoo.eval.knn import knn_top1
from zoo.eval.linear import linear_probe
from zoo.eval.metrics import cluster_metrics

__all__ = ["ALL_PROTOCOLS", "PROTOCOLS", "evaluate", "evaluate_features"]

PROTOCOLS: tuple[str, ...] = ("knn", "linear", "kmeans")  # the default set
ALL_PROTOCOLS: tuple[str, ...] = (*PROTOCOLS, "fewshot", "rlp", "longtail", "lowlabel", "bgswap", "zeroshot",
                                  "retrieval")
_TEXT_PROTOCOLS = ("zeroshot", "retrieval")  # image-text models only (zoo.eval.zeroshot)
_NEEDS_TRAIN = frozenset({"knn", "linear", "rlp", "longtail", "lowlabel", "bgswap"})
LOWLABEL_MODES: tuple[str, ...] = ("linear", "finetune", "both")  # frozen-feature probe, fine-tuning, or both
_FEWSHOT_SHOTS = (1, 5)

# Linear-probe settings used by evaluate_features (reported in the "protocol" string).
_LINEAR_EPOCHS = 100
_LINEAR_WD = 1e-4


def _check_protocols(protocols: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(protocols, str):
        protocols = [p.strip() for p in protocols.split(",") if p.strip()]
    protocols = tuple(protocols)
    unknown = [p for p in protocols if p not in ALL_PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown evaluation protocol(s) {unknown}; known: {', '.join(ALL_PROTOCOLS)}")
    return tuple(dict.fromkeys(protocols))


def evaluate_features(
    train: dict[str, Any],
    test: dict[str, Any],
    protocols: str | Iterable[str] = PROTOCOLS,
    k: int = 20,
    temperature: float = 0.07,
    seed: int = 0,
    rlp_clusters: int | None = None,
    fewshot_ways: int | None = None,
    fewshot_shots: int | Iterable[int] = _FEWSHOT_SHOTS,
    fewshot_episodes: int = 600,
    fewshot_queries: int = 15,
    lowlabel_fractions: Iterable[float] | None = None,
) -> dict[str, float]:
    """Evaluate frozen features; ``train``/``test`` are :func:`extract_features` dicts.

    Keys, for the protocols asked (``protocols`` may also be a comma-separated string):

    - ``knn``: ``knn_top1``, weighted kNN (Wu et al. 2018) of test on train, ``k``, ``temperature``.
    - ``linear``: ``linear_top1``, L-BFGS logistic regression on standardised train features.
    - ``kmeans``: ``kmeans_acc``, ``kmeans_nmi``, ``kmeans_ari``, k-means on the L2-normalised
      test features with k = number of test classes.

    - ``fewshot``: ``fewshot_{N}way_{K}shot`` and ``..._ci95`` for each ``K`` in ``fewshot_shots``,
      nearest-centroid episodes on the test features (:func:`zoo.eval.fewshot.fewshot_eval`);
      ``fewshot_ways`` defaults to ``min(5, number of test classes)``.
    - ``rlp``: reverse linear probing (:func:`zoo.eval.rlp.reverse_linear_probe`) of
      ``train["concepts"]``/``test["concepts"]`` (name -> integer codes): k-means with
      ``rlp_clusters`` (default: number of test classes) clusters on the train features, probes
      fitted on train, scored on test; keys ``rlp_k``, ``rlp_nmi[NAME]``, ``rlp_mi[NAME]``,
      ``rlp_acc[NAME]`` for every concept and pair ``a&b``, ``rlp_gain[a&b]``.
    - ``longtail``: ``lt_{knn,linear}_{top1,many,medium,few}`` and ``lt_num_{many,medium,few}``
      (:func:`zoo.eval.longtail.evaluate_longtail`, class groups from the train label counts).
    - ``lowlabel``: ``lowlabel_{1pct,10pct,...}_{linear,knn,n}`` for each of ``lowlabel_fractions``
      (default 0.01, 0.1) (:func:`zoo.eval.lowlabel.evaluate_lowlabel`, subsets fixed by ``seed``).
    - ``bgswap``: ``bgswap_{linear,knn}_{orig,swapped,gap}`` from ``test["bgswap_features"]``, the
      features of the background-swapped test images (:func:`zoo.eval.bgswap.evaluate_bgswap`).

    And, whenever ``test`` has ``cluster_probs``: ``head_acc``, ``head_nmi``, ``head_ari`` of the
    argmax cluster against the test labels.
    """
    protocols = _check_protocols(protocols)
    results: dict[str, float] = {}
    if "knn" in protocols:
        results["knn_top1"] = knn_top1(
            train["features"], train["labels"], test["features"], test["labels"], k=k, temperature=temperature
        )
    if "linear" in protocols:
        probe = linear_probe(
            train["features"],
            train["labels"],
            test["features"],
            test["labels"],
            epochs=_LINEAR_EPOCHS,
            weight_decay=_LINEAR_WD,
            seed=seed,
        )
        results["linear_top1"] = probe["top1"]
    if "kmeans" in protocols:
        results.update(kmeans_metrics(test["features"], test["labels"], seed=seed))
    if "fewshot" in protocols:
        from zoo.eval.fewshot import fewshot_eval

        ways = fewshot_ways or min(5, int(np.unique(test["labels"]).shape[0]))
        results.update(fewshot_eval(test["features"], test["labels"], ways=ways, shots=fewshot_shots,
                                    queries=fewshot_queries, episodes=fewshot_episodes, seed=seed))
    if "rlp" in protocols:
        from zoo.eval.rlp import reverse_linear_probe, rlp_metrics

        if not train.get("concepts") or not test.get("concepts"):
            raise ValueError("the rlp protocol needs concept labels: train['concepts'] and test['concepts']")
        clusters = rlp_clusters or int(np.unique(test["labels"]).shape[0])
        rlp = reverse_linear_probe(train["features"], train["concepts"], clusters, test_features=test["features"],
                                   test_concepts=test["concepts"], seed=seed)
        results.update(rlp_metrics(rlp))
    if "longtail" in protocols:
        from zoo.eval.longtail import evaluate_longtail

        lt = evaluate_longtail(train, test, protocols=("knn", "linear"), k=k, temperature=temperature)
        results.update({f"lt_{key}": value for key, value in lt.items()})
    if "lowlabel" in protocols:
        from zoo.eval.lowlabel import DEFAULT_FRACTIONS, evaluate_lowlabel

        results.update(evaluate_lowlabel(train, test, lowlabel_fractions or DEFAULT_FRACTIONS, seed=seed, k=k,
                                         temperature=temperature))
    if "bgswap" in protocols:
        from zoo.eval.bgswap import evaluate_bgswap

        if test.get("bgswap_features") is None:
            raise ValueError("the bgswap protocol needs test['bgswap_features'] (features of the swapped images)")
        results.update(evaluate_bgswap(train, test, test["bgswap_features"], k=k, temperature=temperature))
    if test.get("cluster_probs") is not None:
        pred = np.asarray(test["cluster_probs"]).argmax(axis=1)
        results.update({f"head_{key}": v for key, v in cluster_metrics(test["labels"], pred).items()})
    return results


def _protocol_string(protocols: tuple[str, ...], k: int, temperature: float, num_classes: int,
                     rlp_clusters: int | None = None, fewshot: str = "") -> str:
    parts = []
    if "knn" in protocols:
        parts.append(f"kNN: cosine, k={k}, T={temperature}, weighted vote")
    if "linear" in protocols:
        parts.append(
            f"linear: L-BFGS logistic regression, {_LINEAR_EPOCHS} it, wd={_LINEAR_WD:g}, standardised features"
        )
    if "kmeans" in protocols:
        parts.append(f"k-means: k={num_classes} on L2-normalised test features, Hungarian ACC/NMI/ARI")
    if "fewshot" in protocols:
        parts.append(f"few-shot: {fewshot} episodes on test features, cosine nearest centroid, "
                     f"mean and 95% half-width 1.96*std/sqrt(episodes)")
    if "rlp" in protocols:
        parts.append(f"RLP: k-means k={rlp_clusters or num_classes} on L2-normalised train features, logistic "
                     f"regression one-hot concepts (and pairs) -> cluster, NMI(cluster, prediction) on test")
    if "longtail" in protocols:
        parts.append("long-tailed: kNN and linear probe fitted on the long-tailed train split, balanced test; "
                     "many (>100 train images) / medium / few (<20) class groups")
    if "lowlabel" in protocols:
        parts.append("low-label: linear probe and kNN on class-stratified, nested labelled subsets fixed by the seed")
    if "bgswap" in protocols:
        parts.append("background swap: test foregrounds (exact masks) on another test image's different background; "
                     "linear probe / kNN fitted on unswapped train features; gap = orig - swapped")
    return "; ".join(parts)


def _concepts(ds: Any, dataset: str) -> dict[str, np.ndarray]:
    concepts = getattr(ds, "concepts", None)
    if not concepts:
        raise ValueError(
            f"dataset {dataset!r} has no concept labels, which the rlp protocol (reverse linear probing) needs; "
            f"use a dataset with .concepts, e.g. --data shapes (shape / colour / background)"
        )
    return {name: np.asarray(v) for name, v in concepts.items()}


def evaluate(
    model: Any,
    dataset: str,
    protocols: str | Iterable[str] = PROTOCOLS,
    batch_size: int = 256,
    device: Any = None,
    progress: bool = True,
    seed: int = 0,
    k: int = 20,
    temperature: float = 0.07,
    rlp_clusters: int | None = None,
    fewshot_ways: int | None = None,
    fewshot_shots: int | Iterable[int] = _FEWSHOT_SHOTS,
    fewshot_episodes: int = 600,
    lowlabel_fractions: Iterable[float] | None = None,
    lowlabel_mode: str = "linear",
    finetune_steps: int | None = None,
    **dataset_kwargs: Any,
) -> dict[str, Any]:
    """Extract train/test features of ``model`` on a named dataset and run :func:`evaluate_features`.

    Datasets come from ``zoo.data.load_dataset(dataset, split, transform=zoo.data.transform_for(model),
    **dataset_kwargs)``. Cluster-head metrics (``head_*``) are added when the model has a cluster
    head. The result also holds ``"dataset"``, ``"split": "test"`` and ``"protocol"`` (a short
    description of the settings).

    ``rlp`` takes the concept labels from the datasets' ``.concepts`` (``shapes``) and raises a
    ``ValueError`` for a dataset without them; ``longtail`` needs a long-tailed dataset
    (``mnist5k_lt100``, ``shapes_lt10``, ...). Both are checked before any feature is extracted.

    ``lowlabel_mode``: ``linear`` (linear probe and kNN on frozen features), ``finetune`` (encoder +
    linear head fine-tuned on the same subsets, :func:`zoo.eval.finetune.finetune_lowlabel`, keys
    ``lowlabel_{tag}_finetune``; ``finetune_steps`` optimiser steps per fraction) or ``both``.
    """
    from zoo.data import load_dataset, transform_for

    protocols = _check_protocols(protocols)
    if lowlabel_mode not in LOWLABEL_MODES:
        raise ValueError(f"lowlabel_mode must be one of {', '.join(LOWLABEL_MODES)}, got {lowlabel_mode!r}")
    if "longtail" in protocols:
        from zoo.data.longtail import parse_longtail_name

        if parse_longtail_name(dataset) is None:
            raise ValueError(
                f"the longtail protocol needs a long-tailed dataset (<base>_lt<imbalance>, e.g. mnist5k_lt100), "
                f"got {dataset!r}"
            )
    text_results: dict[str, Any] = {}
    text_parts: list[str] = []
    if set(_TEXT_PROTOCOLS) & set(protocols):
        from zoo.eval.zeroshot import retrieval_eval, zeroshot_eval

        opts = dict(batch_size=batch_size, device=device, progress=progress, **dataset_kwargs)
        if "zeroshot" in protocols:
            text_results.update(zeroshot_eval(model, dataset, **opts))
            text_parts.append("zero-shot: nearest class embedding (mean over the dataset's prompt templates), test")
        if "retrieval" in protocols:
            text_results.update(retrieval_eval(model, dataset, **opts))
            text_parts.append("retrieval: held-out test captions -> test images, relevant = same named concepts")
        protocols = tuple(p for p in protocols if p not in _TEXT_PROTOCOLS)
        if not protocols:
            return {**text_results, "dataset": dataset, "split": "test", "protocol": "; ".join(text_parts)}
    transform = transform_for(model)
    opts = dict(batch_size=batch_size, device=device, progress=progress)
    test_ds = load_dataset(dataset, "test", transform=transform, **dataset_kwargs)
    if "bgswap" in protocols and not callable(getattr(test_ds, "layers", None)):
        raise ValueError(f"the bgswap protocol needs exact foreground masks, which {dataset!r} does not have; "
                         "use --data shapes (or a shapes_lt* split)")
    train_ds = None
    if _NEEDS_TRAIN & set(protocols):  # k-means, few-shot and the cluster head use only test
        train_ds = load_dataset(dataset, "train", transform=transform, **dataset_kwargs)
    concepts = {}
    if "rlp" in protocols:
        concepts = {"test": _concepts(test_ds, dataset), "train": _concepts(train_ds, dataset)}
    train: dict[str, Any] = {}
    if train_ds is not None:
        train = extract_features(model, train_ds, **opts)
        if concepts:
            train["concepts"] = concepts["train"]
    test = extract_features(model, test_ds, cluster_probs=True, **opts)
    if concepts:
        test["concepts"] = concepts["test"]
    if "bgswap" in protocols:
        test["bgswap_features"] = extract_features(model, _swapped_test(test_ds, seed), **opts)["features"]
    finetuned: dict[str, float] = {}
    if "lowlabel" in protocols and lowlabel_mode in ("finetune", "both"):
        from zoo.eval.finetune import finetune_lowlabel
        from zoo.eval.lowlabel import DEFAULT_FRACTIONS

        steps = {} if finetune_steps is None else {"steps": finetune_steps}
        finetuned = finetune_lowlabel(model, train_ds, test_ds, lowlabel_fractions or DEFAULT_FRACTIONS, seed=seed,
                                      progress=progress, **steps)
        if lowlabel_mode == "finetune":
            protocols = tuple(p for p in protocols if p != "lowlabel")
    results: dict[str, Any] = evaluate_features(
        train, test, protocols=protocols, k=k, temperature=temperature, seed=seed, rlp_clusters=rlp_clusters,
        fewshot_ways=fewshot_ways, fewshot_shots=fewshot_shots, fewshot_episodes=fewshot_episodes,
        lowlabel_fractions=lowlabel_fractions,
    )
    results.update(finetuned)
    num_classes = int(np.unique(test["labels"]).shape[0])
    fewshot = ", ".join(k_ for k_ in results if k_.startswith("fewshot_") and not k_.endswith("_ci95"))
    fewshot = f"{fewshot_episodes} seeded {fewshot.replace('fewshot_', '')}".strip()
    protocol = _protocol_string(protocols, k, temperature, num_classes, rlp_clusters, fewshot)
    if finetuned:
        from zoo.eval.finetune import FINETUNE_DEFAULTS

        ft = {**FINETUNE_DEFAULTS, **({} if finetune_steps is None else {"steps": finetune_steps})}
        protocol = "; ".join(p for p in [protocol, (
            f"low-label fine-tune: encoder + linear head on the same subsets, {ft['optimizer']} lr {ft['lr']:g} "
            f"cosine, {ft['steps']} steps of {ft['batch_size']}, wd {ft['weight_decay']:g}, no augmentation")] if p)
    if text_results:
        results.update(text_results)
        protocol = "; ".join([protocol, *text_parts])
    results.update(dataset=dataset, split="test", protocol=protocol)
    return results


def _swapped_test(test_ds: Any, seed: int) -> Any:
    """The test split with backgrounds swapped between images (same transform, labels and order)."""
    from zoo.data.base import InMemoryImageDataset
    from zoo.eval.bgswap import bgswap_partners, swap_backgrounds

    masks, backgrounds = test_ds.layers()
    codes = (getattr(test_ds, "concepts", None) or {}).get("background")
    partners = bgswap_partners(len(test_ds), codes, seed)
    images = swap_backgrounds(test_ds.images, masks, backgrounds, partners)
    return InMemoryImageDataset(test_ds.name, "test", images, test_ds.targets, test_ds.classes, test_ds.transform)
