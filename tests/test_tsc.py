"""TSC (train/methods/tsc.py): uniform targets, Hungarian assignment, the loss against its formula."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from train.methods.tsc import TSC, assign_targets, tsc_loss, uniform_targets
from train.trainer import Trainer
from zoo.checkpoint import load_state
from zoo.model import ZooModel

from .method_checks import check_resume_bit_exact, check_two_steps_lower_loss, tiny_cfg

SMALL = {"proj_hidden_dim": 32, "proj_dim": 16, "target_steps": 100}


def test_uniform_targets_are_the_regular_simplex():
    t = uniform_targets(4, 16, seed=1)
    torch.testing.assert_close(t.norm(dim=1), torch.ones(4))
    gram = t @ t.T
    off = gram[~torch.eye(4, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1 / 3), atol=1e-4, rtol=0)  # t_i.t_j = -1/(C-1)
    ten = uniform_targets(10, 32, seed=0)
    off = (ten @ ten.T)[~torch.eye(10, dtype=torch.bool)]
    assert off.max() - off.min() < 0.01 and abs(off.mean().item() + 1 / 9) < 1e-3
    assert torch.equal(uniform_targets(4, 16, seed=1), t) and not torch.equal(uniform_targets(4, 16, seed=2), t)


def test_assignment_is_the_best_permutation():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        centres, targets = torch.randn(5, 3, generator=g), F.normalize(torch.randn(5, 3, generator=g), dim=1)
        cos = F.normalize(centres, dim=1) @ targets.T
        best = max(itertools.permutations(range(5)), key=lambda p: sum(cos[c, p[c]].item() for c in range(5)))
        assert assign_targets(centres, targets).tolist() == list(best)
    # each class goes to the target closest to it when they are already separated
    targets = torch.eye(3)
    assert assign_targets(torch.tensor([[0.0, 0.1, 2.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.2]]), targets).tolist() == [2, 0, 1]


def tsc_by_loops(z, labels, targets, assignment, tau, lam, anchors=None) -> float:
    z = F.normalize(z, dim=1)
    total = 0.0
    anchors = range(len(labels)) if anchors is None else anchors
    for i in anchors:
        den = sum(math.exp(float(z[i] @ z[j]) / tau) for j in range(len(labels)) if j != i)
        den += sum(math.exp(float(z[i] @ t) / tau) for t in targets)
        pos = [float(z[i] @ z[j]) / tau - math.log(den) for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        pos_term = sum(pos) / len(pos) if pos else 0.0
        total += -(pos_term + lam * (float(z[i] @ targets[assignment[labels[i]]]) / tau - math.log(den)))
    return total / len(anchors)


def test_tsc_loss_matches_formula():
    torch.manual_seed(3)
    z = torch.randn(7, 4, dtype=torch.float64)
    labels = [0, 1, 0, 2, 1, 0, 3]  # class 3 has a single row: only its target term
    targets = F.normalize(torch.randn(4, 4, dtype=torch.float64), dim=1)
    assignment = [2, 0, 3, 1]
    for tau, lam in [(0.5, 1.0), (0.1, 0.3), (1.0, 0.0)]:
        got = tsc_loss(z, torch.tensor(labels), targets, torch.tensor(assignment), tau, lam).item()
        assert got == pytest.approx(tsc_by_loops(z, labels, targets, assignment, tau, lam), rel=1e-10)
    # anchors: only rows 2..4 are anchors, the rest are still contrasted against
    part = tsc_loss(z, torch.tensor(labels), targets, torch.tensor(assignment), 0.5, 1.0, slice(2, 5)).item()
    assert part == pytest.approx(tsc_by_loops(z, labels, targets, assignment, 0.5, 1.0, range(2, 5)), rel=1e-10)


def test_centres_are_an_ema_of_class_means_and_drive_the_assignment():
    method = TSC(ZooModel("convnet_tiny", {"widths": [8, 16]}), num_classes=3, proj_hidden_dim=8, proj_dim=3,
                 centre_momentum=0.5)
    method.targets.copy_(torch.eye(3))
    method.update_assignment(torch.tensor([[0.0, 0.0, 2.0], [4.0, 0.0, 0.0]]), torch.tensor([0, 1]))
    torch.testing.assert_close(method.centres, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert method.assignment.tolist() == [2, 0, 1]
    method.update_assignment(torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 2]))
    # class 0: 0.5 * old + 0.5 * new mean; class 2 first seen: its mean; class 1 untouched
    torch.testing.assert_close(method.centres, torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert method.assignment.tolist() == [2, 0, 1]  # class 2 -> target 1 now fits, class 0 keeps 2


def test_targets_are_computed_once_and_saved_with_the_run(tmp_path):
    trainer = Trainer(tiny_cfg(method="tsc", method_kwargs=SMALL, max_steps=2, ckpt_every=2), tmp_path, progress=False)
    trainer.fit()
    expected = uniform_targets(10, 16, steps=100, seed=trainer.cfg.seed)
    assert torch.equal(trainer.method.targets, expected)  # the optimiser does not move them
    (ckpt,) = sorted((tmp_path / "checkpoints").glob("step_*.safetensors"))
    state = load_state(ckpt)["method"]
    assert torch.equal(state["targets"], expected)
    assert sorted(state["assignment"].tolist()) == list(range(10))  # a permutation
    with pytest.raises(ValueError, match="num_classes"):
        TSC(ZooModel("convnet_tiny", {"widths": [8, 16]}))


def test_tsc_lowers_the_loss_and_resumes_bit_exact(tmp_path):
    check_two_steps_lower_loss(tmp_path / "loss", steps=2, lr=0.01, method="tsc", method_kwargs=SMALL)
    check_resume_bit_exact(tmp_path / "resume", total=4, cut=2, batch_size=32, method="tsc", method_kwargs=SMALL)
