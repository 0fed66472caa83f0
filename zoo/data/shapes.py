"""``shapes``: procedural 32x32 RGB images of a coloured shape on a background, with concept labels.

Each image draws independent uniform factors: shape (circle, square, triangle, cross), colour
(red, green, blue, yellow, magenta, cyan), background (black, white, gray, uniform noise), plus a
random half-size ``r`` in ``[5, 11]`` and a centre jittered so the shape never touches the 1-pixel
image border (border pixels always show the background). The label is the shape index. Everything
is deterministic given ``seed``, the split and its size; train and test use different derived seeds.

:func:`shape_layers` replays the generator and returns each image's exact foreground mask and its
background without the shape (the background-swap protocol and CMO's exact-mask pasting use them).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image, ImageDraw

from zoo.data.base import InMemoryImageDataset, Transform

SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
BACKGROUNDS = ("black", "white", "gray", "noise")
COLOUR_RGB = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
BACKGROUND_RGB = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
MIN_HALF_SIZE, MAX_HALF_SIZE = 5, 11
_SPLIT_CODE = {"train": 0, "test": 1}


def _draw(
    draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, fill: tuple[int, int, int]
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "cross":
        t = max(2, (2 * r) // 5)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


@functools.lru_cache(maxsize=8)
def make_shapes(n: int, seed: int = 0, split: str = "train") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(images uint8 [n,32,32,3], factors)``; factors: shape/colour/background codes, size, cx, cy.

    Cached: treat the returned arrays as read-only.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng([int(seed), _SPLIT_CODE[split]])
    f = {
        "shape": rng.integers(0, len(SHAPES), n),
        "colour": rng.integers(0, len(COLOURS), n),
        "background": rng.integers(0, len(BACKGROUNDS), n),
        "size": rng.integers(MIN_HALF_SIZE, MAX_HALF_SIZE + 1, n),
    }
    # Centre in [r + 1, SIZE - 2 - r]: the shape's bounding box stays inside the 1-pixel border.
    for axis in ("cx", "cy"):
        lo = f["size"] + 1
        f[axis] = lo + (rng.random(n) * (SIZE - 1 - 2 * lo + 1)).astype(np.int64)
    noise_bg = BACKGROUNDS.index("noise")
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(n):
        bg = int(f["background"][i])
        if bg == noise_bg:
            img = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
        else:
            img = Image.new("RGB", (SIZE, SIZE), BACKGROUND_RGB[BACKGROUNDS[bg]])
        fill = COLOUR_RGB[COLOURS[int(f["colour"][i])]]
        _draw(
            ImageDraw.Draw(img),
            SHAPES[int(f["shape"][i])],
            int(f["cx"][i]),
            int(f["cy"][i]),
            int(f["size"][i]),
            fill,
        )
        images[i] = np.asarray(img)
    return images, {k: v.astype(np.int64) for k, v in f.items()}


@functools.lru_cache(maxsize=8)
def make_shape_masks(n: int, seed: int = 0, split: str = "train") -> np.ndarray:
    """The exact foreground masks of :func:`make_shapes` ``(n, seed, split)``: uint8 ``[n,32,32]``, 1 on the
    shape's pixels, 0 on the background (the same ``_draw`` call, on a blank canvas). Cached: read-only."""
    _, f = make_shapes(n, seed, split)
    masks = np.empty((n, SIZE, SIZE), dtype=np.uint8)
    for i in range(n):
        img = Image.new("L", (SIZE, SIZE), 0)
        _draw(ImageDraw.Draw(img), SHAPES[int(f["shape"][i])], int(f["cx"][i]), int(f["cy"][i]), int(f["size"][i]), 1)
        masks[i] = np.asarray(img)
    return masks


def load_shapes(
    split: str, transform: Transform | None, seed: int = 0, n_train: int = 3000, n_test: int = 1000
) -> InMemoryImageDataset:
    """The ``shapes`` dataset: label = shape index; ``.concepts`` / ``.concept_names`` give all factors.

    ``.concepts`` maps ``"shape"``, ``"colour"``, ``"background"`` to int code arrays (names in
    ``.concept_names``); ``.factors`` also holds the continuous jitter (``size``, ``cx``, ``cy``);
    ``.masks`` (uint8 ``[n,1,32,32]``) the exact foreground masks (background augmentation uses them).
    """
    n = n_train if split == "train" else n_test
    images, factors = make_shapes(int(n), int(seed), split)
    ds = InMemoryImageDataset(
        "shapes",
        split,
        torch.from_numpy(images.copy()).permute(0, 3, 1, 2).contiguous(),
        factors["shape"],
        list(SHAPES),
        transform,
    )
    ds.seed = int(seed)
    ds.concepts = {k: factors[k].copy() for k in ("shape", "colour", "background")}
    ds.concept_names = {"shape": list(SHAPES), "colour": list(COLOURS), "background": list(BACKGROUNDS)}
    ds.factors = {k: v.copy() for k, v in factors.items()}
    # (masks [n,32,32] bool, backgrounds uint8 [n,3,32,32]) on demand: a partial, so the dataset still pickles
    ds.layers = functools.partial(shape_layer_tensors, int(n), int(seed), split)
    ds.masks = torch.from_numpy(make_shape_masks(int(n), int(seed), split).copy()).unsqueeze(1)
    return ds


@functools.lru_cache(maxsize=4)
def shape_layers(n: int, seed: int = 0, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The two layers of :func:`make_shapes`' images: ``(masks bool [n,32,32], backgrounds uint8 [n,32,32,3])``.

    The generator is replayed with the same random stream, so a noise background is the very noise
    the image was drawn on (including the pixels its shape covers), and the mask is the shape drawn
    with the same PIL call (no anti-aliasing: every pixel is shape or background). For every image,
    ``where(mask, colour, background) == make_shapes(n, seed, split)[0]`` exactly. Cached: read-only.
    """
    images, f = make_shapes(n, seed, split)
    rng = np.random.default_rng([int(seed), _SPLIT_CODE[split]])
    # Same draws as make_shapes, in the same order, so the noise backgrounds come out identical.
    rng.integers(0, len(SHAPES), n), rng.integers(0, len(COLOURS), n), rng.integers(0, len(BACKGROUNDS), n)
    rng.integers(MIN_HALF_SIZE, MAX_HALF_SIZE + 1, n)
    rng.random(n), rng.random(n)
    noise_bg = BACKGROUNDS.index("noise")
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    backgrounds = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(n):
        bg = int(f["background"][i])
        if bg == noise_bg:
            backgrounds[i] = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        else:
            backgrounds[i] = BACKGROUND_RGB[BACKGROUNDS[bg]]
        mask = Image.new("L", (SIZE, SIZE), 0)
        _draw(ImageDraw.Draw(mask), SHAPES[int(f["shape"][i])], int(f["cx"][i]), int(f["cy"][i]), int(f["size"][i]),
              255)
        masks[i] = np.asarray(mask) > 0
    return masks, backgrounds


def shape_layer_tensors(n: int, seed: int = 0, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`shape_layers` as tensors in the dataset's layout: masks bool ``[n,1,32,32]``, backgrounds uint8
    ``[n,3,32,32]`` (fresh copies)."""
    masks, backgrounds = shape_layers(n, seed, split)
    return (torch.from_numpy(masks.copy()).unsqueeze(1),
            torch.from_numpy(backgrounds.copy()).permute(0, 3, 1, 2).contiguous())
