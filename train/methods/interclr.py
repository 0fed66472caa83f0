"""InterCLR: Xie, Zhan, Liu, Ong & Loy, "Delving into Inter-Image Invariance for Unsupervised Visual
Representations" (IJCV 2022, arXiv 2008.11702), on MoCo v2.

MoCo v2 (query encoder, momentum key encoder, queue: all reused from :mod:`train.methods.moco`) learns
intra-image invariance; InterCLR adds an *inter-image* term whose positives are other images that share
the query's online pseudo-label:

- **Memory** (``memory_bank [N,D]``, ``memory_labels [N]``, ``centroids [C,D]``): every training image's
  L2-normalised key embedding, its pseudo-label and the cluster centroids. Before the first step the
  key encoder embeds the whole training set and k-means gives the labels (``train.clustering``); the
  centroids are the means of their members' bank rows.
- **Online labels by mini-batch k-means** (:func:`update_memory`, :func:`cluster_means`): each step the
  batch's keys overwrite their bank rows (momentum 1, as the official memory), each of those images is
  re-labelled to its most similar centroid, and the centroids are recomputed as the means of the bank
  rows of their members, so they move by the batch's re-assigned features. Clusters smaller than
  ``min_cluster`` are dissolved (members to the nearest remaining centroid) and refilled by splitting the
  largest cluster in two with 2-means (:func:`fix_small_clusters`), as the official memory does.
- **Semi-hard negatives** (:func:`sample_inter_pairs`): the ``pool_size`` bank entries most similar to the
  query form a band, and ``num_negatives`` are drawn uniformly from it among entries of another cluster
  (not the hardest ones: those are often false negatives). ``negative_sampling="hard"`` takes the most
  similar ones, ``"random"`` draws from the whole bank (the paper's comparisons).
- **Positive**: one bank entry drawn uniformly among the query's cluster (possibly its own row).
- **Looser decision boundary** (:func:`inter_margin_loss`): a cosine margin on the positive logit,
  ``(q.p - margin) / tau`` with a *negative* margin (-0.5), which makes the noisy pseudo-positive
  easier to accept (the paper's AM-softmax-style study).
- loss = ``intra_weight * InfoNCE(q, k, queue) + inter_weight * inter(q, memory)`` (0.75 / 0.25).

Where the issue is silent this follows the official code (open-mmlab/mmselfsup, ``InterCLRMoCo``,
``InterCLRMemory``, ``InterCLRHook``, config ``interclr-moco_resnet50_8xb32-coslr-200e_in1k``): one shared
projection head for both terms, memory momentum 1, cosine margin -0.5 on the inter term only,
temperature 0.2 for both, weights 0.75 / 0.25, negatives drawn from the top pool and redrawn while they
share the positive's label (here: drawn among the pool entries of other clusters, the same
distribution), small clusters handled every step, the initial labels from k-means of the whole set.
Differences: the centroids are recomputed every ``centroids_update_interval`` steps (default 1; the
official ImageNet config uses 10 of its 5,000 steps per epoch); the embedding clustered at the start is
the key encoder's projection (the space the memory lives in); the arc-margin and offline-label variants
are not provided; 2-means for the split is ``train.clustering.kmeans_with_reseed`` (faiss / sklearn).

Under DDP the memory is global state, the same on every rank: the initial k-means runs on the ranks'
shards (``kmeans_sharded``) and the bank is gathered; each step's update uses every rank's keys and
indices in rank order; per-query draws are made for the global batch (``train.augment``), so 2 ranks
with batch B train exactly as one process with batch 2B.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from train.augment import rand_per_sample
from train.clustering import (
    embed_shard,
    epoch_seed,
    kmeans_sharded,
    kmeans_with_reseed,
    resize_buffers_to_state,
)
from train.distributed import all_gather_rows, gather_dataset
from train.methods.base import StepContext, register_method
from train.methods.moco import MoCo, moco_infonce_loss
from zoo.model import ZooModel

SAMPLINGS = ("semihard", "hard", "random")


def inter_margin_loss(q: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, valid: torch.Tensor | None = None,
                      temperature: float = 0.2, margin: float = -0.5) -> torch.Tensor:
    """The inter-image InfoNCE with a cosine margin on the positive (Xie et al. 2022, sec. 3.4).

    Args:
        q: ``[B,D]`` queries (any scale; L2-normalised here).
        positives: ``[B,D]`` L2-normalised memory entries of the query's cluster.
        negatives: ``[B,M,D]`` L2-normalised memory entries of other clusters.
        valid: ``[B,M]`` bool, False where a negative slot is empty (the band held too few); None: all valid.
        temperature: tau. margin: m; the positive logit is ``q.p - m`` (m < 0 loosens the boundary).

    Returns:
        scalar: mean over the B queries of ``-log exp((q.p - m)/tau) / (exp((q.p - m)/tau) + sum_j exp(q.n_j/tau))``
        over the valid negatives. No gradient into the memory entries.
    """
    q = F.normalize(q, dim=1)
    l_pos = (q * positives.detach()).sum(dim=1, keepdim=True) - margin  # [B,1]
    l_neg = torch.einsum("bd,bmd->bm", q, negatives.detach())  # [B,M]
    if valid is not None:
        l_neg = l_neg.masked_fill(~valid, float("-inf"))
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class InterPairs(NamedTuple):
    """Memory rows chosen for a batch of queries."""

    positive: torch.Tensor  # [B] row of each query's positive (same label as the query's image)
    negatives: torch.Tensor  # [B,M] rows of its negatives (another label); arbitrary where not valid
    valid: torch.Tensor  # [B,M] bool


@torch.no_grad()
def sample_inter_pairs(q: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, own: torch.Tensor,
                       num_negatives: int, pool_size: int, generator: torch.Generator,
                       sampling: str = "semihard") -> InterPairs:
    """InterCLR's positive and negative sampling from the memory.

    Args:
        q: ``[B,D]`` queries (detached here). bank: ``[N,D]`` memory features, labels: ``[N]`` their
            pseudo-labels. own: ``[B]`` the pseudo-label of each query's image.
        num_negatives: M. pool_size: P, the band of the P most similar entries ("semihard").
        generator: draws the positive and the negatives, per sample of the global batch (DDP-consistent).
        sampling: "semihard": M uniform draws without replacement among the pool entries of another label;
            "hard": the M most similar entries of another label; "random": uniform draws from the whole bank.

    Returns: :class:`InterPairs`. A slot is invalid only when fewer than M candidates exist.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"negative_sampling must be one of {SAMPLINGS}, got {sampling!r}")
    b, n, device = q.shape[0], bank.shape[0], bank.device
    own = own.to(device)
    # positive: uniform over the members of the query's cluster (members sorted by label, then by index)
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
    starts = torch.cumsum(counts, 0) - counts
    u = rand_per_sample(b, generator).to(device=device, dtype=torch.float64)
    offset = (u * counts[own].double()).long().clamp_max(counts[own] - 1)
    positive = order[starts[own] + offset]
    # negatives
    pool = n if sampling == "random" else min(pool_size, n)
    sim = F.normalize(q.detach(), dim=1).to(bank.dtype) @ bank.T if sampling != "random" else None  # [B,N]
    # [B,P] candidates, most similar first (the whole bank in index order for "random")
    cand = torch.arange(n, device=device).expand(b, n) if sampling == "random" else sim.topk(pool, dim=1).indices
    allowed = labels[cand] != own.unsqueeze(1)  # [B,P]
    m = min(num_negatives, pool)
    if sampling == "hard":  # most similar first among the allowed (topk is sorted)
        key = torch.arange(pool, 0, -1, device=device, dtype=torch.float64).expand(b, pool)
    else:
        key = rand_per_sample(b, generator, (pool,)).to(device=device, dtype=torch.float64)
    key = key.masked_fill(~allowed, -1.0)
    top = key.topk(m, dim=1)
    return InterPairs(positive, cand.gather(1, top.indices), top.values >= 0)


@torch.no_grad()
def update_memory(bank: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, indices: torch.Tensor,
                  features: torch.Tensor, momentum: float = 1.0) -> float:
    """One online step of the memory, in place (the official ``update_samples_memory``).

    ``bank[i] <- normalize((1 - momentum) bank[i] + momentum normalize(features))`` for the ``[n]``
    ``indices`` (distinct), then ``labels[i] <- argmax_c centroids[c] . bank[i]``. Returns the fraction
    of those images whose label changed.
    """
    idx = indices.to(bank.device).long()
    new = F.normalize((1 - momentum) * bank[idx] + momentum * F.normalize(features.to(bank.dtype), dim=1), dim=1)
    bank[idx] = new
    relabel = (new @ centroids.T).argmax(dim=1)
    changed = float((relabel != labels[idx]).double().mean()) if idx.numel() else 0.0
    labels[idx] = relabel
    return changed


@torch.no_grad()
def cluster_means(bank: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``[C,D]``: the mean of the bank rows of each cluster (un-normalised, as the official memory);
    a cluster with no member keeps its previous centroid. Summed in float64 in a fixed order."""
    c = centroids.shape[0]
    counts = torch.bincount(labels, minlength=c)
    sums = torch.zeros(c, bank.shape[1], dtype=torch.float64, device=bank.device).index_add_(0, labels, bank.double())
    means = (sums / counts.clamp_min(1).unsqueeze(1)).to(centroids.dtype)
    return torch.where((counts > 0).unsqueeze(1), means, centroids)


@torch.no_grad()
def fix_small_clusters(bank: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, min_size: int,
                       seed: int) -> int:
    """In place: dissolve every cluster with fewer than ``min_size`` members and refill it (the official
    ``deal_with_small_clusters``). Its members go to the most similar centroid among the other clusters;
    then each emptied cluster takes one half of the largest cluster, split by 2-means (``seed``), and both
    centroids become their members' means. Returns how many clusters were refilled."""
    c = centroids.shape[0]
    counts = torch.bincount(labels, minlength=c)
    small = (counts < min_size).nonzero().flatten()
    if small.numel() == 0 or small.numel() == c:
        return 0
    keep = (counts >= min_size).nonzero().flatten()
    moving = torch.isin(labels, small).nonzero().flatten()
    if moving.numel():
        labels[moving] = keep[(bank[moving] @ centroids[keep].T).argmax(dim=1)]
    for e in small.tolist():
        counts = torch.bincount(labels, minlength=c)
        big = int(counts.argmax())
        members = (labels == big).nonzero().flatten()
        if members.numel() < 2:
            break
        halves, _ = kmeans_with_reseed(bank[members].float().cpu(), 2, seed=seed + e, niter=20)
        labels[members[halves.to(labels.device) == 1]] = e
        for j in (big, e):
            centroids[j] = bank[labels == j].double().mean(dim=0).to(centroids.dtype)
    return int(small.numel())


@register_method("interclr")
class InterCLR(MoCo):
    """MoCo v2 + the inter-image term over an online-clustered memory. ``moco_kwargs`` are
    :class:`~train.methods.moco.MoCo`'s arguments (``unmix`` is not supported here).

    Buffers (besides MoCo's queue): ``memory_bank [N,proj_dim]``, ``memory_labels [N]`` (sized at the first
    ``on_train_start``), ``centroids [num_clusters,proj_dim]``. ``warmup_epochs``: epochs of the intra term
    alone (the official hook's ``warmup_epochs``; the memory is updated all the same).
    """

    def __init__(
        self, model: ZooModel, num_clusters: int = 100, min_cluster: int = 10, num_negatives: int = 256,
        pool_size: int = 1024, negative_sampling: str = "semihard", margin: float = -0.5,
        intra_weight: float = 0.75, inter_weight: float = 0.25, memory_momentum: float = 1.0,
        centroids_update_interval: int = 1, warmup_epochs: int = 0, kmeans_niter: int = 20,
        **moco_kwargs: Any,
    ):
        if moco_kwargs.get("unmix"):
            raise ValueError("interclr does not support unmix: the inter term needs the dataset index of each query")
        super().__init__(model, **moco_kwargs)
        if negative_sampling not in SAMPLINGS:
            raise ValueError(f"negative_sampling must be one of {SAMPLINGS}, got {negative_sampling!r}")
        if num_clusters < 2 or min_cluster < 1 or num_negatives < 1 or pool_size < 1 or centroids_update_interval < 1:
            raise ValueError("interclr needs num_clusters >= 2 and min_cluster, num_negatives, pool_size, "
                             f"centroids_update_interval >= 1; got {num_clusters}, {min_cluster}, {num_negatives}, "
                             f"{pool_size}, {centroids_update_interval}")
        self.num_clusters, self.min_cluster = num_clusters, min_cluster
        self.num_negatives, self.pool_size, self.negative_sampling = num_negatives, pool_size, negative_sampling
        self.margin, self.intra_weight, self.inter_weight = margin, intra_weight, inter_weight
        self.memory_momentum, self.centroids_update_interval = memory_momentum, centroids_update_interval
        self.warmup_epochs, self.kmeans_niter = warmup_epochs, kmeans_niter
        dim = self.queue.shape[1]
        self.register_buffer("memory_bank", torch.zeros(0, dim))
        self.register_buffer("memory_labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("centroids", torch.zeros(num_clusters, dim))
        self._indices: torch.Tensor | None = None
        self._terms: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._changed: float | None = None

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        resize_buffers_to_state(self, state_dict, prefix, ("memory_bank", "memory_labels"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- memory initialisation -------------------------------------------------------------
    def key_embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W] -> [B,D]`` the key encoder's projection (the memory's space), not normalised."""
        return self.key_projector(self.key_model.forward_features(x))

    @torch.no_grad()
    def on_train_start(self, ctx: StepContext) -> None:
        super().on_train_start(ctx)  # step 0: key encoder <- query encoder
        if self.memory_labels.numel() == ctx.dataset_size:  # restored from a checkpoint, or already built
            return
        if self.num_clusters * self.min_cluster > ctx.dataset_size:
            raise ValueError(f"interclr: num_clusters x min_cluster = {self.num_clusters} x {self.min_cluster} "
                             f"exceeds the {ctx.dataset_size} training images")
        device, dtype = self.queue.device, self.queue.dtype
        feats, idx = embed_shard(self.key_embed, ctx, normalize=True, module=self)
        assign, _ = kmeans_sharded(feats, idx, ctx.dataset_size, self.num_clusters,
                                   epoch_seed(ctx.seed, 0, offset=5), niter=self.kmeans_niter)
        self.memory_bank = gather_dataset(feats, idx, ctx.dataset_size).to(device=device, dtype=dtype)
        self.memory_labels = gather_dataset(assign, idx, ctx.dataset_size).to(device)
        self.centroids.copy_(cluster_means(self.memory_bank, self.memory_labels, self.centroids))
        fix_small_clusters(self.memory_bank, self.memory_labels, self.centroids, self.min_cluster,
                           epoch_seed(ctx.seed, 0, offset=6))

    # -- training ----------------------------------------------------------------------------
    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.memory_labels.numel() == 0:
            raise RuntimeError("interclr: the memory is empty; on_train_start builds it (the trainer calls it)")
        self._indices, self._terms, self._changed = indices, [], None
        try:
            out = super().training_step(images, indices, ctx)
            out["loss_intra"] = torch.stack([t[0] for t in self._terms]).mean()
            out["loss_inter"] = torch.stack([t[1] for t in self._terms]).mean()
            if self._changed is not None:
                out["label_change"] = torch.tensor(self._changed)
            return out
        finally:
            self._indices, self._terms = None, []

    def query_loss(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        intra = moco_infonce_loss(q, k, queue, self.temperature)
        own = self.memory_labels[self._indices.to(self.memory_labels.device)]
        pairs = sample_inter_pairs(q, self.memory_bank, self.memory_labels, own, self.num_negatives, self.pool_size,
                                   ctx.generator, self.negative_sampling)
        inter = inter_margin_loss(q, self.memory_bank[pairs.positive], self.memory_bank[pairs.negatives],
                                  pairs.valid, self.temperature, self.margin)
        self._terms.append((intra.detach(), inter.detach()))
        w_intra, w_inter = (1.0, 0.0) if ctx.epoch < self.warmup_epochs else (self.intra_weight, self.inter_weight)
        return w_intra * intra + w_inter * inter

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """MoCo's FIFO write, then the memory update with the first view's keys of every rank (rank order, as
        ``keys`` holds them), the key of the image each query came from, as the official code."""
        super().enqueue(keys)
        idx = all_gather_rows(self._indices.to(keys.device).long())
        self._changed = update_memory(self.memory_bank, self.memory_labels, self.centroids, idx,
                                      keys[: idx.numel()], self.memory_momentum)

    @torch.no_grad()
    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        super().on_after_optimizer_step(ctx)  # momentum update of the key encoder
        if (ctx.step + 1) % self.centroids_update_interval == 0:
            self.centroids.copy_(cluster_means(self.memory_bank, self.memory_labels, self.centroids))
        fix_small_clusters(self.memory_bank, self.memory_labels, self.centroids, self.min_cluster,
                           epoch_seed(ctx.seed, ctx.step, offset=6))
