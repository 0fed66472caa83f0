"""ResCom: Rebalanced Siamese Contrastive Mining for Long-Tailed Recognition (Zhong et al., 2022).

Supervised contrastive learning on long-tailed data is imbalanced three ways, and ResCom answers each:

- the loss: head-class anchors dominate the average, so each anchor's term is weighted by its class's
  inverse frequency ``n_y ** -beta`` (class-balanced SupCon, :func:`rescom_loss`);
- the memory: a FIFO queue of momentum-encoder keys holds mostly head-class keys, so there is one
  queue per class, each ``queue_per_class`` long (buffers ``queue [C,L,D]``, ``queue_ptr [C]``,
  ``queue_filled [C]``): every class has the same number of keys to contrast with;
- easy pairs: from the queue and the batch's keys, each anchor keeps its own key (the other view) plus
  its ``hard_positives`` least similar same-class keys and its ``hard_negatives`` most similar
  other-class keys, and contrasts only with those;
- the classifier: Siamese balanced softmax (Ren et al. 2020, cross entropy on ``logits + log n_c``) on
  the classifier logits of both views.

Both views go through the online encoder (queries, classifier logits) and the momentum encoder (keys):
view 1's queries contrast against view 2's keys and the other way round. Total:
``ce_weight * BS + contrast_weight * L_con``. At test time the classifier's plain logits predict.

Under DDP the candidates are the keys of every rank's batch (gathered) plus the queue, and the queue
takes every rank's keys and labels in rank order, so all ranks hold the same class-balanced queue.

Differences from the paper: no separate easy-sample weighting schedule; fixed ``beta``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.distributed import all_gather_rows, get_rank
from train.methods.base import StepContext, register_method
from train.methods.moco import copy_weights_, frozen_copy, momentum_update
from train.methods.supervised import ClassifierMethod, logit_adjusted_cross_entropy
from zoo.heads import ProjectionHead
from zoo.model import ZooModel


def rescom_loss(q: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor,
                own: torch.Tensor, class_weights: torch.Tensor, hard_positives: int = 4, hard_negatives: int = 64,
                temperature: float = 0.1, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Class-balanced supervised contrastive loss with hard positive and hard negative mining.

    Args:
        q: ``[B,D]`` L2-normalised queries (anchors). labels: ``[B]`` their classes.
        keys: ``[M,D]`` L2-normalised candidates (batch keys and queue). key_labels: ``[M]``.
        own: ``[B]`` index in ``keys`` of each anchor's own key (its other view): always a positive.
        class_weights: ``[C]`` weight of an anchor of each class (``n_c ** -beta``).
        hard_positives: k+, the least similar other same-class candidates kept as positives.
        hard_negatives: k-, the most similar other-class candidates kept as negatives.
        valid: ``[M]`` bool, candidates that exist (queue slots filled); default all.

    Returns:
        scalar: ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` with
        ``l_i = -1/|P_i| sum_{p in P_i} log( exp(q_i.k_p/tau) / sum_{a in P_i u N_i} exp(q_i.k_a/tau) )``,
        ``P_i`` = own key + hard positives, ``N_i`` = hard negatives.
    """
    b, m = q.shape[0], keys.shape[0]
    valid = torch.ones(m, dtype=torch.bool, device=q.device) if valid is None else valid
    sims = q @ keys.T / temperature  # [B,M]
    rows = torch.arange(b, device=q.device)
    own_mask = torch.zeros(b, m, dtype=torch.bool, device=q.device)
    own_mask[rows, own] = True
    same = labels.view(-1, 1) == key_labels.view(1, -1)
    selected = own_mask.clone()
    positives = own_mask.clone()
    pos_cand = same & valid & ~own_mask
    neg_cand = ~same & valid & ~own_mask
    for cand, k, sign, is_pos in ((pos_cand, hard_positives, -1.0, True), (neg_cand, hard_negatives, 1.0, False)):
        k = min(k, m)
        if k <= 0:
            continue
        score = (sign * sims).masked_fill(~cand, float("-inf"))  # hard positive: low sim; hard negative: high
        top, idx = score.topk(k, dim=1)
        pick = torch.zeros_like(selected).scatter_(1, idx, torch.isfinite(top))
        selected |= pick
        if is_pos:
            positives |= pick
    log_den = torch.logsumexp(sims.masked_fill(~selected, float("-inf")), dim=1, keepdim=True)
    per_anchor = -((sims - log_den).masked_fill(~positives, 0.0).sum(dim=1) / positives.sum(dim=1))
    w = class_weights.to(q)[labels]
    return (w * per_anchor).sum() / w.sum()


@register_method("rescom")
class ResCom(ClassifierMethod):
    """Online encoder + MLP + linear classifier, momentum key encoder + MLP, one key queue per class."""

    def __init__(
        self, model: ZooModel, num_classes: int | None = None, proj_hidden_dim: int = 512, proj_dim: int = 128,
        temperature: float = 0.1, queue_per_class: int = 32, hard_positives: int = 4, hard_negatives: int = 64,
        beta: float = 1.0, momentum: float = 0.99, ce_weight: float = 1.0, contrast_weight: float = 1.0,
    ):
        super().__init__(model, num_classes)
        if temperature <= 0 or queue_per_class < 0 or hard_positives < 0 or hard_negatives < 0:
            raise ValueError(f"need temperature > 0 ({temperature}) and non-negative queue_per_class "
                             f"({queue_per_class}), hard_positives ({hard_positives}), hard_negatives ({hard_negatives})")
        self.projector = ProjectionHead(model.num_features, proj_hidden_dim, proj_dim, num_layers=2)
        self.key_model = frozen_copy(model)
        self.key_projector = frozen_copy(self.projector)
        self.temperature, self.hard_positives, self.hard_negatives = temperature, hard_positives, hard_negatives
        self.beta, self.momentum, self.ce_weight, self.contrast_weight = beta, momentum, ce_weight, contrast_weight
        c = self.num_classes
        self.register_buffer("queue", torch.zeros(c, queue_per_class, proj_dim))  # [C,L,D]
        self.register_buffer("queue_ptr", torch.zeros(c, dtype=torch.long))  # [C] next slot of each class
        self.register_buffer("queue_filled", torch.zeros(c, dtype=torch.long))  # [C] valid slots [0, filled)

    def class_weights(self) -> torch.Tensor:
        """``[C]`` anchor weights ``n_c ** -beta`` (empty classes count one image)."""
        return self.class_counts.double().clamp_min(1).pow(-self.beta).float()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """FIFO write of each class's ``keys`` (in order) into its own queue; the newest L survive."""
        size = self.queue.shape[1]
        if size == 0:
            return
        for c in torch.unique(labels).tolist():
            k = keys[labels == c][-size:]
            n_all = int((labels == c).sum())
            start = (int(self.queue_ptr[c]) + n_all - k.shape[0]) % size
            pos = (start + torch.arange(k.shape[0], device=keys.device)) % size
            self.queue[c, pos] = k.detach().to(self.queue)
            self.queue_ptr[c] = (int(self.queue_ptr[c]) + n_all) % size
            self.queue_filled[c] = min(size, int(self.queue_filled[c]) + n_all)

    def queue_candidates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queue flattened: keys ``[C*L,D]``, labels ``[C*L]``, valid ``[C*L]`` (filled slots)."""
        c, size, d = self.queue.shape
        labels = torch.arange(c, device=self.queue.device).repeat_interleave(size)
        valid = torch.arange(size, device=self.queue.device).view(1, -1) < self.queue_filled.view(-1, 1)
        return self.queue.reshape(c * size, d).clone(), labels, valid.reshape(-1)

    @torch.no_grad()
    def embed_keys(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_projector(self.key_model.forward_features(x)), dim=1)

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        labels = self.batch_labels(indices, ctx)
        b = labels.shape[0]
        v1, v2 = ctx.augment.views(images, ctx.generator, 2)
        f = self.model.forward_features(torch.cat([v1, v2]))
        q = F.normalize(self.projector(f), dim=1)
        keys = torch.cat([self.embed_keys(v1), self.embed_keys(v2)])  # [2B,D]
        both = torch.cat([labels, labels])
        # candidates: every rank's keys (view 1 then view 2 of each rank, in rank order), then the queue
        all_keys, all_labels = all_gather_rows(keys), all_gather_rows(both)
        qk, ql, qvalid = self.queue_candidates()
        cand = torch.cat([all_keys, qk])
        cand_labels = torch.cat([all_labels, ql])
        valid = torch.cat([torch.ones_like(all_labels, dtype=torch.bool), qvalid])
        first = get_rank() * 2 * b
        own = first + torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(q.device)  # view 1 <-> view 2
        con = rescom_loss(q, both, cand, cand_labels, own, self.class_weights(), self.hard_positives,
                          self.hard_negatives, self.temperature, valid)
        ce = logit_adjusted_cross_entropy(self.classify_features(f), both, self.log_prior(), 1.0)  # balanced softmax
        if self.training:  # evaluating the loss (model.eval()) leaves the queue alone
            self.enqueue(all_keys, all_labels)
        return {"loss": self.ce_weight * ce + self.contrast_weight * con, "ce": ce, "contrast": con}

    def on_train_start(self, ctx: StepContext) -> None:
        super().on_train_start(ctx)
        if ctx.step == 0:  # the key encoder starts as a copy of the online encoder
            copy_weights_(self.model, self.key_model)
            copy_weights_(self.projector, self.key_projector)

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        momentum_update(self.model, self.key_model, self.momentum)
        momentum_update(self.projector, self.key_projector, self.momentum)
