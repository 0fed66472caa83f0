"""IFND: Incremental False Negative Detection for Contrastive Learning (Chen et al., ICLR 2022).

Two images of the same semantic class are each other's negatives in instance discrimination: *false
negatives*. IFND clusters the embedding as it improves (once per epoch, k-means over the training set)
and trusts the pseudo-labels of a growing share of the data: in epoch ``e`` only the fraction
``r(e) = min(1, (e - start_epoch + 1) / (epochs - start_epoch))`` of the images closest to their centroid
(cosine to the normalised centroid, ranked over the whole dataset) keep a label; the rest are -1 ("no
label", plain instance discrimination). A negative that shares the anchor's label is then either

- **eliminated**: removed from the anchor's denominator, or
- **attracted**: treated as one more positive (the loss averages ``-log softmax`` over all positives).

Both strategies, on SimCLR (``ifnd_simclr``: :meth:`SimCLR.pair_loss` is overridden, the rest of the step
is SimCLR's) and on MoCo v2 (``ifnd_moco``: :meth:`MoCo.query_loss` is overridden and a queue of the
keys' pseudo-labels rides beside MoCo's key queue).

Where the issue is silent, following the paper: the embedding clustered is the L2-normalised projection
(the space the contrast lives in); one k-means granularity (the paper's hierarchical k-means over several
``k`` is replaced by one ``num_clusters``); the acceptance ratio rises linearly, as in the paper's
schedule. Under DDP each rank embeds its shard, k-means runs on the gathered sample
(``train.clustering.kmeans_sharded``), the ``[N]`` labels are gathered, and the loss gathers the global
batch's embeddings and labels, so 2 ranks with batch B train as one process with batch 2B.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from train.clustering import embed_shard, epoch_seed, kmeans_sharded, resize_buffers_to_state
from train.distributed import all_gather_rows, all_gather_with_grad, gather_dataset, get_rank
from train.methods.base import StepContext, register_method
from train.methods.moco import MoCo
from train.methods.simclr import SimCLR
from zoo.model import ZooModel

STRATEGIES = ("elimination", "attraction")


def _check(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"IFND strategy must be one of {STRATEGIES}, got {strategy!r}")


def _contrast(logits: torch.Tensor, positive: torch.Tensor, false_neg: torch.Tensor, strategy: str) -> torch.Tensor:
    """Mean over rows of IFND's loss. ``logits [R,C]`` (-inf where excluded), ``positive [R]`` column of the
    true positive, ``false_neg [R,C]`` bool: detected false negatives (never the positive)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    if strategy == "elimination":
        return F.cross_entropy(logits.masked_fill(false_neg, float("-inf")), positive)
    log_p = F.log_softmax(logits, dim=1)
    pos = false_neg.clone()
    pos[rows, positive] = True
    return (-(log_p.masked_fill(~pos, 0.0)).sum(dim=1) / pos.sum(dim=1)).mean()


def ifnd_nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5,
                      strategy: str = "elimination") -> torch.Tensor:
    """NT-Xent (``train.methods.simclr.nt_xent_loss``) with false negatives removed or attracted.

    Args:
        z1, z2: ``[B,D]`` projections of the two views (row i: image i). labels: ``[B]`` pseudo-labels
            (-1: none). A candidate ``j`` (not the anchor, not its other view) is a false negative of
            anchor ``i`` when ``labels_i = labels_j >= 0``.
        strategy: "elimination" (out of the denominator) or "attraction" (one more positive).

    Returns: scalar, the mean over this rank's 2B anchors; with no labels it is NT-Xent. Under DDP the
    candidates are every rank's (gathered with gradients, as NT-Xent).
    """
    _check(strategy)
    b = z1.shape[0]
    g1, g2 = all_gather_with_grad(z1), all_gather_with_grad(z2)
    gl = all_gather_rows(labels.to(z1.device).long())
    n, first = g1.shape[0], get_rank() * b
    z = F.normalize(torch.cat([g1, g2]), dim=1)  # [2N,D]
    lab = torch.cat([gl, gl])  # [2N]
    mine = torch.cat([torch.arange(first, first + b), torch.arange(n + first, n + first + b)]).to(z.device)
    rows = torch.arange(2 * b, device=z.device)
    logits = z[mine] @ z.T / temperature  # [2B,2N]
    logits[rows, mine] = float("-inf")
    positive = torch.cat([mine[b:], mine[:b]])
    false_neg = (lab[mine].unsqueeze(1) == lab.unsqueeze(0)) & (lab[mine] >= 0).unsqueeze(1)
    false_neg[rows, mine] = False
    false_neg[rows, positive] = False
    return _contrast(logits, positive, false_neg, strategy)


def ifnd_moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, labels: torch.Tensor,
                   queue_labels: torch.Tensor, temperature: float = 0.2, strategy: str = "elimination") -> torch.Tensor:
    """MoCo's InfoNCE (``train.methods.moco.moco_infonce_loss``) with false negatives of the queue removed
    or attracted: queue entry ``j`` is one for query ``i`` when ``labels_i = queue_labels_j >= 0``.

    Args: ``q, k [B,D]`` queries and keys, ``queue [K,D]`` (rows unit-norm), ``labels [B]``,
    ``queue_labels [K]`` (-1: none). Returns the mean over the B queries; no gradient into k or queue.
    """
    _check(strategy)
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.detach().T], dim=1) / temperature  # [B,1+K]
    labels = labels.to(q.device).long()
    fn = (queue_labels.to(q.device).unsqueeze(0) == labels.unsqueeze(1)) & (labels >= 0).unsqueeze(1)  # [B,K]
    false_neg = torch.cat([torch.zeros_like(fn[:, :1]), fn], dim=1)
    return _contrast(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device), false_neg, strategy)


def confident_labels(assign: torch.Tensor, confidence: torch.Tensor, ratio: float) -> torch.Tensor:
    """``assign [N]`` with every image outside the ``ratio`` most ``confidence``-ranked (ties by index) set to
    -1: the incremental acceptance of IFND. ``ratio`` in [0, 1]."""
    n = assign.numel()
    keep = int(round(min(1.0, max(0.0, ratio)) * n))
    order = torch.argsort(-confidence.double(), stable=True)
    out = torch.full_like(assign, -1)
    out[order[:keep]] = assign[order[:keep]]
    return out


class _FalseNegatives:
    """Per-epoch clustering and the pseudo-label buffer shared by both IFND variants."""

    def _init_ifnd(self, strategy: str, num_clusters: int, start_epoch: int, kmeans_niter: int) -> None:
        _check(strategy)
        self.strategy, self.num_clusters, self.start_epoch = strategy, num_clusters, start_epoch
        self.kmeans_niter = kmeans_niter
        self.register_buffer("pseudo_labels", torch.full((0,), -1, dtype=torch.long))  # [N], -1: none
        self.register_buffer("accepted_ratio", torch.tensor(0.0))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        resize_buffers_to_state(self, state_dict, prefix, ("pseudo_labels",))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def acceptance(self, epoch: int, epochs: int) -> float:
        if epoch < self.start_epoch:
            return 0.0
        return min(1.0, (epoch - self.start_epoch + 1) / max(1, epochs - self.start_epoch))

    @torch.no_grad()
    def on_epoch_start(self, ctx: StepContext) -> None:
        ratio = self.acceptance(ctx.epoch, ctx.epochs)
        if ratio <= 0:
            self.pseudo_labels = torch.full((ctx.dataset_size,), -1, dtype=torch.long, device=self.accepted_ratio.device)
            return
        feats, idx = embed_shard(lambda x: self.projector(self.model.forward_features(x)), ctx, module=self)
        assign, centroids = kmeans_sharded(feats, idx, ctx.dataset_size, self.num_clusters,
                                           epoch_seed(ctx.seed, ctx.epoch, offset=4), niter=self.kmeans_niter)
        confidence = (feats * F.normalize(centroids, dim=1)[assign]).sum(dim=1)  # cosine to own centroid
        assign_all = gather_dataset(assign, idx, ctx.dataset_size)
        conf_all = gather_dataset(confidence, idx, ctx.dataset_size)
        self.pseudo_labels = confident_labels(assign_all, conf_all, ratio).to(self.accepted_ratio.device)
        self.accepted_ratio.fill_(ratio)

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        if self.pseudo_labels.numel() == 0:
            return torch.full((indices.numel(),), -1, dtype=torch.long, device=self.pseudo_labels.device)
        return self.pseudo_labels[indices.to(self.pseudo_labels.device)]


@register_method("ifnd_simclr")
class IFNDSimCLR(_FalseNegatives, SimCLR):
    """SimCLR + IFND. ``simclr_kwargs`` are :class:`~train.methods.simclr.SimCLR`'s arguments."""

    def __init__(self, model: ZooModel, strategy: str = "elimination", num_clusters: int = 10, start_epoch: int = 0,
                 kmeans_niter: int = 20, **simclr_kwargs: Any):
        SimCLR.__init__(self, model, **simclr_kwargs)
        self._init_ifnd(strategy, num_clusters, start_epoch, kmeans_niter)

    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return ifnd_nt_xent_loss(z1, z2, self.labels_of(indices), self.temperature, self.strategy)


@register_method("ifnd_moco")
class IFNDMoCo(_FalseNegatives, MoCo):
    """MoCo v2 + IFND; ``queue_labels`` holds the pseudo-label of every queued key (-1: none). ``moco_kwargs``
    are :class:`~train.methods.moco.MoCo`'s arguments."""

    def __init__(self, model: ZooModel, strategy: str = "elimination", num_clusters: int = 10, start_epoch: int = 0,
                 kmeans_niter: int = 20, **moco_kwargs: Any):
        MoCo.__init__(self, model, **moco_kwargs)
        self._init_ifnd(strategy, num_clusters, start_epoch, kmeans_niter)
        self.register_buffer("queue_labels", torch.full((self.queue.shape[0],), -1, dtype=torch.long))
        self._batch_labels: torch.Tensor | None = None

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        self._batch_labels = self.labels_of(indices)
        try:
            return super().training_step(images, indices, ctx)
        finally:
            self._batch_labels = None

    def query_loss(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return ifnd_moco_loss(q, k, queue, self._batch_labels, self.queue_labels, self.temperature, self.strategy)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """MoCo's FIFO write, with the keys' pseudo-labels written at the same slots."""
        size, n, ptr = self.queue.shape[0], keys.shape[0], int(self.queue_ptr)
        labels = all_gather_rows(self._batch_labels)  # the gathered keys are this, once per view
        labels = labels.repeat(n // labels.numel())
        keep = torch.arange(n)[-size:]
        self.queue_labels[(ptr + keep) % size] = labels[keep].to(self.queue_labels.device)
        super().enqueue(keys)
