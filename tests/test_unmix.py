"""Un-Mix (Shen et al. 2022): batch mixtures, their soft targets, and the option on SimCLR / MoCo / BYOL."""

from __future__ import annotations

import pytest
import torch

from train.methods.unmix import _beta, mix_batch, soft_mixture_loss, unmix_mode

from .method_checks import check_resume_bit_exact, check_two_steps_lower_loss

SMALL = {"proj_hidden_dim": 32, "proj_dim": 16}


def test_global_mixture_is_the_convex_combination_with_the_reversed_batch():
    x = torch.rand(5, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    mix = mix_batch(x, torch.Generator().manual_seed(1), "global")
    lam = float(torch.rand((), generator=torch.Generator().manual_seed(1)))  # Beta(1,1) = one uniform
    assert mix.lam == pytest.approx(lam)
    for i in range(5):
        torch.testing.assert_close(mix.images[i], lam * x[i] + (1 - lam) * x[4 - i])


def test_region_mixture_pastes_a_box_and_lam_is_the_area_kept():
    x = torch.stack([torch.full((3, 16, 16), float(i)) for i in range(4)])  # image i is the constant i
    for seed in range(5):
        mix = mix_batch(x, torch.Generator().manual_seed(seed), "region")
        for i in range(4):
            own = (mix.images[i] == i).all(dim=0).float().mean().item()
            partner = (mix.images[i] == 3 - i).all(dim=0).float().mean().item()
            assert own == pytest.approx(mix.lam) and own + partner == pytest.approx(1.0)
            pasted = (mix.images[i, 0] == 3 - i).nonzero()
            if pasted.numel():  # the pasted pixels form one box
                (y0, x0), (y1, x1) = pasted.min(0).values.tolist(), pasted.max(0).values.tolist()
                assert (y1 - y0 + 1) * (x1 - x0 + 1) == len(pasted)
    with pytest.raises(ValueError, match="global"):
        mix_batch(x, torch.Generator(), "patch")
    assert [unmix_mode(s) for s in range(4)] == ["global", "region", "global", "region"]


def test_soft_targets_weigh_both_sources_by_the_ratio():
    a, t = torch.randn(4, 3), torch.randn(4, 3)

    def loss(p, q):
        return ((p - q) ** 2).sum(dim=1).mean()

    by_hand = sum(0.3 * float(((a[i] - t[i]) ** 2).sum()) + 0.7 * float(((a[i] - t[3 - i]) ** 2).sum())
                  for i in range(4)) / 4
    assert soft_mixture_loss(loss, a, t, 0.3).item() == pytest.approx(by_hand, rel=1e-6)


def test_beta_sampler_has_the_beta_moments():
    gen = torch.Generator().manual_seed(0)
    for alpha in (0.5, 2.0):
        draws = torch.tensor([_beta(alpha, gen) for _ in range(3000)])
        assert draws.mean().item() == pytest.approx(0.5, abs=0.02)
        assert draws.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)  # Beta(a, a) variance
    with pytest.raises(ValueError, match="unmix_alpha"):
        _beta(0.0, gen)


@pytest.mark.parametrize("method,kw", [("simclr", SMALL), ("byol", {**SMALL, "pred_hidden_dim": 32})])
def test_unmix_option_lowers_loss(tmp_path, method, kw):
    check_two_steps_lower_loss(tmp_path, method=method, method_kwargs={**kw, "unmix": True}, lr=0.05)


def test_unmix_moco_resumes_bit_exact(tmp_path):
    check_resume_bit_exact(tmp_path, method="moco", method_kwargs={**SMALL, "queue_length": 96, "unmix": True},
                           total=4, cut=3)


@pytest.mark.parametrize("method,kw", [("simclr", SMALL), ("byol", {**SMALL, "pred_hidden_dim": 32}),
                                       ("moco", {**SMALL, "queue_length": 96})])
def test_unmix_log_columns_are_the_mixture_term_and_its_ratio(tmp_path, method, kw):
    """The logged ``unmix_loss`` is the step's loss minus the same step without the mixture (same views,
    eval-mode BN), ``unmix_lam`` is the ratio that step drew and ``unmix_region`` its mode."""
    from train.trainer import Trainer

    from .method_checks import tiny_cfg

    trainer = Trainer(tiny_cfg(method=method, method_kwargs={**kw, "unmix": True}, max_steps=2), tmp_path,
                      progress=False)
    trainer.method.on_train_start(trainer.context(0))
    trainer.method.eval()
    indices = torch.arange(16)
    images = trainer.data.batch(indices)
    for step in (0, 1):
        ctx = trainer.context(0)
        ctx.step = step
        with torch.no_grad():
            ctx.generator = torch.Generator().manual_seed(7)
            mixed = trainer.method.training_step(images, indices, ctx)
            trainer.method.unmix = False
            ctx.generator = torch.Generator().manual_seed(7)
            plain = trainer.method.training_step(images, indices, ctx)
            trainer.method.unmix = True
        assert float(mixed["unmix_loss"]) == pytest.approx(float(mixed["loss"] - plain["loss"]), rel=1e-5)
        assert float(mixed["unmix_loss"]) > 0 and 0 <= mixed["unmix_lam"] <= 1
        assert mixed["unmix_region"] == float(unmix_mode(step) == "region")
        assert set(plain) == {"loss"}
