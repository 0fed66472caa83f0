"""DeepCluster and PCL: ProtoNCE, k-means re-seeding, uniform sampling, re-clustering, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train import clustering
from train.clustering import (
    kmeans_sharded,
    kmeans_with_reseed,
    pca_whiten,
    resize_buffers_to_state,
    uniform_cluster_order,
)
from train.methods.pcl import concentration, proto_nce_loss
from train.trainer import Trainer
from zoo.eval.cluster import kmeans

from .method_checks import check_resume_bit_exact, check_two_steps_lower_loss, fixed_batch_loss, tiny_cfg

DC_KW = {"num_clusters": 5, "kmeans_niter": 10}
PCL_KW = {"num_clusters": [5, 8], "queue_size": 128, "proj_hidden_dim": 32, "proj_dim": 32, "momentum": 0.9,
          "kmeans_niter": 10}


@pytest.fixture(autouse=True, scope="module")
def _faiss_one_thread():
    """faiss's OpenMP threads spin against the other processes on a small shared machine (10x slower)."""
    try:
        import faiss
    except ImportError:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


# ----------------------------------------------------------------------------- ProtoNCE
def proto_nce_reference(q, prototypes, assignments, phi, allowed=None):
    """Per sample: -log softmax over the (allowed) prototypes of q.c_j / phi_j, at its own prototype."""
    total = 0.0
    for i in range(q.shape[0]):
        scores = [float(q[i] @ prototypes[j]) / float(phi[j]) for j in range(prototypes.shape[0])]
        js = range(len(scores)) if allowed is None else [j for j in range(len(scores)) if allowed[i][j]]
        den = sum(math.exp(scores[j]) for j in js)
        total += -math.log(math.exp(scores[int(assignments[i])]) / den)
    return total / q.shape[0]


def test_proto_nce_matches_formula():
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(6, 4, generator=gen), dim=1)
    protos = F.normalize(torch.randn(5, 4, generator=gen), dim=1)
    assign = torch.tensor([0, 1, 4, 4, 2, 3])
    phi = torch.tensor([0.1, 0.3, 0.2, 0.5, 0.15])
    got = proto_nce_loss(q, protos, assign, phi).item()
    assert got == pytest.approx(proto_nce_reference(q, protos, assign, phi), rel=1e-5)
    # phi is a per-prototype temperature: changing one prototype's phi changes the loss.
    phi2 = phi.clone()
    phi2[3] = 0.05
    assert proto_nce_loss(q, protos, assign, phi2).item() != pytest.approx(got, rel=1e-4)


def test_proto_nce_worked_number():
    # q = (0.6, 0.8), prototypes e1, e2, q belongs to e1; phi = (0.5, 0.2):
    # logits (1.2, 4.0) -> loss = -log(e^1.2 / (e^1.2 + e^4)) = log(1 + e^2.8).
    q = torch.tensor([[0.6, 0.8]])
    protos = torch.eye(2)
    loss = proto_nce_loss(q, protos, torch.tensor([0]), torch.tensor([0.5, 0.2])).item()
    assert loss == pytest.approx(math.log(1 + math.exp(2.8)), rel=1e-6)


def test_proto_nce_sampled_negatives():
    gen = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(8, 3, generator=gen), dim=1)
    protos = F.normalize(torch.randn(10, 3, generator=gen), dim=1)
    assign = torch.randint(10, (8,), generator=gen)
    phi = torch.rand(10, generator=gen) + 0.1
    # r >= K-1: every other prototype is a negative, the full loss.
    full = proto_nce_loss(q, protos, assign, phi, num_negatives=9, generator=torch.Generator())
    assert full.item() == pytest.approx(proto_nce_reference(q, protos, assign, phi), rel=1e-5)
    # r = 3: the same permutation the function draws gives each sample its own + 3 other prototypes.
    r = 3
    loss = proto_nce_loss(q, protos, assign, phi, num_negatives=r, generator=torch.Generator().manual_seed(7))
    cand = torch.randperm(10, generator=torch.Generator().manual_seed(7))[: r + 1].tolist()
    allowed = []
    for a in assign.tolist():
        negs = [c for c in cand if c != a][:r]
        allowed.append([j == a or j in negs for j in range(10)])
        assert len(negs) == r
    assert loss.item() == pytest.approx(proto_nce_reference(q, protos, assign, phi, allowed), rel=1e-5)


def test_concentration_as_official():
    # Two clusters on a line: cluster 0 = {0, 2} around 1, cluster 1 = {10, 10, 16} around 12.
    x = torch.tensor([[0.0], [2.0], [10.0], [10.0], [16.0]])
    c = torch.tensor([[1.0], [12.0]])
    a = torch.tensor([0, 0, 1, 1, 1])
    raw = [2.0 / (2 * math.log(12)), 8.0 / (3 * math.log(13))]
    phi = concentration(x, c, a, temperature=0.2)
    # With two values, the 10th/90th percentile clamp keeps 0.9 a + 0.1 b and 0.1 a + 0.9 b.
    lo, hi = sorted(raw)
    clamped = [min(max(v, lo + 0.1 * (hi - lo)), hi - 0.1 * (hi - lo)) for v in raw]
    expected = [0.2 * v / (sum(clamped) / 2) for v in clamped]
    assert phi.tolist() == pytest.approx(expected, rel=1e-5)
    assert phi.mean().item() == pytest.approx(0.2, rel=1e-6)


# ----------------------------------------------------------------------------- clustering helpers
def test_kmeans_reseeds_empty_clusters():
    # 3 distinct points, each 4 times, into 6 clusters: nearest-centroid k-means can fill at most 3.
    base = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    x = base.repeat_interleave(4, dim=0)  # [12,2]
    plain, _ = kmeans(x, 6, seed=0, niter=10)
    assert len(set(plain.tolist())) < 6, "the plain k-means was expected to leave a cluster empty"
    assign, centroids = kmeans_with_reseed(x, 6, seed=0, niter=10)
    assert torch.bincount(assign, minlength=6).min() >= 1
    assert centroids.shape == (6, 2)
    # Each centroid is the mean of its points.
    for j in range(6):
        torch.testing.assert_close(centroids[j], x[assign == j].mean(0))
    # k = N: every point alone in its cluster.
    y = torch.randn(7, 3, generator=torch.Generator().manual_seed(0)).repeat(2, 1)
    a2, _ = kmeans_with_reseed(y, 14, seed=3)
    assert sorted(torch.bincount(a2, minlength=14).tolist()) == [1] * 14
    # Deterministic for a seed.
    assert torch.equal(kmeans_with_reseed(x, 6, seed=0, niter=10)[0], assign)


def test_uniform_cluster_order_balances_clusters():
    # Cluster 3 is empty, -1 is unlabelled.
    labels = torch.tensor([0] * 100 + [1] * 10 + [2] * 3 + [4] * 1 + [-1] * 5)
    n = labels.numel()
    order = uniform_cluster_order(labels, n, torch.Generator().manual_seed(0))
    assert order.shape == (n,)
    counts = torch.bincount(labels[order], minlength=5)
    nonempty = counts[[0, 1, 2, 4]]
    assert counts[3] == 0 and bool((labels[order] >= 0).all())
    assert int(nonempty.max() - nonempty.min()) <= 1 and int(nonempty.sum()) == n
    # The big cluster is sampled without replacement; a same-seed call repeats, another seed differs.
    big = order[labels[order] == 0]
    assert big.unique().numel() == big.numel()
    assert torch.equal(order, uniform_cluster_order(labels, n, torch.Generator().manual_seed(0)))
    assert not torch.equal(order, uniform_cluster_order(labels, n, torch.Generator().manual_seed(1)))


def test_pca_whiten_gives_unit_covariance():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen) @ torch.randn(6, 6, generator=gen) + 3.0
    y = pca_whiten(x, 4)
    assert y.shape == (200, 4)
    torch.testing.assert_close(y.mean(0), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cov(y.T), torch.eye(4), atol=1e-3, rtol=0)


def test_pca_whiten_matches_sklearn_up_to_axis_signs():
    from sklearn.decomposition import PCA

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 7, generator=gen) @ torch.randn(7, 7, generator=gen) + 2.0
    ours = pca_whiten(x, 3, eps=0.0).double().numpy()
    ref = PCA(n_components=3, whiten=True, svd_solver="full").fit_transform(x.double().numpy())
    signs = np.sign((ours * ref).sum(axis=0))
    np.testing.assert_allclose(ours * signs, ref, rtol=1e-4, atol=1e-4)


def test_kmeans_sharded_trains_on_a_sample_then_assigns_every_row():
    """At scale k-means trains on max_points_per_centroid * k rows (faiss's sample), then every row goes
    to its nearest centroid; on well separated blobs that is as good as k-means on all rows."""
    from sklearn.cluster import KMeans
    from sklearn.datasets import make_blobs
    from sklearn.metrics import adjusted_rand_score

    # 5 equidistant blobs (a simplex), far enough apart that one k-means++ seeding finds them all
    x_np, truth = make_blobs(n_samples=3000, centers=20.0 * np.eye(5), cluster_std=0.8, random_state=0)
    x = torch.from_numpy(x_np).float()
    seen: list[int] = []
    real = clustering.kmeans
    clustering.kmeans = lambda rows, *a, **kw: seen.append(len(rows)) or real(rows, *a, **kw)
    try:
        assign, centroids = kmeans_sharded(x, torch.arange(3000), 3000, 5, seed=0, max_points_per_centroid=50)
    finally:
        clustering.kmeans = real
    assert seen == [250]  # 50 x 5 rows trained the centroids
    dist = ((x_np[:, None, :] - centroids.numpy()[None]) ** 2).sum(-1)  # [N,K], by hand
    assert np.array_equal(assign.numpy(), dist.argmin(1))
    assert adjusted_rand_score(truth, assign.numpy()) > 0.99
    inertia = float(dist.min(1).sum())
    ref = KMeans(5, n_init=3, random_state=0).fit(x_np)
    assert inertia <= 1.02 * ref.inertia_
    again, _ = kmeans_sharded(x, torch.arange(3000), 3000, 5, seed=0, max_points_per_centroid=50)
    assert torch.equal(again, assign)


def test_kmeans_sharded_reseeds_empty_clusters_after_sampling():
    base = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    x = base.repeat_interleave(40, dim=0)  # 3 distinct points for 6 clusters; the sample is 60 of 120 rows
    assign, centroids = kmeans_sharded(x, torch.arange(120), 120, 6, seed=0, max_points_per_centroid=10)
    counts = torch.bincount(assign, minlength=6)
    assert counts.min() >= 1 and counts.sum() == 120
    for j in range(6):
        torch.testing.assert_close(centroids[j], x[assign == j].mean(0))


def test_lazy_buffers_resize_on_load():
    m = torch.nn.Module()
    m.register_buffer("labels", torch.zeros(0, dtype=torch.long))
    resize_buffers_to_state(m, {"labels": torch.arange(4)}, "", ["labels"])
    m.load_state_dict({"labels": torch.arange(4)})
    assert torch.equal(m.labels, torch.arange(4))


# ----------------------------------------------------------------------------- DeepCluster
def _one_epoch_trainer(tmp_path, method: str, kw: dict) -> Trainer:
    """1442 digits / batch 256 = 5 steps per epoch; train exactly epoch 0."""
    trainer = Trainer(tiny_cfg(method=method, method_kwargs=kw, batch_size=256, max_steps=5), tmp_path,
                      progress=False)
    trainer.fit()
    return trainer


def test_deepcluster_relabels_and_reinitialises_classifier(tmp_path):
    trainer = _one_epoch_trainer(tmp_path, "deepcluster", DC_KW)
    method = trainer.method
    labels0 = method.pseudo_labels.clone()
    assert labels0.shape == (1442,) and labels0.min() >= 0
    assert torch.bincount(labels0, minlength=5).min() > 0
    weight_before = method.classifier.weight.detach().clone()
    params = list(method.classifier.parameters())
    assert all(p in trainer.optimizer.state for p in params)  # trained: Adam moments exist
    method.on_epoch_start(trainer.context(1))
    labels1 = method.pseudo_labels
    assert not torch.equal(labels0, labels1)
    assert torch.equal(method.prev_pseudo_labels, labels0)
    assert 0.0 <= float(method.clustering_nmi) < 1.0  # the partition changed, not just its label ids
    assert not torch.equal(method.classifier.weight, weight_before)
    assert float(method.classifier.bias.detach().abs().max()) == 0.0
    assert all(p not in trainer.optimizer.state for p in params)
    assert any(p in trainer.optimizer.state for p in method.model.parameters())  # the encoder keeps its state
    # The epoch's sample order is uniform over the new pseudo-classes.
    order = method.sample_order(1, trainer.cfg.seed, 1442)
    counts = torch.bincount(labels1[order], minlength=5)
    assert int(counts.max() - counts.min()) <= 1


def test_deepcluster_lowers_loss(tmp_path):
    check_two_steps_lower_loss(tmp_path, method="deepcluster", method_kwargs=DC_KW)


@pytest.mark.parametrize("cut", [3, 6])
def test_deepcluster_resume_bit_exact(tmp_path, cut):
    # 5 steps per epoch: cut=3 resumes before the epoch-1 clustering, cut=6 after it.
    check_resume_bit_exact(tmp_path, total=8, cut=cut, method="deepcluster", method_kwargs=DC_KW,
                           batch_size=256)


# ----------------------------------------------------------------------------- PCL
def test_pcl_assignments_change(tmp_path):
    trainer = _one_epoch_trainer(tmp_path, "pcl", PCL_KW)
    method = trainer.method
    a0 = method.assignments.clone()
    assert a0.shape == (2, 1442)
    phi0 = method.phi_1.clone()
    for m, k in enumerate([5, 8]):
        assert torch.bincount(a0[m], minlength=k).min() > 0
        phi = getattr(method, f"phi_{m}")
        assert phi.mean().item() == pytest.approx(0.2, rel=1e-5)
        torch.testing.assert_close(getattr(method, f"prototypes_{m}").norm(dim=1), torch.ones(k))
    assert "loss_proto" in trainer.history[0]
    method.on_epoch_start(trainer.context(1))
    assert int(method.clustered_epoch) == 1
    for m in range(2):
        assert not torch.equal(a0[m], method.assignments[m])
    assert not torch.equal(phi0, method.phi_1)


def test_pcl_warmup_has_no_proto_term(tmp_path):
    kw = {**PCL_KW, "warmup_epochs_proto": 1}
    cfg = tiny_cfg(method="pcl", method_kwargs=kw, batch_size=256, max_steps=1)
    trainer = Trainer(cfg, tmp_path, progress=False)
    queue = trainer.method.queue.clone()
    trainer.fit()
    assert int(trainer.method.clustered_epoch) == -1 and "loss_proto" not in trainer.history[0]
    assert int(trainer.method.assignments.max()) == -1
    assert not torch.equal(trainer.method.queue, queue)  # the instance term still ran and enqueued keys


def test_pcl_lowers_loss(tmp_path):
    """Two steps lower the fixed-batch loss, measured against the same negatives before and after.

    ``check_two_steps_lower_loss`` does not apply as is: the queue is part of the loss, starts as
    random unit vectors (as in MoCo) and fills with real keys during training, which are far harder
    negatives (instance loss 3.7 -> 5.1 for unchanged weights). So the queue is restored to its
    pre-training content before the second measurement; the prototypes do not change within an epoch.
    """
    trainer = Trainer(tiny_cfg(method="pcl", method_kwargs=PCL_KW, max_steps=2), tmp_path, progress=False)
    trainer.method.on_train_start(trainer.context(0))
    trainer.method.on_epoch_start(trainer.context(0))
    indices = torch.arange(trainer.cfg.batch_size)
    images = trainer.data.batch(indices)
    queue = trainer.method.queue.clone()
    before = fixed_batch_loss(trainer, images, indices)
    trainer.fit()
    assert not torch.equal(trainer.method.queue, queue)  # training did enqueue keys
    trainer.method.queue.copy_(queue)
    after = fixed_batch_loss(trainer, images, indices)
    assert after < before, f"pcl: loss {before:.5f} -> {after:.5f} did not go down"


@pytest.mark.parametrize("cut", [3, 6])
def test_pcl_resume_bit_exact(tmp_path, cut):
    kw = {**PCL_KW, "num_negative_prototypes": 3}  # sampled negatives: the generator is part of the state
    check_resume_bit_exact(tmp_path, total=8, cut=cut, method="pcl", method_kwargs=kw, batch_size=256)
