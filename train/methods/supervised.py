"""Supervised cross-entropy: an encoder + linear classifier trained on labels, the reference that
the long-tailed contrastive methods (SupCon, PaCo, BCL) are compared with.

Also the pieces those methods share: :class:`ClassifierMethod` (a linear classifier on the encoder
features and the training set's class counts) and logit-adjusted cross entropy (Menon et al.,
"Long-tail learning via logit adjustment", ICLR 2021), which PaCo and BCL use on long-tailed data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from train.methods.base import Method, StepContext, register_method
from zoo.model import ZooModel


def log_class_prior(counts: torch.Tensor) -> torch.Tensor:
    """``[C]`` class counts -> ``[C]`` ``log(n_c / sum n)`` (uniform when every count is 0; an empty
    class gets ``log(1e-12)`` instead of ``-inf``)."""
    counts = counts.float()
    if float(counts.sum()) == 0:
        return torch.full_like(counts, -math.log(len(counts)))
    return (counts / counts.sum()).clamp_min(1e-12).log()


def logit_adjusted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor | None = None, tau: float = 1.0,
) -> torch.Tensor:
    """Logit-adjusted softmax cross entropy (Menon et al. 2021, the logit-adjusted loss).

    Args:
        logits: ``[B,C]`` classifier outputs. labels: ``[B]`` class indices.
        log_prior: ``[C]`` ``log pi_c`` of the training label distribution; None for plain cross entropy.
        tau: the adjustment's strength (1 in the paper; 0 gives plain cross entropy).

    Returns:
        scalar: ``mean_i -log softmax(logits_i + tau * log_prior)[y_i]``. At test time the plain ``logits``
        are used, which favours the rare classes by exactly the prior that training added.
    """
    if log_prior is not None and tau != 0:
        logits = logits + tau * log_prior.to(logits.dtype)
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def count_labels(ctx: StepContext, num_classes: int, method: str = "this method") -> torch.Tensor:
    """``[C]`` number of training images per class (long, on ``ctx.device``) from ``ctx.labels``."""
    if ctx.labels is None:
        raise ValueError(f"{method} is supervised and needs labelled training data; the dataset has no labels")
    labels = ctx.labels(torch.arange(ctx.dataset_size))
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"{method}: label {int(labels.max())} out of range for num_classes={num_classes}")
    return torch.bincount(labels, minlength=num_classes).to(ctx.device)


class ClassifierMethod(Method):
    """A method with a linear classifier on the encoder features (``classify_features``) that knows the
    training set's class counts (buffer ``class_counts``, filled at the start of training).

    ``num_classes`` is filled by the trainer from the dataset unless the recipe sets it.
    """

    def __init__(self, model: ZooModel, num_classes: int | None = None):
        super().__init__(model)
        if num_classes is None or num_classes < 2:
            raise ValueError(f"{type(self).__name__} needs num_classes >= 2 (the trainer fills it from a labelled "
                             f"dataset), got {num_classes}")
        self.num_classes = num_classes
        self.classifier = nn.Linear(model.num_features, num_classes)
        self.register_buffer("class_counts", torch.zeros(num_classes, dtype=torch.long))

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features ``[B,D]`` -> class logits ``[B,C]`` (no logit adjustment: the test-time rule)."""
        return self.classifier(features)

    def log_prior(self) -> torch.Tensor:
        """``[C]`` log of the training label distribution (uniform before ``on_train_start``)."""
        return log_class_prior(self.class_counts)

    def on_train_start(self, ctx: StepContext) -> None:
        self.class_counts.copy_(count_labels(ctx, self.num_classes, repr(self.name)))


@register_method("supervised")
class Supervised(ClassifierMethod):
    """Cross entropy on one augmented view through encoder + linear classifier.

    ``logit_adjust`` > 0 trains with logit-adjusted cross entropy (Menon et al. 2021) instead; 0, the
    default, is the plain cross-entropy baseline.
    """

    def __init__(self, model: ZooModel, num_classes: int | None = None, logit_adjust: float = 0.0):
        super().__init__(model, num_classes)
        self.logit_adjust = logit_adjust

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        labels = self.batch_labels(indices, ctx)
        logits = self.classify_features(self.model.forward_features(ctx.augment(images, ctx.generator)))
        loss = logit_adjusted_cross_entropy(logits, labels, self.log_prior(), self.logit_adjust)
        return {"loss": loss, "accuracy": (logits.argmax(dim=1) == labels).float().mean()}
