"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations (Chen et al., ICML 2020).

Two augmented views of each image go through encoder + projection head; NT-Xent pulls the two
views of an image together and pushes the other 2B-2 embeddings of the batch away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.distributed import all_gather_with_grad, get_rank
from train.methods.base import Method, StepContext, register_method
from train.methods.unmix import mix_batch, soft_mixture_loss, unmix_log, unmix_mode
from zoo.heads import ProjectionHead
from zoo.model import ZooModel


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Normalised temperature-scaled cross entropy.

    Args:
        z1, z2: ``[B,D]`` projections of view 1 and view 2 (row i of each comes from image i).
        temperature: tau in ``exp(cos(z_i, z_j) / tau)``.

    Returns:
        scalar: mean over the 2B anchors of
        ``-log exp(s_ii+/tau) / sum_{k != i} exp(s_ik/tau)``, where i+ is the other view of i.
        Under DDP the rows are this rank's; the negatives are the embeddings of every rank, gathered
        with gradients, and the mean runs over this rank's anchors (DDP's gradient average then gives
        the loss of one process holding the global batch).
    """
    b = z1.shape[0]
    g1, g2 = all_gather_with_grad(z1), all_gather_with_grad(z2)  # [W*B, D]; z1, z2 on one process
    n, first = g1.shape[0], get_rank() * b
    z = F.normalize(torch.cat([g1, g2], dim=0), dim=1)  # [2N, D]
    mine = torch.cat([torch.arange(first, first + b), torch.arange(n + first, n + first + b)]).to(z.device)
    logits = z[mine] @ z.T / temperature  # [2B, 2N]
    logits[torch.arange(2 * b, device=z.device), mine] = float("-inf")  # an anchor is not its own negative
    targets = torch.cat([mine[b:], mine[:b]])
    return F.cross_entropy(logits, targets)


@register_method("simclr")
class SimCLR(Method):
    """Encoder + projection MLP trained with NT-Xent on two views per image."""

    def __init__(
        self, model: ZooModel, proj_hidden_dim: int = 512, proj_dim: int = 128, proj_layers: int = 2,
        temperature: float = 0.5, unmix: bool = False, unmix_alpha: float = 1.0,
    ):
        super().__init__(model)
        self.projector = ProjectionHead(model.num_features, proj_hidden_dim, proj_dim, num_layers=proj_layers)
        self.temperature = temperature
        self.unmix, self.unmix_alpha = unmix, unmix_alpha  # Un-Mix option (train/methods/unmix.py)

    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The loss of the two views' projections ``[B,D]`` of images ``indices`` (IFND overrides it)."""
        return nt_xent_loss(z1, z2, self.temperature)

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        v1, v2 = ctx.augment.views(images, ctx.generator, 2)
        z = self.projector(self.model.forward_features(torch.cat([v1, v2])))
        z1, z2 = z.chunk(2)
        loss = self.pair_loss(z1, z2, indices, ctx)
        if self.unmix:  # view 1 mixed within the batch, contrasted with both sources' view 2
            mix = mix_batch(v1, ctx.generator, unmix_mode(ctx.step), self.unmix_alpha)
            z_mix = self.projector(self.model.forward_features(mix.images))
            mix_loss = soft_mixture_loss(lambda a, b: nt_xent_loss(a, b, self.temperature), z_mix, z2, mix.lam)
            return {"loss": loss + mix_loss, **unmix_log(mix, mix_loss)}
        return {"loss": loss}
