"""MoCo v2 (queue, momentum key encoder, InfoNCE) and BYOL (regression loss, EMA target)."""

import math

import pytest
import torch
import torch.nn.functional as F

from train.methods.byol import BYOL, byol_loss, direct_pred_weight, ema_momentum
from train.methods.moco import MoCo, moco_infonce_loss
from train.trainer import Trainer
from zoo.model import ZooModel

from .method_checks import (
    check_resume_bit_exact,
    check_two_steps_lower_loss,
    fixed_batch_loss,
    state_of,
    tiny_cfg,
)

MOCO_KW = {"proj_hidden_dim": 32, "proj_dim": 16, "queue_length": 100, "momentum": 0.99}
BYOL_KW = {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32, "tau_base": 0.99}


def tiny_model() -> ZooModel:
    return ZooModel("convnet_tiny", {"widths": [8, 16]})


def check_lower_loss_same_state(tmp_path, steps: int, **cfg_kw) -> tuple[float, float]:
    """Like ``check_two_steps_lower_loss``, but the loss before training is evaluated after it, with the
    initial parameters and the final buffers (MoCo's queue, BN statistics), so that both numbers are the
    same function of the parameters alone.

    ``check_two_steps_lower_loss`` cannot judge MoCo: its loss also depends on the queue, which starts
    as random unit vectors (negatives that are easy to tell from the positive: a loss of about 0.9 here)
    and fills with real keys within two steps (a loss near log(1 + K) until the encoder has learned).
    """
    trainer = Trainer(tiny_cfg(max_steps=steps, **cfg_kw), tmp_path, progress=False)
    indices = torch.arange(trainer.cfg.batch_size)
    images = trainer.data.batch(indices)
    initial = {name: p.detach().clone() for name, p in trainer.method.named_parameters()}
    trainer.fit()
    after = fixed_batch_loss(trainer, images, indices)
    trainer.method.load_state_dict({**state_of(trainer), **initial})
    before = fixed_batch_loss(trainer, images, indices)
    assert after < before, f"{trainer.cfg.method}: loss {before:.5f} -> {after:.5f} did not go down"
    return before, after


# -- MoCo ------------------------------------------------------------------------------------
def test_moco_queue_is_fifo_with_wrap():
    torch.manual_seed(0)
    moco = MoCo(tiny_model(), proj_hidden_dim=8, proj_dim=2, queue_length=10)
    init = moco.queue.clone()
    assert torch.allclose(init.norm(dim=1), torch.ones(10))  # starts as random unit vectors
    assert int(moco.queue_ptr) == 0

    def batch(start: int, n: int) -> torch.Tensor:  # row i = [start+i, -(start+i)]: easy to read back
        v = torch.arange(start, start + n, dtype=torch.float32)
        return torch.stack([v, -v], dim=1)

    def rows(*values: float) -> torch.Tensor:
        v = torch.tensor(values, dtype=torch.float32)
        return torch.stack([v, -v], dim=1)

    expected = init.clone()
    moco.enqueue(batch(100, 4))  # slots 0..3
    expected[0:4] = rows(100, 101, 102, 103)
    assert int(moco.queue_ptr) == 4 and torch.equal(moco.queue, expected)

    moco.enqueue(batch(200, 4))  # slots 4..7
    expected[4:8] = rows(200, 201, 202, 203)
    assert int(moco.queue_ptr) == 8 and torch.equal(moco.queue, expected)

    moco.enqueue(batch(300, 4))  # 10 is not a multiple of 4: slots 8, 9 then wrap to 0, 1
    expected[8:10] = rows(300, 301)
    expected[0:2] = rows(302, 303)
    assert int(moco.queue_ptr) == 2 and torch.equal(moco.queue, expected)

    moco.enqueue(batch(400, 4))  # slots 2..5: overwrites the oldest keys, 102, 103, 200, 201
    expected[2:6] = rows(400, 401, 402, 403)
    assert int(moco.queue_ptr) == 6 and torch.equal(moco.queue, expected)
    assert torch.equal(moco.queue, rows(302, 303, 400, 401, 402, 403, 202, 203, 300, 301))

    # A batch longer than the queue: written one key at a time from slot 6, keys 500..511 land in
    # slots 6,7,8,9,0,...,7, so 502..511 survive and the pointer ends at (6 + 12) % 10 = 8.
    moco.enqueue(batch(500, 12))
    assert int(moco.queue_ptr) == 8
    assert torch.equal(moco.queue, rows(504, 505, 506, 507, 508, 509, 510, 511, 502, 503))


def test_moco_infonce_matches_formula():
    torch.manual_seed(1)
    q, k = torch.randn(3, 4), torch.randn(3, 4)
    queue = F.normalize(torch.randn(5, 4), dim=1)
    tau = 0.2
    total = 0.0
    for i in range(3):
        qi, ki = q[i] / q[i].norm(), k[i] / k[i].norm()
        logits = torch.cat([(qi * ki).sum().view(1), queue @ qi]) / tau  # [1+K], positive first
        total += -torch.log_softmax(logits, dim=0)[0]
    assert moco_infonce_loss(q, k, queue, tau).item() == pytest.approx(total.item() / 3, rel=1e-5)

    # Worked number: unit q = k, two orthogonal negatives: -log(e^(1/t) / (e^(1/t) + 2)).
    e = torch.tensor([[1.0, 0.0, 0.0]])
    negs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2))
    assert moco_infonce_loss(e, e, negs, tau).item() == pytest.approx(expected, rel=1e-6)

    # No gradient into keys or queue.
    qg, kg, ng = q.clone().requires_grad_(), k.clone().requires_grad_(), queue.clone().requires_grad_()
    moco_infonce_loss(qg, kg, ng, tau).backward()
    assert qg.grad is not None and kg.grad is None and ng.grad is None


def test_moco_key_encoder_gets_no_gradient_and_follows_by_momentum(tmp_path):
    trainer = Trainer(tiny_cfg(method="moco", method_kwargs=MOCO_KW, max_steps=1), tmp_path, progress=False)
    moco = trainer.method
    key_params = list(moco.key_model.parameters()) + list(moco.key_projector.parameters())
    online = [moco.model, moco.projector]
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert key_params and not any(p.requires_grad for p in key_params)
    assert not optimized & {id(p) for p in key_params}
    assert {id(p) for m in online for p in m.parameters()} <= optimized

    moco.train()
    images = trainer.data.batch(torch.arange(16))
    ptr = int(moco.queue_ptr)
    loss = moco.training_step(images, torch.arange(16), trainer.context(0))["loss"]
    assert int(moco.queue_ptr) == (ptr + 16) % 100  # train mode enqueues the keys
    loss.backward()
    assert all(p.grad is None for p in key_params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in moco.model.parameters())
    moco.zero_grad(set_to_none=True)

    moco.eval()  # evaluating the loss leaves the queue alone
    queue = moco.queue.clone()
    with torch.no_grad():
        moco.training_step(images, torch.arange(16), trainer.context(0))
    assert torch.equal(moco.queue, queue)
    moco.train()

    k_old = [p.detach().clone() for p in key_params]
    trainer.fit()  # one step
    q_new = [p.detach() for m in online for p in m.parameters()]
    m = MOCO_KW["momentum"]
    moved = False
    for k, ko, qn in zip(key_params, k_old, q_new):
        torch.testing.assert_close(k, m * ko + (1 - m) * qn, rtol=0, atol=0)
        moved |= not torch.equal(k, ko)
    assert moved, "the key encoder did not move"


def test_moco_symmetric_enqueues_both_key_batches(tmp_path):
    trainer = Trainer(tiny_cfg(method="moco", method_kwargs={**MOCO_KW, "symmetric": True, "bn_splits": 2}),
                      tmp_path, progress=False)
    moco = trainer.method.train()
    loss = moco.training_step(trainer.data.batch(torch.arange(16)), torch.arange(16), trainer.context(0))["loss"]
    assert torch.isfinite(loss) and int(moco.queue_ptr) == 32


def test_moco_lowers_loss_and_resumes_bit_exact(tmp_path):
    check_lower_loss_same_state(tmp_path / "loss", steps=5, method="moco", method_kwargs=MOCO_KW)
    check_resume_bit_exact(tmp_path / "resume", total=4, cut=2, batch_size=32, method="moco",
                           method_kwargs={**MOCO_KW, "symmetric": True, "bn_splits": 2})



def test_moco_v3_projector_options_match_formula(tmp_path):
    """``proj_batch_norm`` + ``proj_last_bn`` (MoCo v3's projector): Linear-BN-ReLU-Linear-BN(no affine),
    BN statistics per ``bn_splits`` group, checked against the formula written out here; the key head
    has the same layers, and a run with the options resumes bit-exact like the plain head's."""
    kw = {**MOCO_KW, "proj_batch_norm": True, "proj_last_bn": True, "bn_splits": 2}
    trainer = Trainer(tiny_cfg(method="moco", method_kwargs=kw, max_steps=1), tmp_path / "f", progress=False)
    moco = trainer.method.train()
    x = trainer.data.batch(torch.arange(16))
    lin1, bn1, lin2 = moco.projector.net[0], moco.projector.net[1], moco.projector.net[3]
    assert lin1.bias is None and lin2.bias is None  # BN follows both linear layers
    assert [type(m) for m in moco.key_projector.net] == [type(m) for m in moco.projector.net]

    def batch_norm(a: torch.Tensor) -> torch.Tensor:  # train-mode BN: the group's mean and biased variance
        return (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + 1e-5)

    with torch.no_grad():
        expected = []
        for c in x.chunk(2):
            h = moco.model.forward_features(c) @ lin1.weight.T
            h = torch.relu(batch_norm(h) * bn1.weight + bn1.bias)
            z = batch_norm(h @ lin2.weight.T)
            assert torch.allclose(z.mean(0), torch.zeros(z.shape[1]), atol=1e-5)  # each group centred
            expected.append(F.normalize(z, dim=1))
        torch.testing.assert_close(moco.encode_queries(x), torch.cat(expected), rtol=1e-4, atol=1e-5)
    check_resume_bit_exact(tmp_path / "resume", total=4, cut=2, batch_size=32, method="moco",
                           method_kwargs={**kw, "symmetric": True})

# -- BYOL ------------------------------------------------------------------------------------
def test_byol_loss_matches_formula():
    torch.manual_seed(2)
    p, z = torch.randn(4, 6), torch.randn(4, 6)
    manual = sum(((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum() for i in range(4)) / 4
    assert byol_loss(p, z).item() == pytest.approx(manual.item(), rel=1e-5)
    v = torch.tensor([[3.0, 4.0], [1.0, -2.0]])
    assert byol_loss(v, 2 * v).item() == pytest.approx(0.0, abs=1e-6)  # identical directions
    assert byol_loss(v, -v).item() == pytest.approx(4.0, rel=1e-6)  # opposite


def test_ema_momentum_schedule():
    assert ema_momentum(0, 100, 0.996) == pytest.approx(0.996, abs=1e-12)
    assert ema_momentum(100, 100, 0.996) == 1.0
    assert ema_momentum(50, 100, 0.996) == pytest.approx(0.998, abs=1e-12)
    taus = [ema_momentum(s, 100, 0.99) for s in range(101)]
    assert taus == sorted(taus)


def test_byol_target_is_ema_after_one_step(tmp_path):
    trainer = Trainer(tiny_cfg(method="byol", method_kwargs=BYOL_KW, max_steps=1), tmp_path, progress=False)
    byol: BYOL = trainer.method
    target = list(byol.target_model.parameters()) + list(byol.target_projector.parameters())
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(p.requires_grad for p in target) and not optimized & {id(p) for p in target}
    assert {id(p) for p in byol.predictor.parameters()} <= optimized
    t_old = [p.detach().clone() for p in target]
    trainer.fit()
    online = [p.detach() for m in (byol.model, byol.projector) for p in m.parameters()]
    tau = ema_momentum(0, trainer.schedule_steps, BYOL_KW["tau_base"])
    assert tau == pytest.approx(BYOL_KW["tau_base"])
    for t, to, o in zip(target, t_old, online):
        torch.testing.assert_close(t, tau * to + (1 - tau) * o, rtol=0, atol=0)
    assert byol.export() is byol.model


def test_byol_lowers_loss_and_resumes_bit_exact(tmp_path):
    # At lr 0.01 the eval-mode loss first rises (BN running statistics and the target still move
    # more than the weights learn); 0.05 lowers it from 3.60 to 2.66 in five steps.
    check_two_steps_lower_loss(tmp_path / "loss", steps=5, lr=0.05, method="byol", method_kwargs=BYOL_KW)
    check_resume_bit_exact(tmp_path / "resume", total=4, cut=2, batch_size=32, method="byol", method_kwargs=BYOL_KW)


def test_byol_predictor_lr_mult_scales_the_first_adamw_step(tmp_path):
    # AdamW's first update of a weight with gradient g is lr * g / (|g| + eps), i.e. almost exactly lr in size
    # (bias-corrected moments m = g, v = g^2): so the median |change| of a group is that group's rate.
    kw = {**BYOL_KW, "predictor_lr_mult": 10.0}
    trainer = Trainer(tiny_cfg(method="byol", method_kwargs=kw, max_steps=1, weight_decay=0.0), tmp_path,
                      progress=False)
    byol: BYOL = trainer.method
    pred = {id(p) for p in byol.predictor.parameters()}
    groups = trainer.optimizer.param_groups
    assert [g.get("lr_mult", 1.0) for g in groups] == [1.0, 10.0]
    assert {id(p) for p in groups[1]["params"]} == pred and not pred & {id(p) for p in groups[0]["params"]}
    watched = {"encoder": list(byol.model.parameters()) + list(byol.projector.parameters()),
               "predictor": list(byol.predictor.parameters())}
    before = {k: [p.detach().clone() for p in ps] for k, ps in watched.items()}
    trainer.fit()
    lr = 0.01 * 64 / 256  # tiny_cfg's base lr, scaled linearly; no warm-up, and step 0 of the cosine is 1.0
    assert groups[0]["lr"] == pytest.approx(lr) and groups[1]["lr"] == pytest.approx(10 * lr)
    for name, scale in (("encoder", 1.0), ("predictor", 10.0)):
        delta = torch.cat([(p.detach() - b).abs().flatten() for p, b in zip(watched[name], before[name])])
        assert delta[delta > 0].median().item() == pytest.approx(scale * lr, rel=1e-3)


def test_byol_rejects_a_non_positive_predictor_lr_mult():
    with pytest.raises(ValueError, match="predictor_lr_mult"):
        BYOL(tiny_model(), **BYOL_KW, predictor_lr_mult=0.0)


def test_byol_proj_last_bn_centres_online_and_target_projections():
    # SimSiam's output BN (no affine), train mode: each projection dimension has batch mean 0 and variance 1
    # (population variance, up to BN's eps), for the online projector and for its EMA copy in the target.
    torch.manual_seed(0)
    byol = BYOL(tiny_model(), **BYOL_KW, proj_last_bn=True).train()
    x = torch.rand(32, 3, 16, 16)
    for z in (byol.projector(byol.model.forward_features(x)), byol.target(x)):
        torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(z.shape[1]), atol=2e-3, rtol=0)
    assert not any(p.requires_grad for p in byol.target_projector.parameters())
    plain = BYOL(tiny_model(), **BYOL_KW).train()  # the default keeps BYOL's projector: its output is not centred
    assert plain.target(x).mean(0).abs().max() > 1e-2


def test_byol_linear_predictor_on_centred_projections_has_zero_batch_mean():
    byol = BYOL(tiny_model(), **BYOL_KW, proj_last_bn=True, linear_predictor=True).train()
    assert isinstance(byol.predictor, torch.nn.Linear) and byol.predictor.bias is None
    x = torch.rand(32, 3, 16, 16)
    z = byol.projector(byol.model.forward_features(x))
    p = byol.predict(x)
    torch.testing.assert_close(p, z @ byol.predictor.weight.T)  # p = W z, nothing else
    torch.testing.assert_close(p.mean(0), torch.zeros(p.shape[1]), atol=1e-5, rtol=0)


def test_direct_pred_weight_matches_the_eigen_formula_worked_in_numpy():
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 6))
    corr = a.T @ a / 40
    s, u = np.linalg.eigh(corr)
    expected = u @ np.diag(np.sqrt(s / s.max()) + 0.1) @ u.T  # Tian et al. 2021, eq. 18-19
    w = direct_pred_weight(torch.tensor(corr), eps=0.1)
    np.testing.assert_allclose(w.numpy(), expected, atol=1e-12)
    # A rank-1 correlation (float64: the square root lifts float32's ~1e-8 rounding of the zero eigenvalue to
    # ~1e-4): with eps 0, W is the projector onto that direction; eps adds eps * I.
    v = torch.tensor([[3.0, 4.0]], dtype=torch.float64) / 5
    torch.testing.assert_close(direct_pred_weight(v.T @ v, eps=0.0), v.T @ v)
    torch.testing.assert_close(direct_pred_weight(v.T @ v, eps=0.5), v.T @ v + 0.5 * torch.eye(2, dtype=torch.float64))


def test_byol_direct_pred_sets_the_predictor_from_the_moving_correlation(tmp_path):
    kw = {**BYOL_KW, "proj_last_bn": True, "direct_pred": True, "direct_pred_rho": 0.3, "direct_pred_eps": 0.01}
    trainer = Trainer(tiny_cfg(method="byol", method_kwargs=kw, max_steps=2), tmp_path, progress=False)
    byol: BYOL = trainer.method
    assert not any(p.requires_grad for p in byol.predictor.parameters())  # set, never trained
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in byol.predictor.parameters()}
    seen = []
    original = byol.set_direct_predictor
    byol.set_direct_predictor = lambda f: (seen.append(f.clone()), original(f))[1]
    trainer.fit()
    assert len(seen) == 2 and seen[0].shape == (2 * trainer.cfg.batch_size, BYOL_KW["proj_dim"])
    c1, c2 = (f.T @ f / f.shape[0] for f in seen)
    torch.testing.assert_close(byol.pred_corr, 0.3 * c1 + 0.7 * c2)  # the first call sets F, the second averages
    torch.testing.assert_close(byol.predictor.weight, direct_pred_weight(0.3 * c1 + 0.7 * c2, 0.01))
    assert int(byol.pred_corr_steps) == 2


def test_byol_direct_pred_lowers_loss_and_resumes_bit_exact(tmp_path):
    kw = {**BYOL_KW, "proj_last_bn": True, "direct_pred": True}
    check_resume_bit_exact(tmp_path / "resume", total=4, cut=2, batch_size=32, method="byol", method_kwargs=kw)
    with pytest.raises(ValueError, match="direct_pred_rho"):
        BYOL(tiny_model(), **BYOL_KW, direct_pred=True, direct_pred_rho=1.0)
