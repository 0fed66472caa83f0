"""CARL (online prototypes, consistent assignment) and UIC (classification on its own argmax labels)."""

from __future__ import annotations

import math

import pytest
import torch

from train.clustering import _prepare
from train.methods.carl import CARL, carl_consistency_loss, carl_loss, uniform_usage_loss
from train.methods.uic import uic_loss
from train.trainer import Trainer
from zoo.model import ZooModel

from .method_checks import check_resume_bit_exact, check_two_steps_lower_loss, tiny_cfg
from .test_moco_byol import check_lower_loss_same_state

CARL_KW = {"num_clusters": 6, "proj_dim": 16, "temperature": 0.5}
UIC_KW = {"num_clusters": 6}


def _probs(b: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(b, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).softmax(dim=1)


# -- CARL ------------------------------------------------------------------------------------
def test_carl_losses_match_formula():
    p1, p2, t1, t2 = (_probs(5, 4, s) for s in range(4))
    agree = [sum(float(p1[i, k] * t2[i, k]) for k in range(4)) for i in range(5)]
    assert carl_consistency_loss(p1, t2).item() == pytest.approx(-sum(math.log(a) for a in agree) / 5, rel=1e-12)
    pbar = [sum(float(p1[i, k]) for i in range(5)) / 5 for k in range(4)]
    kl = sum(q * math.log(4 * q) for q in pbar)
    assert uniform_usage_loss(p1).item() == pytest.approx(kl, rel=1e-12)
    total = 0.5 * (carl_consistency_loss(p1, t2) + carl_consistency_loss(p2, t1)) \
        + 0.7 * 0.5 * (uniform_usage_loss(p1) + uniform_usage_loss(p2))
    assert carl_loss(p1, p2, t1, t2, 0.7).item() == pytest.approx(total.item(), rel=1e-12)
    # Worked numbers: uniform views agree with probability 1/K; one prototype for all costs log K of usage.
    u = torch.full((3, 4), 0.25, dtype=torch.float64)
    assert carl_consistency_loss(u, u).item() == pytest.approx(math.log(4), abs=1e-12)
    assert uniform_usage_loss(u).item() == pytest.approx(0.0, abs=1e-12)
    collapsed = torch.zeros(3, 4, dtype=torch.float64)
    collapsed[:, 2] = 1
    assert carl_consistency_loss(collapsed, collapsed).item() == pytest.approx(0.0, abs=1e-12)
    assert uniform_usage_loss(collapsed).item() == pytest.approx(math.log(4), abs=1e-6)
    pg, tg = p1.clone().requires_grad_(), t2.clone().requires_grad_()
    carl_consistency_loss(pg, tg).backward()
    assert pg.grad is not None and tg.grad is None  # the target view gets no gradient


def test_carl_exports_its_prototypes_as_an_exact_cluster_head():
    carl = CARL(ZooModel("convnet_tiny", {"widths": [8, 16]}), **CARL_KW).eval()
    x = torch.rand(4, 3, 8, 8)
    expected = carl.probabilities(carl.model.forward_features(x))
    model = carl.export()
    assert model.num_clusters == 6 and model.pretrained_cfg["num_clusters"] == 6
    torch.testing.assert_close(model.predict_cluster(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="proj_layers"):
        CARL(ZooModel("convnet_tiny", {"widths": [8, 16]}), proj_layers=2, **CARL_KW).export()


def test_carl_lowers_loss_and_resumes_bit_exact(tmp_path):
    check_lower_loss_same_state(tmp_path / "loss", steps=3, method="carl", method_kwargs=CARL_KW)
    check_resume_bit_exact(tmp_path / "resume", method="carl", method_kwargs=CARL_KW)


# -- UIC -------------------------------------------------------------------------------------
FROZEN_KW = {**CARL_KW, "proj_dim": 16, "update_backbone": False, "feature_bank_views": 3, "num_heads": 3,
             "proj_init": "identity"}  # convnet_tiny widths [8, 16]: 16 features


def test_carl_frozen_bank_heads_train_and_resume_bit_exact(tmp_path):
    """Frozen backbone + feature bank + 3 heads: the backbone never moves, the heads learn, a resume that
    crosses an epoch boundary (where the best head is chosen) is bit-exact."""
    trainer = Trainer(tiny_cfg(method="carl", method_kwargs=FROZEN_KW, batch_size=256, max_steps=9), tmp_path / "a",
                      progress=False)
    carl = trainer.method
    backbone = {k: v.clone() for k, v in carl.model.backbone.state_dict().items()}
    assert not any(p.requires_grad for p in carl.model.backbone.parameters())
    torch.testing.assert_close(carl.projectors[0].weight, torch.eye(16), rtol=0, atol=0)
    heads_before = [w.detach().clone() for w in carl.prototypes.parameters()]
    trainer.fit()
    for k, v in carl.model.backbone.state_dict().items():
        torch.testing.assert_close(v, backbone[k], rtol=0, atol=0, msg=k)
    assert all(not torch.equal(a, b) for a, b in zip(heads_before, carl.prototypes.parameters()))
    assert carl.feature_bank.shape == (3, len(trainer.data), 16)
    assert "feature_bank" not in carl.state_dict()  # rebuilt from the seed, not checkpointed
    # the best head is the argmin of the per-head mean loss of the epoch (written out from the log)
    last_epoch = [h for h in trainer.history if h["epoch"] == trainer.history[-1]["epoch"]]
    means = [sum(h[f"loss_head{i}"] for h in last_epoch) / len(last_epoch) for i in range(3)]
    model = carl.export()
    assert int(model.cluster_head.best_head) == min(range(3), key=means.__getitem__)
    x = torch.rand(4, 3, 8, 8)
    model.eval()
    for h in range(3):
        expected = carl.probabilities(model.forward_features(x), h)
        torch.testing.assert_close(model.cluster_head.heads[h](model.forward_features(x)).softmax(1), expected,
                                   rtol=1e-5, atol=1e-6)
    check_resume_bit_exact(tmp_path / "resume", total=9, cut=5, method="carl", method_kwargs=FROZEN_KW,
                           batch_size=256)


def test_carl_feature_bank_holds_the_frozen_features_of_augmented_views(tmp_path):
    # With an augmentation that changes nothing, every bank view is the encoder's plain feature of the image.
    identity_aug = {"hflip": 0.0, "scale": [1.0, 1.0], "ratio": [1.0, 1.0], "rotation": 0.0, "jitter_p": 0.0,
                    "gray_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}
    trainer = Trainer(tiny_cfg(method="carl", method_kwargs=FROZEN_KW, augment=identity_aug, max_steps=1), tmp_path,
                      progress=False)
    carl = trainer.method
    carl.on_train_start(trainer.context(0))
    idx = torch.arange(0, len(trainer.data), 97)
    x = _prepare(trainer.data.batch(idx), trainer.context(0))
    with torch.no_grad():
        plain = carl.model.eval().forward_features(x)
    for v in range(3):
        torch.testing.assert_close(carl.feature_bank[v, idx], plain, rtol=1e-5, atol=1e-5)
    # the default augmentation gives three different views of each image
    trainer = Trainer(tiny_cfg(method="carl", method_kwargs=FROZEN_KW, max_steps=1), tmp_path / "b", progress=False)
    trainer.method.on_train_start(trainer.context(0))
    bank = trainer.method.feature_bank
    assert not torch.allclose(bank[0], bank[1]) and not torch.allclose(bank[1], bank[2])


def test_carl_rejects_bad_options():
    with pytest.raises(ValueError, match="update_backbone=False"):
        CARL(ZooModel("convnet_tiny", {"widths": [8, 16]}), feature_bank_views=3, **CARL_KW)
    with pytest.raises(ValueError, match="proj_dim=16"):
        CARL(ZooModel("convnet_tiny", {"widths": [8, 16]}), **{**CARL_KW, "proj_dim": 8}, proj_init="identity")
    with pytest.raises(ValueError, match="proj_init"):
        CARL(ZooModel("convnet_tiny", {"widths": [8, 16]}), proj_init="eye", **CARL_KW)
    with pytest.raises(ValueError, match="num_heads"):
        CARL(ZooModel("convnet_tiny", {"widths": [8, 16]}), num_heads=0, **CARL_KW)


def test_uic_loss_matches_formula():
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 2, 2, 1, 0])
    expected = sum(-float(logits[i, y[i]]) + math.log(sum(math.exp(float(v)) for v in logits[i]))
                   for i in range(5)) / 5
    assert uic_loss(logits, y).item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(RuntimeError, match="pseudo-labels"):
        uic_loss(logits, torch.tensor([0, -1, 2, 1, 0]))


def test_uic_labels_are_the_classifiers_argmax_and_sampling_is_balanced(tmp_path):
    trainer = Trainer(tiny_cfg(method="uic", method_kwargs=UIC_KW, max_steps=6, batch_size=256), tmp_path,
                      progress=False)
    method = trainer.method
    trainer.fit()  # 5 steps per epoch: epoch 1 relabelled with the network epoch 0 left
    assert int(method.labelled_epoch) == 1
    # Independent: the head's argmax on every un-augmented training image, in eval mode.
    method.eval()
    with torch.no_grad():
        x = _prepare(trainer.data.batch(torch.arange(len(trainer.data))), trainer.context(0))
        argmax = method.model.cluster_head(method.model.forward_features(x)).argmax(dim=1)
    method.train()
    before = method.pseudo_labels.clone()
    method.on_epoch_start(trainer.context(2))
    assert torch.equal(method.pseudo_labels, argmax)
    assert -1.0 <= float(method.label_change_nmi) <= 1.0 and int(method.labelled_epoch) == 2
    assert before.shape == argmax.shape
    order = method.sample_order(2, trainer.cfg.seed, len(trainer.data))
    counts = torch.bincount(method.pseudo_labels[order], minlength=6)
    used = counts[counts > 0]
    assert int(used.max() - used.min()) <= 1  # every pseudo-class present gets the same share
    exported = method.export()
    assert exported.has_cluster_head and exported.num_clusters == 6


def test_uic_lowers_loss(tmp_path):
    check_two_steps_lower_loss(tmp_path, method="uic", method_kwargs=UIC_KW)


@pytest.mark.parametrize("cut", [3, 6])
def test_uic_resume_bit_exact_across_relabelling(tmp_path, cut):
    # 5 steps per epoch: cut=3 resumes before the epoch-1 relabelling, cut=6 after it.
    check_resume_bit_exact(tmp_path, total=8, cut=cut, method="uic", method_kwargs=UIC_KW, batch_size=256)
