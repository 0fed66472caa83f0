"""Multi-view augmentation on batched tensors (runs on whatever device the batch is on).

Every transform draws its random numbers from an explicit ``torch.Generator`` so training is
reproducible and resumable: the generator's state goes into the checkpoint. Per-sample draws go
through :func:`rand_per_sample`: under DDP (:func:`per_sample_shard`) each rank draws for the global
batch and keeps its own slice, so N ranks with batch B see exactly the views of one process with N*B.
Inputs are float images in [0, 1], ``[B,3,H,W]``; outputs are normalised views ``[B,3,h,w]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """SimCLR-style view recipe. Defaults follow SimCLR's CIFAR setting minus the hue jitter."""

    size: int = 32
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation: float = 0.0  # max degrees; digits like a little, natural images use 0
    hflip: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.0  # max hue shift as a fraction of the colour circle (torchvision's hue; 0.5 = any hue)
    gray_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    # Background augmentation (Ryali et al. 2021, :func:`background_augment`): per view, with these
    # probabilities, the background is removed (constant gray) or swapped for another image's. Foreground
    # masks: "auto" = the dataset's exact masks where it has them (shapes), else a saliency estimate;
    # "saliency" = always the estimate (:func:`saliency_masks`).
    bg_remove_p: float = 0.0
    bg_swap_p: float = 0.0
    bg_masks: str = "auto"
    # Object rescale (:func:`rescale_objects`, needs the same masks): per view, with ``object_rescale_p``, the
    # object is scaled about its centre to a half-extent drawn from ``object_size`` (fractions of the side)
    # and moved to a uniform position, over its own object-free background. It decouples object size and
    # position from the image, which random-resized crops alone do not (docs/benchmarks.md, shapes).
    object_rescale_p: float = 0.0
    object_size: tuple[float, float] = (0.15, 0.35)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> AugmentConfig:
        d = dict(d)
        for key in ("scale", "ratio", "mean", "std", "object_size"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


_SHARD: tuple[int, int] = (0, 1)  # (rank, world size) of per-sample draws; see per_sample_shard


@contextmanager
def per_sample_shard(rank: int, world: int) -> Iterator[None]:
    """Within the block, a per-sample draw for ``n`` samples draws ``n * world`` numbers (the global
    batch) and returns the ``rank``-th slice: rank-consistent randomness under DDP."""
    global _SHARD
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    previous, _SHARD = _SHARD, (rank, world)
    try:
        yield
    finally:
        _SHARD = previous


def rand_per_sample(n: int, gen: torch.Generator, shape: tuple[int, ...] = ()) -> torch.Tensor:
    """``[n, *shape]`` uniform numbers on the CPU, one row per sample of this rank (``torch.rand`` on one
    process)."""
    rank, world = _SHARD
    if world == 1:
        return torch.rand(n, *shape, generator=gen)
    return torch.rand(n * world, *shape, generator=gen)[rank * n : (rank + 1) * n]


def randint_per_sample(high: int, n: int, gen: torch.Generator, shape: tuple[int, ...] = ()) -> torch.Tensor:
    """``[n, *shape]`` integers in ``[0, high)``, one row per sample of this rank (``torch.randint`` on one
    process)."""
    rank, world = _SHARD
    if world == 1:
        return torch.randint(high, (n, *shape), generator=gen)
    return torch.randint(high, (n * world, *shape), generator=gen)[rank * n : (rank + 1) * n]


def randn_per_sample(n: int, gen: torch.Generator, shape: tuple[int, ...] = ()) -> torch.Tensor:
    """``[n, *shape]`` standard normal numbers on the CPU, one row per sample of this rank (``torch.randn`` on
    one process)."""
    rank, world = _SHARD
    if world == 1:
        return torch.randn(n, *shape, generator=gen)
    return torch.randn(n * world, *shape, generator=gen)[rank * n : (rank + 1) * n]


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return rand_per_sample(n, gen).to(device) * (high - low) + low


def _bernoulli(n: int, p: float, gen: torch.Generator, device) -> torch.Tensor:
    return (rand_per_sample(n, gen) < p).to(device)


def random_resized_crop(
    x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, size: int | None = None, scale=None
) -> torch.Tensor:
    """Per-sample random resized crop (+ optional rotation and flip) with one ``grid_sample`` call."""
    b, device = x.shape[0], x.device
    size = size or cfg.size
    low, high = scale or cfg.scale
    area = _uniform(b, low, high, gen, device)
    log_ratio = _uniform(b, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), gen, device)
    ratio = torch.exp(log_ratio)
    # crop width/height as fractions of the image side, clamped to fit
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (_uniform(b, 0, 1, gen, device) * (1 - w) + w / 2) * 2 - 1
    cy = (_uniform(b, 0, 1, gen, device) * (1 - h) + h / 2) * 2 - 1
    angle = _uniform(b, -cfg.rotation, cfg.rotation, gen, device) * math.pi / 180
    flip = torch.where(_bernoulli(b, cfg.hflip, gen, device), -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(b, 2, 3, device=device, dtype=x.dtype)
    theta[:, 0, 0] = w * cos * flip
    theta[:, 0, 1] = -h * sin
    theta[:, 1, 0] = w * sin * flip
    theta[:, 1, 1] = h * cos
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def color_jitter(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation jitter (fixed order), applied to each sample with ``jitter_p``."""
    b, device = x.shape[0], x.device
    apply = _bernoulli(b, cfg.jitter_p, gen, device).view(b, 1, 1, 1)

    def factor(strength: float) -> torch.Tensor:
        return _uniform(b, max(0.0, 1 - strength), 1 + strength, gen, device).view(b, 1, 1, 1)

    y = x * factor(cfg.brightness)
    mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * factor(cfg.contrast) + mean
    gray = _gray(y)
    y = (y - gray) * factor(cfg.saturation) + gray
    if cfg.hue > 0:  # drawn only when asked, so recipes without hue keep their random stream
        y = shift_hue(y.clamp(0, 1), _uniform(b, -cfg.hue, cfg.hue, gen, device))
    return torch.where(apply, y.clamp(0, 1), x)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images ``x [B,3,H,W]`` in [0,1] by ``shift [B]`` turns (HSV, as torchvision's
    ``adjust_hue``); value and saturation are kept."""
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.max(dim=1).values, x.min(dim=1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    v = maxc
    # HSV -> RGB: channel n gets v - v s max(0, min(k, 4 - k, 1)) with k = (n + 6h) mod 6, n = 5, 3, 1
    out = [v - v * s * torch.clamp(torch.minimum((n + 6 * h) % 6, 4 - (n + 6 * h) % 6), 0, 1) for n in (5, 3, 1)]
    return torch.stack(out, dim=1)


def random_grayscale(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    apply = _bernoulli(x.shape[0], p, gen, x.device).view(-1, 1, 1, 1)
    return torch.where(apply, _gray(x), x)


def gaussian_blur(x: torch.Tensor, p: float, gen: torch.Generator, sigma=(0.1, 2.0)) -> torch.Tensor:
    """Per-sample Gaussian blur with sigma ~ U(sigma), kernel ~ 10% of the side (SimCLR)."""
    b, c, h, _ = x.shape
    apply = _bernoulli(b, p, gen, x.device).view(-1, 1, 1, 1)
    radius = max(1, int(0.05 * h))
    s = _uniform(b, sigma[0], sigma[1], gen, x.device).view(b, 1)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype).view(1, -1)
    kernel = torch.exp(-(offsets**2) / (2 * s**2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [B, 2r+1]
    # separable depthwise conv with a different kernel per sample: fold batch into channels
    k = kernel.repeat_interleave(c, dim=0)
    xf = x.reshape(1, b * c, h, -1)
    xf = F.conv2d(F.pad(xf, (radius, radius, 0, 0), mode="reflect"), k.view(b * c, 1, 1, -1), groups=b * c)
    xf = F.conv2d(F.pad(xf, (0, 0, radius, radius), mode="reflect"), k.view(b * c, 1, -1, 1), groups=b * c)
    return torch.where(apply, xf.view_as(x), x)


def solarize(x: torch.Tensor, p: float, gen: torch.Generator, threshold: float = 0.5) -> torch.Tensor:
    apply = _bernoulli(x.shape[0], p, gen, x.device).view(-1, 1, 1, 1)
    return torch.where(apply & (x >= threshold), 1 - x, x)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def saliency_masks(x: torch.Tensor, blur_sigma: float = 1.5, threshold: float = 1.5) -> torch.Tensor:
    """Foreground estimate ``[B,1,H,W]`` (float 0/1) of images ``x [B,3,H,W]`` in [0,1]: spectral-residual
    saliency (Hou & Zhang, CVPR 2007), thresholded at ``threshold`` x its per-image mean.

    A coarse estimate: on mnist5k digits its IoU with the ink (pixels > 0.3) is about 0.58; on large
    flat objects it marks their outline more than their inside, as the method does.

    The background-augmentation paper takes masks from a pretrained saliency network (DeepUSPS); with
    no network weights here, this classic training-free detector stands in for it. Steps: log amplitude
    spectrum minus its 3x3 local average (the "spectral residual"), back to the image with the original
    phase, squared magnitude, Gaussian smoothing. The result is deterministic (no random draws).
    """
    gray = _gray(x)[:, :1].float()  # [B,1,H,W]
    spec = torch.fft.fft2(gray)
    log_amp, phase = torch.log(spec.abs() + 1e-8), torch.angle(spec)
    residual = log_amp - F.avg_pool2d(F.pad(log_amp, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    sal = torch.fft.ifft2(torch.exp(residual + 1j * phase)).abs() ** 2
    radius = max(1, int(round(2 * blur_sigma)))
    k = torch.exp(-torch.arange(-radius, radius + 1, dtype=sal.dtype, device=sal.device) ** 2 / (2 * blur_sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    sal = F.conv2d(F.pad(sal, (radius, radius, 0, 0), mode="reflect"), k)
    sal = F.conv2d(F.pad(sal, (0, 0, radius, radius), mode="reflect"), k.transpose(2, 3))
    return (sal > threshold * sal.mean(dim=(2, 3), keepdim=True)).to(x.dtype)


def object_free_background(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x [B,3,H,W]`` with the object (``mask [B,1,H,W]`` = 1) erased: each object pixel takes the pixel of
    the same image half a side away (rolled by (H/2, W/2), then (H/2, 0), then (0, W/2)) when that one is
    background, and the mean background colour where none is. A texture (noise) background stays a
    texture, so the hole does not show the object's silhouette as a flat patch."""
    h, w = x.shape[-2:]
    bg = 1 - mask
    mean = (x * bg).sum(dim=(2, 3), keepdim=True) / bg.sum(dim=(2, 3), keepdim=True).clamp(min=1)
    out, hole = x * bg + mean * mask, mask > 0
    for shift in ((h // 2, w // 2), (h // 2, 0), (0, w // 2)):
        take = hole & (torch.roll(mask, shift, dims=(2, 3)) == 0)
        out = torch.where(take, torch.roll(x, shift, dims=(2, 3)), out)
        hole = hole & ~take
    return out


def rescale_objects(
    x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator, p: float = 1.0,
    size: tuple[float, float] = (0.15, 0.35), border: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask-driven object rescale: each selected object is scaled about its centre and moved, then drawn over
    its own object-free background (:func:`object_free_background`).

    Args:
        x: ``[B,3,H,W]`` images in [0,1]. mask: ``[B,1,H,W]`` foreground masks (1 = object).
        gen: per sample, draws whether it applies (``p``), the new half-extent and the new centre.
        size: range of the new half-extent (half the larger side of the mask's bounding box) as fractions
            of the image side; the scale factor is one number for both axes, so the shape keeps its form.
        border: pixels kept free at the image border (the ``shapes`` generator keeps one).

    Returns:
        ``(images, masks)``: the rescaled images and their new masks (float 0/1; ``[B,1,H,W]``). The new
        bounding box lies inside the border at a uniform position; samples not selected, and those with an
        empty mask, come back unchanged.
    """
    if mask.shape[0] != x.shape[0] or mask.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"masks {tuple(mask.shape)} do not match images {tuple(x.shape)}")
    if not 0 < size[0] <= size[1]:
        raise ValueError(f"object size range must satisfy 0 < low <= high, got {size}")
    b, (h, w), device = x.shape[0], x.shape[-2:], x.device
    draws = rand_per_sample(b, gen, (4,)).to(device, x.dtype)  # apply, half-extent, centre x, centre y
    m = (mask > 0.5).to(x.dtype)
    rows, cols = m.amax(dim=3)[:, 0] > 0, m.amax(dim=2)[:, 0] > 0  # [B,H], [B,W]
    present = rows.any(dim=1)

    def extent(on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # continuous box [first, last + 1] of the occupied lines: centre and half-length in pixels
        idx = torch.arange(on.shape[1], device=device, dtype=x.dtype)
        first = torch.where(on, idx, torch.full_like(idx, float(on.shape[1]))).amin(dim=1)
        last = torch.where(on, idx, torch.full_like(idx, -1.0)).amax(dim=1)
        return (first + last + 1) / 2, ((last + 1 - first) / 2).clamp(min=0.5)

    cy, ry = extent(rows)
    cx, rx = extent(cols)
    target = (size[0] + draws[:, 1] * (size[1] - size[0])) * min(h, w)
    room = torch.minimum((w - 2 * border) / (2 * rx), (h - 2 * border) / (2 * ry))
    s = torch.minimum(target / torch.maximum(rx, ry), room)  # one scale for both axes, clamped to fit
    nx = border + s * rx + draws[:, 2] * (w - 2 * border - 2 * s * rx)
    ny = border + s * ry + draws[:, 3] * (h - 2 * border - 2 * s * ry)
    # output pixel p (continuous coordinates) samples input c + (p - n) / s; as affine_grid's normalised map
    theta = torch.zeros(b, 2, 3, device=device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = 1 / s, 1 / s
    theta[:, 0, 2] = (2 * cx / w - 1) + (1 - 2 * nx / w) / s
    theta[:, 1, 2] = (2 * cy / h - 1) + (1 - 2 * ny / h) / s
    grid = F.affine_grid(theta, [b, 3, h, w], align_corners=False)
    cover = F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    colour = F.grid_sample(x * m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    new_mask = (cover > 0.5).to(x.dtype)
    new_x = torch.where(new_mask > 0, colour / cover.clamp(min=1e-6), object_free_background(x, m)).clamp(0, 1)
    apply = ((draws[:, 0] < p) & present).view(b, 1, 1, 1)
    return torch.where(apply, new_x, x), torch.where(apply, new_mask, mask.to(x.dtype))


def background_augment(
    x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator, remove_p: float = 0.0, swap_p: float = 0.0,
    fill: float = 0.5,
) -> torch.Tensor:
    """Background augmentation (Ryali et al., "Characterizing and Improving the Robustness of
    Self-Supervised Learning through Background Augmentations", 2021): ``BG_RM`` and ``BG_Random``.

    Args:
        x: ``[B,3,H,W]`` raw images in [0,1]. mask: ``[B,1,H,W]`` foreground masks (1 = object).
        gen: draws, per sample, which (if any) change applies and whose background is taken.
        remove_p: probability of ``BG_RM``: the background becomes the constant ``fill`` (gray).
        swap_p: probability of ``BG_Random``: the background becomes that of another image of the batch
            (``j ~ U{0..B-1}``), whose own object is first erased (:func:`object_free_background`) so
            no second object, nor its silhouette, appears (the paper pastes onto object-free backgrounds).

    Returns:
        ``[B,3,H,W]``: ``mask * x + (1 - mask) * background``; samples drawn for neither keep ``x``.
        The two events are exclusive: ``u < remove_p`` removes, ``remove_p <= u < remove_p + swap_p`` swaps.
    """
    if mask.shape[0] != x.shape[0] or mask.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"masks {tuple(mask.shape)} do not match images {tuple(x.shape)}")
    if remove_p < 0 or swap_p < 0 or remove_p + swap_p > 1:
        raise ValueError(f"need remove_p, swap_p >= 0 with remove_p + swap_p <= 1, got {remove_p}, {swap_p}")
    b = x.shape[0]
    u = rand_per_sample(b, gen).to(x.device).view(b, 1, 1, 1)
    partner = randint_per_sample(b, b, gen).to(x.device)
    m = mask.to(x.dtype)
    bg_only = 1 - m
    swapped = m * x + bg_only * object_free_background(x, m)[partner]
    removed = m * x + bg_only * fill
    return torch.where(u < remove_p, removed, torch.where(u < remove_p + swap_p, swapped, x))


class ViewAugment:
    """One random view of every image in a batch: crop -> jitter -> gray -> blur -> solarize -> normalise."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    @property
    def uses_background(self) -> bool:
        """True when the recipe asks for background augmentation (then the trainer binds masks per batch)."""
        return self.cfg.bg_remove_p > 0 or self.cfg.bg_swap_p > 0 or self.cfg.object_rescale_p > 0

    def bind(self, images: torch.Tensor, masks: torch.Tensor) -> ViewAugment:
        """This augmentation, knowing the foreground ``masks [B,1,H,W]`` of the batch ``images``: every view
        of that very tensor gets background augmentation first (other tensors, e.g. SCAN's fetched
        neighbours, are augmented as usual)."""
        return _BoundViewAugment(self.cfg, images, masks)

    def __call__(self, x: torch.Tensor, gen: torch.Generator, size: int | None = None, scale=None) -> torch.Tensor:
        cfg = self.cfg
        x = self._background(x, gen)
        x = random_resized_crop(x, cfg, gen, size=size, scale=scale)
        if cfg.jitter_p > 0:
            x = color_jitter(x, cfg, gen)
        if cfg.gray_p > 0:
            x = random_grayscale(x, cfg.gray_p, gen)
        if cfg.blur_p > 0:
            x = gaussian_blur(x, cfg.blur_p, gen)
        if cfg.solarize_p > 0:
            x = solarize(x, cfg.solarize_p, gen)
        return normalize(x, cfg.mean, cfg.std)

    def _background(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return x

    def views(self, x: torch.Tensor, gen: torch.Generator, n: int = 2) -> list[torch.Tensor]:
        return [self(x, gen) for _ in range(n)]

    def multi_crop(
        self, x: torch.Tensor, gen: torch.Generator, n_large: int = 2, n_small: int = 0, small_size: int | None = None,
        small_scale=(0.05, 0.4),
    ) -> list[torch.Tensor]:
        """SwAV multi-crop: ``n_large`` full-size views then ``n_small`` small low-resolution views."""
        small_size = small_size or max(8, self.cfg.size * 3 // 7)
        large_scale = (max(self.cfg.scale[0], small_scale[1]), self.cfg.scale[1])
        out = [self(x, gen, scale=large_scale) for _ in range(n_large)]
        out += [self(x, gen, size=small_size, scale=small_scale) for _ in range(n_small)]
        return out


class _BoundViewAugment(ViewAugment):
    """:meth:`ViewAugment.bind`: background augmentation of one batch whose masks are known."""

    def __init__(self, cfg: AugmentConfig, images: torch.Tensor, masks: torch.Tensor):
        super().__init__(cfg)
        self.images, self.masks = images, masks

    def _background(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if x is not self.images:
            return x
        masks = self.masks
        if self.cfg.object_rescale_p > 0:  # drawn only when asked: recipes without it keep their random stream
            x, masks = rescale_objects(x, masks, gen, self.cfg.object_rescale_p, self.cfg.object_size)
        return background_augment(x, masks, gen, self.cfg.bg_remove_p, self.cfg.bg_swap_p)
