"""NCC / ProPos (train/methods/ncc.py): prototype scattering, positive sampling alignment, per-epoch
spherical k-means of the target embedding, BYOL underneath."""

import math

import pytest
import torch
import torch.nn.functional as F

from train.clustering import _prepare, epoch_seed, kmeans_sharded
from train.methods.byol import byol_loss
from train.methods.ncc import NCC, cluster_prototypes, prototype_scattering_loss
from train.trainer import Trainer
from zoo.model import ZooModel

from .method_checks import check_resume_bit_exact, state_of, tiny_cfg
from .test_moco_byol import check_lower_loss_same_state

BYOL_KW = {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32, "tau_base": 0.99}
NCC_KW = {**BYOL_KW, "num_clusters": 5, "kmeans_niter": 10, "latent_std": 0.05, "cluster_weight": 0.5}


def _psl_formula(q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor, num: int, tau: float) -> float:
    """The prototype scattering loss written out: means per cluster, then one InfoNCE per present cluster."""
    present = [c for c in range(num) if bool((labels == c).any())]
    qc = {c: q[labels == c].mean(0) / q[labels == c].mean(0).norm() for c in present}
    kc = {c: k[labels == c].mean(0) / k[labels == c].mean(0).norm() for c in present}
    total = 0.0
    for c in present:
        pos = math.exp(float(qc[c] @ kc[c]) / tau)
        neg = sum(math.exp(float(qc[c] @ qc[j]) / tau) for j in present if j != c)
        total += -math.log(pos / (pos + neg))
    return total / len(present)


def _official_cluster_loss(q_centers, k_centers, temperature, psedo_labels, num_cluster):
    """ProPos's ``BYOLWrapper.compute_cluster_loss`` (models/propos/byol_wrapper.py), transcribed (CPU)."""
    d_q = q_centers.mm(q_centers.T) / temperature
    d_k = (q_centers * k_centers).sum(dim=1) / temperature
    d_q = d_q.float()
    d_q[torch.arange(num_cluster), torch.arange(num_cluster)] = d_k
    zero_classes = torch.arange(num_cluster)[torch.sum(F.one_hot(torch.unique(psedo_labels), num_cluster), dim=0) == 0]
    mask = torch.zeros((num_cluster, num_cluster), dtype=torch.bool)
    mask[:, zero_classes] = 1
    d_q.masked_fill_(mask, -10)
    pos = d_q.diag(0)
    mask = torch.ones((num_cluster, num_cluster)).fill_diagonal_(0).bool()
    neg = d_q[mask].reshape(-1, num_cluster - 1)
    loss = -pos + torch.logsumexp(torch.cat([pos.reshape(num_cluster, 1), neg], dim=1), dim=1)
    loss[zero_classes] = 0.0
    return loss.sum() / (num_cluster - len(zero_classes))


def test_prototype_scattering_loss_matches_formula_and_official_code():
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(12, 6), dim=1), F.normalize(torch.randn(12, 6), dim=1)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 0, 1, 3])
    qp, present = cluster_prototypes(q, labels, 4)
    kp, _ = cluster_prototypes(k, labels, 4)
    assert present.all()
    torch.testing.assert_close(qp[2], F.normalize(q[[2, 6]].mean(0), dim=0))
    loss = prototype_scattering_loss(qp, kp, present, 0.5)
    assert loss.item() == pytest.approx(_psl_formula(q, k, labels, 4, 0.5), rel=1e-5)
    # every cluster in the batch: exactly the official function
    assert loss.item() == pytest.approx(_official_cluster_loss(qp, kp, 0.5, labels, 4).item(), rel=1e-5)

    # clusters 1 and 4 absent from the batch: left out of every denominator; the official code keeps them
    # at logit -10, a difference of at most log(1 + 2 e^-10 / denominator)
    labels = torch.tensor([0, 2, 3, 5, 0, 2, 3, 5, 0, 0, 2, 3])
    qp, present = cluster_prototypes(q, labels, 6)
    kp, _ = cluster_prototypes(k, labels, 6)
    assert present.tolist() == [True, False, True, True, False, True]
    assert qp[1].abs().sum() == 0
    loss = prototype_scattering_loss(qp, kp, present, 0.2)
    assert loss.item() == pytest.approx(_psl_formula(q, k, labels, 6, 0.2), rel=1e-5)
    assert abs(loss.item() - _official_cluster_loss(qp, kp, 0.2, labels, 6).item()) < 2 * math.exp(-10)
    assert loss.item() != _official_cluster_loss(qp, kp, 0.2, labels, 6).item()

    # worked number: two orthogonal clusters whose online and target prototypes agree: -log(e^2 / (e^2 + 1))
    e = torch.eye(2)
    one = prototype_scattering_loss(e, e, torch.tensor([True, True]), 0.5)
    assert one.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-6)

    # gradient into the online prototypes only
    qg, kg = qp.clone().requires_grad_(), kp.clone().requires_grad_()
    prototype_scattering_loss(qg, kg, present, 0.5).backward()
    assert qg.grad is not None and qg.grad.abs().sum() > 0 and kg.grad is None


def test_step_is_psa_against_lightly_plus_weighted_scattering(tmp_path):
    """One step's loss rebuilt from its parts: lightly's negative cosine on the noisy predictions, the
    formula above on the batch's pseudo-labels, with the same augmentation and noise draws."""
    lightly_loss = pytest.importorskip("lightly.loss")
    trainer = Trainer(tiny_cfg(method="ncc", method_kwargs=NCC_KW, batch_size=32), tmp_path, progress=False)
    ncc: NCC = trainer.method
    ncc.on_train_start(trainer.context(0))
    ncc.on_epoch_start(trainer.context(0))
    assert int(ncc.clustered_epoch) == 0 and ncc.pseudo_labels.min() >= 0
    ncc.eval()  # BN from running statistics, so both computations see the same network
    idx = torch.arange(32)
    images = trainer.data.batch(idx)
    ctx = trainer.context(0)
    ctx.generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        out = ncc.training_step(images, idx, ctx)
        g = torch.Generator().manual_seed(5)
        v1, v2 = ctx.augment.views(images, g, 2)
        h1, h2 = (ncc.projector(ncc.model.forward_features(v)) for v in (v1, v2))
        z1, z2 = (ncc.target_projector(ncc.target_model.forward_features(v)) for v in (v1, v2))
        e1, e2 = torch.randn(h1.shape, generator=g), torch.randn(h2.shape, generator=g)
        p1, p2 = ncc.predictor(h1 + 0.05 * e1), ncc.predictor(h2 + 0.05 * e2)
    neg_cos = lightly_loss.NegativeCosineSimilarity()
    align = (2 + 2 * neg_cos(p1, z2)) + (2 + 2 * neg_cos(p2, z1))
    assert out["loss_align"].item() == pytest.approx(align.item(), rel=1e-5)
    # without the noise the predictions differ: the noise is really applied
    assert byol_loss(ncc.predictor(h1), z2).item() != pytest.approx(byol_loss(p1, z2).item(), rel=1e-7)
    labels = ncc.pseudo_labels[idx]
    n = lambda t: F.normalize(t, dim=1)  # noqa: E731
    proto = _psl_formula(n(h1), n(z2), labels, 5, 0.5) + _psl_formula(n(h2), n(z1), labels, 5, 0.5)
    assert out["loss_proto"].item() == pytest.approx(proto, rel=1e-5)
    assert out["loss"].item() == pytest.approx(align.item() + 0.5 * proto, rel=1e-5)


def test_e_step_is_spherical_kmeans_of_the_target_embedding(tmp_path):
    trainer = Trainer(tiny_cfg(method="ncc", method_kwargs=NCC_KW, batch_size=128), tmp_path, progress=False)
    ncc: NCC = trainer.method
    ctx = trainer.context(0)
    ncc.on_train_start(ctx)
    with torch.no_grad():  # the online network drifts away from the target: the E-step must use the target
        for p in ncc.model.parameters():
            p.add_(torch.randn_like(p), alpha=0.5)
    ncc.on_epoch_start(ctx)
    labels = ncc.pseudo_labels.clone()
    assert labels.shape == (len(trainer.data),) and int(ncc.clustered_epoch) == 0
    assert torch.bincount(labels, minlength=5).min() > 0  # no empty cluster
    # independently: the target embedding of every image (eval mode, no augmentation), L2-normalised
    ncc.eval()
    with torch.no_grad():
        x = _prepare(trainer.data.batch(torch.arange(len(trainer.data))), ctx)
        z = F.normalize(ncc.target_projector(ncc.target_model.forward_features(x)), dim=1)
        online = F.normalize(ncc.projector(ncc.model.forward_features(x)), dim=1)
    # spherical k-means has converged to a fixed point: each image's most similar normalised cluster
    # mean (cosine) is that of its own cluster (Lloyd's assignment step changes (almost) nothing)
    means = F.normalize(torch.stack([z[labels == c].mean(0) for c in range(5)]), dim=1)
    assert ((z @ means.T).argmax(1) == labels).float().mean() > 0.97

    # exactly the sharded spherical k-means of the target embedding, with the epoch's seed; the online
    # embedding (perturbed above) gives other clusters
    seed = epoch_seed(trainer.cfg.seed, 0, offset=14)
    n = len(trainer.data)
    ref, _ = kmeans_sharded(z, torch.arange(n), n, 5, seed, niter=10,
                            max_points_per_centroid=None, sharded=False, spherical=True)
    assert torch.equal(labels, ref)
    other, _ = kmeans_sharded(online, torch.arange(n), n, 5, seed, niter=10,
                            max_points_per_centroid=None, sharded=False, spherical=True)
    assert not torch.equal(labels, other)
    # the next epoch re-clusters (kmeans_every=1); warm-up epochs do not cluster at all
    ncc.on_epoch_start(trainer.context(1))
    assert int(ncc.clustered_epoch) == 1
    late = NCC(ZooModel("convnet_tiny", {"widths": [8, 16]}), **{**NCC_KW, "warmup_epochs_cluster": 2})
    late.on_epoch_start(trainer.context(1))
    assert int(late.clustered_epoch) == -1 and (late.pseudo_labels == -1).all()


def test_without_noise_and_cluster_term_ncc_trains_exactly_as_byol(tmp_path):
    byol = Trainer(tiny_cfg(method="byol", method_kwargs=BYOL_KW, max_steps=3, batch_size=32), tmp_path / "b",
                   progress=False)
    byol.fit()
    kw = {**NCC_KW, "latent_std": 0.0, "cluster_weight": 0.0}
    ncc = Trainer(tiny_cfg(method="ncc", method_kwargs=kw, max_steps=3, batch_size=32), tmp_path / "n", progress=False)
    ncc.fit()
    a, b = state_of(byol), state_of(ncc)
    assert set(b) - set(a) == {"pseudo_labels", "clustered_epoch"}
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    # and with its terms on, it trains differently
    on = Trainer(tiny_cfg(method="ncc", method_kwargs=NCC_KW, max_steps=3, batch_size=32), tmp_path / "o",
                 progress=False)
    on.fit()
    c = state_of(on)
    assert any(not torch.equal(c[k], a[k]) for k in a if k.startswith("projector"))


def test_bad_arguments_are_named():
    model = ZooModel("convnet_tiny", {"widths": [8, 16]})
    for kw, word in (({"num_clusters": 1}, "num_clusters"), ({"temperature": 0.0}, "temperature"),
                     ({"latent_std": -1.0}, "latent_std"), ({"kmeans_every": 0}, "kmeans_every")):
        with pytest.raises(ValueError, match=word):
            NCC(model, **{**BYOL_KW, **kw})


def test_ncc_lowers_loss_and_resumes_bit_exact_across_the_kmeans_step(tmp_path):
    check_lower_loss_same_state(tmp_path / "loss", steps=6, lr=0.05, method="ncc", method_kwargs=NCC_KW)
    # batch 128: 11 steps per epoch. Warm-up epoch 0 is BYOL; the first E-step (and the noise and the
    # cluster term) start at step 11, after the cut at 8; the second resume is cut after it (step 13),
    # so the pseudo-labels and the noise draws must come back from the checkpoint.
    kw = {**NCC_KW, "warmup_epochs_cluster": 1}
    check_resume_bit_exact(tmp_path / "across", total=14, cut=8, batch_size=128, method="ncc", method_kwargs=kw)
    check_resume_bit_exact(tmp_path / "after", total=15, cut=13, batch_size=128, method="ncc", method_kwargs=kw)
