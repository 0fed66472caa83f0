"""Helpers for methods that cluster the whole training set every epoch (DeepCluster, PCL, ...).

- :func:`embed_dataset`: features ``[N,D]`` of every training image, no augmentation, eval mode.
- :func:`kmeans_with_reseed`: :func:`zoo.eval.cluster.kmeans`, then DeepCluster's re-seeding of
  empty clusters (Caron et al., ECCV 2018, sec. 3.3) so every pseudo-class has images.
- :func:`uniform_cluster_order`: an epoch's sample order drawn uniformly over pseudo-classes
  (DeepCluster's ``UnifLabelSampler``), so a huge cluster does not dominate the epoch.
- :func:`epoch_seed`: the seed of anything random in a clustering step, a pure function of
  ``(seed, epoch)`` so a resumed run clusters exactly as the uninterrupted one.
- :func:`resize_buffers_to_state`: per-sample buffers (pseudo-labels ``[N]``) are sized lazily at
  ``on_train_start``; a checkpoint may be loaded before that, so loading resizes them first.

- :func:`embed_shard` / :func:`kmeans_sharded` / :func:`pca_whiten`: the same steps on features that
  stay in shards, one per rank, so no process ever holds the ``[N,D]`` features of a large dataset.

Under DDP :func:`embed_dataset` embeds one shard of the training set per rank and gathers the features
on every rank. DeepCluster and PCL keep their shards (and SCAN too, ``mine_neighbors_sharded``):
:func:`kmeans_sharded` trains the centroids on rank 0 from a sample of at most
``max_points_per_centroid * k`` rows (faiss's own default sample, all ``N`` rows on small datasets,
so one process and several give the same clusters), broadcasts them, and every rank assigns its
own rows; only the ``[N]`` pseudo-labels are gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from train.distributed import (
    all_gather_rows,
    all_reduce_sum,
    broadcast_tensor,
    gather_dataset,
    gather_rows_to,
    get_rank,
    is_distributed,
)
from zoo.eval.cluster import kmeans

__all__ = [
    "embed_dataset",
    "embed_shard",
    "epoch_seed",
    "kmeans_sharded",
    "kmeans_with_reseed",
    "pca_whiten",
    "resize_buffers_to_state",
    "uniform_cluster_order",
]


def epoch_seed(seed: int, epoch: int, offset: int = 0) -> int:
    """A non-negative 31-bit seed derived from ``(seed, epoch, offset)``; ``offset`` separates uses."""
    return (int(seed) * 1_000_003 + int(epoch) * 10_007 + int(offset) * 101) % (2**31 - 1024)


def _prepare(x: torch.Tensor, ctx: Any) -> torch.Tensor:
    """Raw images ``[B,3,H,W]`` in [0,1] -> the network's input: resized to the view size, normalised."""
    from train.augment import normalize

    cfg = ctx.augment.cfg
    size = int(getattr(cfg, "size", x.shape[-1]))
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x, cfg.mean, cfg.std)


@torch.no_grad()
def embed_shard(
    model_or_fn: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    ctx: Any,
    normalize: bool = True,
    module: nn.Module | None = None,
    batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the training set embedded: ``(features [n_r,D] float32 CPU, indices [n_r])``.

    Images come from ``ctx.iterate_dataset()`` without augmentation: resized to the augmentation's
    view size when needed and normalised with its mean/std. ``model_or_fn`` maps the normalised
    batch ``[B,3,H,W]`` to ``[B,D]``; ``module`` (default: ``model_or_fn`` when it is a module) is
    put in eval mode for the pass (BN uses running statistics, nothing is updated) and each of its
    submodules gets its previous train/eval mode back afterwards. ``normalize`` L2-normalises rows.
    Consumes no random numbers. Under DDP the share is the contiguous ``shard_range`` of this rank
    (ranks in order cover ``0..N-1``); on one process it is the whole set. ``batch_size``: images per
    forward pass (default: the trainer's).
    """
    if ctx.iterate_dataset is None:
        raise ValueError("embed_shard needs ctx.iterate_dataset (the trainer provides it)")
    if module is None and isinstance(model_or_fn, nn.Module):
        module = model_or_fn
    modes = {m: m.training for m in module.modules()} if module is not None else {}
    if module is not None:
        module.eval()
    feats: list[torch.Tensor] = []
    order: list[torch.Tensor] = []
    try:
        for images, idx in iterate_shard(ctx, batch_size):
            feats.append(model_or_fn(_prepare(images, ctx)).float().cpu())
            order.append(torch.as_tensor(idx).long().cpu())
    finally:
        for m, training in modes.items():
            m.train(training)
    if not feats:
        raise ValueError("ctx.iterate_dataset() yielded no images")
    x = torch.cat(feats)
    return (F.normalize(x, dim=1) if normalize else x), torch.cat(order)


@torch.no_grad()
def embed_dataset(
    model_or_fn: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    ctx: Any,
    normalize: bool = True,
    module: nn.Module | None = None,
) -> torch.Tensor:
    """Features ``[N,D]`` (float32, on the CPU) of the whole training set, row i = dataset index i.

    :func:`embed_shard` (same arguments), then under DDP the ranks' shards are gathered, so every rank
    returns the whole ``[N,D]``.
    """
    x, idx = embed_shard(model_or_fn, ctx, normalize, module)
    return gather_dataset(x, idx, ctx.dataset_size)


def iterate_shard(ctx: Any, batch_size: int | None = None) -> Any:
    """``ctx.iterate_dataset``: this rank's shard under DDP (the caller gathers), everything otherwise."""
    kwargs: dict[str, Any] = {} if batch_size is None else {"batch_size": batch_size}
    if is_distributed():
        kwargs["shard"] = True
    return ctx.iterate_dataset(**kwargs)


def pca_whiten(x: torch.Tensor, dim: int, eps: float = 1e-5, sharded: bool = False) -> torch.Tensor:
    """PCA to ``dim`` components with whitening (DeepCluster's ``preprocess_features``).

    ``x``: ``[N,D]``; returns ``[N,min(dim,D,N)]``: centred, projected on the top principal axes
    and divided by the square root of each axis's variance (faiss ``PCAMatrix(eigen_power=-0.5)``).
    Not L2-normalised: the caller does that. ``sharded=True``: ``x`` is this rank's shard and the
    mean and covariance (``[D]``, ``[D,D]``, float64) are all-reduced over the ranks, so each rank
    whitens its rows with the statistics of the whole dataset.
    """
    reduce = all_reduce_sum if sharded else (lambda t: t)
    x = x.double()
    n = int(reduce(torch.tensor([x.shape[0]], dtype=torch.float64))[0])
    mean = reduce(x.sum(dim=0)) / n
    xc = x - mean
    cov = reduce(xc.T @ xc) / max(1, n - 1)
    var, vecs = torch.linalg.eigh(cov)  # ascending
    k = min(dim, x.shape[1], n)
    var, vecs = var.flip(0)[:k], vecs.flip(1)[:, :k]
    return (xc @ vecs / (var.clamp_min(0).sqrt() + eps)).float()


@torch.no_grad()
def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """``[N] int64`` on ``x``'s device: the index of the L2-nearest row of ``centroids [K,D]`` for each row of
    ``x [N,D]``. Computed on the GPU when there is one (chunks of ``x`` are moved there), as faiss would."""
    device = torch.device("cuda") if torch.cuda.is_available() else x.device
    c = centroids.to(device=device, dtype=torch.float32)
    c_sq = (c * c).sum(dim=1)
    # ||x||^2 is the same for every centroid: argmin ||c||^2 - 2 x.c
    out = [(c_sq - 2 * part.to(device, torch.float32) @ c.T).argmin(dim=1).to(x.device) for part in x.split(chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


def kmeans_sample_indices(n: int, k: int, max_points_per_centroid: int | None, seed: int) -> torch.Tensor | None:
    """The sorted dataset indices k-means trains on (``max_points_per_centroid * k`` drawn without
    replacement from ``(seed)``), or None when that is all ``n`` of them."""
    if max_points_per_centroid is None or n <= k * max_points_per_centroid:
        return None
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    return torch.randperm(n, generator=gen)[: k * max_points_per_centroid].sort().values


def kmeans_sharded(
    shard: torch.Tensor, indices: torch.Tensor, n: int, k: int, seed: int, niter: int = 20,
    max_points_per_centroid: int | None = 256, perturbation: float = 1e-4, sharded: bool = True,
    spherical: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means with no empty cluster over features held in shards (one per rank under DDP).

    Args:
        shard: ``[n_r,D]`` this rank's features; ``indices``: their dataset indices ``[n_r]`` (the ranks'
            indices together are ``0..n-1``). n: dataset size; k: clusters; seed: all randomness.
        max_points_per_centroid: the centroids are trained on ``k * max_points_per_centroid`` rows
            drawn from the whole dataset (faiss's default sample; None or a small dataset: all rows).
        sharded: False when this process holds every row (no collectives; one process).
        spherical: spherical k-means for L2-normalised rows (:func:`zoo.eval.cluster.kmeans` with
            ``spherical=True``: centroids re-normalised every iteration, assignment by inner product, which
            for unit rows is the L2-nearest unit centroid); the returned centroids are unit-norm.

    Returns:
        ``(assignments [n_r] int64 of this shard's rows, centroids [k,D] float32)``, centroids identical
        on every rank.

    Steps: the sample's rows are gathered on rank 0, which runs :func:`zoo.eval.cluster.kmeans` on them (faiss,
    k-means++ seeding, ``niter`` Lloyd iterations) and broadcasts the centroids (and, when the sample
    is the whole dataset, its assignments, so one process and several give the same result); otherwise
    every rank assigns its rows to the nearest centroid. Then every cluster left empty is re-seeded, as
    DeepCluster does (Caron et al. 2018, sec. 3.3): pick a non-empty cluster ``j`` (at random,
    proportionally to its size, among clusters with at least two points, as faiss picks the cluster
    it splits), give the empty cluster ``e`` the centroid ``c_j + eps`` and ``j`` the centroid
    ``c_j - eps`` (``eps`` a random vector of norm ``perturbation * ||c_j||``), re-assign the points of
    ``j`` to the nearer of the two, and recompute both centroids as means. When the split leaves one
    side empty (the points of ``j`` coincide, or lie within the perturbation), the half of ``j``'s
    points with the largest projection on ``eps`` (ties: lower dataset index first) moves to ``e``.
    Repeat until no cluster is empty. Counts and sums are all-reduced, so the ranks stay in step.
    Deterministic for ``(features, k, seed)``. Memory: each rank its shard; rank 0 also the sample.
    """
    reduce = all_reduce_sum if sharded else (lambda t: t)
    gather = all_gather_rows if sharded else (lambda t: t)
    to_main = gather_rows_to if sharded else (lambda t: t)
    main = get_rank() == 0 if sharded else True
    x = shard.detach().float().cpu().contiguous()
    indices = indices.detach().long().cpu()
    if k > n:
        raise ValueError(f"k-means with k={k} clusters needs at least k points, got N={n}")
    # Train the centroids on the sample, on rank 0.
    sample_idx = kmeans_sample_indices(n, k, max_points_per_centroid, seed)
    mine = torch.ones(len(indices), dtype=torch.bool) if sample_idx is None else torch.isin(indices, sample_idx)
    rows, ids = to_main(x[mine]), to_main(indices[mine])  # on rank 0 only: the others keep their shard
    centroids = torch.empty(k, x.shape[1])
    assign_all = torch.empty(n if sample_idx is None else 0, dtype=torch.long)
    if main:
        order = torch.argsort(ids)  # dataset order, however the ranks split it
        a, c = kmeans(rows[order], k, seed=seed, niter=niter, spherical=spherical)
        centroids = torch.from_numpy(c).float().clone()
        if sample_idx is None:
            assign_all[ids[order]] = torch.from_numpy(a).long()
    del rows, ids
    if sharded:
        broadcast_tensor(centroids)
    if sample_idx is None:  # the sample is the dataset: rank 0's k-means assignments are everyone's
        if sharded:
            broadcast_tensor(assign_all)
        assign = assign_all[indices]
    else:
        assign = nearest_centroid(x, centroids)
    # Re-seed empty clusters; every rank takes the same decisions from all-reduced counts.
    gen = torch.Generator().manual_seed(int(seed))
    counts = reduce(torch.bincount(assign, minlength=k))
    while True:
        empty = (counts == 0).nonzero().flatten()
        if empty.numel() == 0:
            break
        e = int(empty[0])
        weights = torch.where(counts >= 2, counts, torch.zeros_like(counts)).double()
        j = int(torch.multinomial(weights, 1, generator=gen))
        members = (assign == j).nonzero().flatten()
        c = centroids[j].clone()
        noise = torch.randn(c.shape, generator=gen)
        noise = noise / noise.norm().clamp_min(1e-12) * perturbation * float(c.norm().clamp_min(1.0))
        pts = x[members]
        to_e = (pts - (c + noise)).pow(2).sum(1) < (pts - (c - noise)).pow(2).sum(1)
        moved = int(reduce(to_e.sum().reshape(1))[0])
        if moved in (0, int(counts[j])):  # degenerate split: move half along the noise, over all ranks
            proj = (pts - c) @ noise
            everyone = gather(torch.stack([proj.double(), indices[members].double()], dim=1))  # [n_j, 2]
            ranking = torch.argsort(-everyone[:, 0], stable=True)  # gathered in dataset order: ties by index
            chosen = everyone[ranking[: int(counts[j]) // 2], 1].long()
            to_e = torch.isin(indices[members], chosen)
        assign[members[to_e]] = e
        sums = reduce(torch.stack([pts[to_e].double().sum(0), pts[~to_e].double().sum(0)]))
        sizes = reduce(torch.stack([to_e.sum(), (~to_e).sum()]))
        centroids[e] = (sums[0] / sizes[0]).float()
        centroids[j] = (sums[1] / sizes[1]).float()
        counts[e], counts[j] = sizes[0], sizes[1]
    if spherical:  # the re-seeded clusters' means back on the sphere
        centroids = F.normalize(centroids, dim=1)
    return assign, centroids


def kmeans_with_reseed(
    features: torch.Tensor, k: int, seed: int, niter: int = 20, perturbation: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means with no empty cluster on one process: ``(assignments [N] int64, centroids [k,D] float32)``.

    :func:`kmeans_sharded` with every row here (all of them train the centroids): k-means++ seeding,
    ``niter`` Lloyd iterations, then DeepCluster's re-seeding of empty clusters.
    """
    n = features.shape[0]
    return kmeans_sharded(features, torch.arange(n), n, k, seed, niter, max_points_per_centroid=None,
                          perturbation=perturbation, sharded=False)


def uniform_cluster_order(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` dataset indices ``[n]`` drawn uniformly over pseudo-classes (DeepCluster's ``UnifLabelSampler``).

    ``labels``: ``[N]`` cluster id per image (negative = unlabelled, never drawn). Every non-empty
    cluster gets ``n // K`` or ``n // K + 1`` slots (the ``n % K`` larger shares go to randomly
    chosen clusters), so cluster counts differ by at most one. A cluster with at least as many
    images as slots fills them without replacement; a smaller one draws with replacement. The
    result is shuffled. All randomness comes from ``generator``.
    """
    labels = labels.detach().long().cpu()
    clusters = torch.unique(labels[labels >= 0])  # sorted
    if clusters.numel() == 0:
        raise ValueError("uniform_cluster_order: no labelled image")
    num = clusters.numel()
    share = torch.full((num,), n // num, dtype=torch.long)
    share[torch.randperm(num, generator=generator)[: n % num]] += 1
    parts = []
    for c, need in zip(clusters.tolist(), share.tolist()):
        members = (labels == c).nonzero().flatten()
        if members.numel() >= need:
            parts.append(members[torch.randperm(members.numel(), generator=generator)[:need]])
        else:
            parts.append(members[torch.randint(members.numel(), (need,), generator=generator)])
    order = torch.cat(parts)
    return order[torch.randperm(order.numel(), generator=generator)]


def resize_buffers_to_state(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str, names: Iterable[str]
) -> None:
    """Give each lazily sized buffer ``names`` of ``module`` the shape stored in ``state_dict``.

    Call from ``_load_from_state_dict`` before the default loading, which then copies the values.
    """
    for name in names:
        key = prefix + name
        current = getattr(module, name)
        if key in state_dict and tuple(state_dict[key].shape) != tuple(current.shape):
            shape = state_dict[key].shape
            setattr(module, name, torch.empty(shape, dtype=current.dtype, device=current.device))
