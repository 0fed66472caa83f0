"""Boosted contrastive learning: "Contrastive Learning with Boosted Memorization" (Zhou et al., ICML 2022).

Self-supervised learning on long-tailed data *without labels*. Deep networks memorise easy (head)
patterns first, so a sample whose contrastive loss stays high is probably from the tail. The
method tracks each image's loss over training and gives the images that are memorised least the
strongest augmentation, which boosts their share of the learning signal. On top of SimCLR:

- memorisation: ``memo_loss [N]``, the momentum average of each training image's NT-Xent loss
  (``m_i <- beta * m_i + (1 - beta) * l_i``, the first value taken as is; ``memo_seen [N]``);
- strength: at each epoch start ``strength_i = (m_i - min m) / (max m - min m)`` over the images seen
  (0 for the others), in buffer ``strength [N]``;
- boosted views: before SimCLR's augmentation each view of image i gets each of ``posterize``
  (4 bits), ``solarize`` (threshold 0.5) and ``cutout`` (a square of ``cutout`` times the side) with
  probability ``boost * strength_i`` (the paper draws that many RandAugment operations; the
  operations here are a small fixed set).

Under DDP the per-sample losses and indices of every rank are gathered before the update, so all
ranks hold the same memorisation buffers, equal to one process with the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.augment import rand_per_sample
from train.distributed import all_gather_rows, all_gather_with_grad, get_rank
from train.methods.base import StepContext, register_method
from train.methods.simclr import SimCLR
from zoo.model import ZooModel


def nt_xent_per_sample(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """``[B]`` NT-Xent loss of each image: the mean of its two anchors' terms
    ``-log exp(s_{i,i+}/tau) / sum_{k != i} exp(s_ik/tau)`` over the (gathered) 2N embeddings. Its mean over
    the batch is :func:`train.methods.simclr.nt_xent_loss`."""
    b = z1.shape[0]
    g1, g2 = all_gather_with_grad(z1), all_gather_with_grad(z2)
    n, first = g1.shape[0], get_rank() * b
    z = F.normalize(torch.cat([g1, g2], dim=0), dim=1)
    mine = torch.cat([torch.arange(first, first + b), torch.arange(n + first, n + first + b)]).to(z.device)
    logits = z[mine] @ z.T / temperature  # [2B, 2N]
    logits[torch.arange(2 * b, device=z.device), mine] = float("-inf")
    targets = torch.cat([mine[b:], mine[:b]])
    per_anchor = F.cross_entropy(logits, targets, reduction="none")  # [2B]
    return 0.5 * (per_anchor[:b] + per_anchor[b:])


def boost_views(x: torch.Tensor, strength: torch.Tensor, generator: torch.Generator, boost: float = 1.0,
                cutout: float = 0.25) -> torch.Tensor:
    """Raw images ``[B,3,H,W]`` in [0,1] with posterize / solarize / cutout, each applied to image i with
    probability ``boost * strength[i]`` (``strength`` ``[B]`` in [0,1]); draws are per sample."""
    b, _, h, w = x.shape
    p = (boost * strength.to(x)).clamp(0, 1).view(b, 1, 1, 1)
    draws = rand_per_sample(b, generator, (5,)).to(x)  # 3 apply-or-not + cutout centre (y, x)
    x = torch.where(draws[:, 0].view(b, 1, 1, 1) < p, torch.floor(x * 15 + 0.5) / 15, x)  # posterize to 4 bits
    x = torch.where((draws[:, 1].view(b, 1, 1, 1) < p) & (x >= 0.5), 1 - x, x)  # solarize
    side = max(1, int(round(cutout * min(h, w))))
    cy = (draws[:, 3] * (h - side + 1)).long().clamp_max(h - side)
    cx = (draws[:, 4] * (w - side + 1)).long().clamp_max(w - side)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    box = ((ys >= cy.view(-1, 1, 1)) & (ys < (cy + side).view(-1, 1, 1)) & (xs >= cx.view(-1, 1, 1))
           & (xs < (cx + side).view(-1, 1, 1))).unsqueeze(1)
    return torch.where(box & (draws[:, 2].view(b, 1, 1, 1) < p), torch.full_like(x, 0.5), x)  # cutout: gray


@register_method("boosted")
class BoostedSimCLR(SimCLR):
    """SimCLR whose per-image augmentation strength follows its memorisation (see the module docstring).

    ``memo_momentum`` is beta; ``boost`` the apply probability at full strength; ``dataset_size`` is
    filled at the start of training (the buffers have one entry per training image).
    """

    def __init__(self, model: ZooModel, proj_hidden_dim: int = 512, proj_dim: int = 128, proj_layers: int = 2,
                 temperature: float = 0.5, memo_momentum: float = 0.9, boost: float = 1.0, cutout: float = 0.25):
        super().__init__(model, proj_hidden_dim, proj_dim, proj_layers, temperature)
        if not 0 <= memo_momentum < 1 or not 0 <= boost <= 1:
            raise ValueError(f"need 0 <= memo_momentum < 1 ({memo_momentum}) and 0 <= boost <= 1 ({boost})")
        self.memo_momentum, self.boost, self.cutout = memo_momentum, boost, cutout
        self.register_buffer("memo_loss", torch.zeros(0))  # [N] momentum loss per training image
        self.register_buffer("memo_seen", torch.zeros(0, dtype=torch.bool))  # [N]
        self.register_buffer("strength", torch.zeros(0))  # [N] this epoch's augmentation strength

    def _resize(self, n: int) -> None:
        if self.memo_loss.shape[0] != n:
            device = self.memo_loss.device
            self.memo_loss = torch.zeros(n, device=device)
            self.memo_seen = torch.zeros(n, dtype=torch.bool, device=device)
            self.strength = torch.zeros(n, device=device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # buffers sized by the checkpoint
        key = prefix + "memo_loss"
        if key in state_dict:
            self._resize(state_dict[key].shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_train_start(self, ctx: StepContext) -> None:
        if ctx.step == 0 or self.memo_loss.shape[0] != ctx.dataset_size:
            self._resize(ctx.dataset_size)

    @torch.no_grad()
    def on_epoch_start(self, ctx: StepContext) -> None:
        self._resize(max(ctx.dataset_size, self.memo_loss.shape[0]))
        self.strength.copy_(memorisation_strength(self.memo_loss, self.memo_seen))

    @torch.no_grad()
    def record(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Momentum update of ``memo_loss`` at dataset ``indices`` with this step's ``losses`` (both ``[M]``)."""
        idx = indices.to(self.memo_loss.device)
        old, seen = self.memo_loss[idx], self.memo_seen[idx]
        m = self.memo_momentum
        self.memo_loss[idx] = torch.where(seen, m * old + (1 - m) * losses.float(), losses.float())
        self.memo_seen[idx] = True

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.memo_loss.shape[0] < ctx.dataset_size:
            self._resize(ctx.dataset_size)
        strength = self.strength[indices.to(self.strength.device)]
        views = [ctx.augment(boost_views(images, strength, ctx.generator, self.boost, self.cutout), ctx.generator)
                 for _ in range(2)]
        z = self.projector(self.model.forward_features(torch.cat(views)))
        z1, z2 = z.chunk(2)
        per_sample = nt_xent_per_sample(z1, z2, self.temperature)
        if self.training:  # every rank records the global batch's losses
            self.record(all_gather_rows(indices.to(per_sample.device)), all_gather_rows(per_sample.detach()))
        return {"loss": per_sample.mean(), "mean_strength": strength.float().mean()}


def memorisation_strength(memo_loss: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """``[N]`` min-max normalised momentum losses over the seen images (0 for unseen, 0 when all are equal)."""
    out = torch.zeros_like(memo_loss)
    if bool(seen.any()):
        values = memo_loss[seen]
        lo, hi = values.min(), values.max()
        if float(hi - lo) > 0:
            out[seen] = (values - lo) / (hi - lo)
    return out
