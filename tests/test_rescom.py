"""ResCom (train/methods/rescom.py): class-balanced queues, hard mining, the loss against its formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from train.methods.rescom import ResCom, rescom_loss
from zoo.model import ZooModel

from .method_checks import check_resume_bit_exact
from .test_moco_byol import check_lower_loss_same_state

SMALL = {"proj_hidden_dim": 32, "proj_dim": 16, "queue_per_class": 8, "hard_positives": 3, "hard_negatives": 20}


def rescom_by_loops(q, labels, keys, key_labels, own, weights, kp, kn, tau, valid) -> float:
    num, den_w = 0.0, 0.0
    for i in range(len(labels)):
        s = {j: float(q[i] @ keys[j]) / tau for j in range(len(key_labels)) if valid[j]}
        pos_c = sorted((j for j in s if key_labels[j] == labels[i] and j != own[i]), key=lambda j: s[j])[:kp]
        neg_c = sorted((j for j in s if key_labels[j] != labels[i] and j != own[i]), key=lambda j: -s[j])[:kn]
        pos = [own[i], *pos_c]
        log_den = math.log(sum(math.exp(s[j]) for j in pos + neg_c))
        loss = -sum(s[j] - log_den for j in pos) / len(pos)
        w = weights[labels[i]]
        num, den_w = num + w * loss, den_w + w
    return float(num / den_w)


def test_rescom_loss_matches_formula():
    torch.manual_seed(2)
    q = F.normalize(torch.randn(4, 5, dtype=torch.float64), dim=1)
    keys = F.normalize(torch.randn(14, 5, dtype=torch.float64), dim=1)
    labels = [0, 1, 0, 2]
    key_labels = [0, 1, 0, 2, 0, 0, 0, 1, 1, 2, 2, 2, 1, 0]
    own = [1, 0, 3, 2]  # deliberately of another class for rows 0/1: the own key is a positive regardless
    valid = [True] * 12 + [False, True]
    weights = torch.tensor([1 / 8, 1 / 4, 1.0], dtype=torch.float64)
    for kp, kn, tau in [(2, 3, 0.5), (0, 1, 0.2), (10, 100, 1.0)]:
        got = rescom_loss(q, torch.tensor(labels), keys, torch.tensor(key_labels), torch.tensor(own), weights, kp, kn,
                          tau, torch.tensor(valid)).item()
        ref = rescom_by_loops(q, labels, keys, key_labels, own, weights, kp, kn, tau, valid)
        assert got == pytest.approx(ref, rel=1e-10), (kp, kn, tau)


def test_queue_is_one_fifo_per_class():
    m = ResCom(ZooModel("convnet_tiny", {"widths": [8, 16]}), num_classes=3, proj_hidden_dim=8, proj_dim=1,
               queue_per_class=3)
    m.enqueue(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([0, 1, 0]))
    m.enqueue(torch.tensor([[4.0], [5.0], [6.0], [7.0]]), torch.tensor([0, 0, 2, 0]))
    # class 0 receives 1, 3 | 4, 5, 7: written one at a time 1->0, 3->1, 4->2, 5->0, 7->1, so slots hold [5, 7, 4]
    assert m.queue[0].flatten().tolist() == [5.0, 7.0, 4.0]
    assert m.queue_filled.tolist() == [3, 1, 1] and m.queue_ptr.tolist() == [2, 1, 1]
    m2 = ResCom(ZooModel("convnet_tiny", {"widths": [8, 16]}), num_classes=3, proj_hidden_dim=8, proj_dim=1,
                queue_per_class=3)
    for v, c in [(1, 0), (2, 1), (3, 0), (4, 0), (5, 0), (6, 2), (7, 0)]:
        m2.enqueue(torch.tensor([[float(v)]]), torch.tensor([c]))
    assert torch.equal(m2.queue, m.queue) and torch.equal(m2.queue_ptr, m.queue_ptr)  # batched == one at a time
    keys, labels, valid = m2.queue_candidates()
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and valid.tolist() == [1, 1, 1, 1, 0, 0, 1, 0, 0]
    m.class_counts.copy_(torch.tensor([100, 10, 0]))
    torch.testing.assert_close(m.class_weights(), torch.tensor([0.01, 0.1, 1.0]))


@pytest.mark.parametrize("kwargs", [SMALL, {**SMALL, "queue_per_class": 0, "beta": 0.0}], ids=["queue", "no_queue"])
def test_rescom_lowers_the_loss_and_resumes_bit_exact(kwargs, tmp_path):
    check_lower_loss_same_state(tmp_path / "loss", steps=3, lr=0.03, method="rescom", method_kwargs=kwargs)
    check_resume_bit_exact(tmp_path / "resume", total=4, cut=2, batch_size=32, method="rescom", method_kwargs=kwargs)
