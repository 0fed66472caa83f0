"""NNCLR: With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of Visual
Representations (Dwibedi et al., ICCV 2021).

Like SimCLR, but the positive of an embedding is not the other view of its own image: it is the
embedding's nearest neighbour in a support set, a FIFO queue of view-1 embeddings from earlier
batches. The neighbour (no gradient) must pick the prediction of the other view of its image
among the predictions of the batch. Projection MLP + prediction MLP as in the paper; the loss
is symmetrised over the two views (Algorithm 1). The support set is a buffer, so a
resumed run continues with the same neighbours. Under DDP the support set is global (every rank's
view-1 embeddings) and the predictions are gathered across ranks, so W ranks with batch B train as
one process with batch W*B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.distributed import all_gather_rows, all_gather_with_grad, get_rank
from train.methods.base import Method, StepContext, register_method
from train.methods.moco import MoCo
from zoo.heads import ProjectionHead
from zoo.model import ZooModel


@torch.no_grad()
def nearest_neighbour(z: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``NN(z, Q)`` of Dwibedi et al. 2021: for each row of ``z`` the most cosine-similar support row.

    Args:
        z: ``[B,D]`` embeddings (any scale). support: ``[K,D]`` support set (any scale), K >= 1.

    Returns:
        ``(neighbours [B,D], indices [B])``: ``support[indices]`` with
        ``indices_i = argmax_j cos(z_i, support_j)`` (ties -> the first such j). No gradient.
    """
    if support.shape[0] == 0:
        raise ValueError("the support set is empty")
    sim = F.normalize(z, dim=1) @ F.normalize(support, dim=1).T  # [B,K]
    idx = sim.argmax(dim=1)
    return support[idx], idx


def nnclr_loss(nn: torch.Tensor, p: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NNCLR's InfoNCE with the prediction head (Dwibedi et al. 2021, the loss of Algorithm 1).

    Args:
        nn: ``[B,D]`` nearest neighbours of view-1 embeddings (no gradient flows into them).
        p: ``[B,D]`` predictions of view 2 (row i from the same image as ``nn`` row i).
        temperature: tau.

    Returns:
        scalar: mean over i of ``-log exp(nn_i.p_i/tau) / sum_k exp(nn_i.p_k/tau)`` on L2-normalised rows,
        i.e. cross entropy over the ``[B,B]`` logits with the diagonal as targets. Under DDP the rows are
        this rank's and the predictions ``p_k`` of every rank are gathered with gradients (as solo-learn's
        NNCLR), so the logits are ``[B, W*B]`` and DDP's gradient average gives the global-batch loss.
    """
    b = p.shape[0]
    nn = F.normalize(nn.detach(), dim=1)
    p_all = F.normalize(all_gather_with_grad(p), dim=1)  # [W*B, D]; p itself on one process
    logits = nn @ p_all.T / temperature  # [B, W*B]
    first = get_rank() * b
    return F.cross_entropy(logits, torch.arange(first, first + b, device=p.device))


@register_method("nnclr")
class NNCLR(Method):
    """Encoder + projection MLP + prediction MLP; the positive is the nearest neighbour in a support queue.

    ``queue_length`` support embeddings (L2-normalised projections of view 1, newest overwrite oldest).
    Until the first batch has been enqueued the support set is empty and each embedding is its own
    neighbour (one SimCLR-with-predictor step); afterwards neighbours come only from the filled slots.
    """

    def __init__(
        self, model: ZooModel, proj_hidden_dim: int = 2048, proj_dim: int = 256, proj_layers: int = 3,
        pred_hidden_dim: int = 4096, queue_length: int = 98304, temperature: float = 0.1,
    ):
        super().__init__(model)
        if queue_length < 1 or temperature <= 0:
            raise ValueError(f"queue_length ({queue_length}) must be >= 1 and temperature ({temperature}) > 0")
        # A 3-layer projection MLP with BN (on its output too, like lightly's NNCLR head), a 2-layer predictor.
        self.projector = ProjectionHead(model.num_features, proj_hidden_dim, proj_dim, num_layers=proj_layers,
                                        last_bn=True)
        self.predictor = ProjectionHead(proj_dim, pred_hidden_dim, proj_dim, num_layers=2)
        self.temperature = temperature
        self.register_buffer("queue", torch.zeros(queue_length, proj_dim))  # [K,D], slots [0, filled) valid
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, z: torch.Tensor) -> None:
        """FIFO write of ``z [N,D]`` (L2-normalised here), with MoCo's wrap-around semantics."""
        MoCo.enqueue(self, F.normalize(z.detach(), dim=1))  # same buffers (queue, queue_ptr), same write
        self.queue_filled.fill_(min(self.queue.shape[0], int(self.queue_filled) + z.shape[0]))

    def support_neighbours(self, z: torch.Tensor) -> torch.Tensor:
        """``[B,D] -> [B,D]``: the nearest neighbours in the support set (``z`` itself while it is empty)."""
        filled = int(self.queue_filled)
        if filled == 0:
            return z.detach()
        return nearest_neighbour(z, self.queue[:filled])[0]

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        v1, v2 = ctx.augment.views(images, ctx.generator, 2)
        z = self.projector(self.model.forward_features(torch.cat([v1, v2])))
        p1, p2 = self.predictor(z).chunk(2)
        z1, z2 = z.chunk(2)
        nn1, nn2 = self.support_neighbours(z1), self.support_neighbours(z2)
        loss = 0.5 * (nnclr_loss(nn1, p2, self.temperature) + nnclr_loss(nn2, p1, self.temperature))
        if self.training:  # evaluating the loss (model.eval()) leaves the support set alone
            self.enqueue(all_gather_rows(z1))  # under DDP one global support set: every rank's, in rank order
        return {"loss": loss}
