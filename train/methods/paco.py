"""PaCo: Parametric Contrastive Learning (Cui et al., ICCV 2021), and GPaCo (Cui et al., "Generalized
Parametric Contrastive Learning", TPAMI 2023).

Supervised contrastive learning is biased towards the head classes of a long-tailed dataset: an
anchor of a frequent class has many positives, one of a rare class few. PaCo adds a set of learnable
class centres to the contrast set, so every anchor has exactly one parametric positive (the centre
of its class), and down-weights the sample positives by ``alpha``. The centres are the weights of a
linear classifier on the encoder features, so ``c_j . G(x_i)`` are classifier logits; at test time
that classifier predicts the class.

What is implemented here, following the authors' released code (``LT/losses.py`` and
``GPaCo/LT/losses.py`` of dvlab-research/Parametric-Contrastive-Learning):

- ``paco`` (default): MoCo-style, as in the paper. Anchors are the queries (view 1, encoder + MLP);
  the contrast set is the queries, the keys of view 2 from a momentum key encoder, and a FIFO queue
  of earlier keys with their labels. During training the classifier logits get the log class
  prior added (logit adjustment, as the PaCo long-tailed code does; ``logit_adjust=0`` turns it off).
- ``gpaco=True``: no momentum encoder; both views go through the same encoder, both are anchors,
  and both get the centre term; the centre targets can be label-smoothed (``smooth``).
- ``queue_length=0``: in-batch contrast only (no queue), for either variant.

Differences from the released code: the queue starts empty and only filled slots are used (the code
starts it with random vectors and random labels); no shuffled BN for the keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from train.distributed import all_gather_rows
from train.methods.base import StepContext, register_method
from train.methods.moco import copy_weights_, frozen_copy, momentum_update
from train.methods.supervised import ClassifierMethod
from zoo.heads import ProjectionHead
from zoo.model import ZooModel


def paco_loss(
    features: torch.Tensor, labels: torch.Tensor, centre_logits: torch.Tensor, num_anchors: int,
    temperature: float = 0.07, alpha: float = 0.05, beta: float = 1.0, gamma: float = 1.0,
    centre_temperature: float = 1.0, smooth: float = 0.0,
) -> torch.Tensor:
    """The parametric contrastive loss (Cui et al. 2021; GPaCo's label smoothing with ``smooth``).

    Args:
        features: ``[M,D]`` L2-normalised contrast set; its first ``num_anchors`` rows are the anchors.
        labels: ``[M]`` class of each row.
        centre_logits: ``[N,C]`` logits of the N anchors against the C class centres (the classifier's
            outputs, any training-time adjustment already added); divided by ``centre_temperature``.
        temperature: tau of the sample similarities ``f_i . f_m / tau``.
        alpha: weight of each sample positive. beta: weight of the centre positive.
        gamma: weight of the sample terms in the denominator (1 in the paper).
        smooth: GPaCo: the centre target is ``1 - smooth`` on the true class and ``smooth / (C-1)`` elsewhere.

    Returns:
        scalar: mean over anchors i of ``-sum_p w_p log P_p / sum_p w_p`` with
        ``P_p = exp(l_p) / (sum_c exp(centre_ic) + gamma * sum_{m != i} exp(f_i.f_m/tau))`` over the
        positives p: the centres (weight ``beta * target_c``) and the other rows of class ``y_i``
        (weight ``alpha`` each).
    """
    n, c = centre_logits.shape
    m = features.shape[0]
    sample_logits = features[:n] @ features.T / temperature  # [N,M]
    centre = centre_logits / centre_temperature  # [N,C]
    not_self = torch.ones(n, m, dtype=torch.bool, device=features.device)
    not_self[torch.arange(n), torch.arange(n)] = False
    # Denominator: every centre, and every sample but the anchor (scaled by gamma; gamma = 0 drops them).
    terms = [centre]
    if gamma > 0:
        terms.append(sample_logits.masked_fill(~not_self, float("-inf")) + math.log(gamma))
    log_denominator = torch.logsumexp(torch.cat(terms, dim=1), dim=1, keepdim=True)
    # Positive weights: centres (one-hot, or smoothed), samples of the anchor's class.
    one_hot = F.one_hot(labels[:n], c).to(features.dtype)
    centre_w = beta * (one_hot * (1 - smooth) + (1 - one_hot) * (smooth / (c - 1) if c > 1 else 0.0))
    sample_w = alpha * ((labels[:n].view(-1, 1) == labels.view(1, -1)) & not_self).to(features.dtype)
    log_prob_centre = centre - log_denominator
    log_prob_sample = (sample_logits - log_denominator).masked_fill(sample_w == 0, 0.0)
    total = (centre_w * log_prob_centre).sum(dim=1) + (sample_w * log_prob_sample).sum(dim=1)
    return -(total / (centre_w.sum(dim=1) + sample_w.sum(dim=1))).mean()


@register_method("paco")
class PaCo(ClassifierMethod):
    """PaCo / GPaCo: encoder + MLP (contrastive embeddings) + linear classifier (the class centres).

    See the module docstring for the two variants. ``momentum`` is the key encoder's EMA rate (PaCo only).
    """

    def __init__(
        self, model: ZooModel, num_classes: int | None = None, proj_hidden_dim: int = 2048, proj_dim: int = 128,
        temperature: float = 0.07, alpha: float = 0.05, beta: float = 1.0, gamma: float = 1.0,
        centre_temperature: float = 1.0, queue_length: int = 1024, momentum: float = 0.999, gpaco: bool = False,
        smooth: float = 0.0, logit_adjust: float = 1.0,
    ):
        super().__init__(model, num_classes)
        if queue_length < 0 or temperature <= 0 or not 0 <= smooth < 1:
            raise ValueError(f"need queue_length >= 0 ({queue_length}), temperature > 0 ({temperature}), "
                             f"0 <= smooth < 1 ({smooth})")
        # Linear-BN-ReLU-Linear, as the PaCo long-tailed code's MLP head.
        self.projector = ProjectionHead(model.num_features, proj_hidden_dim, proj_dim, num_layers=2)
        self.temperature, self.alpha, self.beta, self.gamma = temperature, alpha, beta, gamma
        self.centre_temperature, self.smooth, self.logit_adjust = centre_temperature, smooth, logit_adjust
        self.gpaco = gpaco
        self.momentum = momentum
        if not gpaco:
            self.key_model = frozen_copy(model)
            self.key_projector = frozen_copy(self.projector)
        self.register_buffer("queue", torch.zeros(queue_length, proj_dim))  # [K,D], slots [0, filled) valid
        self.register_buffer("queue_labels", torch.zeros(queue_length, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """FIFO write of ``keys [N,D]`` and their labels; the newest ``queue_length`` survive."""
        size = self.queue.shape[0]
        if size == 0:
            return
        n = keys.shape[0]
        ptr = (int(self.queue_ptr) + max(0, n - size)) % size
        keys, labels = keys[-size:], labels[-size:]
        pos = (ptr + torch.arange(keys.shape[0], device=keys.device)) % size  # distinct slots
        self.queue[pos] = keys.detach()
        self.queue_labels[pos] = labels
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % size)
        self.queue_filled.fill_(min(size, int(self.queue_filled) + n))

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B,3,H,W]`` -> (encoder features ``[B,F]``, L2-normalised embeddings ``[B,D]``)."""
        f = self.model.forward_features(x)
        return f, F.normalize(self.projector(f), dim=1)

    @torch.no_grad()
    def embed_keys(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_projector(self.key_model.forward_features(x)), dim=1)

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        labels = self.batch_labels(indices, ctx)
        v1, v2 = ctx.augment.views(images, ctx.generator, 2)
        if self.gpaco:  # both views are anchors, from the online encoder
            f, z = self.embed(torch.cat([v1, v2]))
            contrast, contrast_labels = z, torch.cat([labels, labels])
            keys = z[labels.shape[0]:].detach()
        else:  # the queries are the anchors; the keys come from the momentum encoder
            f, q = self.embed(v1)
            keys = self.embed_keys(v2)
            contrast, contrast_labels = torch.cat([q, keys]), torch.cat([labels, labels])
        num_anchors = f.shape[0]
        filled = int(self.queue_filled)  # the queue as it was before this batch's keys are enqueued
        contrast = torch.cat([contrast, self.queue[:filled].clone()])
        contrast_labels = torch.cat([contrast_labels, self.queue_labels[:filled].clone()])
        centre_logits = self.classify_features(f)
        if self.logit_adjust:
            centre_logits = centre_logits + self.logit_adjust * self.log_prior()
        loss = paco_loss(contrast, contrast_labels, centre_logits, num_anchors, self.temperature, self.alpha,
                         self.beta, self.gamma, self.centre_temperature, self.smooth)
        if self.training:  # evaluating the loss (model.eval()) leaves the queue alone
            # under DDP the queue takes every rank's keys and labels, in rank order (the released code's
            # concat_all_gather), so all ranks contrast against the same global queue
            self.enqueue(all_gather_rows(keys), all_gather_rows(labels))
        return {"loss": loss}

    def on_train_start(self, ctx: StepContext) -> None:
        super().on_train_start(ctx)
        if not self.gpaco and ctx.step == 0:  # the key encoder starts as a copy of the query encoder
            copy_weights_(self.model, self.key_model)
            copy_weights_(self.projector, self.key_projector)

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        if not self.gpaco:
            momentum_update(self.model, self.key_model, self.momentum)
            momentum_update(self.projector, self.key_projector, self.momentum)
