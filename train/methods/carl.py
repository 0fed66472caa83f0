"""CARL: Consistent Assignment for Representation Learning (Silva & Ramírez Rivera, "Representation
Learning via Consistent Assignment of Views to Clusters", ACM SAC 2022).

Online prototypes learned by gradient descent: no Sinkhorn, no k-means. Each view goes through
encoder -> projection MLP -> a linear prototype layer of ``K`` outputs -> softmax, giving a
distribution over the prototypes. Two terms:

- **consistency**: both views must choose the same prototype. For the pair (online view a, target
  view b) the probability that independent draws from the two distributions agree is
  ``<p_a, t_b> = sum_k p_a[k] t_b[k]``; the loss is ``-log`` of it, symmetrised over the two views.
  The target distributions ``t`` come from an exponential moving average of the online network
  (encoder + projector + prototypes), as in the paper's BYOL-style target network.
- **uniform usage**: the batch-mean online distribution ``pbar`` must be close to uniform:
  ``KL(pbar || U) = sum_k pbar_k log(K pbar_k)``, weighted by ``entropy_weight``. Without it every
  image picks one prototype (the trivial solution).

The prototype layer is the exported model's cluster head (``ZooModel.cluster_head``): the projector is
one linear layer by default (``proj_layers=1``), so projector and prototypes compose into one linear map
of the encoder features ``[B,D] -> [B,K]``, which ``export()`` writes as the cluster head (same
probabilities, exactly). A deeper projector trains but cannot be exported as a one-layer head.

Choices this file makes where the issue is silent (the paper's code was not available offline, so
these are stated, not copied): prototypes are a bias-free linear layer, not L2-normalised; the target
network's momentum follows BYOL's cosine schedule from ``tau_base``; no predictor. ``pretext`` starts the
encoder from a trained model (e.g. the shipped ``simclr_convnet_mnist5k``), as SCAN does.
The batch statistic ``pbar`` is over the global batch under DDP (all-reduced with gradient), so the
uniform-usage term of W ranks with batch B is that of one process with batch W*B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.distributed import all_reduce_with_grad, get_world_size
from train.methods.base import Method, StepContext, register_method
from train.methods.byol import ema_momentum
from train.methods.moco import copy_weights_, frozen_copy, momentum_update
from zoo.heads import ClusterHead, ProjectionHead
from zoo.model import ZooModel


def carl_consistency_loss(p: torch.Tensor, t: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``-1/B sum_i log sum_k p[i,k] t[i,k]``: the two views choose the same prototype.

    Args:
        p: ``[B,K]`` online prototype probabilities of one view (rows sum to 1).
        t: ``[B,K]`` target probabilities of the other view (rows sum to 1; no gradient flows into them).
    """
    return -torch.log((p * t.detach()).sum(dim=1).clamp(min=eps)).mean()


def uniform_usage_loss(p: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``KL(pbar || U) = sum_k pbar_k log(K pbar_k)`` with ``pbar = mean_i p[i]`` over the global batch.

    Args:
        p: ``[B,K]`` probabilities (rows sum to 1). Under DDP ``pbar`` averages every rank's rows
            (gradients flow back to each rank's own rows).

    Returns:
        scalar in ``[0, log K]``: 0 when the prototypes are used uniformly, ``log K`` when one takes all.
    """
    k = p.shape[1]
    pbar = p.mean(dim=0)
    world = get_world_size()
    if world > 1:
        pbar = all_reduce_with_grad(pbar) / world
    return (pbar * torch.log((k * pbar).clamp(min=eps))).sum()


def carl_loss(p1: torch.Tensor, p2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor,
              entropy_weight: float = 1.0) -> torch.Tensor:
    """CARL's objective on two views: ``(C(p1,t2) + C(p2,t1))/2 + w (KL(p1bar||U) + KL(p2bar||U))/2``.

    Args: ``[B,K]`` online probabilities ``p1, p2`` and target probabilities ``t1, t2`` of views 1, 2.
    """
    consistency = 0.5 * (carl_consistency_loss(p1, t2) + carl_consistency_loss(p2, t1))
    usage = 0.5 * (uniform_usage_loss(p1) + uniform_usage_loss(p2))
    return consistency + entropy_weight * usage


@register_method("carl")
class CARL(Method):
    """Encoder + projector + ``num_clusters`` linear prototypes (softmax at ``temperature``), EMA target.

    Args:
        num_clusters: K prototypes (the exported cluster head's outputs).
        proj_layers: 1 makes the projector a single linear layer, so the prototypes compose with it into
            one linear cluster head on the encoder features (exported exactly); more layers export a head
            fitted to the trained assignments.
        entropy_weight: weight of the uniform-usage term.
        temperature: softmax temperature of the prototype scores.
        pretext: a trained encoder to start from (registered name, model folder or ``hf-hub:``).
    """

    def __init__(
        self, model: ZooModel, num_clusters: int = 10, proj_hidden_dim: int = 512, proj_dim: int = 128,
        proj_layers: int = 1, temperature: float = 0.1, entropy_weight: float = 1.0, tau_base: float = 0.99,
        pretext: str | None = None,
    ):
        super().__init__(model)
        if pretext is not None:
            from train.methods.scan import copy_backbone_, load_pretext

            copy_backbone_(load_pretext(pretext), model, f"pretext {pretext!r}")
            model.pretrained_cfg["pretext"] = pretext
        if num_clusters < 2:
            raise ValueError(f"num_clusters must be >= 2, got {num_clusters}")
        self.num_clusters = num_clusters
        self.temperature = temperature
        self.entropy_weight = entropy_weight
        self.tau_base = tau_base
        self.proj_layers = proj_layers
        if proj_layers == 1:
            self.projector = nn.Linear(model.num_features, proj_dim)
        else:
            self.projector = ProjectionHead(model.num_features, proj_hidden_dim, proj_dim, num_layers=proj_layers)
        self.prototypes = nn.Linear(proj_dim, num_clusters, bias=False)
        self.target_model = frozen_copy(model)
        self.target_projector = frozen_copy(self.projector)
        self.target_prototypes = frozen_copy(self.prototypes)

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """Online ``[B,D]`` encoder features -> ``[B,K]`` prototype probabilities."""
        return F.softmax(self.prototypes(self.projector(features)) / self.temperature, dim=1)

    @torch.no_grad()
    def target_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        z = self.target_projector(self.target_model.forward_features(x))
        return F.softmax(self.target_prototypes(z) / self.temperature, dim=1)

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        v1, v2 = ctx.augment.views(images, ctx.generator, 2)
        p1, p2 = self.probabilities(self.model.forward_features(v1)), self.probabilities(self.model.forward_features(v2))
        t1, t2 = self.target_probabilities(v1), self.target_probabilities(v2)
        loss = carl_loss(p1, p2, t1, t2, self.entropy_weight)
        with torch.no_grad():
            used = torch.cat([p1, p2]).argmax(dim=1).unique().numel()
        return {"loss": loss, "clusters_used": torch.tensor(float(used))}

    def on_train_start(self, ctx: StepContext) -> None:
        if ctx.step == 0:
            for online, target in ((self.model, self.target_model), (self.projector, self.target_projector),
                                   (self.prototypes, self.target_prototypes)):
                copy_weights_(online, target)

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        tau = ema_momentum(ctx.step, ctx.total_steps, self.tau_base)
        for online, target in ((self.model, self.target_model), (self.projector, self.target_projector),
                               (self.prototypes, self.target_prototypes)):
            momentum_update(online, target, tau)

    @torch.no_grad()
    def export(self) -> ZooModel:
        """The encoder with a one-layer cluster head: ``prototypes(projector(f)) / temperature`` folded into
        one ``nn.Linear`` when the projector is linear (the same argmax and probabilities)."""
        if self.proj_layers != 1:
            raise ValueError("CARL exports a cluster head only with proj_layers=1 (a linear projector)")
        w_p, b_p, w_c = self.projector.weight, self.projector.bias, self.prototypes.weight
        head = ClusterHead(self.model.num_features, self.num_clusters, 1).to(w_p.device)
        head.heads[0].weight.copy_(w_c @ w_p / self.temperature)
        head.heads[0].bias.copy_(w_c @ b_p / self.temperature)
        self.model.cluster_head = head
        self.model.num_clusters = self.num_clusters
        self.model.pretrained_cfg.update(num_clusters=self.num_clusters, num_cluster_heads=1)
        return self.model

