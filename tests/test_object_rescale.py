"""Mask-driven object rescale (``train.augment.rescale_objects``): the object keeps its shape class and
colour, its area moves by the drawn scale squared, and its new size no longer depends on the old one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from train.augment import AugmentConfig, ViewAugment, background_augment, rescale_objects
from zoo.data import load_dataset
from zoo.data.shapes import SHAPES, SIZE, _draw


def _shapes(n: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    ds = load_dataset("shapes", "train", transform=None)
    return ds.images[:n].float() / 255, ds.masks[:n].float(), {k: v[:n] for k, v in ds.concepts.items()}


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Centre (x, y) and half-extents (x, y) of a mask's bounding box, continuous pixel coordinates."""
    ys, xs = np.nonzero(mask)
    return (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2, (xs.max() + 1 - xs.min()) / 2, \
        (ys.max() + 1 - ys.min()) / 2


def _template_class(mask: np.ndarray) -> int:
    """The shape whose generator drawing, at this mask's box, overlaps it best (IoU): a classifier that
    knows nothing of the transform."""
    cx, cy, rx, ry = _box(mask)
    best, best_iou = -1, -1.0
    for k, shape in enumerate(SHAPES):
        img = Image.new("L", (SIZE, SIZE), 0)
        r = int(round(max(rx, ry) - 0.5))  # the generator's half-size r gives a box of 2r + 1 pixels
        _draw(ImageDraw.Draw(img), shape, int(cx), int(cy), r, 1)
        t = np.asarray(img) > 0
        iou = (t & mask).sum() / (t | mask).sum()
        if iou > best_iou:
            best, best_iou = k, iou
    return best


def test_rescale_keeps_shape_and_colour_and_moves_area_by_scale_squared():
    x, m, concepts = _shapes(120)
    size = (0.12, 0.4)
    out, new_m = rescale_objects(x, m, torch.Generator().manual_seed(5), p=1.0, size=size)
    draws = torch.rand(120, 4, generator=torch.Generator().manual_seed(5))  # replay: apply, size, cx, cy
    correct, ratios = 0, []
    for i in range(120):
        old, new = m[i, 0].numpy() > 0, new_m[i, 0].numpy() > 0
        _, _, rx, ry = _box(old)
        r_old = max(rx, ry)
        target = (size[0] + float(draws[i, 1]) * (size[1] - size[0])) * SIZE
        s = min(target / r_old, (SIZE - 2) / (2 * r_old))  # the drawn scale, capped so the object fits
        ratios.append(new.sum() / old.sum() / s**2)
        ncx, ncy, nrx, nry = _box(new)
        assert abs(max(nrx, nry) - s * r_old) <= 1.0, i  # the new half-extent is the drawn one
        assert ncx - nrx >= 1 and ncy - nry >= 1 and ncx + nrx <= SIZE - 1 and ncy + nry <= SIZE - 1, i
        correct += _template_class(new) == int(concepts["shape"][i])
        colour = x[i][:, m[i, 0] > 0][:, 0]  # the flat object colour before
        torch.testing.assert_close(out[i][:, new_m[i, 0] > 0], colour[:, None].expand(-1, int(new.sum())))
    assert correct >= 114, correct  # >= 95 %: the template classifier still reads the same shape
    ratios = np.array(ratios)
    assert np.median(np.abs(ratios - 1)) < 0.1 and (np.abs(ratios - 1) < 0.3).mean() > 0.9, ratios


def test_new_size_is_independent_of_the_old_one():
    x, m, _ = _shapes(600)
    _, new_m = rescale_objects(x, m, torch.Generator().manual_seed(0), p=1.0, size=(0.15, 0.35))
    old_r = np.array([max(_box(m[i, 0].numpy() > 0)[2:]) for i in range(600)])
    new_r = np.array([max(_box(new_m[i, 0].numpy() > 0)[2:]) for i in range(600)])
    assert abs(np.corrcoef(old_r, new_r)[0, 1]) < 0.1  # size decoupled from the image's own
    assert new_r.min() < 0.17 * SIZE and new_r.max() > 0.33 * SIZE  # and the whole range is covered


def test_flat_background_is_restored_and_p_zero_is_identity():
    x, m, concepts = _shapes(40)
    out, new_m = rescale_objects(x, m, torch.Generator().manual_seed(1), p=1.0)
    flat = [i for i in range(40) if int(concepts["background"][i]) != 3]  # black, white, gray
    for i in flat:
        bg = x[i][:, m[i, 0] == 0][:, 0]
        torch.testing.assert_close(out[i][:, new_m[i, 0] == 0], bg[:, None].expand(-1, int((new_m[i, 0] == 0).sum())))
    same, same_m = rescale_objects(x, m, torch.Generator().manual_seed(1), p=0.0)
    assert torch.equal(same, x) and torch.equal(same_m, m)
    with pytest.raises(ValueError, match="do not match"):
        rescale_objects(x, m[:3], torch.Generator())
    with pytest.raises(ValueError, match="size range"):
        rescale_objects(x, m, torch.Generator(), size=(0.3, 0.1))


def test_bound_view_augment_rescales_only_when_asked():
    x, m, _ = _shapes(8)
    cfg = dict(size=32, jitter_p=0.0, gray_p=0.0, hflip=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0), mean=(0, 0, 0), std=(1, 1, 1))
    plain = ViewAugment(AugmentConfig(**cfg, bg_swap_p=1.0))
    assert ViewAugment(AugmentConfig(object_rescale_p=0.5)).uses_background
    moved = ViewAugment(AugmentConfig(**cfg, bg_swap_p=1.0, object_rescale_p=1.0, object_size=(0.3, 0.35)))
    a = plain.bind(x, m)(x, torch.Generator().manual_seed(0))
    b = moved.bind(x, m)(x, torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)
    # The bound view is: rescale, then swap backgrounds, from the same generator (the crop is the identity here).
    g = torch.Generator().manual_seed(0)
    expected = background_augment(*rescale_objects(x, m, g, 1.0, (0.3, 0.35)), g, 0.0, 1.0)
    torch.testing.assert_close(b, expected, atol=1e-5, rtol=0)
