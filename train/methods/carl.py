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

Options for training a cluster head on a pretext encoder (not in the paper, which trains end to end
from scratch; measured on mnist5k in docs/benchmarks.md): ``update_backbone=False`` keeps the pretext
backbone frozen (eval mode, out of the optimizer; SCAN's ``update_cluster_head_only``), so the target
network's backbone is the online one and only the projector and prototypes have EMA targets;
``feature_bank_views=V`` (frozen backbone only) embeds V augmented views of every training image once at
the start and draws each step's two views from them (two different bank views per image), so a step
costs no encoder pass; ``proj_init="identity"`` starts the linear projector as the identity map;
``num_heads=H`` trains H independent (projector, prototypes) heads on the same views, the loss summed,
and keeps the head with the lowest mean loss over the last epoch (SCAN's rule for its heads: the
objective is non-convex in the head and some starts end in a worse partition with a higher loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.clustering import epoch_seed
from train.distributed import all_reduce_mean, all_reduce_with_grad, get_world_size, is_distributed
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
        update_backbone: False freezes the backbone (eval mode, no gradient, not in the optimizer).
        feature_bank_views: V >= 2 embeds V augmented views of each training image once (needs
            ``update_backbone=False``); 0 augments and encodes every step.
        proj_init: "default" (PyTorch's init) or "identity" (needs ``proj_layers=1`` and
            ``proj_dim`` = the encoder's feature dimension).
        num_heads: independent heads trained at once; the lowest-loss one is exported (``best_head``).
    """

    ddp_find_unused_parameters = True  # a frozen backbone has no gradients

    def __init__(
        self, model: ZooModel, num_clusters: int = 10, proj_hidden_dim: int = 512, proj_dim: int = 128,
        proj_layers: int = 1, temperature: float = 0.1, entropy_weight: float = 1.0, tau_base: float = 0.99,
        pretext: str | None = None, update_backbone: bool = True, feature_bank_views: int = 0,
        proj_init: str = "default", bank_batch_size: int = 512, num_heads: int = 1,
    ):
        super().__init__(model)
        if pretext is not None:
            from train.methods.scan import copy_backbone_, load_pretext

            copy_backbone_(load_pretext(pretext), model, f"pretext {pretext!r}")
            model.pretrained_cfg["pretext"] = pretext
        if num_clusters < 2 or num_heads < 1:
            raise ValueError(f"need num_clusters >= 2 and num_heads >= 1, got {num_clusters}, {num_heads}")
        if feature_bank_views and (feature_bank_views < 2 or update_backbone):
            raise ValueError(f"feature_bank_views must be 0 or >= 2 with update_backbone=False, got "
                             f"{feature_bank_views} with update_backbone={update_backbone}")
        if proj_init not in ("default", "identity"):
            raise ValueError(f"proj_init must be 'default' or 'identity', got {proj_init!r}")
        if proj_init == "identity" and (proj_layers != 1 or proj_dim != model.num_features):
            raise ValueError(f"proj_init='identity' needs proj_layers=1 and proj_dim={model.num_features} "
                             f"(the encoder's features), got proj_layers={proj_layers}, proj_dim={proj_dim}")
        self.num_clusters = num_clusters
        self.update_backbone = update_backbone
        self.feature_bank_views = feature_bank_views
        self.bank_batch_size = bank_batch_size
        self.temperature = temperature
        self.entropy_weight = entropy_weight
        self.tau_base = tau_base
        self.proj_layers = proj_layers
        self.num_heads = num_heads
        self.projectors = nn.ModuleList(self._projector(model.num_features, proj_hidden_dim, proj_dim, proj_init)
                                        for _ in range(num_heads))
        self.prototypes = nn.ModuleList(nn.Linear(proj_dim, num_clusters, bias=False) for _ in range(num_heads))
        self.target_model = frozen_copy(model)
        self.target_projectors = frozen_copy(self.projectors)
        self.target_prototypes = frozen_copy(self.prototypes)
        if not update_backbone:
            for p in model.backbone.parameters():
                p.requires_grad_(False)
        # [V,N,D] encoder features of V augmented views (rebuilt from the seed at every start, so a
        # resumed run draws from the same bank; not checkpointed).
        self.register_buffer("feature_bank", torch.zeros(0), persistent=False)
        # Summed loss of each head over the current epoch (checkpointed: a resume picks the same head).
        self.register_buffer("head_loss_sum", torch.zeros(num_heads, dtype=torch.float64))
        self.register_buffer("head_loss_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("best_head", torch.zeros((), dtype=torch.long))

    def _projector(self, dim: int, hidden: int, out: int, init: str) -> nn.Module:
        if self.proj_layers != 1:
            return ProjectionHead(dim, hidden, out, num_layers=self.proj_layers)
        layer = nn.Linear(dim, out)
        if init == "identity":
            with torch.no_grad():
                layer.weight.copy_(torch.eye(out))
                layer.bias.zero_()
        return layer

    def probabilities(self, features: torch.Tensor, head: int | None = None) -> torch.Tensor:
        """Online ``[B,D]`` encoder features -> ``[B,K]`` prototype probabilities of ``head`` (default: the
        best head)."""
        h = int(self.best_head) if head is None else head
        return F.softmax(self.prototypes[h](self.projectors[h](features)) / self.temperature, dim=1)

    @torch.no_grad()
    def target_probabilities(self, x: torch.Tensor, head: int = 0) -> torch.Tensor:
        return self.target_head(self.target_model.forward_features(x), head)

    @torch.no_grad()
    def target_head(self, features: torch.Tensor, head: int = 0) -> torch.Tensor:
        """``[B,D]`` encoder features -> ``[B,K]`` target probabilities (EMA projector and prototypes)."""
        z = self.target_projectors[head](features)
        return F.softmax(self.target_prototypes[head](z) / self.temperature, dim=1)

    @torch.no_grad()
    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features ``[B,D]`` of the frozen backbone (eval mode for the pass, no gradient)."""
        mode = self.model.training
        self.model.eval()
        f = self.model.forward_features(x)
        self.model.train(mode)
        return f

    @torch.no_grad()
    def build_feature_bank(self, ctx: StepContext) -> torch.Tensor:
        """``[V,N,D]``: every training image's features under V augmentations, from a generator seeded by
        the run's seed alone (every rank builds the same bank; ``ctx.generator`` is not consumed)."""
        gen = torch.Generator().manual_seed(epoch_seed(ctx.seed, 0, 7))
        bank = None
        for v in range(self.feature_bank_views):
            for images, idx in ctx.iterate_dataset(batch_size=self.bank_batch_size):
                f = self.frozen_features(ctx.augment(images, gen))
                if bank is None:
                    bank = f.new_zeros(self.feature_bank_views, ctx.dataset_size, f.shape[1])
                bank[v, idx.to(f.device)] = f
        return bank

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.feature_bank.numel():  # two different bank views of each image
            rows = indices.to(self.feature_bank.device)
            a = torch.randint(0, self.feature_bank_views, (rows.numel(),), generator=ctx.generator)
            b = (a + torch.randint(1, self.feature_bank_views, (rows.numel(),), generator=ctx.generator)) \
                % self.feature_bank_views
            f1, f2 = self.feature_bank[a.to(rows.device), rows], self.feature_bank[b.to(rows.device), rows]
        else:
            v1, v2 = ctx.augment.views(images, ctx.generator, 2)
            if self.update_backbone:
                f1, f2 = self.model.forward_features(v1), self.model.forward_features(v2)
            else:
                f1, f2 = self.frozen_features(v1), self.frozen_features(v2)
        if self.update_backbone:  # the EMA target network encodes the views itself
            g1, g2 = self.target_model.forward_features(v1), self.target_model.forward_features(v2)
        else:  # frozen backbone: the target's backbone is the online one
            g1, g2 = f1.detach(), f2.detach()
        totals, used = [], 0
        for h in range(self.num_heads):
            p1, p2 = self.probabilities(f1, h), self.probabilities(f2, h)
            with torch.no_grad():
                t1, t2 = self.target_head(g1, h), self.target_head(g2, h)
            totals.append(carl_loss(p1, p2, t1, t2, self.entropy_weight))
            if h == int(self.best_head):
                with torch.no_grad():
                    used = torch.cat([p1, p2]).argmax(dim=1).unique().numel()
        totals = torch.stack(totals)  # [H]
        if self.training:
            with torch.no_grad():
                per_head = totals.detach().double()
                self.head_loss_sum.add_(all_reduce_mean(per_head) if is_distributed() else per_head)
                self.head_loss_count.add_(1)
        out = {"loss": totals.sum(), "clusters_used": torch.tensor(float(used))}
        if self.num_heads > 1:
            out.update({f"loss_head{h}": t.detach() for h, t in enumerate(totals)})
        return out

    @torch.no_grad()
    def select_best_head(self) -> int:
        """``best_head`` <- the head with the lowest mean loss over the current (or last) epoch."""
        if int(self.head_loss_count) > 0:
            self.best_head.fill_(int(torch.argmin(self.head_loss_sum)))
        return int(self.best_head)

    def on_epoch_start(self, ctx: StepContext) -> None:
        self.select_best_head()  # from the epoch that just ended
        self.head_loss_sum.zero_()
        self.head_loss_count.zero_()

    def on_train_start(self, ctx: StepContext) -> None:
        if self.feature_bank_views:
            self.feature_bank = self.build_feature_bank(ctx)
        if ctx.step == 0:
            for online, target in ((self.model, self.target_model), (self.projectors, self.target_projectors),
                                   (self.prototypes, self.target_prototypes)):
                copy_weights_(online, target)

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        tau = ema_momentum(ctx.step, ctx.total_steps, self.tau_base)
        pairs = [(self.projectors, self.target_projectors), (self.prototypes, self.target_prototypes)]
        if self.update_backbone:
            pairs.append((self.model, self.target_model))
        for online, target in pairs:
            momentum_update(online, target, tau)

    @torch.no_grad()
    def export(self) -> ZooModel:
        """The encoder with one linear cluster head per CARL head: ``prototypes(projector(f)) / temperature``
        folded into one ``nn.Linear`` (the same probabilities) when the projector is linear; ``best_head``
        is the head with the lowest loss over the last epoch."""
        if self.proj_layers != 1:
            raise ValueError("CARL exports a cluster head only with proj_layers=1 (a linear projector)")
        best = self.select_best_head()
        head = ClusterHead(self.model.num_features, self.num_clusters, self.num_heads, best_head=best)
        head = head.to(self.prototypes[0].weight.device)
        for out, proj, proto in zip(head.heads, self.projectors, self.prototypes):
            out.weight.copy_(proto.weight @ proj.weight / self.temperature)
            out.bias.copy_(proto.weight @ proj.bias / self.temperature)
        self.model.cluster_head = head
        self.model.num_clusters = self.num_clusters
        self.model.pretrained_cfg.update(num_clusters=self.num_clusters, num_cluster_heads=self.num_heads)
        return self.model
