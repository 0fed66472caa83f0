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
    gray_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> AugmentConfig:
        d = dict(d)
        for key in ("scale", "ratio", "mean", "std"):
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
    return torch.where(apply, y.clamp(0, 1), x)


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


class ViewAugment:
    """One random view of every image in a batch: crop -> jitter -> gray -> blur -> solarize -> normalise."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def __call__(self, x: torch.Tensor, gen: torch.Generator, size: int | None = None, scale=None) -> torch.Tensor:
        cfg = self.cfg
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
