"""CMO: Context-rich Minority Oversampling (Park et al., "The Majority Can Help the Minority:
Context-rich Minority Oversampling for Long-tailed Classification", CVPR 2022).

A second stream of images is drawn with class weights ``1 / n_c`` (a class-balanced, minority-heavy
sampler) and its *foregrounds* are pasted onto the images of the ordinary, majority-heavy batch, so
rare classes are seen on the many contexts of the frequent ones:

- generally (the paper): CutMix (Yun et al. 2019). One box per batch with area fraction
  ``1 - lam``, ``lam ~ Beta(1, 1)``, centre uniform and clipped to the image; the minority image fills
  the box; the loss is ``lam * CE(y_major) + (1 - lam) * CE(y_minor)`` with ``lam`` recomputed from the
  clipped box;
- on ``shapes`` / ``shapes_lt*``, where the generator gives exact foreground masks
  (``StepContext.layers``): the minority shape, cut out by its mask, on the majority image's clean
  background (its own shape removed). The background carries no class, so the target is the
  minority class alone (weight 1).

The mix is applied to a whole batch with probability ``prob`` (0.5 in the paper), on the raw images
before the view augmentation (the paper mixes after it; here one augmentation pass follows). All
draws come from ``ctx.generator``; the per-sample minority draw goes through ``rand_per_sample``, so
two ranks with batch B draw the minority images of one process with 2B.
"""

from __future__ import annotations

import torch

from train.augment import rand_per_sample


def minority_weights(labels: torch.Tensor, counts: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """``[N]`` sampling weight of each training image: ``n_{y_i} ** -power`` (CMO's weighted sampler)."""
    return counts.double().clamp_min(1)[labels].pow(-power)


def sample_by_weight(weights: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n]`` indices drawn with replacement with probability ``weights / weights.sum()`` (inverse CDF of
    uniforms from :func:`rand_per_sample`: rank-consistent under DDP)."""
    cdf = weights.double().cumsum(0)
    u = rand_per_sample(n, generator).double() * float(cdf[-1])
    return torch.searchsorted(cdf.cpu(), u, right=True).clamp_max(weights.shape[0] - 1)


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of a box with side ratio ``sqrt(1 - lam)``, centre uniform, clipped (CutMix's rand_bbox)."""
    cut = (1.0 - lam) ** 0.5
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = (int(v) for v in (torch.rand(2, generator=generator) * torch.tensor([height, width])).long())
    return max(cy - ch // 2, 0), min(cy + ch // 2, height), max(cx - cw // 2, 0), min(cx + cw // 2, width)


def cmo_mix(major: torch.Tensor, minor: torch.Tensor, generator: torch.Generator,
            minor_masks: torch.Tensor | None = None, major_backgrounds: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste minority foregrounds onto majority images.

    Args:
        major, minor: ``[B,3,H,W]`` raw images of the ordinary and of the minority-weighted draw.
        minor_masks: bool ``[B,1,H,W]`` exact foreground masks of ``minor``; with ``major_backgrounds``
            (``[B,3,H,W]``, the majority images without their foreground) selects the exact-mask mode.

    Returns:
        (mixed ``[B,3,H,W]``, ``[B]`` weight of the minority label in the target: 1 with masks, the
        clipped box's area fraction with CutMix).
    """
    b, _, h, w = major.shape
    if minor_masks is not None and major_backgrounds is not None:
        return torch.where(minor_masks, minor, major_backgrounds), torch.ones(b, device=major.device)
    lam = float(torch.rand((), generator=generator))  # Beta(1, 1)
    y0, y1, x0, x1 = cutmix_box(h, w, lam, generator)
    mixed = major.clone()
    mixed[:, :, y0:y1, x0:x1] = minor[:, :, y0:y1, x0:x1]
    return mixed, torch.full((b,), (y1 - y0) * (x1 - x0) / (h * w), device=major.device)
