"""DCL/DCLW, NNCLR, MoCHi, SupCon, PaCo/GPaCo, BCL and the supervised baseline.

Each loss is checked against the formula written out with loops (or a worked number); each method
lowers its loss in a few steps on `digits` and resumes bit-exact from a mid-run checkpoint.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.methods.base import StepContext
from train.methods.bcl import bcl_loss
from train.methods.dcl import dcl_loss, vmf_weights
from train.methods.mochi import mix_hard_negatives, mochi_infonce_loss
from train.methods.moco import moco_infonce_loss
from train.methods.nnclr import NNCLR, nearest_neighbour, nnclr_loss
from train.methods.paco import PaCo, paco_loss
from train.methods.simclr import nt_xent_loss
from train.methods.supcon import supcon_loss
from train.methods.supervised import log_class_prior, logit_adjusted_cross_entropy
from train.trainer import Trainer
from zoo.model import ZooModel

from .method_checks import check_resume_bit_exact, check_two_steps_lower_loss, tiny_cfg
from .test_moco_byol import check_lower_loss_same_state

TAU = 0.5


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=1)


def tiny_model() -> ZooModel:
    return ZooModel("convnet_tiny", {"widths": [8, 16]})


# -- DCL / DCLW ------------------------------------------------------------------------------
def dcl_by_loops(z1: torch.Tensor, z2: torch.Tensor, tau: float, sigma: float | None) -> float:
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    b = z1.shape[0]
    total = 0.0
    for a, p in ((z1, z2), (z2, z1)):
        s = [float(a[i] @ p[i]) for i in range(b)]
        mean_e = sum(math.exp(v / sigma) for v in s) / b if sigma else 1.0
        for i in range(b):
            w = 2 - math.exp(s[i] / sigma) / mean_e if sigma else 1.0
            negatives = [float(a[i] @ a[j]) for j in range(b) if j != i] + [float(a[i] @ p[j]) for j in range(b) if j != i]
            total += -w * s[i] / tau + math.log(sum(math.exp(v / tau) for v in negatives))
    return total / (2 * b)


def test_dcl_and_dclw_match_formula():
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    assert dcl_loss(z1, z2, TAU).item() == pytest.approx(dcl_by_loops(z1, z2, TAU, None), rel=1e-10)
    assert dcl_loss(z1, z2, TAU, weighted=True, sigma=0.5).item() == pytest.approx(
        dcl_by_loops(z1, z2, TAU, 0.5), rel=1e-10)
    # Worked number: two orthogonal images, identical views, tau = 1: every anchor has its positive at
    # similarity 1 and two negatives at 0, so L = -1 + log(e^0 + e^0) = log 2 - 1 (DCLW: all w_i = 1).
    e = unit([1, 0], [0, 1])
    assert dcl_loss(e, e, 1.0).item() == pytest.approx(math.log(2) - 1, abs=1e-12)
    assert dcl_loss(e, e, 1.0, weighted=True).item() == pytest.approx(math.log(2) - 1, abs=1e-12)
    # NT-Xent is the same expression with the positive back in the denominator: -1 + log(e + 2).
    assert nt_xent_loss(e, e, 1.0).item() == pytest.approx(math.log(math.e + 2) - 1, abs=1e-12)
    w = vmf_weights(unit([1, 0], [0, 1], [1, 1]), unit([1, 0], [1, 1], [-1, 1]), sigma=0.5)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-12) and w[0] < w[1] < w[2]  # closer pairs weigh less


# -- NNCLR -----------------------------------------------------------------------------------
def test_nnclr_nearest_neighbour_is_by_cosine():
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 4.0]])  # row 3 is long: dot != cosine
    z = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.5, 0.55], [-2.0, 0.1]])
    nn, idx = nearest_neighbour(z, support)
    # cos(z0, row0) = 0.994 > cos(z0, row3) = 0.68, though z0 . row3 = 3.1 > z0 . row0 = 0.9.
    assert idx.tolist() == [0, 1, 3, 2]
    assert torch.equal(nn, support[[0, 1, 3, 2]])  # the support rows themselves, unnormalised
    with pytest.raises(ValueError, match="empty"):
        nearest_neighbour(z, support[:0])


def test_nnclr_loss_matches_formula():
    torch.manual_seed(1)
    nn, p = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    total = 0.0
    for i in range(3):
        logits = [float(F.normalize(nn[i], dim=0) @ F.normalize(p[k], dim=0)) / TAU for k in range(3)]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    assert nnclr_loss(nn, p, TAU).item() == pytest.approx(total / 3, rel=1e-10)
    nng, pg = nn.clone().requires_grad_(), p.clone().requires_grad_()
    nnclr_loss(nng, pg, TAU).backward()
    assert nng.grad is None and pg.grad is not None  # no gradient into the neighbours


def test_nnclr_support_queue_fills_fifo_and_feeds_the_loss():
    nnclr = NNCLR(tiny_model(), proj_hidden_dim=8, proj_dim=2, pred_hidden_dim=8, queue_length=3)
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert torch.equal(nnclr.support_neighbours(z), z)  # empty support set: its own neighbour
    nnclr.enqueue(torch.tensor([[1.0, 1.0], [0.0, 5.0]]))
    assert int(nnclr.queue_filled) == 2 and int(nnclr.queue_ptr) == 2
    torch.testing.assert_close(nnclr.support_neighbours(z), unit([1, 1], [0, 1]).float())
    nnclr.enqueue(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # slot 2, then wraps to slot 0
    assert int(nnclr.queue_filled) == 3 and int(nnclr.queue_ptr) == 1
    torch.testing.assert_close(nnclr.queue, unit([-1, 0], [0, 1], [1, 0]).float())
    assert {"queue", "queue_ptr", "queue_filled"} <= set(nnclr.state_dict())  # saved with a checkpoint


# -- MoCHi -----------------------------------------------------------------------------------
def test_mochi_synthetic_negatives_mix_the_hardest():
    torch.manual_seed(2)
    q = torch.randn(3, 4, dtype=torch.float64)
    queue = F.normalize(torch.randn(10, 4, dtype=torch.float64), dim=1)
    n, s, s2 = 4, 6, 5
    mixed = mix_hard_negatives(q, queue, n, s, s2, torch.Generator().manual_seed(0))
    assert mixed.negatives.shape == (3, s + s2, 4) and mixed.pairs.shape == (3, s, 2)
    assert not mixed.negatives.requires_grad
    torch.testing.assert_close(mixed.negatives.norm(dim=2), torch.ones(3, s + s2, dtype=torch.float64))
    qn = F.normalize(q, dim=1)
    for b in range(3):
        sims = [(float(qn[b] @ queue[j]), j) for j in range(10)]
        hardest = [j for _, j in sorted(sims, reverse=True)[:n]]  # the N most similar queue rows
        assert mixed.hardest[b].tolist() == hardest
        for k in range(s):  # convex combination of two of the hardest, then normalised
            i, j = (hardest[int(t)] for t in mixed.pairs[b, k])
            a = float(mixed.alpha[b, k])
            assert 0 <= a < 1
            h = a * queue[i] + (1 - a) * queue[j]
            torch.testing.assert_close(mixed.negatives[b, k], h / h.norm())
        for k in range(s2):  # the query mixed into one of the hardest, the query's weight below 1/2
            j = hardest[int(mixed.partners[b, k])]
            beta = float(mixed.beta[b, k])
            assert 0 <= beta < 0.5
            h = beta * qn[b] + (1 - beta) * queue[j]
            torch.testing.assert_close(mixed.negatives[b, s + k], h / h.norm())
    # Same generator state, same points (resume); N larger than the queue is clipped.
    again = mix_hard_negatives(q, queue, n, s, s2, torch.Generator().manual_seed(0))
    assert torch.equal(again.negatives, mixed.negatives)
    assert mix_hard_negatives(q, queue, 50, 2, 0, torch.Generator()).hardest.shape == (3, 10)


def test_mochi_loss_adds_synthetic_negatives_per_query():
    torch.manual_seed(3)
    q, k = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    queue = F.normalize(torch.randn(4, 3, dtype=torch.float64), dim=1)
    syn = F.normalize(torch.randn(2, 3, 3, dtype=torch.float64), dim=2)
    total = 0.0
    for i in range(2):
        qi, ki = q[i] / q[i].norm(), k[i] / k[i].norm()
        logits = [float(qi @ ki)] + [float(qi @ n) for n in queue] + [float(qi @ h) for h in syn[i]]
        total += -logits[0] / TAU + math.log(sum(math.exp(v / TAU) for v in logits))
    assert mochi_infonce_loss(q, k, queue, syn, TAU).item() == pytest.approx(total / 2, rel=1e-10)
    no_syn = syn[:, :0]
    assert mochi_infonce_loss(q, k, queue, no_syn, TAU).item() == pytest.approx(
        moco_infonce_loss(q, k, queue, TAU).item(), rel=1e-12)


# -- SupCon ----------------------------------------------------------------------------------
def supcon_by_loops(z: torch.Tensor, labels: list[int], tau: float) -> float:
    z = F.normalize(z, dim=1)
    n, losses = len(labels), []
    for i in range(n):
        pos = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        log_den = math.log(sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(n) if a != i))
        losses.append(-sum(float(z[i] @ z[p]) / tau - log_den for p in pos) / len(pos))
    return sum(losses) / len(losses)


def test_supcon_matches_formula_and_reduces_to_nt_xent():
    torch.manual_seed(4)
    z = torch.randn(6, 4, dtype=torch.float64)
    labels = [0, 1, 0, 2, 1, 0]
    assert supcon_loss(z, torch.tensor(labels), TAU).item() == pytest.approx(supcon_by_loops(z, labels, TAU),
                                                                             rel=1e-10)
    # An anchor whose label nobody else has is left out of the mean.
    lone = [0, 1, 0, 2, 1, 3]
    assert supcon_loss(z, torch.tensor(lone), TAU).item() == pytest.approx(supcon_by_loops(z, lone, TAU), rel=1e-10)
    # All labels distinct (only the two views of an image share one): exactly SimCLR's NT-Xent.
    z1, z2 = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    ids = torch.arange(5)
    assert supcon_loss(torch.cat([z1, z2]), torch.cat([ids, ids]), TAU).item() == pytest.approx(
        nt_xent_loss(z1, z2, TAU).item(), rel=1e-12)
    with pytest.raises(ValueError, match="positive"):
        supcon_loss(z[:3], torch.tensor([0, 1, 2]), TAU)


# -- PaCo ------------------------------------------------------------------------------------
def paco_by_loops(f, labels, centre, n, tau, alpha, beta, gamma, smooth) -> float:
    m, c = f.shape[0], centre.shape[1]
    total = 0.0
    for i in range(n):
        sims = {k: float(f[i] @ f[k]) / tau for k in range(m) if k != i}
        den = sum(math.exp(float(v)) for v in centre[i]) + gamma * sum(math.exp(v) for v in sims.values())
        weighted, weights = 0.0, 0.0
        for j in range(c):
            w = beta * ((1 - smooth) if j == labels[i] else smooth / (c - 1))
            weighted += w * (float(centre[i, j]) - math.log(den))
            weights += w
        for k, v in sims.items():
            if labels[k] == labels[i]:
                weighted += alpha * (v - math.log(den))
                weights += alpha
        total += -weighted / weights
    return total / n


def test_paco_loss_matches_formula():
    torch.manual_seed(5)
    f = F.normalize(torch.randn(7, 3, dtype=torch.float64), dim=1)
    labels = [0, 2, 1, 0, 2, 2, 1]
    centre = torch.randn(3, 3, dtype=torch.float64)
    for alpha, beta, gamma, smooth in [(0.05, 1.0, 1.0, 0.0), (0.3, 0.7, 0.5, 0.1), (1.0, 1.0, 0.0, 0.2)]:
        got = paco_loss(f, torch.tensor(labels), centre, 3, TAU, alpha, beta, gamma, 1.0, smooth).item()
        assert got == pytest.approx(paco_by_loops(f, labels, centre, 3, TAU, alpha, beta, gamma, smooth), rel=1e-10)
    # Without sample positives (alpha 0) and without samples in the denominator (gamma 0), PaCo is the
    # cross entropy of the classifier logits: the class centres are the classifier.
    ce = F.cross_entropy(centre, torch.tensor(labels[:3])).item()
    assert paco_loss(f, torch.tensor(labels), centre, 3, TAU, alpha=0.0, gamma=0.0).item() == pytest.approx(ce)


def test_paco_queue_keeps_labels_with_keys():
    paco = PaCo(tiny_model(), num_classes=3, proj_hidden_dim=8, proj_dim=2, queue_length=3)
    paco.enqueue(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([2, 1]))
    paco.enqueue(torch.tensor([[3.0, 3.0], [4.0, 4.0]]), torch.tensor([0, 2]))  # slot 2, then slot 0
    assert torch.equal(paco.queue, torch.tensor([[4.0, 4.0], [0.0, 1.0], [3.0, 3.0]]))
    assert paco.queue_labels.tolist() == [2, 1, 0] and int(paco.queue_filled) == 3 and int(paco.queue_ptr) == 1
    paco.enqueue(torch.arange(10.0).view(5, 2), torch.arange(5))  # longer than the queue: newest 3 survive
    # Written one at a time from slot 1: 0->1, 1->2, 2->0, 3->1, 4->2.
    assert paco.queue_labels.tolist() == [2, 3, 4] and int(paco.queue_ptr) == 0


# -- BCL -------------------------------------------------------------------------------------
def bcl_by_loops(z, labels, protos, tau) -> float:
    items = [(z[k], labels[k]) for k in range(len(labels))] + [(protos[c], c) for c in range(protos.shape[0])]
    total = 0.0
    for i in range(len(labels)):
        others = [(v, y) for k, (v, y) in enumerate(items) if k != i]
        count = {c: sum(1 for _, y in others if y == c) for c in range(protos.shape[0])}
        den = sum(math.exp(float(z[i] @ v) / tau) / count[y] for v, y in others)
        pos = [float(z[i] @ v) / tau for v, y in others if y == labels[i]]
        total += -sum(p - math.log(den) for p in pos) / len(pos)
    return total / len(labels)


def test_bcl_loss_matches_formula():
    torch.manual_seed(6)
    z = F.normalize(torch.randn(6, 3, dtype=torch.float64), dim=1)
    protos = F.normalize(torch.randn(4, 3, dtype=torch.float64), dim=1)
    labels = [0, 0, 1, 0, 1, 3]  # class 2 is absent from the batch: only its prototype represents it
    assert bcl_loss(z, torch.tensor(labels), protos, TAU).item() == pytest.approx(
        bcl_by_loops(z, labels, protos, TAU), rel=1e-10)
    # Worked number: two identical views e1 of class 0, prototypes e1 (class 0) and e2 (class 1), tau 1.
    # Denominator (e + e)/2 + e^0/1 = e + 1, both positives at e: L = log(1 + 1/e).
    e = unit([1, 0], [1, 0])
    assert bcl_loss(e, torch.tensor([0, 0]), unit([1, 0], [0, 1]), 1.0).item() == pytest.approx(
        math.log(1 + 1 / math.e), abs=1e-12)


# -- supervised / logit adjustment -----------------------------------------------------------
def test_logit_adjusted_cross_entropy():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    counts = torch.tensor([6, 3, 1])
    prior = log_class_prior(counts)
    torch.testing.assert_close(prior, torch.log(torch.tensor([0.6, 0.3, 0.1], dtype=torch.float32)))
    y = torch.tensor([2, 1])
    manual = 0.0
    for i in range(2):
        adj = [float(logits[i, c]) + math.log(counts[c] / 10) for c in range(3)]
        manual += -adj[y[i]] + math.log(sum(math.exp(a) for a in adj))
    assert logit_adjusted_cross_entropy(logits, y, prior).item() == pytest.approx(manual / 2, rel=1e-6)
    assert logit_adjusted_cross_entropy(logits, y, prior, tau=0).item() == pytest.approx(
        F.cross_entropy(logits, y).item())
    torch.testing.assert_close(log_class_prior(torch.zeros(4)), torch.full((4,), -math.log(4)))


# -- labels reach the methods ----------------------------------------------------------------
def test_trainer_gives_labels_and_num_classes(tmp_path):
    trainer = Trainer(tiny_cfg(method="paco", method_kwargs={"proj_hidden_dim": 8, "proj_dim": 4}), tmp_path,
                      progress=False)
    targets = trainer.data.dataset.targets
    assert trainer.method.num_classes == 10  # filled from the dataset
    idx = torch.tensor([5, 0, 77])
    assert trainer.context(0).labels(idx).tolist() == targets[[5, 0, 77]].tolist()
    trainer.method.on_train_start(trainer.context(0))
    assert trainer.method.class_counts.tolist() == np.bincount(targets, minlength=10).tolist()


@pytest.mark.parametrize("method", ["supcon", "paco", "bcl", "supervised"])
def test_supervised_methods_refuse_unlabelled_data(method, tmp_path):
    trainer = Trainer(tiny_cfg(method=method, method_kwargs={"num_classes": 10} if method != "supcon" else {}),
                      tmp_path, progress=False)
    trainer.data.dataset.targets = np.full(len(trainer.data), -1)  # as imagefolder / stl10 unlabeled
    trainer.targets = trainer.training_targets()
    assert trainer.targets is None and trainer.context(0).labels is None
    with pytest.raises(ValueError, match="label"):
        trainer.fit()
    ctx = StepContext(augment=trainer.augment, generator=torch.Generator(), dataset_size=4)
    with pytest.raises(ValueError, match="needs labelled"):
        trainer.method.training_step(trainer.data.batch(torch.arange(4)), torch.arange(4), ctx)


# -- every method: a few steps lower the loss, a mid-run checkpoint resumes bit-exact --------
SMALL = {"proj_hidden_dim": 32, "proj_dim": 16}
# case -> (method, kwargs, steps and lr of the loss check). With this 16-feature backbone the eval-mode
# loss moves little in a few steps (BN running statistics move too); these settings lower it reliably.
CASES = {
    "dcl": ("dcl", {**SMALL, "temperature": 0.5}, 5, 0.05),
    "dclw": ("dcl", {**SMALL, "temperature": 0.5, "weighted": True}, 5, 0.05),
    "nnclr": ("nnclr", {**SMALL, "pred_hidden_dim": 32, "queue_length": 100}, 3, 0.01),
    "mochi": ("mochi", {**SMALL, "queue_length": 100, "momentum": 0.99, "num_hardest": 16, "num_synthetic": 16,
                        "num_query_mix": 8, "symmetric": True}, 3, 0.01),
    "supcon": ("supcon", SMALL, 2, 0.01),
    "paco": ("paco", {**SMALL, "queue_length": 100, "momentum": 0.99, "temperature": 0.2}, 3, 0.05),
    "gpaco": ("paco", {**SMALL, "gpaco": True, "queue_length": 0, "smooth": 0.1, "temperature": 0.2}, 3, 0.03),
    "bcl": ("bcl", SMALL, 2, 0.01),
    "supervised": ("supervised", {}, 2, 0.01),
}
# Methods whose loss also depends on buffers that training fills (queues): compare before/after with the
# same final buffers (see check_lower_loss_same_state).
QUEUED = {"nnclr", "mochi", "paco"}


@pytest.mark.parametrize("case", list(CASES))
def test_method_lowers_loss_and_resumes_bit_exact(case, tmp_path):
    method, kwargs, steps, lr = CASES[case]
    check = check_lower_loss_same_state if case in QUEUED else check_two_steps_lower_loss
    check(tmp_path / "loss", steps=steps, lr=lr, method=method, method_kwargs=kwargs)
    check_resume_bit_exact(tmp_path / "resume", total=4, cut=2, batch_size=32, method=method, method_kwargs=kwargs)
