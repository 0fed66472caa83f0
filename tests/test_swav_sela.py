"""Sinkhorn-Knopp, SwAV (swapped prediction, prototypes, queue) and SeLa (self-labelling)."""

import math

import pytest
import torch
import torch.nn.functional as F

from train.methods.sela import label_update_epochs, sela_labels
from train.methods.swav import swapped_prediction_loss
from train.sinkhorn import sinkhorn_argmax_streamed, sinkhorn_knopp
from train.trainer import Trainer

from .method_checks import check_resume_bit_exact, check_two_steps_lower_loss, tiny_cfg

SWAV_KW = {"proj_hidden_dim": 32, "proj_dim": 16, "num_prototypes": 10, "small_size": 4}
SELA_KW = {"num_clusters": 5, "num_heads": 2, "sinkhorn_iters": 20}


def sinkhorn_reference(scores, epsilon, n_iters):
    """SwAV's ``distributed_sinkhorn`` (one process), in float64 and the exp domain."""
    q = torch.exp(scores.double() / epsilon).t()  # [K, B]
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iters):
        q /= q.sum(dim=1, keepdim=True)  # each prototype gets total weight 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample gets total weight 1/B
        q /= b
    return (q * b).t()  # [B, K], rows sum to 1


# -- Sinkhorn ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_iters", [1, 3, 10])
def test_sinkhorn_matches_reference(n_iters):
    scores = torch.randn(24, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = sinkhorn_reference(scores, 0.5, n_iters)
    torch.testing.assert_close(sinkhorn_knopp(scores, 0.5, n_iters), ref, rtol=1e-9, atol=1e-12)
    q32 = sinkhorn_knopp(scores.float(), 0.5, n_iters)
    assert q32.dtype == torch.float32
    torch.testing.assert_close(q32.double(), ref, rtol=1e-4, atol=1e-6)


def test_sinkhorn_meets_marginals():
    n, k = 40, 8
    scores = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    q = sinkhorn_knopp(scores, 0.5, n_iters=50)
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(n), rtol=0, atol=1e-3)  # each row a distribution
    torch.testing.assert_close(q.sum(0), torch.full((k,), n / k), rtol=0, atol=1e-3)  # equal partition
    # custom marginals; the column marginal is given as proportions and rescaled to sum(rows)
    rows = torch.linspace(0.5, 1.5, n)
    cols = torch.arange(1.0, k + 1)
    q = sinkhorn_knopp(scores, 0.5, n_iters=200, row_marginal=rows, col_marginal=cols)
    torch.testing.assert_close(q.sum(1), rows, rtol=0, atol=1e-3)
    torch.testing.assert_close(q.sum(0), cols * rows.sum() / cols.sum(), rtol=0, atol=1e-3)


def test_sinkhorn_stable_at_small_epsilon():
    n, k = 64, 10
    g = torch.Generator().manual_seed(2)
    # scores of magnitude 100: the plain exp-domain loop overflows (exp(100 / 0.05) is inf)
    scores = 100 + torch.randn(n, k, generator=g)
    assert not torch.isfinite(sinkhorn_reference(scores, 0.05, 3)).all()
    for n_iters in (3, 300):
        q = sinkhorn_knopp(scores, epsilon=0.05, n_iters=n_iters)
        assert torch.isfinite(q).all()
        torch.testing.assert_close(q.sum(1), torch.ones(n), rtol=0, atol=1e-3)
    torch.testing.assert_close(q.sum(0), torch.full((k,), n / k), rtol=0, atol=1e-3)
    # spread of 100 / 0.05 = 2000 between entries: still finite, rows exact, mass conserved
    # (the columns need many more iterations at this spread: Sinkhorn slows as epsilon / spread shrinks)
    scores = 100 * torch.randn(n, k, generator=g)
    q = sinkhorn_knopp(scores, epsilon=0.05, n_iters=3)
    assert torch.isfinite(q).all() and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(n), rtol=0, atol=1e-3)
    assert q.sum().item() == pytest.approx(n, rel=1e-5)
    half = sinkhorn_knopp(scores.half(), epsilon=0.05, n_iters=3)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()


# -- SwAV loss -----------------------------------------------------------------------------


def swapped_reference(scores, codes, tau):
    """Caron et al. 2020 eq. 1 with multi-crop, written out sample by sample."""
    total = 0.0
    for i, q in enumerate(codes):
        sub = 0.0
        others = [v for v in range(len(scores)) if v != i]
        for v in others:
            p = torch.exp(scores[v] / tau) / torch.exp(scores[v] / tau).sum(dim=1, keepdim=True)
            sub += float(-(q * torch.log(p)).sum(dim=1).mean())
        total += sub / len(others)
    return total / len(codes)


def test_swapped_prediction_matches_formula():
    g = torch.Generator().manual_seed(3)
    scores = [torch.randn(4, 5, generator=g) for _ in range(4)]  # 2 large + 2 small crops
    codes = [torch.rand(4, 5, generator=g).softmax(dim=1) for _ in range(2)]
    for tau in (0.1, 1.0):
        expected = swapped_reference(scores, codes, tau)
        assert swapped_prediction_loss(scores, codes, tau).item() == pytest.approx(expected, rel=1e-5)
    # hand-made: codes one-hot, scores put all mass of crop 1 on the code of crop 0 and vice versa
    s0, s1 = torch.tensor([[0.0, 10.0]]), torch.tensor([[10.0, 0.0]])
    q0, q1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss = swapped_prediction_loss([s0, s1], [q0, q1], 1.0).item()
    assert loss == pytest.approx(math.log1p(math.exp(-10)), rel=1e-3)


def test_swapped_prediction_uniform_scores_is_log_k():
    k = 7
    scores = [torch.zeros(3, k) for _ in range(3)]
    codes = [F.one_hot(torch.tensor([0, 3, 6]), k).float(), torch.full((3, k), 1 / k)]
    assert swapped_prediction_loss(scores, codes, 0.1).item() == pytest.approx(math.log(k))


# -- SwAV method ---------------------------------------------------------------------------


def swav_trainer(tmp_path, max_steps, **kw):
    cfg = tiny_cfg(method="swav", method_kwargs={**SWAV_KW, **kw}, max_steps=max_steps, batch_size=32)
    return Trainer(cfg, tmp_path, progress=False)


def test_swav_prototypes_frozen_then_unit_norm(tmp_path):
    trainer = swav_trainer(tmp_path, 2, freeze_prototypes_steps=1)
    method = trainer.method
    snapshots = [{k: v.clone() for k, v in method.state_dict().items()}]
    after_step = method.on_after_optimizer_step

    def spy(ctx):
        after_step(ctx)
        snapshots.append({k: v.clone() for k, v in method.state_dict().items()})

    method.on_after_optimizer_step = spy
    trainer.fit()
    key = "prototypes.prototypes.weight"
    # step 0 is frozen: prototypes unchanged (up to re-normalisation), the rest trained
    torch.testing.assert_close(snapshots[1][key], snapshots[0][key], rtol=0, atol=1e-6)
    for other in ("projector.net.0.weight", "model.backbone.features.0.weight"):
        assert not torch.equal(snapshots[1][other], snapshots[0][other])
    # step 1 is not: prototypes move and are back on the unit sphere after the step
    assert (snapshots[2][key] - snapshots[1][key]).abs().max() > 1e-4
    w = method.prototypes.prototypes.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(w.shape[0]), rtol=0, atol=1e-5)


def test_swav_queue_fills_fifo(tmp_path):
    b, length = 32, 80
    trainer = swav_trainer(tmp_path, 3, queue_length=length, queue_start_step=1)
    method = trainer.method
    pushed = []
    push = method.on_after_optimizer_step

    def spy(ctx):
        pushed.append(None if method._pending is None else method._pending.clone())
        push(ctx)

    method.on_after_optimizer_step = spy
    trainer.fit()
    assert pushed[0] is None and pushed[1] is not None  # queue starts at step 1
    assert int(method.queue_count) == 2 * b
    # newest first: step 2's embeddings, then step 1's, then the zeros not yet filled
    torch.testing.assert_close(method.queue[:, :b], pushed[2], rtol=0, atol=0)
    torch.testing.assert_close(method.queue[:, b : 2 * b], pushed[1], rtol=0, atol=0)
    assert (method.queue[:, 2 * b :] == 0).all()
    assert not method.queue_full
    # the embeddings are the large crops' L2-normalised projections
    torch.testing.assert_close(pushed[2].norm(dim=2), torch.ones(2, b), rtol=0, atol=1e-5)
    # one more push drops the oldest rows: FIFO
    method._pending = torch.ones(2, b, method.queue.shape[2])
    method.on_after_optimizer_step = push
    method.on_after_optimizer_step(trainer.context(0))
    assert method.queue_full
    assert (method.queue[:, :b] == 1).all()
    torch.testing.assert_close(method.queue[:, b : 2 * b], pushed[2], rtol=0, atol=0)
    torch.testing.assert_close(method.queue[:, 2 * b :], pushed[1][:, : length - 2 * b], rtol=0, atol=0)


def test_swav_full_queue_joins_the_codes(tmp_path):
    trainer = swav_trainer(tmp_path, 1, queue_length=32)
    method = trainer.method
    scores = [torch.randn(8, 10) for _ in range(2)]
    without = method.compute_codes(scores)
    method.queue.copy_(F.normalize(torch.randn_like(method.queue), dim=2))
    method.queue_count.fill_(32)
    with_queue = method.compute_codes(scores)
    assert with_queue[0].shape == (8, 10)
    assert not torch.allclose(with_queue[0], without[0])


def test_swav_lowers_loss(tmp_path):
    check_two_steps_lower_loss(tmp_path, method="swav", method_kwargs=SWAV_KW)


def test_swav_resume_bit_exact(tmp_path):
    # batch 32, queue of 64: full after steps 0-1, so the resumed steps 2-3 use the stored queue
    kw = {**SWAV_KW, "queue_length": 64, "freeze_prototypes_steps": 1}
    check_resume_bit_exact(tmp_path, method="swav", method_kwargs=kw, total=4, cut=2, batch_size=32)


# -- SeLa ----------------------------------------------------------------------------------


def test_sela_labels_equal_partition():
    n, k = 600, 6
    g = torch.Generator().manual_seed(4)
    # skewed predictions: most samples prefer cluster 0, so a plain argmax is very unbalanced
    logits = torch.randn(n, k, generator=g)
    logits[:, 0] += 2.0
    log_probs = logits.log_softmax(dim=1)
    assert torch.bincount(log_probs.argmax(1), minlength=k).max() > 2 * n / k
    labels = sela_labels(log_probs, lam=25.0, n_iters=100)
    assert labels.shape == (n,) and labels.dtype == torch.long
    counts = torch.bincount(labels, minlength=k)
    assert counts.max() <= 2 * n / k and counts.min() > 0


def test_streamed_sinkhorn_labels_equal_the_in_memory_solution():
    """SeLa's label step recomputes scores chunk by chunk and keeps only the potentials: the labels are
    the argmax of sinkhorn_knopp's plan on the whole matrix, for any chunking."""
    n, k = 700, 7
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(n, k, generator=g) * 2
    logits[:, 0] += 2.0  # skewed, so the balancing matters
    log_probs = logits.log_softmax(dim=1)
    for iters in (1, 30):
        ref = sinkhorn_knopp(log_probs, epsilon=1 / 25, n_iters=iters).argmax(dim=1)
        assert not torch.equal(ref, log_probs.argmax(dim=1))
        for chunk in (700, 64, 9):
            rows: list[int] = []
            got = sinkhorn_argmax_streamed(lambda sl, rows=rows: rows.append(sl.stop - sl.start) or log_probs[sl], n,
                                           epsilon=1 / 25, n_iters=iters, chunk=chunk)
            assert torch.equal(got, ref), (iters, chunk)
            assert max(rows) <= chunk and sum(rows) == n * (iters + 2)  # max pass, iterations, argmax pass
    assert torch.equal(sela_labels(log_probs, lam=25.0, n_iters=30), ref)


def test_sela_schedule():
    assert label_update_epochs(10, 0) == {0}
    assert label_update_epochs(10, 4) == {0, 2, 4, 6, 8}
    assert label_update_epochs(2, 1) == {0, 1}


def test_sela_labels_update_on_schedule(tmp_path):
    cfg = tiny_cfg(method="sela", method_kwargs={**SELA_KW, "label_updates": 1}, epochs=4)
    trainer = Trainer(cfg, tmp_path, progress=False)
    method = trainer.method
    method.on_train_start(trainer.context(0))
    assert method.labels.shape == (2, len(trainer.data))
    method.on_epoch_start(trainer.context(0))
    first = method.labels.clone()
    counts = torch.bincount(first[0], minlength=5)
    assert counts.max() <= 2 * len(trainer.data) / 5
    with torch.no_grad():  # stand-in for training: move the heads
        for head in method.heads:
            head.weight.add_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(5)))
    assert label_update_epochs(4, 1) == {0, 2}
    method.on_epoch_start(trainer.context(2))  # scheduled: labels recomputed
    second = method.labels.clone()
    assert not torch.equal(first, second)
    with torch.no_grad():
        for head in method.heads:
            head.weight.mul_(-1)
    method.on_epoch_start(trainer.context(3))  # not scheduled: labels kept
    assert torch.equal(method.labels, second)
    assert method.export().has_cluster_head


def test_sela_lowers_loss(tmp_path):
    check_two_steps_lower_loss(tmp_path, method="sela", method_kwargs=SELA_KW)


def test_sela_resume_bit_exact(tmp_path):
    # 5 steps per epoch at batch 256; labels at epochs 0 and 1. Cut mid-epoch 1 so the resumed run
    # relies on the labels stored in the checkpoint.
    check_resume_bit_exact(tmp_path, method="sela", method_kwargs={**SELA_KW, "label_updates": 1},
                           total=7, cut=6, batch_size=256)


def test_swav_crop_batching_changes_only_how_crops_are_batched():
    """Per-crop passes (lightly's way) equal per-resolution passes when BatchNorm uses running stats."""
    from train.methods.swav import SwAV
    from zoo.model import ZooModel

    torch.manual_seed(0)
    by_size = SwAV(ZooModel("convnet_tiny"), num_prototypes=7, proj_hidden_dim=16, proj_dim=8,
                   crop_batching="resolution").eval()
    by_crop = SwAV(ZooModel("convnet_tiny"), num_prototypes=7, proj_hidden_dim=16, proj_dim=8,
                   crop_batching="crop").eval()
    by_crop.load_state_dict(by_size.state_dict())
    crops = [torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16), torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)]
    torch.testing.assert_close(by_crop.embed_crops(crops), by_size.embed_crops(crops))
    by_size.train(), by_crop.train()  # in training mode BatchNorm sees different batches: different results
    assert not torch.allclose(by_crop.embed_crops(crops), by_size.embed_crops(crops))
    with pytest.raises(ValueError, match="crop_batching"):
        SwAV(ZooModel("convnet_tiny"), crop_batching="view")
    # "auto" (the default) is one pass per crop on the CPU (per resolution on CUDA): the same batches as "crop"
    by_default = SwAV(ZooModel("convnet_tiny"), num_prototypes=7, proj_hidden_dim=16, proj_dim=8).train()
    by_default.load_state_dict(by_size.state_dict())
    assert by_default.crop_batching == "auto"
    torch.testing.assert_close(by_default.embed_crops(crops), by_crop.embed_crops(crops), rtol=0, atol=0)
