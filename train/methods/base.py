"""What every method provides to the trainer, and the registry of methods by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from zoo.model import ZooModel

METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def wrap(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}{hint} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


@dataclass
class StepContext:
    """What a training step may use besides the batch: augmentation, RNG, schedule position."""

    augment: Callable[..., Any]
    generator: torch.Generator
    step: int = 0
    total_steps: int = 1
    epoch: int = 0
    epochs: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Iterates over (raw images [B,3,H,W] in [0,1], dataset indices [B]) of the whole training set in a
    # fixed order: for methods that cluster the dataset each epoch. Optional ``batch_size``; ``shard=True``
    # gives only this rank's share under DDP (``train.clustering.iterate_shard``; the caller gathers).
    iterate_dataset: Callable[[], Any] | None = None
    dataset_size: int = 0
    # Raw images [B,3,H,W] in [0,1] of the given dataset indices (SCAN fetches neighbours with it).
    fetch: Callable[[torch.Tensor], torch.Tensor] | None = None
    optimizer: torch.optim.Optimizer | None = None
    seed: int = 0
    # Class labels ``[B]`` (long, on ``device``) of the given dataset indices, from the dataset's targets;
    # None when the training data is unlabelled. Only supervised methods use it (``Method.batch_labels``).
    labels: Callable[[torch.Tensor], torch.Tensor] | None = None
    # (foreground masks bool [B,1,H,W], clean backgrounds [B,3,H,W] in [0,1]) of the given dataset indices, on
    # ``device``, when the training set's generator knows them exactly (shapes, shapes_lt*); else None. CMO uses it.
    layers: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


class Method(nn.Module):
    """A self-supervised method: an encoder (``self.model``, a ZooModel) plus the heads it trains.

    Subclasses implement ``training_step`` and may override the hooks. All state that must
    survive a resume (queues, EMA targets, pseudo-labels) lives in parameters or buffers.
    """

    name: ClassVar[str] = "base"

    def __init__(self, model: ZooModel):
        super().__init__()
        self.model = model

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        """``images``: raw float ``[B,3,H,W]`` in [0,1]. Returns a dict with a scalar ``loss``."""
        raise NotImplementedError

    def batch_labels(self, indices: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The labels ``[B]`` of dataset ``indices``; a clear error when the training data has none."""
        if ctx.labels is None:
            raise ValueError(
                f"method {self.name!r} is supervised and needs labelled training data, but the dataset has no "
                "labels (every image needs a class; imagefolder and stl10 'unlabeled' images have none)"
            )
        return ctx.labels(indices)

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: ``{"params": [...]}`` plus an optional ``"lr_mult"`` (a group's
        rate is that multiple of the recipe's). Default: every trainable parameter in one group."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def on_train_start(self, ctx: StepContext) -> None:  # noqa: B027 - optional hook
        pass

    def on_epoch_start(self, ctx: StepContext) -> None:  # noqa: B027 - optional hook
        pass

    def on_before_optimizer_step(self, ctx: StepContext) -> None:  # noqa: B027 - e.g. freeze prototypes
        pass

    def on_after_optimizer_step(self, ctx: StepContext) -> None:  # noqa: B027 - EMA updates go here
        pass

    def schedule_restarts(self, epochs: int) -> list[int]:
        """Epochs at which the learning-rate schedule starts again (cosine per segment, warm-up only
        in the first). ``[0]``: one schedule over the run. SCAN restarts it for self-labelling."""
        return [0]

    def sample_order(self, epoch: int, seed: int, n: int) -> torch.Tensor | None:
        """The epoch's sample order, or None for a uniform shuffle. Must be a pure function of
        (epoch, seed, method state) so a resumed run sees the same order (DeepCluster's
        uniform sampling over pseudo-classes overrides this)."""
        return None

    def export(self) -> ZooModel:
        """The encoder (+ cluster head) to publish; heads used only for training are dropped."""
        return self.model
