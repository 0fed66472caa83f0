"""IFND (Chen et al. 2022): false-negative elimination and attraction, on SimCLR and MoCo."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.methods.ifnd import confident_labels, ifnd_moco_loss, ifnd_nt_xent_loss
from train.methods.moco import moco_infonce_loss
from train.methods.simclr import nt_xent_loss
from train.trainer import Trainer, epoch_order

from .method_checks import check_resume_bit_exact, check_two_steps_lower_loss, tiny_cfg
from .test_moco_byol import check_lower_loss_same_state

TAU = 0.5
SIMCLR_KW = {"proj_hidden_dim": 32, "proj_dim": 16, "num_clusters": 5, "kmeans_niter": 5}
MOCO_KW = {**SIMCLR_KW, "queue_length": 100, "momentum": 0.99}


def _reference(anchors, candidates, pos, labels_a, labels_c, skip, strategy):
    """Loops: anchor a's candidates c (minus ``skip[a]``), positive ``pos[a]``, false negatives by label."""
    total = 0.0
    for a in range(len(anchors)):
        cands = [c for c in range(len(candidates)) if c not in skip[a]]
        s = {c: float(anchors[a] @ candidates[c]) / TAU for c in cands}
        fn = [c for c in cands if c != pos[a] and labels_a[a] >= 0 and labels_c[c] == labels_a[a]]
        if strategy == "elimination":
            den = sum(math.exp(s[c]) for c in cands if c not in fn)
            total += -s[pos[a]] + math.log(den)
        else:
            den = sum(math.exp(s[c]) for c in cands)
            ps = [pos[a], *fn]
            total += sum(-s[p] + math.log(den) for p in ps) / len(ps)
    return total / len(anchors)


@pytest.mark.parametrize("strategy", ["elimination", "attraction"])
def test_simclr_false_negatives_match_formula(strategy):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, -1, 1])
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    lab = torch.cat([labels, labels]).tolist()
    pos = [(i + 5) % 10 for i in range(10)]
    expected = _reference(z, z, pos, lab, lab, [{i} for i in range(10)], strategy)
    assert ifnd_nt_xent_loss(z1, z2, labels, TAU, strategy).item() == pytest.approx(expected, rel=1e-10)
    none = torch.full((5,), -1)
    assert ifnd_nt_xent_loss(z1, z2, none, TAU, strategy).item() == pytest.approx(nt_xent_loss(z1, z2, TAU).item(),
                                                                               rel=1e-10)


@pytest.mark.parametrize("strategy", ["elimination", "attraction"])
def test_moco_false_negatives_match_formula(strategy):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    queue = F.normalize(torch.randn(6, 3, generator=g, dtype=torch.float64), dim=1)
    labels, queue_labels = torch.tensor([2, 0, -1, 2]), torch.tensor([2, 2, 0, -1, 1, 0])
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    expected = 0.0
    for i in range(4):  # candidates: the key (column 0) then the queue
        cands = torch.cat([kn[i : i + 1], queue])
        expected += _reference(qn[i : i + 1], cands, [0], [int(labels[i])], [-2, *queue_labels.tolist()], [set()],
                               strategy)
    got = ifnd_moco_loss(q, k, queue, labels, queue_labels, TAU, strategy).item()
    assert got == pytest.approx(expected / 4, rel=1e-10)
    plain = ifnd_moco_loss(q, k, queue, torch.full((4,), -1), queue_labels, TAU, strategy).item()
    assert plain == pytest.approx(moco_infonce_loss(q, k, queue, TAU).item(), rel=1e-10)
    with pytest.raises(ValueError, match="strategy"):
        ifnd_moco_loss(q, k, queue, labels, queue_labels, TAU, "merge")


def test_attraction_pulls_same_cluster_embeddings_together():
    # Gradient descent on the attraction loss alone (free embeddings): it falls, and two images that share
    # a label end up closer than under plain NT-Xent from the same start.
    g = torch.Generator().manual_seed(2)
    start = torch.randn(2, 6, 4, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    out = {}
    for name, lab in (("attraction", labels), ("plain", torch.full((6,), -1))):
        z = start.clone().requires_grad_()
        opt = torch.optim.SGD([z], lr=0.5)
        first = None
        for _ in range(30):
            loss = ifnd_nt_xent_loss(z[0], z[1], lab, TAU, "attraction")
            first = loss.item() if first is None else first
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < first
        e = F.normalize(z[0].detach(), dim=1)
        out[name] = float(sum(e[2 * c] @ e[2 * c + 1] for c in range(3)) / 3)
    assert out["attraction"] > out["plain"] + 0.2, out


def test_acceptance_keeps_the_most_confident_share():
    assign = torch.tensor([0, 1, 1, 0, 2, 2])
    conf = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.5, 0.95])
    assert confident_labels(assign, conf, 0.5).tolist() == [0, -1, 1, -1, -1, 2]
    assert confident_labels(assign, conf, 0.0).tolist() == [-1] * 6
    assert torch.equal(confident_labels(assign, conf, 1.0), assign)


def test_ifnd_moco_queues_the_keys_labels(tmp_path):
    kw = {**MOCO_KW, "queue_length": 256}
    t = Trainer(tiny_cfg(method="ifnd_moco", method_kwargs=kw, max_steps=2, batch_size=64), tmp_path, progress=False)
    t.fit()
    m = t.method
    assert float(m.accepted_ratio) == 0.5 and int((m.pseudo_labels >= 0).sum()) == 721  # half of 1,442
    assert int(m.queue_ptr) == 128
    first_images = epoch_order(t.cfg.seed, 0, 1442)[:128]  # the two batches of epoch 0, in order
    assert torch.equal(m.queue_labels[:128], m.pseudo_labels[first_images])
    assert bool((m.queue_labels[128:] == -1).all())


@pytest.mark.parametrize("method,kw", [("ifnd_simclr", {**SIMCLR_KW, "strategy": "elimination"}),
                                       ("ifnd_moco", {**MOCO_KW, "strategy": "elimination"})])
def test_ifnd_lowers_loss_and_resumes_across_clustering(tmp_path, method, kw):
    if method == "ifnd_moco":  # the queue starts random: judge with the final buffers (test_moco_byol)
        check_lower_loss_same_state(tmp_path / "loss", steps=5, method=method, method_kwargs=kw)
    else:
        check_two_steps_lower_loss(tmp_path / "loss", method=method, method_kwargs=kw, lr=0.05)
    # 5 steps per epoch: cut=6 resumes after the epoch-1 clustering, with its pseudo-labels restored
    check_resume_bit_exact(tmp_path / "resume", total=8, cut=6, method=method, method_kwargs=kw, batch_size=256)
