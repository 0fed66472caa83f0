"""SupCon: Supervised Contrastive Learning (Khosla et al., NeurIPS 2020).

SimCLR's batch of two views per image, but every other view with the same class label is a
positive too. The loss is the paper's ``L_out`` (the average over positives is taken outside the
log, the variant the paper finds best). With all labels distinct it is exactly SimCLR's NT-Xent.
The encoder is then evaluated (or fine-tuned) with a linear classifier on frozen features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.distributed import all_gather_rows, all_gather_with_grad, get_rank, is_distributed
from train.methods.base import Method, StepContext, register_method
from zoo.heads import ProjectionHead
from zoo.model import ZooModel


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1,
                anchors: slice | None = None) -> torch.Tensor:
    """Supervised contrastive loss ``L_out`` (Khosla et al. 2020, eq. 2).

    Args:
        z: ``[N,D]`` embeddings of all views of the batch stacked (e.g. ``cat([z_view1, z_view2])``, N = 2B);
            any scale, L2-normalised here.
        labels: ``[N]`` class of each row (the two views of an image share theirs).
        temperature: tau.
        anchors: the rows that are anchors (default all). Under DDP ``z``/``labels`` hold every rank's
            rows and the anchors are this rank's.

    Returns:
        scalar: mean over anchors i of ``-1/|P(i)| sum_{p in P(i)} log exp(z_i.z_p/tau) / sum_{a != i} exp(z_i.z_a/tau)``,
        where ``P(i)`` are the other rows with label ``y_i``. Anchors without a positive are left out
        (with two views every anchor has one). With all labels distinct (one image per label) it
        equals :func:`train.methods.simclr.nt_xent_loss`.
    """
    z = F.normalize(z, dim=1)
    n = z.shape[0]
    rows = torch.arange(n, device=z.device)[anchors if anchors is not None else slice(None)]
    self_mask = torch.zeros(rows.shape[0], n, dtype=torch.bool, device=z.device)
    self_mask[torch.arange(rows.shape[0], device=z.device), rows] = True
    logits = (z[rows] @ z.T / temperature).masked_fill(self_mask, float("-inf"))  # [n_anchors,N], A(i) = all but i
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[rows].view(-1, 1) == labels.view(1, -1)) & ~self_mask  # [n_anchors,N]
    n_pos = positives.sum(dim=1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        raise ValueError("no anchor has a positive: supcon_loss needs at least two rows with the same label")
    mean_log_prob_pos = log_prob.masked_fill(~positives, 0.0).sum(dim=1)[has_pos] / n_pos[has_pos]
    return -mean_log_prob_pos.mean()


@register_method("supcon")
class SupCon(Method):
    """Encoder + projection MLP (Linear-ReLU-Linear, as the official code) trained with ``L_out``."""

    def __init__(
        self, model: ZooModel, proj_hidden_dim: int = 512, proj_dim: int = 128, temperature: float = 0.1,
    ):
        super().__init__(model)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.projector = ProjectionHead(model.num_features, proj_hidden_dim, proj_dim, num_layers=2, batch_norm=False)
        self.temperature = temperature

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        labels = self.batch_labels(indices, ctx)
        v1, v2 = ctx.augment.views(images, ctx.generator, 2)
        z = self.projector(self.model.forward_features(torch.cat([v1, v2])))  # [2B, D]
        # Under DDP every rank's rows (gathered with gradients) are candidates; this rank's are the anchors.
        n = z.shape[0]
        mine = slice(get_rank() * n, (get_rank() + 1) * n) if is_distributed() else None
        labels = all_gather_rows(torch.cat([labels, labels]))
        return {"loss": supcon_loss(all_gather_with_grad(z), labels, self.temperature, mine)}
