"""Un-Mix: image mixtures within the batch (Shen et al., "Un-Mix: Rethinking Image Mixtures for Unsupervised
Visual Representation Learning", AAAI 2022). An option of SimCLR, MoCo and BYOL (``unmix: true`` in
``method_kwargs``), not a method of its own.

Each step one view is mixed with the same batch in reverse order, ``x_mix = lam x + (1 - lam) x[::-1]``
("global" mixup) or with a box of ``x[::-1]`` pasted in (``region``, CutMix; ``lam`` is then the area
kept), alternating between the two from step to step as the official code does. The mixed view's
embedding is trained against the *unmixed* targets of both sources with soft weights in the mixing
ratio: ``lam * L(mix, target_i) + (1 - lam) * L(mix, target_{B-1-i})``, added to the method's own loss
(the official code sums the two). ``lam ~ Beta(alpha, alpha)``, one per step (the official code draws one
per batch), from the step's generator, so a resumed run mixes the same way.

Under DDP the reversal is within each rank's batch, as in the official code (its batches are per GPU);
Un-Mix keeps no state, so only the partner of each image differs from a one-process run.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Mixture(NamedTuple):
    """A mixed batch: ``images [B,3,H,W]``, ``lam`` (weight of each image itself, a float) and ``mode``."""

    images: torch.Tensor
    lam: float
    mode: str


def _beta(alpha: float, gen: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha) from uniforms of ``gen`` (Jöhnk's method, exact for any alpha > 0;
    torch's Beta sampler takes no generator). Beta(1, 1) is U(0, 1): one uniform."""
    if alpha <= 0:
        raise ValueError(f"unmix_alpha must be > 0, got {alpha}")
    if alpha == 1.0:
        return float(torch.rand((), generator=gen))
    while True:
        u, v = torch.rand(2, generator=gen).tolist()
        x, y = u ** (1 / alpha), v ** (1 / alpha)
        if 0 < x + y <= 1:
            return x / (x + y)


def mix_batch(x: torch.Tensor, gen: torch.Generator, mode: str, alpha: float = 1.0) -> Mixture:
    """``x [B,3,H,W]`` mixed with ``x.flip(0)``: ``mode`` "global" (mixup) or "region" (CutMix box).

    Region: a box of side ``sqrt(1 - lam)`` of the image, centred uniformly (clipped at the border), is
    copied from the partner; ``lam`` is then recomputed as the exact fraction of pixels kept.
    """
    lam = _beta(alpha, gen)
    partner = x.flip(0)
    if mode == "global":
        return Mixture(lam * x + (1 - lam) * partner, lam, mode)
    if mode != "region":
        raise ValueError(f"Un-Mix mode must be 'global' or 'region', got {mode!r}")
    h, w = x.shape[-2:]
    cut = math.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = (torch.rand(2, generator=gen) * torch.tensor([h, w])).long().tolist()
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    mixed = x.clone()
    mixed[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
    return Mixture(mixed, 1 - (y1 - y0) * (x1 - x0) / (h * w), mode)


def unmix_mode(step: int) -> str:
    """The official code alternates: global mixture on even steps, region mixture on odd ones."""
    return "global" if step % 2 == 0 else "region"


def soft_mixture_loss(loss_fn, mixed: torch.Tensor, targets: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * loss_fn(mixed, targets) + (1 - lam) * loss_fn(mixed, targets.flip(0))``: the mixed batch's
    embeddings ``[B,D]`` against their two sources' targets ``[B,D]``, weighted by the mixing ratio."""
    return lam * loss_fn(mixed, targets) + (1 - lam) * loss_fn(mixed, targets.flip(0))


def unmix_log(mix: Mixture, mix_loss: torch.Tensor) -> dict[str, torch.Tensor | float]:
    """Extra columns of the training log for a step with a mixture: the step's ``lam``, whether it was a region
    mix, and the mixture term alone (detached), so a run's ``log.csv`` shows how the term tracks ``lam``."""
    return {"unmix_lam": mix.lam, "unmix_region": float(mix.mode == "region"), "unmix_loss": mix_loss.detach()}
