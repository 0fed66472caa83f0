"""Supervised cross-entropy: an encoder + linear classifier trained on labels, the reference that
the long-tailed contrastive methods (SupCon, PaCo, BCL) are compared with.

Also the pieces those methods share: :class:`ClassifierMethod` (a linear classifier on the encoder
features and the training set's class counts) and logit-adjusted cross entropy (Menon et al.,
"Long-tail learning via logit adjustment", ICLR 2021), which PaCo and BCL use on long-tailed data.

Two more long-tailed options of the classifier: IIF (Alexandridis et al., "Inverse Image Frequency
for Long-tailed Image Recognition", IEEE TIP 2023), multiplicative logit margins ``z_c * w_c`` with
``w_c`` from the inverse image frequency of class c, used in training and at test time as the
authors' code does; and CMO (:mod:`train.cmo`), minority foregrounds pasted on majority backgrounds.
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


IIF_VARIANTS = ("raw", "smooth", "rel")


def iif_weights(counts: torch.Tensor, variant: str = "raw") -> torch.Tensor:
    """``[C]`` class counts ``n_c`` (N = their sum) -> ``[C]`` inverse image frequencies (Alexandridis et al.):

    ``raw``: ``log(N / n_c)``; ``smooth``: ``log((N + 1) / (n_c + 1)) + 1``; ``rel``: ``log((N - n_c) / n_c)``.
    An empty class counts as one image (finite weight); all ones before the counts are known (N = 0).
    """
    if variant not in IIF_VARIANTS:
        raise ValueError(f"unknown IIF variant {variant!r}; use one of {', '.join(IIF_VARIANTS)}")
    n = counts.double()
    total = n.sum()
    if float(total) == 0:
        return torch.ones_like(n, dtype=torch.float32)
    n = n.clamp_min(1)
    if variant == "raw":
        w = torch.log(total / n)
    elif variant == "smooth":
        w = torch.log((total + 1) / (n + 1)) + 1
    else:
        w = torch.log((total - n).clamp_min(1) / n)
    return w.float()


def iif_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """IIF loss: ``mean_i -log softmax(logits_i * w)[y_i]`` with ``w`` the ``[C]`` :func:`iif_weights`."""
    return F.cross_entropy(logits * weights.to(logits.dtype), labels)


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
    default, is the plain cross-entropy baseline. ``iif`` (``raw`` / ``smooth`` / ``rel``) multiplies the
    logits by the inverse image frequencies in training and at test time (:func:`iif_weights`); with
    both, the prior is added to the multiplied logits. ``cmo`` > 0 applies CMO with that probability per
    batch (:mod:`train.cmo`; exact masks on shapes, CutMix boxes elsewhere); ``cmo_power`` is the
    exponent of its ``1 / n_c`` minority sampler.
    """

    def __init__(self, model: ZooModel, num_classes: int | None = None, logit_adjust: float = 0.0,
                 iif: str | None = None, cmo: float = 0.0, cmo_power: float = 1.0):
        super().__init__(model, num_classes)
        if iif is not None and iif not in IIF_VARIANTS:
            raise ValueError(f"unknown IIF variant {iif!r}; use one of {', '.join(IIF_VARIANTS)} (or leave it unset)")
        if not 0 <= cmo <= 1:
            raise ValueError(f"cmo is a probability per batch, got {cmo}")
        self.logit_adjust, self.iif, self.cmo, self.cmo_power = logit_adjust, iif, cmo, cmo_power

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits; with IIF the multiplicative margins stay on at test time."""
        logits = self.classifier(features)
        return logits * iif_weights(self.class_counts, self.iif).to(logits) if self.iif else logits

    def per_sample_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``[B]`` training loss of each row of ``logits`` (already IIF-multiplied) against ``labels``."""
        if self.logit_adjust:
            logits = logits + self.logit_adjust * self.log_prior().to(logits)
        return F.cross_entropy(logits, labels, reduction="none")

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        labels = self.batch_labels(indices, ctx)
        minor_labels, minor_weight = labels, None
        if self.cmo > 0 and float(torch.rand((), generator=ctx.generator)) < self.cmo:
            images, minor_labels, minor_weight = self.cmo_batch(images, indices, ctx)
        logits = self.classify_features(self.model.forward_features(ctx.augment(images, ctx.generator)))
        loss = self.per_sample_loss(logits, labels)
        if minor_weight is not None:  # the mixed target: (1 - w) * CE(y_major) + w * CE(y_minor)
            loss = (1 - minor_weight) * loss + minor_weight * self.per_sample_loss(logits, minor_labels)
        return {"loss": loss.mean(), "accuracy": (logits.argmax(dim=1) == labels).float().mean()}

    def cmo_batch(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CMO: (mixed images, minority labels ``[B]``, minority weight ``[B]``) for this batch."""
        from train.cmo import cmo_mix, minority_weights, sample_by_weight

        if ctx.fetch is None or ctx.labels is None:
            raise ValueError("CMO draws minority images from the training set: it needs ctx.fetch and ctx.labels")
        if getattr(self, "_cmo_weights", None) is None:  # a function of the (fixed) training labels
            all_labels = ctx.labels(torch.arange(ctx.dataset_size)).cpu()
            self._cmo_weights = minority_weights(all_labels, self.class_counts.cpu(), self.cmo_power)
        minor_idx = sample_by_weight(self._cmo_weights, images.shape[0], ctx.generator)
        minor = ctx.fetch(minor_idx).to(images)
        masks = backgrounds = None
        if ctx.layers is not None:
            masks, _ = ctx.layers(minor_idx)
            _, backgrounds = ctx.layers(indices)
            backgrounds = backgrounds.to(images)
        mixed, weight = cmo_mix(images, minor, ctx.generator, masks, backgrounds)
        return mixed, self.batch_labels(minor_idx, ctx), weight.to(images)


@register_method("iif")
class IIF(Supervised):
    """:class:`Supervised` with IIF margins on (``iif="raw"`` by default): the name recipes and tables use."""

    def __init__(self, model: ZooModel, num_classes: int | None = None, iif: str | None = "raw",
                 logit_adjust: float = 0.0, cmo: float = 0.0, cmo_power: float = 1.0):
        super().__init__(model, num_classes, logit_adjust, iif, cmo, cmo_power)


@register_method("cmo")
class CMO(Supervised):
    """:class:`Supervised` with CMO on (``cmo=0.5``, the paper's probability): the name recipes and tables use."""

    def __init__(self, model: ZooModel, num_classes: int | None = None, cmo: float = 0.5, cmo_power: float = 1.0,
                 logit_adjust: float = 0.0, iif: str | None = None):
        super().__init__(model, num_classes, logit_adjust, iif, cmo, cmo_power)
