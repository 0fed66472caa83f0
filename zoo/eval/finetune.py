"""Low-label fine-tuning: the semi-supervised protocol's other half (SimCLR / BYOL / SwAV's 1 % and 10 %).

Where :func:`zoo.eval.lowlabel.evaluate_lowlabel` fits a linear probe on frozen features, this trains
the whole encoder with a new linear head on the same fixed labelled subset
(:func:`zoo.eval.lowlabel.lowlabel_indices`: class-stratified, nested, a pure function of the labels,
the fraction and the seed), by cross entropy, then scores the fine-tuned encoder + head on the whole
test split. The model passed in is never modified (each fraction fine-tunes a copy).

Recipe (small, as the zoo's encoders are): a fixed number of optimiser steps per fraction rather than
epochs (a 1 % subset of a 4,000-image split is one batch), batches drawn by an epoch-wise shuffle of the
subset from a generator seeded by ``seed``, no augmentation, SGD (momentum 0.9, Nesterov) or AdamW with
a cosine learning-rate decay, BatchNorm in train mode, the head initialised from ``seed``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zoo.eval.lowlabel import DEFAULT_FRACTIONS, fraction_tag, lowlabel_indices

__all__ = ["FINETUNE_DEFAULTS", "finetune", "finetune_lowlabel"]

FINETUNE_DEFAULTS: dict[str, Any] = {"steps": 200, "batch_size": 64, "lr": 0.05, "weight_decay": 5e-4,
                                     "optimizer": "sgd"}


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _stack(dataset: Any, indices: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformed images ``[n,C,H,W]`` and labels ``[n]`` of ``dataset[i]`` for ``i`` in ``indices``."""
    items = [dataset[int(i)] for i in indices]
    images = torch.stack([torch.as_tensor(x) for x, _ in items]).float()
    return images, torch.tensor([int(y) for _, y in items], dtype=torch.long)


def finetune(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 200,
             batch_size: int = 64, lr: float = 0.05, weight_decay: float = 5e-4, optimizer: str = "sgd",
             seed: int = 0, progress: bool = False) -> tuple[nn.Module, nn.Linear]:
    """Fine-tune a copy of ``model`` (``forward_features``: ``[B,C,H,W] -> [B,D]``) with a new linear head.

    ``images`` are model inputs (already normalised), ``labels`` ``[n]`` in ``0..num_classes-1``.
    Returns ``(encoder, head)``, both in eval mode, on the model's device; ``model`` is left as it was.
    """
    from tqdm.auto import tqdm

    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"fine-tuning needs matching, non-empty images and labels, got {images.shape[0]} images "
                         f"and {labels.shape[0]} labels")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"fine-tuning optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    device = _device_of(model)
    encoder = copy.deepcopy(model).to(device).requires_grad_(True)
    with torch.no_grad():
        dim = encoder.forward_features(images[:1].to(device)).shape[1]
    with torch.random.fork_rng(devices=[]):  # the head's init from the seed, the global RNG untouched
        torch.manual_seed(seed)
        head = nn.Linear(dim, num_classes).to(device)
    params = [*encoder.parameters(), *head.parameters()]
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    n, order, pos = images.shape[0], torch.empty(0, dtype=torch.long), 0
    encoder.train()
    head.train()
    for _ in tqdm(range(steps), desc="fine-tune", disable=not progress, leave=False):
        if pos >= order.numel():  # a new epoch: reshuffle the labelled subset
            order, pos = torch.randperm(n, generator=gen), 0
        batch = order[pos:pos + batch_size]
        pos += batch_size
        x, y = images[batch].to(device), labels[batch].to(device)
        loss = F.cross_entropy(head(encoder.forward_features(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return encoder.eval(), head.eval()


@torch.no_grad()
def _accuracy(encoder: nn.Module, head: nn.Linear, dataset: Any, batch_size: int) -> float:
    device, correct = _device_of(head), 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for x, y in loader:
        pred = head(encoder.forward_features(torch.as_tensor(x).float().to(device))).argmax(dim=1).cpu()
        correct += int((pred == torch.as_tensor(y).reshape(-1)).sum())
    return correct / len(dataset)


def finetune_lowlabel(model: nn.Module, train_ds: Any, test_ds: Any, fractions: Iterable[float] = DEFAULT_FRACTIONS,
                      seed: int = 0, progress: bool = False, eval_batch_size: int = 256,
                      **kwargs: Any) -> dict[str, float]:
    """Fine-tune on each labelled fraction of ``train_ds`` (the subsets of the linear mode), score on ``test_ds``.

    Datasets yield ``(model input, label)``. ``kwargs`` override :data:`FINETUNE_DEFAULTS`. Keys per
    fraction: ``lowlabel_{tag}_finetune`` (test top-1) and ``lowlabel_{tag}_n`` (labelled images used).
    """
    unknown = set(kwargs) - set(FINETUNE_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown fine-tuning option(s) {sorted(unknown)}; known: {sorted(FINETUNE_DEFAULTS)}")
    opts = {**FINETUNE_DEFAULTS, **kwargs}
    targets = np.asarray(train_ds.targets).reshape(-1)
    num_classes = int(max(targets.max(), np.asarray(test_ds.targets).max())) + 1
    out: dict[str, float] = {}
    for fraction in fractions:
        idx = lowlabel_indices(targets, float(fraction), seed)
        images, labels = _stack(train_ds, idx)
        encoder, head = finetune(model, images, labels, num_classes, seed=seed, progress=progress, **opts)
        tag = fraction_tag(float(fraction))
        out[f"lowlabel_{tag}_finetune"] = _accuracy(encoder, head, test_ds, eval_batch_size)
        out[f"lowlabel_{tag}_n"] = float(len(idx))
    return out
