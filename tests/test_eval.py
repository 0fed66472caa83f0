"""Tests for zoo.eval: clustering metrics, weighted kNN, linear probe, k-means, feature extraction."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import nn
from torch.utils.data import TensorDataset

from zoo.eval import (
    PROTOCOLS,
    ari,
    cluster_accuracy,
    cluster_metrics,
    contingency,
    evaluate_features,
    extract_features,
    hungarian_match,
    kmeans,
    kmeans_metrics,
    knn_predict,
    knn_top1,
    linear_probe,
    nmi,
)

# ----------------------------------------------------------------------------- metrics


def brute_force_acc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Best one-to-one cluster -> class map by trying every injective map."""
    classes, clusters = np.unique(y_true), np.unique(y_pred)
    best = 0
    if len(clusters) <= len(classes):
        for perm in itertools.permutations(classes, len(clusters)):
            m = dict(zip(clusters, perm))
            best = max(best, sum(m[p] == t for t, p in zip(y_true, y_pred)))
    else:
        for perm in itertools.permutations(clusters, len(classes)):
            m = dict(zip(perm, classes))  # clusters not in perm stay unmatched
            best = max(best, sum(m.get(p) == t for t, p in zip(y_true, y_pred)))
    return best / len(y_true)


def test_contingency_counts():
    y_true = [0, 0, 1, 1, 1, 2]
    y_pred = [5, 5, 5, 7, 7, 9]
    np.testing.assert_array_equal(contingency(y_true, y_pred), [[2, 0, 0], [1, 2, 0], [0, 0, 1]])


def test_acc_perfect_permutation():
    y = np.array([0, 0, 1, 1, 2, 2, 3])
    perm = np.array([2, 3, 0, 1])  # relabel class c as cluster perm[c]
    assert cluster_accuracy(y, perm[y]) == 1.0
    assert hungarian_match(y, perm[y]) == {2: 0, 3: 1, 0: 2, 1: 3}
    assert cluster_metrics(y, perm[y]) == {"acc": 1.0, "nmi": pytest.approx(1.0), "ari": 1.0}


def test_acc_worked_example():
    # contingency (rows = classes, cols = clusters):
    #            cluster 0  cluster 1
    #   class 0      5          4
    #   class 1      4          0
    # Greedy "largest cell first" takes (class 0, cluster 0) = 5, then (class 1, cluster 1) = 0 -> 5/13.
    # The optimal one-to-one map is cluster 0 -> class 1 (4) and cluster 1 -> class 0 (4) -> 8/13.
    y_true = np.array([0] * 5 + [0] * 4 + [1] * 4)
    y_pred = np.array([0] * 5 + [1] * 4 + [0] * 4)
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(8 / 13)
    assert hungarian_match(y_true, y_pred) == {0: 1, 1: 0}


def test_acc_more_clusters_than_classes():
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    y_pred = np.array([0, 0, 1, 1, 2, 2, 2, 3])  # class 0 split in two, class 1 mostly cluster 2
    # best: cluster 0 (or 1) -> class 0 (2 points), cluster 2 -> class 1 (3 points) -> 5/8
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(5 / 8)
    assert len(hungarian_match(y_true, y_pred)) == 2


def test_acc_fewer_clusters_than_classes():
    y_true = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 1, 1, 1])  # classes 1 and 2 merged
    # cluster 0 -> class 0 (3), cluster 1 -> class 1 (3); class 2 never predicted -> 6/8
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(6 / 8)
    assert hungarian_match(y_true, y_pred) == {0: 0, 1: 1}


@pytest.mark.parametrize("seed", range(6))
def test_acc_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_true, n_pred = [(3, 3), (4, 2), (2, 5), (5, 5), (4, 6), (6, 3)][seed]
    y_true = rng.integers(0, n_true, 40)
    y_pred = rng.integers(0, n_pred, 40) + 10  # non-overlapping label values
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(brute_force_acc(y_true, y_pred), abs=1e-12)
    m = hungarian_match(y_true, y_pred)
    matched = sum(m.get(p) == t for t, p in zip(y_true, y_pred))
    assert matched / len(y_true) == pytest.approx(cluster_accuracy(y_true, y_pred))


@pytest.mark.parametrize("seed", range(8))
def test_nmi_ari_match_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(5, 300))
    n_true, n_pred = int(rng.integers(1, 9)), int(rng.integers(1, 12))
    y_true = rng.integers(0, n_true, n)
    # half the cases: a noisy, permuted copy of y_true (high agreement); else independent labels
    if seed % 2:
        y_pred = rng.permutation(max(n_true, n_pred))[y_true]
        flip = rng.random(n) < 0.2
        y_pred[flip] = rng.integers(0, n_pred, flip.sum())
    else:
        y_pred = rng.integers(0, n_pred, n)
    y_pred = y_pred * 3 - 7  # arbitrary label values
    assert nmi(y_true, y_pred) == pytest.approx(normalized_mutual_info_score(y_true, y_pred), abs=1e-10)
    assert ari(y_true, y_pred) == pytest.approx(adjusted_rand_score(y_true, y_pred), abs=1e-10)
    # symmetric and invariant to relabelling
    assert nmi(y_pred, y_true) == pytest.approx(nmi(y_true, y_pred), abs=1e-12)
    assert ari(y_pred, y_true) == pytest.approx(ari(y_true, y_pred), abs=1e-12)


@pytest.mark.parametrize(
    "y_true,y_pred",
    [
        ([0, 0, 0, 0], [1, 1, 1, 1]),  # both a single cluster
        ([0, 0, 0, 0], [0, 1, 2, 3]),  # single class vs all singletons
        ([0, 1, 2, 3], [0, 0, 0, 0]),
        ([0, 1, 2, 3], [3, 2, 1, 0]),  # both all singletons
        ([0, 0, 1, 1], [0, 0, 0, 1]),
        ([0], [0]),  # one point
        ([0, 0, 1, 1], [0, 1, 0, 1]),  # independent: MI = 0, ARI negative
    ],
)
def test_nmi_ari_edge_cases(y_true, y_pred):
    assert nmi(y_true, y_pred) == pytest.approx(normalized_mutual_info_score(y_true, y_pred), abs=1e-10)
    assert ari(y_true, y_pred) == pytest.approx(adjusted_rand_score(y_true, y_pred), abs=1e-10)


def test_metric_edge_values_written_out():
    assert nmi([0, 0, 0], [4, 4, 4]) == 1.0
    assert ari([0, 0, 0], [4, 4, 4]) == 1.0
    assert nmi([0, 0, 0, 0], [0, 0, 1, 1]) == 0.0
    assert ari([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)  # worked: tp=0, fp=fn=2, tn=2
    with pytest.raises(ValueError, match="length"):
        nmi([0, 1], [0])
    with pytest.raises(ValueError):
        cluster_accuracy([], [])


# ----------------------------------------------------------------------------- kNN


def test_knn_weighted_vote_differs_from_majority():
    # query q = (1, 0). Train (any scale, normalised inside):
    #   a = 5*(1, 0)       label 0, cos = 1.0
    #   b = 2*(0.8, 0.6)   label 1, cos = 0.8
    #   c = 3*(0.8, -0.6)  label 1, cos = 0.8
    #   d = (-1, 0)        label 0, cos = -1 (not among the k=3 nearest)
    # Majority among the 3 neighbours: class 1 (2 votes vs 1).
    # T = 0.1: class 0 weight e^{10} = 22026.5, class 1 weight 2 e^{8} = 5961.9 -> class 0.
    # T = 10 : class 0 weight e^{0.1} = 1.105, class 1 weight 2 e^{0.08} = 2.167 -> class 1.
    train = np.array([[5.0, 0.0], [1.6, 1.2], [2.4, -1.8], [-1.0, 0.0]], dtype=np.float32)
    labels = np.array([0, 1, 1, 0])
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    assert math.exp(1 / 0.1) > 2 * math.exp(0.8 / 0.1)
    assert knn_predict(train, labels, q, k=3, temperature=0.1).tolist() == [0]
    assert knn_predict(train, labels, q, k=3, temperature=10.0).tolist() == [1]
    # k larger than the training set is clipped (4 neighbours: d adds e^{-0.1} to class 0 at T=10)
    assert knn_predict(train, labels, q, k=50, temperature=10.0).tolist() == [1]
    assert knn_top1(train, labels, q, [0], k=3, temperature=0.1) == 1.0


def reference_knn(train, labels, query, k, temperature, num_classes):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    out = []
    for q in query:
        sims = train @ q
        nn_idx = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for i in nn_idx:
            votes[labels[i]] += math.exp(sims[i] / temperature)
        out.append(int(np.argmax(votes)))
    return np.array(out)


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.5)])
def test_knn_matches_reference_loop(k, temperature):
    rng = np.random.default_rng(k)
    train = rng.normal(size=(300, 16))
    labels = rng.integers(0, 6, 300)
    query = rng.normal(size=(70, 16))
    expected = reference_knn(train, labels, query, k, temperature, 6)
    got = knn_predict(train, labels, query, k=k, temperature=temperature, batch_size=16)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.int64
    # torch inputs (float32) give the same predictions
    got_t = knn_predict(torch.from_numpy(train).float(), torch.from_numpy(labels), torch.from_numpy(query))
    ref_t = reference_knn(train, labels, query, 20, 0.07, 6)
    assert (got_t == ref_t).mean() > 0.97  # float32 vs float64 may swap near-ties only


# ----------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_blobs():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 32)) * 4
    y = rng.integers(0, 4, 1200)
    x = (centers[y] + rng.normal(size=(1200, 32))).astype(np.float32)
    r = linear_probe(x[:800], y[:800], x[800:], y[800:])
    assert set(r) >= {"top1", "train_top1"}
    assert r["top1"] >= 0.95 and r["train_top1"] >= 0.95
    # deterministic
    assert linear_probe(x[:800], y[:800], x[800:], y[800:]) == r


def test_linear_probe_close_to_sklearn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(2)
    n, d, c = 3000, 24, 5
    x = rng.normal(size=(n, d)) * rng.uniform(0.2, 5, d) + rng.normal(size=d) * 3
    w = rng.normal(size=(d, c))
    y = (x / x.std(0) @ w + rng.gumbel(size=(n, c)) * 10.0).argmax(1) + 3  # labels 3..7
    xtr, ytr, xte, yte = x[:2000], y[:2000], x[2000:], y[2000:]
    r = linear_probe(xtr, ytr, xte, yte, weight_decay=1e-3)
    sc = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=1 / (1e-3 * len(xtr)), max_iter=2000).fit(sc.transform(xtr), ytr)
    sk = clf.score(sc.transform(xte), yte)
    assert 0.4 < sk < 0.95  # a genuinely hard problem
    assert abs(r["top1"] - sk) <= 0.03
    assert abs(r["train_top1"] - clf.score(sc.transform(xtr), ytr)) <= 0.03


def test_linear_probe_objective_matches_sklearn_coefficients():
    # The fitted weights solve the same L2-regularised multinomial problem as scikit-learn's
    # LogisticRegression(C = 1 / (weight_decay * N)) (bias unpenalised in both).
    from sklearn.linear_model import LogisticRegression

    from zoo.eval.linear import _fit_linear

    rng = np.random.default_rng(3)
    n, d, c, wd = 150, 40, 3, 1e-2  # few points per dimension: the penalty matters
    x = rng.normal(size=(n, d))
    y = rng.integers(0, c, n)
    model = _fit_linear(torch.from_numpy(x), torch.from_numpy(y), c, epochs=500, weight_decay=wd)
    clf = LogisticRegression(C=1 / (wd * n), tol=1e-10, max_iter=10000).fit(x, y)
    np.testing.assert_allclose(model.weight.detach().numpy(), clf.coef_, atol=2e-4)
    np.testing.assert_allclose(model.bias.detach().numpy(), clf.intercept_, atol=2e-4)


def test_linear_probe_speed():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5000, 256)).astype(np.float32)
    y = rng.integers(0, 10, 5000)
    t = time.perf_counter()
    linear_probe(x[:4000], y[:4000], x[4000:], y[4000:], device="cpu")
    assert time.perf_counter() - t < 5.0


# ----------------------------------------------------------------------------- k-means


def blobs(n_per=60, k=5, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    centers *= 10 / np.linalg.norm(centers, axis=1, keepdims=True)
    y = np.repeat(np.arange(k), n_per)
    x = centers[y] + 0.1 * rng.normal(size=(len(y), d))
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm]


@pytest.mark.parametrize("seed", [0, 1])
def test_kmeans_recovers_blobs(seed):
    x, y = blobs(seed=seed)
    assign, centroids = kmeans(x, 5, seed=seed)
    assert assign.shape == (len(y),) and assign.dtype == np.int64
    assert centroids.shape == (5, 16) and centroids.dtype == np.float32
    assert cluster_accuracy(y, assign) == 1.0
    m = kmeans_metrics(x, y, seed=seed)
    assert m == {"kmeans_acc": 1.0, "kmeans_nmi": pytest.approx(1.0), "kmeans_ari": 1.0}
    # deterministic for a seed
    np.testing.assert_array_equal(kmeans(x, 5, seed=seed)[0], assign)


def test_kmeans_k_too_large():
    x = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="k=4"):
        kmeans(x, 4)


# ----------------------------------------------------------------------------- protocols


def synthetic_split(seed, n=300, probs=False, label_noise=0.0):
    x, y = blobs(n_per=n // 5, seed=0)
    rng = np.random.default_rng(seed)
    x = x + rng.normal(size=x.shape).astype(np.float32)
    flip = rng.random(len(y)) < label_noise
    y[flip] = rng.integers(0, 5, flip.sum())
    out = {"features": x, "labels": y.astype(np.int64)}
    if probs:
        p = rng.random((len(y), 7)).astype(np.float32)
        p[np.arange(len(y)), y] += 1.0
        out["cluster_probs"] = p / p.sum(1, keepdims=True)
    return out


def test_evaluate_features_all_keys():
    train, test = synthetic_split(1), synthetic_split(2, probs=True, label_noise=0.3)
    r = evaluate_features(train, test)
    keys = {
        "knn_top1",
        "linear_top1",
        "kmeans_acc",
        "kmeans_nmi",
        "kmeans_ari",
        "head_acc",
        "head_nmi",
        "head_ari",
    }
    assert set(r) == keys
    for key in keys:
        assert 0.0 <= r[key] <= 1.0, key
    # k-means runs on the (label-noisy) test split, not on the clean train split
    assert r["kmeans_acc"] < 0.95
    assert {k: r[k] for k in ("kmeans_acc", "kmeans_nmi", "kmeans_ari")} == kmeans_metrics(
        test["features"], test["labels"]
    )
    assert 0.6 < r["knn_top1"] < 0.95 and 0.6 < r["linear_top1"] < 0.95
    assert r["head_acc"] == cluster_accuracy(test["labels"], test["cluster_probs"].argmax(1))
    r2 = evaluate_features(train, synthetic_split(2), protocols=("knn",))
    assert set(r2) == {"knn_top1"}
    assert PROTOCOLS == ("knn", "linear", "kmeans")


def test_evaluate_features_unknown_protocol():
    with pytest.raises(ValueError, match="knn, linear, kmeans"):
        evaluate_features(synthetic_split(1), synthetic_split(2), protocols=("knn", "nosuch"))


# ----------------------------------------------------------------------------- feature extraction


class TinyModel(nn.Module):
    """Stand-in for ZooModel: BN encoder (eval mode matters) + optional cluster head."""

    def __init__(self, with_head: bool = True):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.cluster_head = nn.Linear(4, 3) if with_head else None

    def forward_features(self, x):
        return self.encoder(x).flatten(1)

    def forward_head(self, f):
        return f if self.cluster_head is None else self.cluster_head(f)


def test_extract_features_matches_direct_forward():
    torch.manual_seed(0)
    model = TinyModel()
    with torch.no_grad():  # non-trivial BN running stats so train/eval differ
        model.encoder[1].running_mean.uniform_(-1, 1)
        model.encoder[1].running_var.uniform_(0.5, 2)
    images = torch.randn(10, 3, 8, 8)
    labels = torch.arange(10) % 3
    ds = TensorDataset(images, labels)
    model.train()
    out = extract_features(model, ds, batch_size=4, progress=False, cluster_probs=True)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        f = model.forward_features(images)
        p = model.forward_head(f).softmax(1)
    assert out["features"].shape == (10, 4) and out["features"].dtype == np.float32
    assert out["labels"].dtype == np.int64
    np.testing.assert_array_equal(out["labels"], labels.numpy())
    np.testing.assert_allclose(out["features"], f.numpy(), rtol=1e-5, atol=1e-6)
    assert out["cluster_probs"].shape == (10, 3)
    np.testing.assert_allclose(out["cluster_probs"], p.numpy(), rtol=1e-5, atol=1e-6)

    no_head = extract_features(TinyModel(with_head=False), ds, progress=False, cluster_probs=True)
    assert "cluster_probs" not in no_head
    assert set(extract_features(model, ds, progress=False)) == {"features", "labels"}


def test_kmeans_sklearn_fallback(monkeypatch):
    import zoo.eval.cluster as cluster_mod

    monkeypatch.setattr(cluster_mod, "_import_faiss", lambda: None)
    x, y = blobs(seed=3)
    assign, centroids = kmeans(x, 5, seed=0)
    assert cluster_accuracy(y, assign) == 1.0 and centroids.shape == (5, 16)
    assign_s, centroids_s = kmeans(x, 5, seed=0, spherical=True)
    assert cluster_accuracy(y, assign_s) == 1.0
    np.testing.assert_allclose(np.linalg.norm(centroids_s, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="k=400"):
        kmeans(x, 400)


def test_evaluate_with_stub_datasets(monkeypatch):
    import sys
    import types

    from zoo.eval import evaluate

    torch.manual_seed(0)
    images = torch.randn(40, 3, 8, 8)
    labels = torch.arange(40) % 4
    images += labels.view(-1, 1, 1, 1).float() * 2  # make the classes separable
    calls = []

    def load_dataset(name, split, transform=None, root=None, **kwargs):
        calls.append((name, split, transform, kwargs))
        return TensorDataset(images, labels)

    stub = types.ModuleType("zoo.data")
    stub.load_dataset = load_dataset
    stub.transform_for = lambda model: "the-transform"
    monkeypatch.setitem(sys.modules, "zoo.data", stub)
    r = evaluate(TinyModel(), "toy", protocols="knn,kmeans", progress=False, batch_size=16, download=False)
    assert {(c[1], c[2]) for c in calls} == {("train", "the-transform"), ("test", "the-transform")}
    assert all(c[0] == "toy" and c[3] == {"download": False} for c in calls)
    assert r["dataset"] == "toy" and r["split"] == "test" and "k=20" in r["protocol"]
    assert {"knn_top1", "kmeans_acc", "head_acc"} <= set(r) and "linear_top1" not in r


def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    from zoo.eval.plots import matched_confusion, plot_confusion, plot_embedding_2d

    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([7, 7, 5, 5, 6, 6, 9])
    table, _, clusters = matched_confusion(y_true, y_pred)
    assert clusters.tolist() == [7, 5, 6, 9]
    assert np.trace(table[:, :3]) == round(cluster_accuracy(y_true, y_pred) * 7)
    p = plot_confusion(y_true, y_pred, tmp_path / "conf.png")
    x, y = blobs(n_per=10)
    q = plot_embedding_2d(x, y, tmp_path / "sub" / "emb.png")
    for path in (p, q):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths_match_cpu():
    rng = np.random.default_rng(0)
    train, labels, query = rng.normal(size=(500, 32)), rng.integers(0, 5, 500), rng.normal(size=(60, 32))
    cpu = knn_predict(train, labels, query)
    gpu = knn_predict(
        torch.from_numpy(train).cuda(), torch.from_numpy(labels).cuda(), torch.from_numpy(query).cuda()
    )
    np.testing.assert_array_equal(cpu, gpu)
    r = linear_probe(train[:400], labels[:400], train[400:], labels[400:], device="cuda")
    assert r["train_top1"] > 0.5
    ds = TensorDataset(torch.randn(6, 3, 8, 8), torch.zeros(6, dtype=torch.long))
    model = TinyModel()
    out_cpu = extract_features(model, ds, progress=False, device="cpu")
    out_gpu = extract_features(model, ds, progress=False, device="cuda")
    np.testing.assert_allclose(out_cpu["features"], out_gpu["features"], rtol=1e-4, atol=1e-5)
