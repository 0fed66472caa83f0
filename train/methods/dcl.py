"""DCL: Decoupled Contrastive Learning (Yeh et al., ECCV 2022), and its weighted variant DCLW.

SimCLR's NT-Xent puts the positive pair in the denominator too. Yeh et al. show that this couples
the gradients of the positive and the negative terms through a "negative-positive coupling"
multiplier, which slows learning most when batches are small. DCL removes the positive from the
denominator; DCLW further weights the positive term with a von Mises-Fisher weighting function, so
pairs that are already close count less (``weighted=True``, ``sigma=0.5`` as in the paper).
Everything else is SimCLR: two views, encoder + projection head, in-batch negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.distributed import all_gather_with_grad, get_rank
from train.methods.base import Method, StepContext, register_method
from zoo.heads import ProjectionHead
from zoo.model import ZooModel


def vmf_weights(z1: torch.Tensor, z2: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """DCLW's positive weights (Yeh et al. 2022): ``w_i = 2 - exp(s_i/sigma) / mean_j exp(s_j/sigma)``.

    Args:
        z1, z2: ``[B,D]`` L2-normalised embeddings of view 1 and view 2; ``s_i = z1_i . z2_i``.
        sigma: the von Mises-Fisher concentration parameter.

    Returns:
        ``[B]`` weights that average to 1 over the batch (``2 - B * softmax(s / sigma)``). As in the
        authors' code the weights are not detached: their gradient is part of the loss.
    """
    s = (z1 * z2).sum(dim=1) / sigma  # [B]
    return 2 - z1.shape[0] * torch.softmax(s, dim=0)


def dcl_loss_one_way(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, sigma: float | None = None,
                     anchors: slice | None = None) -> torch.Tensor:
    """The decoupled loss with the anchors taken from view 1 (Yeh et al. 2022).

    Args:
        z1, z2: ``[B,D]`` L2-normalised embeddings (row i of each is image i).
        temperature: tau.
        sigma: None for DCL; a float for DCLW (the positive term is multiplied by :func:`vmf_weights`).
        anchors: the rows of ``z1`` that are anchors (default all). Under DDP ``z1``/``z2`` hold every
            rank's rows and the anchors are this rank's, so the negatives span the global batch.

    Returns:
        scalar: mean over anchors i of ``-w_i z1_i.z2_i / tau + log sum_{k in 1,2; j != i} exp(z1_i.zk_j / tau)``:
        the 2B-2 negatives are the other images' two views; neither the anchor nor its positive is in
        the denominator.
    """
    n = z1.shape[0]
    rows = torch.arange(n, device=z1.device)[anchors if anchors is not None else slice(None)]
    b = rows.shape[0]
    a = z1[rows]
    cross = a @ z2.T / temperature  # [b,N]: z1_i . z2_j
    same = a @ z1.T / temperature  # [b,N]: z1_i . z1_j
    positive = -cross[torch.arange(b, device=z1.device), rows]  # [b]
    if sigma is not None:
        positive = positive * vmf_weights(z1, z2, sigma)[rows]
    own = torch.zeros(b, n, dtype=torch.bool, device=z1.device)
    own[torch.arange(b, device=z1.device), rows] = True
    negatives = torch.cat([same.masked_fill(own, float("-inf")), cross.masked_fill(own, float("-inf"))], dim=1)
    return (positive + torch.logsumexp(negatives, dim=1)).mean()


def dcl_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, weighted: bool = False,
             sigma: float = 0.5) -> torch.Tensor:
    """Symmetrised DCL / DCLW (Yeh et al. 2022): the mean of :func:`dcl_loss_one_way` from both views.

    Args:
        z1, z2: ``[B,D]`` projections of view 1 and view 2 (any scale; L2-normalised here).
        temperature: tau. weighted: DCLW's von Mises-Fisher weighting with ``sigma``.

    Returns:
        scalar: the mean over the 2B anchors, comparable with SimCLR's NT-Xent (which is the same
        expression with ``exp(s_ii+/tau)`` added to each denominator). Under DDP the negatives (and
        DCLW's weights) come from every rank's embeddings, gathered with gradients; the mean runs over
        this rank's anchors.
    """
    b = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    g1, g2 = all_gather_with_grad(z1), all_gather_with_grad(z2)  # z1, z2 on one process
    mine = slice(get_rank() * b, (get_rank() + 1) * b) if g1.shape[0] != b else None
    s = sigma if weighted else None
    return 0.5 * (dcl_loss_one_way(g1, g2, temperature, s, mine) + dcl_loss_one_way(g2, g1, temperature, s, mine))


@register_method("dcl")
class DCL(Method):
    """SimCLR's architecture (encoder + projection MLP, two views) trained with the decoupled loss.

    ``weighted=True`` gives DCLW (von Mises-Fisher weighting of the positive, ``sigma``).
    """

    def __init__(
        self, model: ZooModel, proj_hidden_dim: int = 512, proj_dim: int = 128, proj_layers: int = 2,
        temperature: float = 0.1, weighted: bool = False, sigma: float = 0.5,
    ):
        super().__init__(model)
        if temperature <= 0 or sigma <= 0:
            raise ValueError(f"temperature ({temperature}) and sigma ({sigma}) must be > 0")
        self.projector = ProjectionHead(model.num_features, proj_hidden_dim, proj_dim, num_layers=proj_layers)
        self.temperature = temperature
        self.weighted = weighted
        self.sigma = sigma

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        v1, v2 = ctx.augment.views(images, ctx.generator, 2)
        z1, z2 = self.projector(self.model.forward_features(torch.cat([v1, v2]))).chunk(2)
        return {"loss": dcl_loss(z1, z2, self.temperature, self.weighted, self.sigma)}
