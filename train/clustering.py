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

Under DDP :func:`embed_dataset` embeds one shard of the training set per rank and gathers the features
on every rank; k-means then runs on every rank on the same features and ``_broadcast`` makes rank 0's
pseudo-labels everyone's (floating-point reductions may differ across devices).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from train.distributed import gather_dataset, is_distributed
from zoo.eval.cluster import kmeans

__all__ = [
    "embed_dataset",
    "epoch_seed",
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
def embed_dataset(
    model_or_fn: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    ctx: Any,
    normalize: bool = True,
    module: nn.Module | None = None,
) -> torch.Tensor:
    """Features ``[N,D]`` (float32, on the CPU) of the whole training set, row i = dataset index i.

    Images come from ``ctx.iterate_dataset()`` without augmentation: resized to the augmentation's
    view size when needed and normalised with its mean/std. ``model_or_fn`` maps the normalised
    batch ``[B,3,H,W]`` to ``[B,D]``; ``module`` (default: ``model_or_fn`` when it is a module) is
    put in eval mode for the pass (BN uses running statistics, nothing is updated) and each of its
    submodules gets its previous train/eval mode back afterwards. ``normalize`` L2-normalises rows.
    Consumes no random numbers. Under DDP each rank embeds its shard (``iterate_dataset(shard=True)``)
    and the features are gathered, so every rank returns the whole ``[N,D]``.
    """
    if ctx.iterate_dataset is None:
        raise ValueError("embed_dataset needs ctx.iterate_dataset (the trainer provides it)")
    if module is None and isinstance(model_or_fn, nn.Module):
        module = model_or_fn
    modes = {m: m.training for m in module.modules()} if module is not None else {}
    if module is not None:
        module.eval()
    feats: list[torch.Tensor] = []
    order: list[torch.Tensor] = []
    try:
        for images, idx in iterate_shard(ctx):
            feats.append(model_or_fn(_prepare(images, ctx)).float().cpu())
            order.append(torch.as_tensor(idx).long().cpu())
    finally:
        for m, training in modes.items():
            m.train(training)
    if not feats:
        raise ValueError("ctx.iterate_dataset() yielded no images")
    x, idx = torch.cat(feats), torch.cat(order)
    if is_distributed():
        out = gather_dataset(x, idx, ctx.dataset_size)
    else:
        out = torch.empty_like(x)
        out[idx] = x  # index order, whatever order the iterator used
    return F.normalize(out, dim=1) if normalize else out


def iterate_shard(ctx: Any, batch_size: int | None = None) -> Any:
    """``ctx.iterate_dataset``: this rank's shard under DDP (the caller gathers), everything otherwise."""
    kwargs: dict[str, Any] = {} if batch_size is None else {"batch_size": batch_size}
    if is_distributed():
        kwargs["shard"] = True
    return ctx.iterate_dataset(**kwargs)


def pca_whiten(x: torch.Tensor, dim: int, eps: float = 1e-5) -> torch.Tensor:
    """PCA to ``dim`` components with whitening (DeepCluster's ``preprocess_features``).

    ``x``: ``[N,D]``; returns ``[N,min(dim,D,N)]``: centred, projected on the top principal axes
    and divided by the square root of each axis's variance (faiss ``PCAMatrix(eigen_power=-0.5)``).
    Not L2-normalised: the caller does that.
    """
    x = x.double()
    xc = x - x.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    k = min(dim, vh.shape[0])
    std = s[:k] / max(1, x.shape[0] - 1) ** 0.5
    return (xc @ vh[:k].T / (std + eps)).float()


def kmeans_with_reseed(
    features: torch.Tensor, k: int, seed: int, niter: int = 20, perturbation: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means with no empty cluster: ``(assignments [N] int64, centroids [k,D] float32)``, on the CPU.

    Runs :func:`zoo.eval.cluster.kmeans` (faiss, k-means++ seeding, ``niter`` Lloyd iterations),
    then re-seeds every cluster that ended with no point, as DeepCluster does (Caron et al. 2018,
    sec. 3.3, "Empty clusters"): pick a non-empty cluster ``j`` (at random, proportionally to its
    size, among clusters with at least two points, as faiss picks the cluster it splits), give the
    empty cluster ``e`` the centroid ``c_j + eps`` and ``j`` the centroid ``c_j - eps`` (``eps`` a
    random vector of norm ``perturbation * ||c_j||``), re-assign the points of ``j`` to the nearer of
    the two, and recompute both centroids as means. When the split leaves one side empty (the
    points of ``j`` coincide, or lie within the perturbation), the half of ``j``'s points with the
    largest projection on ``eps`` moves to ``e``. Repeat until no cluster is empty: each round
    fills one, and a cluster with two points exists whenever one is empty and ``N >= k``.
    Only the split cluster's points are re-assigned, so other points keep their k-means cluster.
    Deterministic for ``(features, k, seed)``.
    """
    x = features.detach().float().cpu().contiguous()
    n = x.shape[0]
    if k > n:
        raise ValueError(f"k-means with k={k} clusters needs at least k points, got N={n}")
    assign_np, centroids_np = kmeans(x, k, seed=seed, niter=niter)
    assign = torch.from_numpy(assign_np).long()
    centroids = torch.from_numpy(centroids_np).float().clone()
    gen = torch.Generator().manual_seed(int(seed))
    while True:
        counts = torch.bincount(assign, minlength=k)
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
        if bool(to_e.all()) or not bool(to_e.any()):  # degenerate split: move half along the noise
            rank = torch.argsort((pts - c) @ noise, descending=True, stable=True)
            to_e = torch.zeros(members.numel(), dtype=torch.bool)
            to_e[rank[: members.numel() // 2]] = True
        assign[members[to_e]] = e
        centroids[e] = pts[to_e].mean(0)
        centroids[j] = pts[~to_e].mean(0)
    return assign, centroids


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


def _broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``t`` from rank ``src`` on every rank (in place) under ``torch.distributed``; identity otherwise.

    Clustering runs on every rank over the same data and seed; broadcasting rank 0's result makes the
    pseudo-labels identical across ranks even where floating-point reductions differ. NCCL needs a
    CUDA tensor, so a CPU tensor travels through the current CUDA device.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        buf = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.broadcast(buf, src)
        t.copy_(buf.cpu())
    else:
        dist.broadcast(t, src)
    return t


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
