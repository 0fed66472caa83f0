"""Boosted contrastive learning (train/methods/boosted.py): memorisation-driven augmentation on SimCLR."""

import math

import pytest
import torch
import torch.nn.functional as F

from train.methods.boosted import BoostedSimCLR, boost_views, memorisation_strength, nt_xent_per_sample
from train.methods.simclr import nt_xent_loss
from train.trainer import Trainer
from zoo.model import ZooModel

from .method_checks import check_resume_bit_exact, check_two_steps_lower_loss, tiny_cfg

SMALL = {"proj_hidden_dim": 32, "proj_dim": 16, "memo_momentum": 0.5}


def test_per_sample_nt_xent_by_loops_and_its_mean_is_simclr():
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    tau = 0.5
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    expected = []
    for i in range(4):
        terms = []
        for a, p in ((i, i + 4), (i + 4, i)):
            den = sum(math.exp(float(z[a] @ z[k]) / tau) for k in range(8) if k != a)
            terms.append(-float(z[a] @ z[p]) / tau + math.log(den))
        expected.append(sum(terms) / 2)
    got = nt_xent_per_sample(z1, z2, tau)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert got.mean().item() == pytest.approx(nt_xent_loss(z1, z2, tau).item(), rel=1e-12)


def test_memorisation_is_a_momentum_loss_and_strength_its_min_max():
    m = BoostedSimCLR(ZooModel("convnet_tiny", {"widths": [8, 16]}), proj_hidden_dim=8, proj_dim=4, memo_momentum=0.75)
    m._resize(5)
    m.record(torch.tensor([0, 2, 3]), torch.tensor([1.0, 2.0, 4.0]))
    m.record(torch.tensor([2, 4]), torch.tensor([6.0, 3.0]))
    torch.testing.assert_close(m.memo_loss, torch.tensor([1.0, 0.0, 0.75 * 2 + 0.25 * 6, 4.0, 3.0]))
    assert m.memo_seen.tolist() == [True, False, True, True, True]
    # seen values 1, 3, 4, 3 -> (v - 1) / 3; the unseen image gets 0
    torch.testing.assert_close(memorisation_strength(m.memo_loss, m.memo_seen), torch.tensor([0, 0, 2 / 3, 1, 2 / 3]))
    assert memorisation_strength(torch.ones(3), torch.ones(3, dtype=torch.bool)).tolist() == [0, 0, 0]


def test_boost_is_off_at_zero_strength_and_all_on_at_full_strength():
    x = torch.full((3, 3, 8, 8), 0.8)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(boost_views(x, torch.zeros(3), g), x)
    out = boost_views(x, torch.ones(3), torch.Generator().manual_seed(0), cutout=0.25)
    # posterize 0.8 -> 12/15 = 0.8, solarize -> 1 - 0.8; a 2x2 gray cutout square in each image
    assert ((out == 0.5).sum(dim=(1, 2, 3)) == 3 * 4).all()
    rest = out[out != 0.5]
    torch.testing.assert_close(rest, torch.full_like(rest, 1 - 12 / 15))
    half = boost_views(x, torch.tensor([0.0, 1.0, 0.0]), torch.Generator().manual_seed(0))
    assert torch.equal(half[0], x[0]) and torch.equal(half[2], x[2]) and not torch.equal(half[1], x[1])


def test_training_fills_memorisation_and_boosts_the_hardest(tmp_path):
    trainer = Trainer(tiny_cfg(method="boosted", method_kwargs=SMALL, epochs=2, batch_size=256), tmp_path,
                      progress=False)
    n = len(trainer.data)
    trainer.fit()
    m = trainer.method
    steps_per_epoch = n // 256
    assert m.memo_loss.shape == (n,) and int(m.memo_seen.sum()) >= steps_per_epoch * 256
    # the strength of epoch 1 is the min-max of the losses recorded in epoch 0 (the hardest image gets 1)
    assert m.strength.max().item() == pytest.approx(1.0) and m.strength.min().item() == 0.0
    assert [h["mean_strength"] for h in trainer.history[:steps_per_epoch]] == [0.0] * steps_per_epoch
    assert trainer.history[-1]["mean_strength"] > 0


def test_boosted_lowers_the_loss_and_resumes_bit_exact(tmp_path):
    check_two_steps_lower_loss(tmp_path / "loss", steps=5, lr=0.05, method="boosted", method_kwargs=SMALL)
    # 2 steps per epoch: the resumed run crosses an epoch start, where the strengths are recomputed
    check_resume_bit_exact(tmp_path / "resume", total=4, cut=1, batch_size=512, method="boosted",
                           method_kwargs=SMALL)
