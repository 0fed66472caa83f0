"""InterCLR (Xie et al., IJCV 2022): the inter-image loss, its sampling, the online mini-batch k-means memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.methods.interclr import (
    InterCLR,
    cluster_means,
    fix_small_clusters,
    inter_margin_loss,
    sample_inter_pairs,
    update_memory,
)
from train.methods.moco import moco_infonce_loss
from train.trainer import Trainer, epoch_order
from zoo.model import ZooModel

from .method_checks import check_resume_bit_exact, tiny_cfg
from .test_moco_byol import check_lower_loss_same_state

TAU = 0.2
KW = {"proj_hidden_dim": 32, "proj_dim": 16, "queue_length": 128, "momentum": 0.99, "num_clusters": 20,
      "min_cluster": 5, "num_negatives": 32, "pool_size": 200, "kmeans_niter": 5}


def test_inter_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, generator=g, dtype=torch.float64)
    pos = F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1)
    neg = F.normalize(torch.randn(3, 5, 4, generator=g, dtype=torch.float64), dim=2)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    margin = -0.5
    expected = 0.0
    for i in range(3):
        qi = q[i] / q[i].norm()
        s_pos = (float(qi @ pos[i]) - margin) / TAU
        den = math.exp(s_pos) + sum(math.exp(float(qi @ neg[i, j]) / TAU) for j in range(5) if valid[i, j])
        expected += -s_pos + math.log(den)
    got = inter_margin_loss(q, pos, neg, valid, TAU, margin)
    assert got.item() == pytest.approx(expected / 3, rel=1e-12)
    # no margin, every negative shared: MoCo's InfoNCE with those negatives as the queue
    shared = neg[0].expand(3, 5, 4)
    assert inter_margin_loss(q, pos, shared, None, TAU, 0.0).item() == pytest.approx(
        moco_infonce_loss(q, pos, neg[0], TAU).item(), rel=1e-12)
    # the negative margin loosens the boundary: the same pairs cost less
    assert got.item() < inter_margin_loss(q, pos, neg, valid, TAU, 0.0).item()


def _bank(n=40, d=4, k=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1),
            torch.randint(k, (n,), generator=g), torch.randn(3, d, generator=g, dtype=torch.float64))


def test_semihard_negatives_come_from_the_band_of_other_clusters_uniformly():
    bank, labels, q = _bank()
    own = labels[:3]
    sim = F.normalize(q, dim=1) @ bank.T
    band = sim.topk(15, dim=1).indices
    seen = [set() for _ in range(3)]
    positives = [set() for _ in range(3)]
    for s in range(60):
        p = sample_inter_pairs(q, bank, labels, own, 5, 15, torch.Generator().manual_seed(s))
        assert p.negatives.shape == (3, 5) and bool(p.valid.all())
        for i in range(3):
            negs = p.negatives[i].tolist()
            assert len(set(negs)) == 5  # without replacement
            assert set(negs) <= set(band[i].tolist())  # inside the band of the 15 most similar
            assert all(int(labels[j]) != int(own[i]) for j in negs)  # never the query's cluster
            seen[i] |= set(negs)
            positives[i].add(int(p.positive[i]))
    for i in range(3):  # every allowed band entry gets drawn; every member of the cluster can be the positive
        assert seen[i] == {j for j in band[i].tolist() if int(labels[j]) != int(own[i])}
        assert positives[i] == set((labels == own[i]).nonzero().flatten().tolist())


def test_hard_and_random_sampling_and_too_small_a_band():
    bank, labels, q = _bank()
    own = labels[:3]
    sim = F.normalize(q, dim=1) @ bank.T
    hard = sample_inter_pairs(q, bank, labels, own, 4, 40, torch.Generator().manual_seed(0), "hard")
    for i in range(3):  # the 4 most similar entries of another cluster, most similar first
        ranked = [j for j in sim[i].argsort(descending=True).tolist() if int(labels[j]) != int(own[i])]
        assert hard.negatives[i].tolist() == ranked[:4]
    rand = sample_inter_pairs(q, bank, labels, own, 30, 3, torch.Generator().manual_seed(0), "random")
    assert rand.negatives.shape == (3, 30)  # the whole bank is the pool, whatever pool_size says
    for i in range(3):
        n_allowed = int((labels != own[i]).sum())
        assert int(rand.valid[i].sum()) == min(30, n_allowed)
        assert all(int(labels[j]) != int(own[i]) for j in rand.negatives[i][rand.valid[i]].tolist())
    tiny = sample_inter_pairs(q, bank, labels, own, 8, 3, torch.Generator().manual_seed(0))
    top3 = sim.topk(3, dim=1).indices
    for i in range(3):  # a band of 3 holds at most 3 negatives; same-cluster entries are masked, not drawn
        assert int(tiny.valid[i].sum()) == sum(int(labels[j]) != int(own[i]) for j in top3[i].tolist())
    with pytest.raises(ValueError, match="negative_sampling"):
        sample_inter_pairs(q, bank, labels, own, 4, 10, torch.Generator(), "hardest")


def test_minibatch_kmeans_step_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]])
    labels = torch.tensor([0, 1, 1, 0])
    centroids = torch.tensor([[0.0, 0.0], [0.0, 0.0], [-5.0, 0.0]])  # cluster 2 has no member
    centroids = cluster_means(bank, labels, centroids)
    torch.testing.assert_close(centroids, torch.tensor([[0.9, -0.3], [0.3, 0.9], [-5.0, 0.0]]))
    # image 2 gets key (3,-4) -> (0.6,-0.8): c0 . = 0.78 > c1 . = -0.54 (c2 . = -3): relabelled 0;
    # image 1 gets key (0,5) -> (0,1): c1 . = 0.9 > c2 . = 0 > c0 . = -0.3: stays 1. Half of the batch changed.
    changed = update_memory(bank, labels, centroids, torch.tensor([2, 1]), torch.tensor([[3.0, -4.0], [0.0, 5.0]]))
    assert changed == 0.5
    torch.testing.assert_close(bank, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, -0.8], [0.8, -0.6]]))
    assert labels.tolist() == [0, 1, 0, 0]
    # the centroids move by the re-assigned features: c0 = mean of images 0, 2, 3; c1 = image 1 alone
    torch.testing.assert_close(cluster_means(bank, labels, centroids),
                               torch.tensor([[0.8, -1.4 / 3], [0.0, 1.0], [-5.0, 0.0]]))
    # memory momentum 0.5: normalize(0.5 old + 0.5 new) = normalize((0.6, 0) + ...) -> (1, 0) for image 2
    bank2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]])
    update_memory(bank2, torch.tensor([0, 1, 1, 0]), centroids, torch.tensor([2]), torch.tensor([[0.6, -0.8]]), 0.5)
    torch.testing.assert_close(bank2[2], torch.tensor([1.0, 0.0]))


def test_small_clusters_are_dissolved_and_refilled_by_splitting_the_largest():
    def unit(deg):
        return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]

    rows = [unit(a) for a in (18, 20, 22, -18, -20, -22)]  # cluster 0: two tight groups
    rows += [unit(a) for a in (88, 90, 92, 94)]  # cluster 1
    rows += [unit(a) for a in (170, 175)]  # cluster 2: 2 < min_size 3, nearer to cluster 1 than to cluster 0
    bank = torch.tensor(rows, dtype=torch.float64)
    labels = torch.tensor([0] * 6 + [1] * 4 + [2] * 2)
    centroids = cluster_means(bank, labels, torch.zeros(3, 2, dtype=torch.float64))
    assert fix_small_clusters(bank, labels, centroids, min_size=3, seed=0) == 1
    assert labels[10:].tolist() == [1, 1]  # moved to the most similar remaining centroid
    # clusters 0 and 1 then hold 6 each; the first largest (0) is split along its two groups, one goes to 2
    groups = {tuple(labels[:3].tolist()), tuple(labels[3:6].tolist())}
    assert groups == {(0, 0, 0), (2, 2, 2)}
    for j in (0, 2):
        torch.testing.assert_close(centroids[j], bank[labels == j].mean(dim=0))
    assert torch.bincount(labels, minlength=3).min() >= 3
    assert fix_small_clusters(bank, labels, centroids, min_size=3, seed=0) == 0  # nothing left to fix


def test_bad_settings_are_refused(tmp_path):
    model = ZooModel("convnet_tiny", {"widths": [8, 16]})
    with pytest.raises(ValueError, match="negative_sampling"):
        InterCLR(model, negative_sampling="hardest", **{k: KW[k] for k in ("proj_hidden_dim", "proj_dim")})
    with pytest.raises(ValueError, match="unmix"):
        InterCLR(model, unmix=True)
    with pytest.raises(ValueError, match="exceeds"):  # 1,442 digits cannot hold 200 clusters of at least 10
        Trainer(tiny_cfg(method="interclr", method_kwargs={**KW, "num_clusters": 200, "min_cluster": 10},
                         max_steps=1), tmp_path, progress=False).fit()


def test_one_step_writes_the_batch_keys_into_the_memory(tmp_path):
    kw = {**KW, "min_cluster": 1}  # no cluster is small after one step: the step's k-means update alone
    t = Trainer(tiny_cfg(method="interclr", method_kwargs=kw, max_steps=1), tmp_path, progress=False)
    m = t.method
    m.on_train_start(t.context(0))
    bank0, labels0, centroids0 = m.memory_bank.clone(), m.memory_labels.clone(), m.centroids.clone()
    assert bank0.shape == (1442, 16) and torch.bincount(labels0, minlength=20).min() >= 1
    torch.testing.assert_close(bank0.norm(dim=1), torch.ones(1442))
    torch.testing.assert_close(centroids0, cluster_means(bank0, labels0, centroids0))  # means of the k-means labels
    keys: list[torch.Tensor] = []
    encode = m.encode_keys
    m.encode_keys = lambda x, g: keys.append(encode(x, g)) or keys[-1]
    t.fit()  # its on_train_start keeps the memory built above
    first = epoch_order(t.cfg.seed, 0, 1442)[:64]
    torch.testing.assert_close(m.memory_bank[first], keys[0], rtol=0, atol=1e-6)  # momentum 1: the new key
    rest = torch.ones(1442, dtype=torch.bool)
    rest[first] = False
    assert torch.equal(m.memory_bank[rest], bank0[rest]) and torch.equal(m.memory_labels[rest], labels0[rest])
    # the batch relabelled to its most similar centroid (before the step), then the centroids re-averaged
    assert torch.equal(m.memory_labels[first], (m.memory_bank[first] @ centroids0.T).argmax(dim=1))
    assert t.history[0]["label_change"] == pytest.approx(
        float((m.memory_labels[first] != labels0[first]).double().mean()), abs=1e-6)
    assert not torch.equal(m.centroids, centroids0)
    torch.testing.assert_close(m.centroids, cluster_means(m.memory_bank, m.memory_labels, centroids0))


def test_interclr_lowers_loss_and_resumes_bit_exact(tmp_path):
    # the queue starts random: judge with the final buffers (test_moco_byol.check_lower_loss_same_state)
    before, after = check_lower_loss_same_state(tmp_path / "loss", steps=5, method="interclr", method_kwargs=KW)
    # 5 steps per epoch at batch 256: cut=6 resumes in epoch 1 with the memory bank, labels, centroids, queue
    check_resume_bit_exact(tmp_path / "resume", total=8, cut=6, method="interclr", method_kwargs=KW, batch_size=256)
