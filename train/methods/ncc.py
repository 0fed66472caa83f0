"""NCC / ProPos: BYOL with positive sampling and prototype scattering, trained as an EM loop.

Huang, Chen, Zhang & Shan, "Exploring Non-Contrastive Representation Learning for Deep Clustering"
(arXiv:2111.11821, 2021); journal version "Learning Representation for Clustering via Prototype
Scattering and Positive Sampling" (ProPos, IEEE TPAMI 2022). Official code: github.com/Hzzone/ProPos
(``models/propos/byol_wrapper.py``, ``models/basic_template.py``), which this file follows where the
issue is silent.

- **E-step** (start of every ``kmeans_every``-th epoch from ``warmup_epochs_cluster`` on): the target
  network (EMA encoder + EMA projector) embeds the whole training set (no augmentation, eval mode); the
  L2-normalised embeddings are clustered by spherical k-means into ``num_clusters`` pseudo-classes
  (``train.clustering.kmeans_sharded(spherical=True)``; the official code runs its own cosine k-means,
  k-means++ init, every epoch). Only the pseudo-labels are kept: the prototypes of the M-step are
  recomputed from each batch.
- **M-step** (every step), with the online network ``h = projector(encoder(x))`` and the target
  ``z = target_projector(target_encoder(x))`` of the two views:

  * positive sampling alignment (PSA): BYOL's regression ``2 - 2 cos(predictor(h1 + sigma eps), z2)``
    (``train.methods.byol.byol_loss``), ``eps ~ N(0, I)``: the predictor sees a sample from an isotropic
    Gaussian around the online embedding, a neighbour assumed to be a true positive. The official code
    perturbs the online projection before the predictor (``noise_q = q + randn_like(q) * latent_std``),
    not the target, and so does this file; ``latent_std`` (sigma) is 0.001 in every released config.
  * prototype scattering (PSL, :func:`prototype_scattering_loss`): the batch's online embeddings and
    target embeddings, each grouped by pseudo-label, give two sets of L2-normalised cluster means; each
    online prototype's positive is the target prototype of the same cluster, its negatives are the
    other online prototypes (InfoNCE at temperature ``temperature``, 0.5 in the paper). Clusters absent
    from the batch take no part (the official code fills their logits with -10, i.e. adds
    ``exp(-10)`` per absent cluster to each denominator; they are left out here).

  Both terms are symmetrised (view 1 -> 2 and 2 -> 1) and summed, as BYOL here sums its two directions:
  ``loss = [byol(p1, z2) + byol(p2, z1)] + cluster_weight * [psl(h1, z2) + psl(h2, z1)]``. The official
  code averages the two directions of each term, so this loss is twice the official one (plus a
  constant), with the same ratio between the terms; with ``cluster_weight = 0`` and ``latent_std = 0``
  NCC is exactly :class:`~train.methods.byol.BYOL`. Before ``warmup_epochs_cluster`` the step is BYOL's
  (no noise, no cluster term, no k-means), as the official code switches both off during its warm-up.

Not reproduced from the official code: the predictor's 10x learning rate (BYOL's ``predictor_lr_mult``
option has it; NCC keeps one learning rate), its N(0, 0.01) predictor init, shuffled BN in the target
(use ``sync_bn`` under DDP), and the constant EMA momentum of its CIFAR-10 config (BYOL's cosine
schedule from ``tau_base`` is used).

DDP: the E-step embeds one shard per rank and clusters on the gathered sample (as PCL and IFND); the
``[N]`` pseudo-labels are gathered on every rank. The prototypes are means over the *global* batch:
online embeddings are gathered with gradients, target embeddings and labels without, so every rank
computes the same cluster term and 2 ranks with batch B train as 1 process with batch 2B.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from train.augment import randn_per_sample
from train.clustering import embed_shard, epoch_seed, kmeans_sharded, resize_buffers_to_state
from train.distributed import all_gather_rows, all_gather_with_grad, gather_dataset
from train.methods.base import StepContext, register_method
from train.methods.byol import BYOL, byol_loss
from zoo.model import ZooModel


def cluster_prototypes(x: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised cluster means of a batch (the official ``compute_centers``).

    Args:
        x: ``[B,D]`` L2-normalised embeddings. labels: ``[B]`` pseudo-labels in ``[0, K)``.
        num_clusters: ``K``.

    Returns:
        ``(prototypes [K,D], present [K] bool)``: row c is ``normalize(mean of x_i with labels_i = c)``;
        a cluster with no row in the batch has a zero prototype and ``present = False``.
    """
    one_hot = F.one_hot(labels.long(), num_clusters).to(x.dtype).T  # [K,B]
    counts = one_hot.sum(dim=1)  # [K]
    means = (one_hot @ x) / counts.clamp_min(1).unsqueeze(1)
    return F.normalize(means, dim=1), counts > 0


def prototype_scattering_loss(
    q_protos: torch.Tensor, k_protos: torch.Tensor, present: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """ProPos's prototype scattering loss (the official ``compute_cluster_loss``).

    Args:
        q_protos: ``[K,D]`` L2-normalised online prototypes (gradient flows into them).
        k_protos: ``[K,D]`` L2-normalised target prototypes of the other view (no gradient).
        present: ``[K]`` bool, the clusters that have rows in the batch.
        temperature: ``tau``.

    Returns:
        scalar, the mean over present clusters c of
        ``-log exp(q_c.k_c/tau) / (exp(q_c.k_c/tau) + sum_{j present, j != c} exp(q_c.q_j/tau))``;
        0 when no cluster is present.
    """
    k = q_protos.shape[0]
    if int(present.sum()) == 0:
        return q_protos.sum() * 0.0
    eye = torch.eye(k, dtype=torch.bool, device=q_protos.device)
    pos = (q_protos * k_protos.detach()).sum(dim=1) / temperature  # [K]
    logits = torch.where(eye, torch.diag_embed(pos), q_protos @ q_protos.T / temperature)  # [K,K]
    logits = logits.masked_fill(~present.unsqueeze(0), float("-inf"))
    rows = present.nonzero().flatten()
    return F.cross_entropy(logits[rows], rows)


@register_method("ncc")
class NCC(BYOL):
    """BYOL (online encoder + projector + predictor, EMA target) + per-epoch spherical k-means pseudo-labels,
    trained with positive sampling alignment and prototype scattering.

    Buffers: ``pseudo_labels`` ``[N]`` (cluster of every training image, -1 before the first E-step) and
    ``clustered_epoch`` (the epoch of the last E-step, -1 before any), so a resumed run continues with
    the same labels. ``export()`` returns the online encoder (BYOL's).
    """

    def __init__(
        self,
        model: ZooModel,
        proj_hidden_dim: int = 4096,
        proj_dim: int = 256,
        pred_hidden_dim: int = 4096,
        tau_base: float = 0.996,
        num_clusters: int = 10,
        temperature: float = 0.5,
        cluster_weight: float = 0.1,
        latent_std: float = 0.001,
        warmup_epochs_cluster: int = 0,
        kmeans_every: int = 1,
        kmeans_niter: int = 50,
        kmeans_sample_per_cluster: int | None = 1000,
    ):
        super().__init__(model, proj_hidden_dim=proj_hidden_dim, proj_dim=proj_dim, pred_hidden_dim=pred_hidden_dim,
                         tau_base=tau_base)
        if num_clusters < 2:
            raise ValueError(f"NCC: num_clusters must be >= 2, got {num_clusters}")
        if temperature <= 0:
            raise ValueError(f"NCC: temperature must be > 0, got {temperature}")
        if latent_std < 0:
            raise ValueError(f"NCC: latent_std must be >= 0, got {latent_std}")
        if kmeans_every < 1:
            raise ValueError(f"NCC: kmeans_every must be >= 1, got {kmeans_every}")
        self.num_clusters, self.temperature, self.cluster_weight = num_clusters, temperature, cluster_weight
        self.latent_std, self.warmup_epochs_cluster = latent_std, warmup_epochs_cluster
        self.kmeans_every, self.kmeans_niter = kmeans_every, kmeans_niter
        self.kmeans_sample_per_cluster = kmeans_sample_per_cluster
        self.register_buffer("pseudo_labels", torch.full((0,), -1, dtype=torch.long))
        self.register_buffer("clustered_epoch", torch.tensor(-1, dtype=torch.long))

    # -- state ---------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        resize_buffers_to_state(self, state_dict, prefix, ("pseudo_labels",))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _size_labels(self, ctx: StepContext) -> None:
        if self.pseudo_labels.numel() != ctx.dataset_size:
            self.pseudo_labels = torch.full((ctx.dataset_size,), -1, dtype=torch.long,
                                            device=self.clustered_epoch.device)

    def on_train_start(self, ctx: StepContext) -> None:
        super().on_train_start(ctx)  # BYOL's: the target starts as a copy of the online network
        self._size_labels(ctx)

    def active(self, epoch: int) -> bool:
        """Whether the epoch is past the warm-up (noise, cluster term and k-means on)."""
        return epoch >= self.warmup_epochs_cluster

    # -- E-step ----------------------------------------------------------------------------
    @torch.no_grad()
    def target_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Target embedding ``[B,proj_dim]``, L2-normalised (what the official code clusters)."""
        return F.normalize(self.target(x), dim=1)

    @torch.no_grad()
    def on_epoch_start(self, ctx: StepContext) -> None:
        self._size_labels(ctx)
        if not self.active(ctx.epoch):
            return
        if int(self.clustered_epoch) >= 0 and (ctx.epoch - self.warmup_epochs_cluster) % self.kmeans_every:
            return
        module = torch.nn.ModuleList([self.target_model, self.target_projector])
        feats, idx = embed_shard(self.target_embed, ctx, normalize=True, module=module)  # [n_r,d] this rank's
        assign, _ = kmeans_sharded(feats, idx, ctx.dataset_size, self.num_clusters,
                                   epoch_seed(ctx.seed, ctx.epoch, offset=14), niter=self.kmeans_niter,
                                   max_points_per_centroid=self.kmeans_sample_per_cluster, spherical=True)
        self.pseudo_labels.copy_(gather_dataset(assign, idx, ctx.dataset_size).to(self.pseudo_labels.device))
        self.clustered_epoch.fill_(ctx.epoch)

    # -- M-step ----------------------------------------------------------------------------
    def perturb(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """``h + latent_std * eps`` ``[B,d]``, ``eps`` drawn per sample of the global batch (rank-consistent)."""
        if self.latent_std == 0:
            return h
        eps = randn_per_sample(h.shape[0], ctx.generator, tuple(h.shape[1:]))
        return h + self.latent_std * eps.to(device=h.device, dtype=h.dtype)

    def cluster_term(self, h: torch.Tensor, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """:func:`prototype_scattering_loss` of online ``h`` ``[B,d]`` against target ``z`` ``[B,d]`` of the other
        view, the prototypes taken over the global batch (every rank's rows)."""
        labels = labels.to(h.device)
        q_all = F.normalize(all_gather_with_grad(h), dim=1)
        k_all = F.normalize(all_gather_rows(z.detach()), dim=1)
        q_protos, present = cluster_prototypes(q_all, labels, self.num_clusters)
        k_protos, _ = cluster_prototypes(k_all, labels, self.num_clusters)
        return prototype_scattering_loss(q_protos, k_protos, present, self.temperature)

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        v1, v2 = ctx.augment.views(images, ctx.generator, 2)
        h1 = self.project(v1)  # [B,d] online projections
        h2 = self.project(v2)
        z1, z2 = self.target(v1), self.target(v2)
        clustering = self.active(ctx.epoch) and int(self.clustered_epoch) >= 0
        if clustering:
            h1n, h2n = self.perturb(h1, ctx), self.perturb(h2, ctx)
        else:
            h1n, h2n = h1, h2
        loss_align = byol_loss(self.predictor(h1n), z2) + byol_loss(self.predictor(h2n), z1)
        out = {"loss_align": loss_align.detach()}
        loss = loss_align
        if clustering:
            labels = all_gather_rows(self.pseudo_labels[indices.to(self.pseudo_labels.device)])
            loss_proto = self.cluster_term(h1, z2, labels) + self.cluster_term(h2, z1, labels)
            out["loss_proto"] = loss_proto.detach()
            loss = loss + self.cluster_weight * loss_proto
        out["loss"] = loss
        return out
