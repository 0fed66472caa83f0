"""TSC: Targeted Supervised Contrastive Learning for Long-Tailed Recognition (Li et al., CVPR 2022).

On long-tailed data SupCon's class centres crowd together in the region the head classes leave
free, so the tail classes are poorly separated. TSC fixes the geometry in advance:

- **targets**: ``C`` points spread uniformly on the unit hypersphere of the projection space,
  found once before training by minimising their uniformity loss (:func:`uniform_targets`) and
  kept in the buffer ``targets`` (so they are saved in every checkpoint of the run and a resume
  uses the very same points);
- **assignment**: during training each class is matched to one target by the Hungarian method
  (``scipy.optimize.linear_sum_assignment``) on the cosine similarity between the class centres
  and the targets (:func:`assign_targets`). The class centres are an exponential moving average of
  the class means of the (detached) batch embeddings (buffer ``centres``); the assignment is
  recomputed every step (buffer ``assignment``);
- **loss** (:func:`tsc_loss`): SupCon's loss where every target joins the contrast set of every
  anchor and the anchor's assigned target is an extra positive weighted by ``target_weight``.

Under DDP the centres are updated with the class means of the global batch (the embeddings and labels
of every rank, gathered), so every rank holds the same centres and the same assignment, equal to one
process with the global batch.

Differences from the paper: the paper builds on MoCo with KCL's k sampled positives; here the
contrast set is the batch (both views, all ranks), with every same-class view a positive, as in
:mod:`train.methods.supcon`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from train.distributed import all_gather_rows, all_gather_with_grad, get_rank, is_distributed
from train.methods.base import Method, StepContext, register_method
from zoo.heads import ProjectionHead
from zoo.model import ZooModel


def uniformity_loss(t: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``mean_i log sum_{j != i} exp(t_i . t_j / temperature)`` of L2-normalised rows of ``t [C,D]``."""
    t = F.normalize(t, dim=1)
    sims = t @ t.T / temperature
    sims = sims.masked_fill(torch.eye(t.shape[0], dtype=torch.bool, device=t.device), float("-inf"))
    return torch.logsumexp(sims, dim=1).mean()


def uniform_targets(num_classes: int, dim: int, steps: int = 1000, lr: float = 0.02, temperature: float = 1.0,
                    seed: int = 0) -> torch.Tensor:
    """``[C,D]`` unit vectors spread uniformly on the sphere (TSC's optimal targets).

    Gaussian start from ``torch.Generator().manual_seed(seed)``, then ``steps`` of Adam on
    :func:`uniformity_loss` in float64, normalising after each step. Deterministic for a seed. For
    ``C <= D + 1`` the optimum is the regular simplex: ``t_i . t_j = -1 / (C - 1)`` for all ``i != j``.
    """
    if num_classes < 2 or dim < 2:
        raise ValueError(f"need num_classes >= 2 and dim >= 2, got {num_classes} and {dim}")
    t = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    t = F.normalize(t, dim=1).requires_grad_(True)
    opt = torch.optim.Adam([t], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        uniformity_loss(t, temperature).backward()
        opt.step()
        with torch.no_grad():
            t.copy_(F.normalize(t, dim=1))
    return t.detach().float()


def assign_targets(centres: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[C]`` target index of each class: the one-to-one map maximising ``sum_c cos(centre_c, target_a(c))``
    (Hungarian method). ``centres`` ``[C,D]`` (a zero row: the class has no centre yet), ``targets`` ``[K,D]``, K >= C."""
    sims = F.normalize(centres.double(), dim=1) @ F.normalize(targets.double(), dim=1).T  # [C,K]
    rows, cols = linear_sum_assignment(-sims.cpu().numpy())
    out = np.empty(centres.shape[0], dtype=np.int64)
    out[rows] = cols
    return torch.as_tensor(out, device=centres.device)


def tsc_loss(z: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, assignment: torch.Tensor,
             temperature: float = 0.1, target_weight: float = 1.0, anchors: slice | None = None) -> torch.Tensor:
    """Targeted supervised contrastive loss (Li et al. 2022, eq. 4, in-batch).

    Args:
        z: ``[N,D]`` embeddings of all views (any scale; L2-normalised here).
        labels: ``[N]`` classes in ``[0, C)``.
        targets: ``[K,D]`` unit targets. assignment: ``[C]`` target index of each class.
        temperature: tau. target_weight: lambda, the weight of the target positive.
        anchors: the rows that are anchors (default all; under DDP this rank's rows).

    Returns:
        scalar: mean over anchors i of
        ``-[ 1/|P(i)| sum_{p in P(i)} log(e^{z_i.z_p/tau} / D_i) + lambda log(e^{z_i.t_{a(y_i)}/tau} / D_i) ]``
        with ``D_i = sum_{j != i} e^{z_i.z_j/tau} + sum_k e^{z_i.t_k/tau}`` and ``P(i)`` the other rows of
        class ``y_i`` (an anchor without one keeps only the target term).
    """
    z = F.normalize(z, dim=1)
    n = z.shape[0]
    rows = torch.arange(n, device=z.device)[anchors if anchors is not None else slice(None)]
    a = rows.shape[0]
    self_mask = torch.zeros(a, n, dtype=torch.bool, device=z.device)
    self_mask[torch.arange(a, device=z.device), rows] = True
    sample = (z[rows] @ z.T / temperature).masked_fill(self_mask, float("-inf"))  # [A,N]
    target = z[rows] @ targets.to(z).T / temperature  # [A,K]
    log_den = torch.logsumexp(torch.cat([sample, target], dim=1), dim=1)  # [A]
    positives = (labels[rows].view(-1, 1) == labels.view(1, -1)) & ~self_mask
    n_pos = positives.sum(dim=1)
    pos_term = (sample - log_den[:, None]).masked_fill(~positives, 0.0).sum(dim=1) / n_pos.clamp_min(1)
    own_target = target.gather(1, assignment[labels[rows]].view(-1, 1)).squeeze(1)
    return -(pos_term + target_weight * (own_target - log_den)).mean()


@register_method("tsc")
class TSC(Method):
    """Encoder + projection MLP trained with :func:`tsc_loss`, targets fixed, classes assigned by Hungarian.

    No classifier: like SupCon, TSC's encoder is evaluated with a linear probe. ``num_classes`` comes from
    the data (the trainer fills it). ``centre_momentum`` is the EMA rate of the class centres.
    """

    def __init__(self, model: ZooModel, num_classes: int | None = None, proj_hidden_dim: int = 512,
                 proj_dim: int = 128, temperature: float = 0.1, target_weight: float = 1.0,
                 centre_momentum: float = 0.9, target_steps: int = 1000, target_temperature: float = 1.0):
        super().__init__(model)
        if num_classes is None or num_classes < 2:
            raise ValueError(f"TSC needs num_classes >= 2 (the trainer fills it from a labelled dataset), got {num_classes}")
        self.num_classes = num_classes
        if temperature <= 0 or not 0 <= centre_momentum < 1:
            raise ValueError(f"need temperature > 0 ({temperature}) and 0 <= centre_momentum < 1 ({centre_momentum})")
        self.projector = ProjectionHead(model.num_features, proj_hidden_dim, proj_dim, num_layers=2, batch_norm=False)
        self.temperature, self.target_weight, self.centre_momentum = temperature, target_weight, centre_momentum
        self.target_steps, self.target_temperature = target_steps, target_temperature
        self.register_buffer("targets", torch.zeros(self.num_classes, proj_dim))  # [C,D], set once at step 0
        self.register_buffer("centres", torch.zeros(self.num_classes, proj_dim))  # [C,D] EMA of class means
        self.register_buffer("assignment", torch.arange(self.num_classes))  # [C] class -> target row

    def on_train_start(self, ctx: StepContext) -> None:
        if ctx.step == 0:  # computed once; a resume loads them from the checkpoint
            self.targets.copy_(uniform_targets(self.num_classes, self.targets.shape[1], self.target_steps,
                                               temperature=self.target_temperature, seed=ctx.seed))

    @torch.no_grad()
    def update_assignment(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        """EMA of the class means of ``z [N,D]`` (normalised, this step's global batch) into ``centres``,
        then the Hungarian assignment of the classes to the targets."""
        z = F.normalize(z.float(), dim=1)
        sums = torch.zeros_like(self.centres).index_add_(0, labels, z)
        counts = torch.bincount(labels, minlength=self.num_classes)
        present = counts > 0
        means = sums[present] / counts[present, None]
        m = self.centre_momentum
        fresh = self.centres[present].abs().sum(dim=1) == 0  # a class seen for the first time takes its mean
        self.centres[present] = torch.where(fresh[:, None], means, m * self.centres[present] + (1 - m) * means)
        self.assignment.copy_(assign_targets(self.centres, self.targets))

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        labels = self.batch_labels(indices, ctx)
        v1, v2 = ctx.augment.views(images, ctx.generator, 2)
        z = self.projector(self.model.forward_features(torch.cat([v1, v2])))  # [2B, D]
        n = z.shape[0]
        mine = slice(get_rank() * n, (get_rank() + 1) * n) if is_distributed() else None
        everyone = all_gather_with_grad(z)
        both = all_gather_rows(torch.cat([labels, labels]))
        if self.training:  # evaluating the loss (model.eval()) leaves centres and assignment alone
            self.update_assignment(everyone.detach(), both)
        loss = tsc_loss(everyone, both, self.targets, self.assignment, self.temperature, self.target_weight, mine)
        return {"loss": loss}
