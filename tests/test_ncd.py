"""Novel category discovery with adaptive prototypes (train/methods/ncd.py)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.methods.ncd import kmeanspp_init, ncd_loss, ncd_protocol
from train.trainer import Trainer

from .method_checks import check_resume_bit_exact, tiny_cfg
from .test_moco_byol import check_lower_loss_same_state

SMALL = {"proj_hidden_dim": 32, "proj_dim": 16}


def test_ncd_loss_by_loops():
    torch.manual_seed(0)
    l1, l2 = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 4, 2])  # 2 labelled classes (0, 1); rows 1, 3, 4 unlabelled
    t1 = torch.softmax(torch.randn(3, 3, dtype=torch.float64), dim=1)
    t2 = torch.softmax(torch.randn(3, 3, dtype=torch.float64), dim=1)
    terms = []
    for logits, swapped in ((l1, t2), (l2, t1)):
        u = 0
        for i in range(5):
            logp = [float(v) - math.log(sum(math.exp(float(w)) for w in logits[i])) for v in logits[i]]
            if labels[i] < 2:
                terms.append(-logp[labels[i]])
            else:
                terms.append(-sum(float(swapped[u, k]) * logp[2 + k] for k in range(3)))
                u += 1
    assert ncd_loss(l1, l2, labels, 2, t1, t2).item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)


def test_kmeanspp_picks_distinct_rows():
    x = torch.cat([torch.zeros(5, 2), torch.ones(5, 2) * 10, torch.tensor([[10.0, -10.0]] * 5)])
    seeds = kmeanspp_init(x, 3, torch.Generator().manual_seed(0))
    assert {tuple(r.tolist()) for r in seeds} == {(0.0, 0.0), (10.0, 10.0), (10.0, -10.0)}  # one per blob
    with pytest.raises(ValueError, match="at least"):
        kmeanspp_init(x[:2], 3, torch.Generator())


def test_prototypes_adapt_and_novel_labels_are_never_used(tmp_path):
    trainer = Trainer(tiny_cfg(method="ncd", method_kwargs={**SMALL, "momentum": 0.5}), tmp_path, progress=False)
    m = trainer.method
    m.novel_prototypes.copy_(torch.tensor([[1.0] + [0.0] * 15] * 5))
    z = F.normalize(torch.randn(4, 16), dim=1)
    m.update_prototypes(z, torch.tensor([0, 0, 3, 0]))
    torch.testing.assert_close(m.novel_prototypes[0], 0.5 * torch.eye(16)[0] + 0.5 * z[[0, 1, 3]].mean(0))
    torch.testing.assert_close(m.novel_prototypes[3], 0.5 * torch.eye(16)[0] + 0.5 * z[2])
    torch.testing.assert_close(m.novel_prototypes[1], torch.eye(16)[0])
    # Relabelling the novel classes among themselves changes nothing: their labels are not used.
    idx = torch.arange(64)
    images = trainer.data.batch(idx)
    losses = []
    for perm in (None, torch.tensor([0, 1, 2, 3, 4, 9, 8, 7, 6, 5])):
        m.initialised.fill_(False)
        ctx = trainer.context(0)
        ctx.generator = torch.Generator().manual_seed(1)
        if perm is not None:
            ctx.labels = lambda i, p=perm: p[trainer.batch_labels(i)]
        m.eval()
        with torch.no_grad():
            losses.append(m.training_step(images, idx, ctx)["loss"].item())
    assert losses[0] == losses[1]


def test_ncd_lowers_the_loss_resumes_bit_exact_and_reports_the_protocol(tmp_path):
    check_lower_loss_same_state(tmp_path / "loss", steps=3, lr=0.05, method="ncd", method_kwargs=SMALL)
    check_resume_bit_exact(tmp_path / "resume", total=4, cut=2, batch_size=32, method="ncd", method_kwargs=SMALL)
    trainer = Trainer(tiny_cfg(method="ncd", method_kwargs=SMALL, max_steps=2), tmp_path / "p", progress=False)
    trainer.fit()
    x = trainer.augment.cfg
    from train.augment import normalize

    images = normalize(trainer.data.batch(torch.arange(200)), x.mean, x.std)
    labels = trainer.targets[:200].numpy()
    out = ncd_protocol(trainer.method, images, labels)
    assert set(out) == {"novel_acc", "all_acc", "labelled_acc"} and all(0 <= v <= 1 for v in out.values())
    assert out["novel_acc"] >= 1 / 5 - 1e-9  # Hungarian ACC of 5 balanced-ish classes is at least chance
    assert np.isfinite(out["all_acc"])
