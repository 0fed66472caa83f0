"""IIF (inverse image frequency margins) and CMO (context-rich minority oversampling) of `supervised`."""

import math

import numpy as np
import pytest
import torch

from train.cmo import cmo_mix, cutmix_box, minority_weights, sample_by_weight
from train.methods.supervised import Supervised, iif_cross_entropy, iif_weights
from train.trainer import Trainer
from zoo.model import ZooModel

from .method_checks import check_resume_bit_exact, check_two_steps_lower_loss, tiny_cfg


# -- IIF -------------------------------------------------------------------------------------
def test_iif_weights_match_the_paper_formulas():
    counts = torch.tensor([60, 30, 9, 1])
    n = 100
    expected = {
        "raw": [math.log(n / c) for c in (60, 30, 9, 1)],
        "smooth": [math.log((n + 1) / (c + 1)) + 1 for c in (60, 30, 9, 1)],
        "rel": [math.log((n - c) / c) for c in (60, 30, 9, 1)],
    }
    for variant, values in expected.items():
        np.testing.assert_allclose(iif_weights(counts, variant).numpy(), values, rtol=1e-6)
    assert iif_weights(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]  # before the counts are known
    assert torch.isfinite(iif_weights(torch.tensor([5, 0]))).all()
    with pytest.raises(ValueError, match="IIF variant"):
        iif_weights(counts, "log2")


def test_iif_cross_entropy_by_loops():
    torch.manual_seed(0)
    logits, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 3, 3, 1, 2])
    w = iif_weights(torch.tensor([60, 30, 9, 1])).double()
    manual = 0.0
    for i in range(5):
        z = [float(logits[i, c] * w[c]) for c in range(4)]
        manual += -z[y[i]] + math.log(sum(math.exp(v) for v in z))
    assert iif_cross_entropy(logits, y, w).item() == pytest.approx(manual / 5, rel=1e-12)
    # The margin is multiplicative: the rare class's logit is stretched most.
    method = Supervised(ZooModel("convnet_tiny", {"widths": [8, 16]}), num_classes=4, iif="raw")
    method.class_counts.copy_(torch.tensor([60, 30, 9, 1]))
    f = torch.randn(3, method.model.num_features)
    torch.testing.assert_close(method.classify_features(f), method.classifier(f) * w.float())
    with pytest.raises(ValueError, match="IIF variant"):
        Supervised(ZooModel("convnet_tiny", {"widths": [8, 16]}), num_classes=4, iif="nope")


# -- CMO pieces ------------------------------------------------------------------------------
def test_minority_sampler_is_class_balanced_and_an_inverse_cdf():
    labels = torch.repeat_interleave(torch.arange(3), torch.tensor([400, 40, 4]))
    w = minority_weights(labels, torch.bincount(labels))
    torch.testing.assert_close(w[[0, 400, 443]], torch.tensor([1 / 400, 1 / 40, 1 / 4], dtype=torch.float64))
    idx = sample_by_weight(w, 30000, torch.Generator().manual_seed(0))
    freq = torch.bincount(labels[idx], minlength=3).double() / 30000
    torch.testing.assert_close(freq, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.015, rtol=0)
    # inverse CDF of the same uniforms, written out
    u = torch.rand(50, generator=torch.Generator().manual_seed(1)).double()
    cdf = np.cumsum(w.numpy()) / w.sum().item()
    manual = [int(np.searchsorted(cdf, v, side="right")) for v in u.numpy()]
    assert sample_by_weight(w, 50, torch.Generator().manual_seed(1)).tolist() == manual


def test_cutmix_box_and_mask_mixing():
    g = torch.Generator().manual_seed(0)
    for lam in (0.0, 0.3, 0.9):
        y0, y1, x0, x1 = cutmix_box(32, 32, lam, g)
        assert 0 <= y0 <= y1 <= 32 and 0 <= x0 <= x1 <= 32
        assert (y1 - y0) <= int(32 * math.sqrt(1 - lam)) and (x1 - x0) <= int(32 * math.sqrt(1 - lam))
    major, minor = torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16)
    mixed, weight = cmo_mix(major, minor, torch.Generator().manual_seed(4))
    box = mixed[0, 0] == 1
    assert torch.equal(mixed[0], mixed[1]) and box.any()  # one box for the batch
    rows, cols = box.any(dim=1).nonzero().flatten(), box.any(dim=0).nonzero().flatten()
    assert box.sum() == len(rows) * len(cols)  # a rectangle
    assert weight.tolist() == [box.float().mean().item()] * 2  # the minority weight is its area fraction
    masks = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    masks[0, :, 2:5, 3:9] = True
    backgrounds = torch.full((2, 3, 16, 16), 0.5)
    mixed, weight = cmo_mix(major, minor, torch.Generator(), masks, backgrounds)
    assert torch.equal(mixed, torch.where(masks, minor, backgrounds)) and weight.tolist() == [1.0, 1.0]


def test_cmo_on_shapes_lt_uses_the_exact_masks_and_clean_backgrounds(tmp_path):
    from zoo.data.shapes import shape_layer_tensors

    trainer = Trainer(tiny_cfg(data="shapes_lt100", method="supervised", method_kwargs={"cmo": 1.0}), tmp_path,
                      progress=False)
    ds = trainer.data.dataset
    ctx = trainer.context(0)
    idx = torch.tensor([0, 5, len(ds) - 1])
    masks, backgrounds = ctx.layers(idx)
    base_masks, base_bg = shape_layer_tensors(3000, 0, "train")
    assert torch.equal(masks, base_masks[ds.indices[idx.numpy()]])
    torch.testing.assert_close(backgrounds, base_bg[ds.indices[idx.numpy()]].float() / 255)
    raw = trainer.data.batch(idx)
    assert torch.equal(torch.where(masks, raw, backgrounds), raw)  # image = its shape over its background
    trainer.method.on_train_start(ctx)
    mixed, minor_labels, weight = trainer.method.cmo_batch(raw, idx, ctx)
    assert weight.tolist() == [1.0] * 3
    # the pasted shapes come from minority-weighted draws: their pixels are the minority images' pixels
    assert not torch.equal(mixed, raw) and minor_labels.shape == (3,)


def test_supervised_cmo_loss_is_the_mixed_target_formula(tmp_path):
    trainer = Trainer(tiny_cfg(method="supervised", method_kwargs={"cmo": 1.0, "logit_adjust": 1.0}), tmp_path,
                      progress=False)
    method = trainer.method.eval()
    method.on_train_start(trainer.context(0))
    idx = torch.arange(16)
    images = trainer.data.batch(idx)
    labels = trainer.batch_labels(idx)
    ctx = trainer.context(0)
    ctx.generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        got = method.training_step(images, idx, ctx)["loss"].item()
        ctx.generator = torch.Generator().manual_seed(9)
        assert float(torch.rand((), generator=ctx.generator)) < 1.0  # the batch's apply-or-not draw
        mixed, minor_labels, w = method.cmo_batch(images, idx, ctx)
        logits = method.classify_features(method.model.forward_features(ctx.augment(mixed, ctx.generator)))
    prior = np.log(np.bincount(trainer.targets.numpy(), minlength=10) / len(trainer.targets))
    manual = 0.0
    for i in range(16):
        z = logits[i].double().numpy() + prior
        lse = math.log(np.exp(z).sum())
        manual += (1 - w[i].item()) * (lse - z[labels[i]]) + w[i].item() * (lse - z[minor_labels[i]])
    assert got == pytest.approx(manual / 16, rel=1e-5)
    assert 0 < w[0] < 1 and not torch.equal(minor_labels, labels)


# -- a few steps lower the loss, resume is bit-exact -------------------------------------------
CASES = {
    "iif": {"iif": "raw"},
    "iif_la": {"iif": "smooth", "logit_adjust": 1.0},
    "cmo_box": {"cmo": 1.0},
}


@pytest.mark.parametrize("case", list(CASES))
def test_iif_and_cmo_lower_the_loss_and_resume_bit_exact(case, tmp_path):
    kwargs = CASES[case]
    check_two_steps_lower_loss(tmp_path / "loss", steps=2, lr=0.01, method="supervised", method_kwargs=kwargs)
    check_resume_bit_exact(tmp_path / "resume", total=4, cut=2, batch_size=32, method="supervised",
                           method_kwargs=kwargs)


def test_cmo_with_exact_masks_resumes_bit_exact(tmp_path):
    check_resume_bit_exact(tmp_path, total=4, cut=2, batch_size=32, data="shapes_lt100", method="supervised",
                           method_kwargs={"cmo": 0.5})


@pytest.mark.parametrize("method,data,kwargs", [
    ("iif", "mnist5k_lt100", "{}"), ("cmo", "shapes_lt100", '{"cmo": 1.0}'),
    ("tsc", "mnist5k_lt100", '{"proj_hidden_dim": 32, "target_steps": 20}'),
    ("rescom", "shapes_lt100", '{"proj_hidden_dim": 32, "queue_per_class": 4}'),
    ("boosted", "mnist5k_lt100", '{"proj_hidden_dim": 32}'),
])
def test_long_tailed_methods_train_from_the_cli(method, data, kwargs, tmp_path):
    from zoo.cli import main

    out = tmp_path / "run"
    assert main(["train", "--method", method, "--data", data, "--backbone", "convnet_tiny", "--backbone-kwargs",
                 '{"widths": [8, 16]}', "--method-kwargs", kwargs, "--batch-size", "64", "--max-steps", "2",
                 "--epochs", "1", "--out", str(out), "--quiet", "--no-eval"]) == 0
    assert (out / "model" / "model.safetensors").is_file() and len(list((out / "checkpoints").iterdir())) == 1
