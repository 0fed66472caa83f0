"""Background augmentation (Ryali et al. 2021): the transform, the masks it uses, and the trainer option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.augment import AugmentConfig, ViewAugment, background_augment, saliency_masks
from train.trainer import Trainer
from zoo.data import load_dataset
from zoo.data.shapes import BACKGROUND_RGB, BACKGROUNDS, COLOUR_RGB, COLOURS

from .method_checks import check_resume_bit_exact, check_two_steps_lower_loss, tiny_cfg


def _batch(b: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, 10, 10, generator=g)
    m = (torch.rand(b, 1, 10, 10, generator=g) < 0.3).float()
    return x, m


def test_remove_and_swap_match_the_formula():
    x, m = _batch()
    removed = background_augment(x, m, torch.Generator().manual_seed(1), remove_p=1.0)
    torch.testing.assert_close(removed, m * x + (1 - m) * 0.5, rtol=0, atol=0)
    # Swap: replay the generator's draws (u per sample, then the partner per sample) and build it by hand.
    gen = torch.Generator().manual_seed(2)
    swapped = background_augment(x, m, gen, swap_p=1.0)
    replay = torch.Generator().manual_seed(2)
    torch.rand(x.shape[0], generator=replay)
    partner = torch.randint(x.shape[0], (x.shape[0],), generator=replay)
    h, w = x.shape[-2:]
    for i in range(x.shape[0]):
        j = int(partner[i])
        bg = 1 - m[j, 0]
        for c in range(3):
            mean = float((x[j, c] * bg).sum() / bg.sum())
            for r in range(h):
                for s in range(w):
                    if m[i, 0, r, s] > 0:  # the object stays
                        expected = x[i, c, r, s]
                    elif bg[r, s] > 0:  # the partner's background
                        expected = x[j, c, r, s]
                    else:  # the partner's object erased: the first background pixel half a side away
                        expected = mean
                        for dr, ds in ((h // 2, w // 2), (h // 2, 0), (0, w // 2)):
                            rr, ss = (r - dr) % h, (s - ds) % w
                            if bg[rr, ss] > 0:
                                expected = x[j, c, rr, ss]
                                break
                    assert float(swapped[i, c, r, s]) == pytest.approx(float(expected), abs=1e-6)
    assert not torch.equal(partner, torch.arange(x.shape[0]))  # some image really got another background


def test_probabilities_split_the_batch_and_zero_is_identity():
    x, m = _batch(b=400)
    x = x[:, :, :4, :4].contiguous()
    m = torch.zeros(400, 1, 4, 4)  # all background: removed images are exactly constant gray
    out = background_augment(x, m, torch.Generator().manual_seed(3), remove_p=0.3, swap_p=0.0)
    gray = (out == 0.5).flatten(1).all(dim=1).float().mean().item()
    assert 0.22 < gray < 0.38
    assert torch.equal(background_augment(x, m, torch.Generator().manual_seed(3)), x)
    with pytest.raises(ValueError, match="remove_p"):
        background_augment(x, m, torch.Generator(), remove_p=0.7, swap_p=0.5)
    with pytest.raises(ValueError, match="do not match"):
        background_augment(x, m[:3], torch.Generator(), remove_p=0.5)


def test_shapes_masks_are_the_shape_pixels():
    ds = load_dataset("shapes", "train", transform=None)
    assert ds.masks.shape == (3000, 1, 32, 32) and ds.masks.dtype == torch.uint8
    checked = 0
    for i in range(200):
        bg = BACKGROUNDS[int(ds.concepts["background"][i])]
        if bg == "noise":
            continue
        colour = np.array(COLOUR_RGB[COLOURS[int(ds.concepts["colour"][i])]])
        if (colour == np.array(BACKGROUND_RGB[bg])).all():
            continue
        img = ds.images[i].permute(1, 2, 0).numpy()
        is_colour = (img == colour).all(axis=2)
        assert np.array_equal(is_colour, ds.masks[i, 0].numpy().astype(bool)), i
        checked += 1
    assert checked > 100


def test_saliency_finds_the_digits_ink():
    x = load_dataset("mnist5k", "train", transform=None).images[:64].float().div(255).expand(-1, 3, -1, -1)
    truth = (x[:, :1] > 0.3).float()  # the ink, known here from the pixel values
    est = saliency_masks(x)
    def iou(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a * b).sum() / ((a + b) > 0).float().sum())

    other = truth[torch.roll(torch.arange(64), 1)]  # another digit's ink: what a mask blind to the image gets
    assert iou(est, truth) > 0.5 and iou(est, truth) > iou(est, other) + 0.15, (iou(est, truth), iou(est, other))
    assert torch.equal(saliency_masks(x), est)  # deterministic


def test_bound_augment_changes_only_its_batch():
    cfg = AugmentConfig(size=10, bg_remove_p=1.0, jitter_p=0.0, gray_p=0.0, hflip=0.0, scale=(1.0, 1.0))
    aug = ViewAugment(cfg)
    assert aug.uses_background and not ViewAugment(AugmentConfig()).uses_background
    x, m = _batch()
    bound = aug.bind(x, m)
    other = x.clone()
    plain = aug(other, torch.Generator().manual_seed(0))
    torch.testing.assert_close(bound(other, torch.Generator().manual_seed(0)), plain)  # not the bound tensor
    view = bound(x, torch.Generator().manual_seed(0))
    assert not torch.allclose(view, plain)


def test_trainer_feeds_exact_masks_on_shapes_and_saliency_elsewhere(tmp_path):
    t = Trainer(tiny_cfg(data="shapes", max_steps=1, augment={"bg_swap_p": 0.5}), tmp_path / "s", progress=False)
    idx = torch.arange(5)
    images = t.data.batch(idx)
    torch.testing.assert_close(t.data.foreground(idx, images), t.data.dataset.masks[:5].float())
    torch.testing.assert_close(t.data.foreground(idx, images, "saliency"), saliency_masks(images))
    d = Trainer(tiny_cfg(max_steps=1), tmp_path / "d", progress=False)
    images = d.data.batch(idx)
    torch.testing.assert_close(d.data.foreground(idx, images), saliency_masks(images))
    with pytest.raises(ValueError, match="bg_masks"):
        d.data.foreground(idx, images, "exact")


BG = {"hflip": 0.0, "bg_swap_p": 0.5, "bg_remove_p": 0.2}


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_view_methods_with_background_augmentation_lower_loss(tmp_path, method):
    kw = {"simclr": {"proj_hidden_dim": 32, "proj_dim": 16},
          "byol": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32}}[method]
    check_two_steps_lower_loss(tmp_path, method=method, method_kwargs=kw, augment=BG, lr=0.05)


def test_background_augmentation_resumes_bit_exact(tmp_path):
    check_resume_bit_exact(tmp_path, method="simclr", method_kwargs={"proj_hidden_dim": 32, "proj_dim": 16},
                           augment=BG)
