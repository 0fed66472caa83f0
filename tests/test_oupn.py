"""OUPN (train/methods/oupn.py): the class-blocked stream, the online prototype memory, the loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from train.methods.oupn import OUPN, class_blocked_order, oupn_loss, prototype_log_probs
from train.trainer import Trainer
from zoo.model import ZooModel

from .method_checks import check_resume_bit_exact, tiny_cfg
from .test_moco_byol import check_lower_loss_same_state

SMALL = {"proj_hidden_dim": 32, "proj_dim": 16, "max_prototypes": 20, "novelty_threshold": 0.5}


def test_stream_is_class_blocks_fixed_by_seed():
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0])
    order = class_blocked_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(7))
    assert labels[order].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert torch.equal(order, class_blocked_order(labels, seed=0))
    assert any(not torch.equal(class_blocked_order(labels, seed=s), order) for s in range(1, 5))


def test_log_probs_and_loss_match_formulas():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    z2 = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    protos = F.normalize(torch.randn(4, 4, dtype=torch.float64), dim=1)
    active = torch.tensor([True, False, True, True])
    tau, sharpen, lam = 0.3, 0.5, 0.7
    lq1, lq2 = prototype_log_probs(z, protos, active, tau), prototype_log_probs(z2, protos, active, tau)
    ks = [0, 2, 3]

    def post(v):
        e = [math.exp(-float((v - protos[k]).pow(2).sum()) / tau) for k in ks]
        return [x / sum(e) for x in e]

    q1, q2 = [post(v) for v in z], [post(v) for v in z2]
    for i in range(3):
        assert [lq1[i, k].exp().item() for k in ks] == pytest.approx(q1[i], rel=1e-12)
    assert torch.isinf(lq1[:, 1]).all()

    def sharp(q):
        s = [x ** (1 / sharpen) for x in q]
        return [x / sum(s) for x in s]

    ce = sum(-sum(a * math.log(b) for a, b in zip(sharp(q1[i]), q2[i]))
             - sum(a * math.log(b) for a, b in zip(sharp(q2[i]), q1[i])) for i in range(3)) / 3
    qbar = [sum(q[i][j] for q in (q1, q2) for i in range(3)) / 6 for j in range(3)]
    expected = 0.5 * ce - lam * -sum(p * math.log(p) for p in qbar)
    assert oupn_loss(lq1, lq2, sharpen, lam).item() == pytest.approx(expected, rel=1e-10)


def _oupn(**kw) -> OUPN:
    return OUPN(ZooModel("convnet_tiny", {"widths": [8, 16]}), proj_hidden_dim=8, **kw)


def test_novel_examples_start_prototypes_and_a_full_memory_reuses_the_least_used():
    m = _oupn(proj_dim=2, max_prototypes=2, novelty_threshold=0.5)
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.96, 0.28], [-1.0, 0.0]])
    assert m.add_novel(e[:1]) == 1 and torch.equal(m.prototypes[0], e[0]) and m.counts[0] == 1
    assert m.add_novel(e[1:3]) == 1  # e1 is novel (distance 2); e2 is 0.08 from e0: not novel
    assert m.active.tolist() == [True, True] and torch.equal(m.prototypes[1], e[1])
    m.counts.copy_(torch.tensor([5.0, 2.0]))
    assert m.add_novel(e[3:]) == 1 and torch.equal(m.prototypes[1], e[3])  # slot 1 had the smaller count


def test_memory_update_is_the_weighted_mean():
    m = _oupn(proj_dim=2, max_prototypes=3, count_decay=0.5)
    m.prototypes.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    m.counts.copy_(torch.tensor([2.0, 1.0, 0.0]))
    m.active.copy_(torch.tensor([True, True, False]))
    z = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    q = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    m.update_memory(z, q)
    p0 = F.normalize((2 * torch.tensor([1.0, 0.0]) + 0.5 * z[0] + z[1]) / 3.5, dim=0)
    p1 = F.normalize((torch.tensor([0.0, 1.0]) + 0.5 * z[0]) / 1.5, dim=0)
    torch.testing.assert_close(m.prototypes, torch.stack([p0, p1, torch.zeros(2)]))
    torch.testing.assert_close(m.counts, torch.tensor([0.5 * 2 + 1.5, 0.5 * 1 + 0.5, 0.0]))


def test_training_follows_the_stream_and_records_online_clusters(tmp_path):
    trainer = Trainer(tiny_cfg(method="oupn", method_kwargs=SMALL, epochs=1, batch_size=64, max_steps=3), tmp_path,
                      progress=False)
    seen = []
    step = trainer.method.training_step
    trainer.method.training_step = lambda x, i, c: seen.append(i.clone()) or step(x, i, c)
    trainer.fit()
    stream = class_blocked_order(trainer.targets, trainer.cfg.seed)
    assert torch.equal(torch.cat(seen), stream[:192])  # the stream, in order: class 0 first
    m = trainer.method
    assert (m.online_pred[stream[:192]] >= 0).all() and (m.online_pred[stream[192:]] == -1).all()
    assert 1 <= int(m.active.sum()) <= 20


def test_oupn_lowers_the_loss_and_resumes_bit_exact(tmp_path):
    check_lower_loss_same_state(tmp_path / "loss", steps=3, lr=0.05, method="oupn", method_kwargs=SMALL)
    check_resume_bit_exact(tmp_path / "resume", total=4, cut=2, batch_size=32, method="oupn", method_kwargs=SMALL)
    check_resume_bit_exact(tmp_path / "simclr", total=4, cut=2, batch_size=32, method="simclr_stream",
                           method_kwargs={"proj_hidden_dim": 32, "proj_dim": 16})
