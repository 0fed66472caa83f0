"""PCL: Prototypical Contrastive Learning of Unsupervised Representations (Li et al., ICLR 2021).

An EM view of contrastive learning. E-step (start of every epoch from ``warmup_epochs_proto`` on):
the momentum encoder embeds the whole training set (no augmentation, eval mode); for each of
``M`` granularities ``k_m`` k-means gives every image a prototype (its cluster's L2-normalised
centroid) and every cluster a concentration ``phi`` (eq. 12). M-step (every training step): the
MoCo v2 instance InfoNCE loss plus, averaged over granularities, the ProtoNCE prototype term,
which pulls a query towards its prototype at the prototype's own temperature ``phi``.

Instance part: query encoder (backbone + 2-layer MLP, MoCo v2) and a momentum copy that encodes
keys; a queue of past keys holds the negatives. Shuffled BN across GPUs is not reproduced (use the
trainer's ``sync_bn`` under DDP). Under DDP the E-step embeds one shard of the dataset per rank and
keeps it there: k-means (``train.clustering.kmeans_sharded``) trains its centroids on rank 0 from a
sample of ``kmeans_sample_per_cluster * k`` rows (all rows on small datasets), every rank assigns its
own rows, the concentrations' sums are all-reduced and only the ``[M,N]`` assignments are gathered;
the queue receives the keys of every rank.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from train.clustering import embed_shard, epoch_seed, kmeans_sharded, resize_buffers_to_state
from train.distributed import all_gather_rows, all_reduce_sum, gather_dataset
from train.methods.base import Method, StepContext, register_method
from zoo.heads import ProjectionHead
from zoo.model import ZooModel


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE (Oord et al. 2018; He et al. 2020, eq. 1).

    Args:
        q: ``[B,D]`` L2-normalised queries; k: ``[B,D]`` their L2-normalised keys (the positives).
        queue: ``[Q,D]`` L2-normalised keys of earlier batches (the negatives).

    Returns:
        ``-1/B sum_i log exp(q_i.k_i/T) / (exp(q_i.k_i/T) + sum_j exp(q_i.queue_j/T))``.
    """
    l_pos = (q * k).sum(dim=1, keepdim=True)  # [B,1]
    l_neg = q @ queue.T  # [B,Q]
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def proto_nce_loss(
    q: torch.Tensor,
    prototypes: torch.Tensor,
    assignments: torch.Tensor,
    phi: torch.Tensor,
    num_negatives: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The prototype term of ProtoNCE (Li et al. 2021, eq. 11) for one granularity.

    Args:
        q: ``[B,D]`` L2-normalised query embeddings.
        prototypes: ``[K,D]`` L2-normalised cluster centroids ``c_j``.
        assignments: ``[B]`` cluster ``s_i`` of each query's image (from the E-step).
        phi: ``[K]`` per-prototype concentration (temperature) ``phi_j``.
        num_negatives: ``r``; None (or ``r >= K-1``): every other prototype is a negative.
        generator: draws the ``r`` negatives (required when they are sampled).

    Returns:
        scalar ``-1/B sum_i log exp(q_i.c_{s_i}/phi_{s_i}) / sum_{j in {s_i} u N_i} exp(q_i.c_j/phi_j)``,
        where ``N_i`` is the negatives of query i: all ``j != s_i``, or ``r`` of them drawn uniformly
        without replacement. The draw is one random permutation of the K prototypes per call, shared
        by the batch: ``N_i`` = its first ``r`` entries that are not ``s_i`` (uniform for each i). The
        official code instead shares ``r`` negatives drawn outside all of the batch's positives and
        adds the other queries' positives as negatives.
    """
    logits = (q @ prototypes.T) / phi.unsqueeze(0)  # [B,K]
    k = prototypes.shape[0]
    if num_negatives is not None and num_negatives < k - 1:
        if generator is None:
            raise ValueError("proto_nce_loss: sampling num_negatives needs a generator")
        cand = torch.randperm(k, generator=generator)[: num_negatives + 1].to(q.device)  # [r+1]
        not_own = cand.unsqueeze(0) != assignments.unsqueeze(1)  # [B,r+1]
        chosen = not_own & (not_own.long().cumsum(dim=1) <= num_negatives)  # first r that are not s_i
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        allowed.scatter_(1, cand.unsqueeze(0).expand_as(chosen), chosen)
        allowed.scatter_(1, assignments.unsqueeze(1), True)
        logits = logits.masked_fill(~allowed, float("-inf"))
    return F.cross_entropy(logits, assignments)


def concentration(
    features: torch.Tensor, centroids: torch.Tensor, assignments: torch.Tensor, temperature: float,
    alpha: float = 10.0,
) -> torch.Tensor:
    """Per-cluster concentration ``phi`` ``[K]`` (Li et al. 2021, eq. 12), as the official code computes it.

    ``phi_k = sum_{z in k} ||v_z - c_k|| / (Z_k log(Z_k + alpha))`` over the ``Z_k`` features ``v_z``
    ``[N,D]`` assigned to cluster k (``c_k`` the un-normalised k-means centroid). Under DDP ``features``
    and ``assignments`` may be this rank's shard: the sums are all-reduced. A cluster of at most
    one point takes the largest ``phi``; values are clamped to the 10th..90th percentile and scaled so
    that their mean is ``temperature``.
    """
    k = centroids.shape[0]
    x, c = features.double(), centroids.double()
    dist = (x - c[assignments]).norm(dim=1)  # [N]
    # per-cluster sums over every rank's rows (features and assignments may be this rank's shard)
    z = all_reduce_sum(torch.bincount(assignments, minlength=k).double())
    total = all_reduce_sum(torch.zeros(k, dtype=torch.float64).index_add_(0, assignments, dist))
    phi = total / (z.clamp_min(1) * torch.log(z + alpha))
    single = z <= 1
    if bool(single.all()):
        phi = torch.ones(k, dtype=torch.float64)
    elif bool(single.any()):
        phi[single] = phi[~single].max()
    lo, hi = torch.quantile(phi, 0.1), torch.quantile(phi, 0.9)
    phi = phi.clamp(lo, hi)
    phi = temperature * phi / phi.mean()
    return phi.float()


@register_method("pcl")
class PCL(Method):
    """Encoder + projector trained with InfoNCE (momentum keys, queue) + ProtoNCE over k-means prototypes.

    Buffers: ``queue`` ``[Q,d]``, ``queue_ptr``; ``assignments`` ``[M,N]`` (cluster of every image
    at each granularity, -1 before the first E-step), ``prototypes_m`` ``[k_m,d]`` and ``phi_m``
    ``[k_m]`` per granularity, ``clustered_epoch`` (-1 before any E-step).
    """

    def __init__(
        self,
        model: ZooModel,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 128,
        queue_size: int = 16384,
        momentum: float = 0.999,
        temperature: float = 0.2,
        num_clusters: list[int] | tuple[int, ...] = (10, 20),
        num_negative_prototypes: int | None = None,
        warmup_epochs_proto: int = 0,
        concentration_alpha: float = 10.0,
        kmeans_niter: int = 20,
        kmeans_sample_per_cluster: int | None = 1000,
    ):
        super().__init__(model)
        self.projector = ProjectionHead(model.num_features, proj_hidden_dim, proj_dim, num_layers=2,
                                        batch_norm=False)
        self.key_encoder = nn.ModuleDict(
            {"backbone": copy.deepcopy(model), "projector": copy.deepcopy(self.projector)}
        )
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        self.momentum = momentum
        self.temperature = temperature
        self.num_clusters = [int(k) for k in num_clusters]
        self.num_negative_prototypes = num_negative_prototypes
        self.warmup_epochs_proto = warmup_epochs_proto
        self.concentration_alpha = concentration_alpha
        self.kmeans_niter = kmeans_niter
        # k-means trains on at most this many rows per cluster (the official code's faiss setting, 1000)
        self.kmeans_sample_per_cluster = kmeans_sample_per_cluster
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("assignments", torch.full((len(self.num_clusters), 0), -1, dtype=torch.long))
        for m, k in enumerate(self.num_clusters):
            self.register_buffer(f"prototypes_{m}", torch.zeros(k, proj_dim))
            self.register_buffer(f"phi_{m}", torch.full((k,), temperature))
        self.register_buffer("clustered_epoch", torch.tensor(-1, dtype=torch.long))
        self._pending_keys: torch.Tensor | None = None

    # -- state ---------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        resize_buffers_to_state(self, state_dict, prefix, ("assignments",))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_train_start(self, ctx: StepContext) -> None:
        if self.assignments.shape[1] != ctx.dataset_size:
            self.assignments = torch.full((len(self.num_clusters), ctx.dataset_size), -1, dtype=torch.long,
                                          device=self.queue.device)

    def key_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Momentum-encoder embedding ``[B,d]``, L2-normalised."""
        features = self.key_encoder["backbone"].forward_features(x)
        return F.normalize(self.key_encoder["projector"](features), dim=1)

    # -- E-step ----------------------------------------------------------------------------
    @torch.no_grad()
    def on_epoch_start(self, ctx: StepContext) -> None:
        self.on_train_start(ctx)
        if ctx.epoch < self.warmup_epochs_proto:
            return
        # this rank's shard [n_r,d] (all N on one process): no rank holds the whole dataset's features
        feats, idx = embed_shard(self.key_embed, ctx, normalize=True, module=self.key_encoder)
        for m, k in enumerate(self.num_clusters):
            assign, centroids = kmeans_sharded(feats, idx, ctx.dataset_size, k,
                                               epoch_seed(ctx.seed, ctx.epoch, offset=m), niter=self.kmeans_niter,
                                               max_points_per_centroid=self.kmeans_sample_per_cluster)
            phi = concentration(feats, centroids, assign, self.temperature, self.concentration_alpha)
            self.assignments[m].copy_(gather_dataset(assign, idx, ctx.dataset_size))
            getattr(self, f"prototypes_{m}").copy_(F.normalize(centroids, dim=1))  # the same on every rank
            getattr(self, f"phi_{m}").copy_(phi)
        self.clustered_epoch.fill_(ctx.epoch)

    # -- M-step ----------------------------------------------------------------------------
    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        v_q, v_k = ctx.augment.views(images, ctx.generator, 2)
        q = F.normalize(self.projector(self.model.forward_features(v_q)), dim=1)  # [B,d]
        with torch.no_grad():
            k = self.key_embed(v_k)  # [B,d]
        loss_instance = info_nce_loss(q, k, self.queue.clone(), self.temperature)
        out = {"loss_instance": loss_instance.detach()}
        loss = loss_instance
        if int(self.clustered_epoch) >= 0:
            idx = indices.to(self.assignments.device)
            terms = [
                proto_nce_loss(
                    q, getattr(self, f"prototypes_{m}"), self.assignments[m, idx], getattr(self, f"phi_{m}"),
                    self.num_negative_prototypes, ctx.generator,
                )
                for m in range(len(self.num_clusters))
            ]
            loss_proto = torch.stack(terms).mean()
            out["loss_proto"] = loss_proto.detach()
            loss = loss + loss_proto
        self._pending_keys = all_gather_rows(k.detach())  # under DDP: every rank's keys, in rank order
        out["loss"] = loss
        return out

    @torch.no_grad()
    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        """Momentum update of the key encoder, then enqueue this step's keys (FIFO, oldest replaced)."""
        online = list(self.model.parameters()) + list(self.projector.parameters())  # same order as target
        target = list(self.key_encoder.parameters())
        for po, pt in zip(online, target):
            pt.mul_(self.momentum).add_(po.detach(), alpha=1 - self.momentum)
        keys, self._pending_keys = self._pending_keys, None
        if keys is None:
            return
        size = self.queue.shape[0]
        keys = keys[-size:]
        pos = (int(self.queue_ptr) + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[pos] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + keys.shape[0]) % size)
