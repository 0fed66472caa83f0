"""BCL: Balanced Contrastive Learning for Long-Tailed Visual Recognition (Zhu et al., CVPR 2022).

Supervised contrastive learning on long-tailed data has two imbalances: a batch holds many images
of the head classes and none of some tail classes, and the head classes dominate every
denominator. BCL fixes both:

- class-complement: the C class prototypes join every batch's contrast set, so each class is
  present in each batch. The prototypes are the classifier's weight vectors passed through their
  own MLP (``prototype_head``) into the embedding space, as in the authors' code;
- class-averaging: in the denominator the terms of each class are averaged over that class's
  members in the contrast set, so every class weighs the same whatever its batch count.

A classifier branch on the encoder features trains with logit-adjusted cross entropy (Menon et al.
2021); the total is ``ce_weight * CE_LA + bcl_weight * L_BCL``. Difference from the paper: it feeds a
third, differently augmented view to the classifier; here both contrastive views feed it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.methods.base import StepContext, register_method
from train.methods.supervised import ClassifierMethod, logit_adjusted_cross_entropy
from zoo.heads import ProjectionHead
from zoo.model import ZooModel


def bcl_loss(z: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, temperature: float = 0.1
             ) -> torch.Tensor:
    """Balanced supervised contrastive loss (Zhu et al. 2022, class-averaging + class-complement).

    Args:
        z: ``[N,D]`` L2-normalised embeddings of all views of the batch (e.g. ``cat([z_view1, z_view2])``).
        labels: ``[N]`` class of each row, in ``[0, C)``.
        prototypes: ``[C,D]`` L2-normalised class prototypes; row c has class c.
        temperature: tau.

    Returns:
        scalar: mean over the N anchors i of
        ``-1/|P(i)| sum_{p in P(i)} log( exp(z_i.x_p/tau) / sum_c 1/n_c(i) sum_{k in S_c(i)} exp(z_i.x_k/tau) )``,
        where the contrast set of i is the other N-1 rows plus the C prototypes, ``S_c(i)`` its members of
        class c, ``n_c(i) = |S_c(i)|`` (>= 1: the prototype), and ``P(i) = S_{y_i}(i)``.
    """
    n, c = z.shape[0], prototypes.shape[0]
    contrast = torch.cat([z, prototypes])  # [N+C,D]
    contrast_labels = torch.cat([labels, torch.arange(c, device=labels.device)])  # [N+C]
    not_self = torch.ones(n, n + c, dtype=torch.bool, device=z.device)
    not_self[torch.arange(n), torch.arange(n)] = False
    same_class = labels.view(-1, 1) == contrast_labels.view(1, -1)  # [N,N+C]
    positives = same_class & not_self
    # n_c(i) for the class of each contrast item: its class's members in the whole set, minus the anchor
    # itself for the anchor's own class (the official code's ``batch_cls_count[y_k] - mask``).
    per_item_count = torch.bincount(contrast_labels, minlength=c)[contrast_labels].view(1, -1) - same_class.long()
    logits = z @ contrast.T / temperature  # [N,N+C]
    weighted = logits.masked_fill(~not_self, float("-inf")) - per_item_count.clamp_min(1).to(z.dtype).log()
    log_denominator = torch.logsumexp(weighted, dim=1, keepdim=True)
    log_prob = (logits - log_denominator).masked_fill(~positives, 0.0)
    return -(log_prob.sum(dim=1) / positives.sum(dim=1)).mean()


@register_method("bcl")
class BCL(ClassifierMethod):
    """Encoder + contrastive MLP + linear classifier + prototype MLP (classifier weights -> prototypes).

    ``logit_adjust`` is the tau of the classifier branch's logit-adjusted cross entropy (0: plain CE).
    """

    def __init__(
        self, model: ZooModel, num_classes: int | None = None, proj_hidden_dim: int = 512, proj_dim: int = 128,
        temperature: float = 0.1, ce_weight: float = 2.0, bcl_weight: float = 0.6, logit_adjust: float = 1.0,
    ):
        super().__init__(model, num_classes)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        d = model.num_features
        self.projector = ProjectionHead(d, proj_hidden_dim, proj_dim, num_layers=2)  # Linear-BN-ReLU-Linear
        self.prototype_head = ProjectionHead(d, proj_hidden_dim, proj_dim, num_layers=2)
        self.temperature, self.ce_weight, self.bcl_weight = temperature, ce_weight, bcl_weight
        self.logit_adjust = logit_adjust

    def prototypes(self) -> torch.Tensor:
        """``[C,proj_dim]`` L2-normalised class prototypes: the classifier weights through ``prototype_head``."""
        return F.normalize(self.prototype_head(self.classifier.weight), dim=1)

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        labels = self.batch_labels(indices, ctx)
        v1, v2 = ctx.augment.views(images, ctx.generator, 2)
        f = self.model.forward_features(torch.cat([v1, v2]))
        z = F.normalize(self.projector(f), dim=1)
        both = torch.cat([labels, labels])
        contrastive = bcl_loss(z, both, self.prototypes(), self.temperature)
        ce = logit_adjusted_cross_entropy(self.classify_features(f), both, self.log_prior(), self.logit_adjust)
        return {"loss": self.ce_weight * ce + self.bcl_weight * contrastive, "ce": ce, "bcl": contrastive}
