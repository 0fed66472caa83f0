"""SCAN: Learning to Classify Images without Labels (Van Gansbeke et al., ECCV 2020).

Three stages; this method runs stages 2 and 3 on top of a pretext encoder (stage 1, any other
method of the zoo, e.g. SimCLR or MoCo, loaded with ``pretext=``):

1. *Pretext*: a self-supervised encoder. Its L2-normalised features of the un-augmented training
   set give every image its ``k`` nearest neighbours (*neighbour mining*, cosine similarity, faiss).
2. *SCAN clustering*: cluster heads ``[B,D] -> [B,K]`` (and the backbone) are trained so that an
   image and one of its mined neighbours get the same cluster (consistency: ``-log <p_a, p_n>``),
   while the mean prediction over the batch stays spread over all K clusters (entropy bonus).
   Several heads train at once; the one with the lowest SCAN loss is kept (``best_head``).
3. *Self-labelling*: with the best head only, samples whose prediction on a weak view is confident
   (``max p > confidence``) become pseudo-labels for a cross entropy on a strongly augmented view,
   class-balanced by the inverse frequency of the pseudo-labels.

Epochs ``[0, scan_epochs)`` are stage 2, the remaining trainer epochs stage 3.
Under DDP the neighbours are mined over the whole dataset with the features left in shards: each rank
embeds its share, the shards are broadcast one at a time and each rank keeps the running top-k of its
own images (:func:`mine_neighbors_sharded`), and the neighbour lists are gathered; per-sample random draws (the picked neighbour, Cutout) are
rank-consistent slices of the global batch's.
``export()`` returns the encoder with its cluster head (best head selected), so the published
model folder predicts clusters ``[B,K]`` with ``model.predict_cluster(images)``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from train.augment import AugmentConfig, ViewAugment, rand_per_sample, randint_per_sample
from train.clustering import embed_shard
from train.distributed import (
    broadcast_tensor,
    gather_dataset,
    get_rank,
    get_world_size,
    is_distributed,
    shard_range,
)
from train.methods.base import Method, StepContext, register_method
from zoo.heads import ClusterHead
from zoo.model import ZooModel

EPS = 1e-8  # the official code's clamp for probabilities inside a log


# ----------------------------------------------------------------------------- losses
def scan_loss(
    anchor_logits: torch.Tensor, neighbor_logits: torch.Tensor, entropy_weight: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SCAN loss of one cluster head (Van Gansbeke et al. 2020, eq. 2).

    Args:
        anchor_logits: ``[B,K]`` cluster logits of the anchors.
        neighbor_logits: ``[B,K]`` cluster logits of one mined neighbour of each anchor (row i is a
            neighbour of anchor i).
        entropy_weight: lambda, the weight of the entropy bonus.

    Returns:
        ``(total, consistency, entropy)``, scalars:
        ``consistency = -1/B sum_i log <p_i, p'_i>`` with ``p = softmax(anchor_logits)``,
        ``p' = softmax(neighbor_logits)``; ``entropy = -sum_k m_k log m_k`` of the mean anchor
        prediction ``m = 1/B sum_i p_i``; ``total = consistency - entropy_weight * entropy``.
        Uniform logits give ``consistency = entropy = log K``. Gradients flow into both inputs, as in
        the official code.
    """
    if anchor_logits.shape != neighbor_logits.shape or anchor_logits.ndim != 2:
        raise ValueError(f"expected two [B,K] logits of one shape, got {tuple(anchor_logits.shape)} "
                         f"and {tuple(neighbor_logits.shape)}")
    p_anchor = anchor_logits.softmax(dim=1)  # [B,K]
    p_neighbor = neighbor_logits.softmax(dim=1)  # [B,K]
    similarity = (p_anchor * p_neighbor).sum(dim=1)  # [B], <p_i, p'_i> in (0, 1]
    consistency = -similarity.clamp_min(EPS).log().mean()
    mean_p = p_anchor.mean(dim=0).clamp_min(EPS)  # [K]
    entropy = -(mean_p * mean_p.log()).sum()
    return consistency - entropy_weight * entropy, consistency, entropy


def pseudo_labels(weak_logits: torch.Tensor, confidence: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels of self-labelling: ``(argmax p [B] long, mask [B] bool = max p > confidence)``
    with ``p = softmax(weak_logits)`` of ``[B,K]`` logits of weakly augmented images (no gradient)."""
    max_prob, target = weak_logits.detach().softmax(dim=1).max(dim=1)
    return target, max_prob > confidence


def selflabel_loss(
    weak_logits: torch.Tensor, strong_logits: torch.Tensor, confidence: float = 0.99,
    class_balance: bool = True,
) -> torch.Tensor:
    """Confidence-masked, class-balanced cross entropy of SCAN's self-labelling step (Sec. 3.3).

    Args:
        weak_logits: ``[B,K]`` logits of weakly augmented images; they give the targets (no gradient).
        strong_logits: ``[B,K]`` logits of strongly augmented views of the same images (row i <-> row i).
        confidence: threshold on the weak prediction's max probability.
        class_balance: weight each class by ``n / n_c`` (n confident samples, ``n_c`` of them with
            pseudo-label c), as the official ``ConfidenceBasedCE``.

    Returns:
        scalar: ``sum_i w_{y_i} CE(strong_i, y_i) / sum_i w_{y_i}`` over the confident samples i, i.e.
        with balancing the mean over the pseudo-classes present of each class's mean cross entropy.
        With no confident sample: ``0 * strong_logits.sum()`` (zero, still attached to the graph, where
        the official code would raise).
    """
    if weak_logits.shape != strong_logits.shape or weak_logits.ndim != 2:
        raise ValueError(f"expected two [B,K] logits of one shape, got {tuple(weak_logits.shape)} "
                         f"and {tuple(strong_logits.shape)}")
    target, mask = pseudo_labels(weak_logits, confidence)
    if not bool(mask.any()):
        return 0 * strong_logits.sum()
    target = target[mask]
    weight = None
    if class_balance:
        num_classes = strong_logits.shape[1]
        counts = torch.bincount(target, minlength=num_classes).to(strong_logits.dtype)  # [K]
        weight = torch.where(counts > 0, target.numel() / counts.clamp_min(1), torch.ones_like(counts))
    return F.cross_entropy(strong_logits[mask], target, weight=weight)


# ----------------------------------------------------------------------------- neighbours
def _search(database: torch.Tensor, queries: torch.Tensor, k: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product search: ``(similarities [Q,k], row indices [Q,k])``, most similar first."""
    if backend == "auto":
        try:
            import faiss  # noqa: F401

            backend = "faiss"
        except ImportError:
            backend = "torch"
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(database.shape[1])
        if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(database.numpy())
        sims, found = index.search(queries.numpy(), k)
        return torch.from_numpy(np.ascontiguousarray(sims)), torch.from_numpy(np.ascontiguousarray(found)).long()
    if backend == "torch":
        tops = [(chunk @ database.T).topk(k, dim=1) for chunk in queries.split(4096)]
        return torch.cat([t.values for t in tops]), torch.cat([t.indices for t in tops])
    raise ValueError(f"unknown backend {backend!r}; use auto, faiss or torch")


def _drop_self(found: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """``[Q,k+1]`` candidates -> ``[Q,k]`` without the sample itself; where a duplicate pushed it out of
    the k+1, drop the last instead."""
    drop = found == ids.unsqueeze(1)
    drop[:, -1] |= ~drop.any(dim=1)
    return found[~drop].view(ids.numel(), k)


def mine_neighbors(features: torch.Tensor, k: int, backend: str = "auto", rows: slice | None = None) -> torch.Tensor:
    """The ``k`` nearest neighbours of every row by cosine similarity, excluding the row itself.

    Args:
        features: ``[N,D]`` features (L2-normalised here).
        k: neighbours per sample, ``1 <= k < N``.
        backend: ``"faiss"`` (exact ``IndexFlatIP``, on the GPU when faiss sees one), ``"torch"``
            (chunked matrix products), or ``"auto"``: faiss when it imports.
        rows: mine only for these rows (searched among all ``N``).

    Returns:
        ``[N,k]`` (or ``[len(rows),k]``) long, most similar first. The sample itself is never among its
        neighbours, even when a duplicate of it ranks first.
    """
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"need 1 <= k < N to mine neighbours, got k={k}, N={n}")
    x = F.normalize(features.detach().float().cpu(), dim=1).contiguous()
    ids = torch.arange(n)[rows if rows is not None else slice(None)]
    _, found = _search(x, x[ids].contiguous(), k + 1, backend)
    return _drop_self(found, ids, k)


@torch.no_grad()
def mine_neighbors_sharded(shard: torch.Tensor, n: int, k: int, backend: str = "auto") -> torch.Tensor:
    """:func:`mine_neighbors` for this rank's rows when the ``N`` rows are spread over the ranks.

    ``shard``: this rank's ``[n_r,D]`` rows, the contiguous ``shard_range(n)`` of the dataset (as
    ``iterate_shard`` yields them). Each rank's shard is broadcast in turn and searched, the running
    top ``k+1`` merged, so a rank holds its shard and one other at a time, never ``[N,D]``.
    Returns ``[n_r,k]`` dataset indices, most similar first, the sample itself excluded.
    """
    if not 1 <= k < n:
        raise ValueError(f"need 1 <= k < N to mine neighbours, got k={k}, N={n}")
    world, rank = get_world_size(), get_rank()
    lo, hi = shard_range(n, rank, world)
    if shard.shape[0] != hi - lo:
        raise ValueError(f"rank {rank} holds {shard.shape[0]} rows, its shard of {n} has {hi - lo}")
    q = F.normalize(shard.detach().float().cpu(), dim=1).contiguous()
    best_sims = torch.empty(q.shape[0], 0)
    best_ids = torch.empty(q.shape[0], 0, dtype=torch.long)
    for src in range(world):
        b_lo, b_hi = shard_range(n, src, world)
        block = q.clone() if src == rank else torch.empty(b_hi - b_lo, q.shape[1])
        broadcast_tensor(block, src)
        sims, found = _search(block, q, min(k + 1, b_hi - b_lo), backend)
        best_sims, pos = torch.cat([best_sims, sims], dim=1).topk(min(k + 1, best_sims.shape[1] + sims.shape[1]), dim=1)
        best_ids = torch.cat([best_ids, found + b_lo], dim=1).gather(1, pos)
    return _drop_self(best_ids, torch.arange(lo, hi), k)


def neighbor_accuracy(neighbors: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Fraction of mined neighbours that share their anchor's label (SCAN, Fig. 2): ``neighbors [N,k]``,
    ``labels [N]``. Labels never reach training; this measures how good the pretext features are."""
    neighbors = torch.as_tensor(np.asarray(neighbors)).long()
    labels = torch.as_tensor(np.asarray(labels)).long()
    return float((labels[neighbors] == labels.unsqueeze(1)).float().mean())


# ----------------------------------------------------------------------------- augmentation
def cutout(x: torch.Tensor, gen: torch.Generator, fraction: float = 0.5) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017), as in SCAN's strong augmentation: one square of side
    ``fraction * min(H,W)`` at a uniformly random centre (it may stick out of the image) set to 0,
    i.e. to the mean colour of normalised views ``[B,C,H,W]``."""
    b, _, h, w = x.shape
    side = max(1, round(fraction * min(h, w)))
    cy = (rand_per_sample(b, gen) * h).long() - side // 2  # top edge  [B]
    cx = (rand_per_sample(b, gen) * w).long() - side // 2  # left edge [B]
    ys, xs = torch.arange(h).unsqueeze(0), torch.arange(w).unsqueeze(0)
    in_y = (ys >= cy.unsqueeze(1)) & (ys < (cy + side).unsqueeze(1))  # [B,H]
    in_x = (xs >= cx.unsqueeze(1)) & (xs < (cx + side).unsqueeze(1))  # [B,W]
    mask = (in_y.unsqueeze(2) & in_x.unsqueeze(1)).unsqueeze(1).to(x.device)  # [B,1,H,W]
    return x.masked_fill(mask, 0.0)


def strong_augment_config(cfg: AugmentConfig, overrides: dict[str, Any] | None = None) -> AugmentConfig:
    """A stronger version of the recipe's view recipe for self-labelling, standing in for SCAN's
    RandAugment: colour jitter, grayscale, blur and solarisation at least as likely and as strong as
    SimCLR's; crops, flips and rotation as in the recipe (flipping digits would change them)."""
    strong = dataclasses.replace(
        cfg,
        jitter_p=max(cfg.jitter_p, 0.8),
        brightness=max(cfg.brightness, 0.4),
        contrast=max(cfg.contrast, 0.4),
        saturation=max(cfg.saturation, 0.4),
        gray_p=max(cfg.gray_p, 0.2),
        blur_p=max(cfg.blur_p, 0.5),
        solarize_p=max(cfg.solarize_p, 0.2),
    )
    return dataclasses.replace(strong, **(overrides or {}))


# ----------------------------------------------------------------------------- the method
def load_pretext(pretext: str) -> ZooModel:
    """The stage-1 encoder: a registered zoo name with weights, a model folder, or ``hf-hub:ORG/NAME``."""
    from zoo.registry import create_model

    return create_model(pretext, pretrained=True)


def copy_backbone_(source: ZooModel, target: ZooModel, source_name: str = "pretext") -> None:
    """Copy ``source.backbone`` (parameters and buffers) into ``target.backbone``; ValueError when the
    architectures differ (name, or any tensor name or shape)."""
    src, dst = source.backbone.state_dict(), target.backbone.state_dict()
    same = source.arch == target.arch and src.keys() == dst.keys() and all(
        src[key].shape == dst[key].shape for key in src)
    if not same:
        raise ValueError(
            f"{source_name} is {source.arch} {source.arch_kwargs} but the trainer built {target.arch} "
            f"{target.arch_kwargs}: set backbone and backbone_kwargs of the recipe to the pretext's")
    target.backbone.load_state_dict(src)


@register_method("scan")
class SCAN(Method):
    """SCAN stages 2 (clustering with mined neighbours) and 3 (self-labelling) on a pretext encoder.

    Args:
        pretext: the stage-1 encoder whose backbone is copied in (registered name with weights, model
            folder, ``hf-hub:``); None keeps the backbone the trainer built. A pretext that already has a
            cluster head with the same K and number of heads (a SCAN model) also lends its heads.
        num_clusters: K. num_heads: cluster heads trained at once in stage 2.
        num_neighbors: k mined neighbours per image (SCAN uses 20).
        entropy_weight: lambda of :func:`scan_loss` (SCAN uses 5).
        scan_epochs: epochs of stage 2; None: all trainer epochs but the last ``selflabel_epochs``.
        selflabel_epochs: epochs of stage 3 when ``scan_epochs`` is None.
        confidence: self-labelling threshold (SCAN uses 0.99).
        class_balance: class-balanced self-labelling cross entropy.
        update_backbone: False trains the heads only (SCAN's ``update_cluster_head_only``; the backbone
            stays in eval mode and leaves the optimizer).
        freeze_backbone_epochs: the backbone receives no update during the first epochs.
        strong_augment: overrides of the strong view's :class:`AugmentConfig` fields.
        cutout_fraction: side of the Cutout square of strong views, as a fraction of the image side.
        mining_batch_size: images per forward pass while embedding the dataset for mining.
        restart_schedule: restart the warm-up + cosine learning-rate schedule when self-labelling starts.
    """

    ddp_find_unused_parameters = True  # self-labelling trains one head; frozen epochs skip the backbone

    def __init__(
        self, model: ZooModel, pretext: str | None = None, num_clusters: int = 10, num_heads: int = 5,
        num_neighbors: int = 20, entropy_weight: float = 5.0, scan_epochs: int | None = None,
        selflabel_epochs: int = 0, confidence: float = 0.99, class_balance: bool = True,
        update_backbone: bool = True, freeze_backbone_epochs: int = 0,
        strong_augment: dict[str, Any] | None = None, cutout_fraction: float = 0.5, restart_schedule: bool = False,
        mining_batch_size: int = 512,
    ):
        super().__init__(model)
        if num_clusters < 2 or num_heads < 1 or num_neighbors < 1:
            raise ValueError(f"need num_clusters >= 2, num_heads >= 1, num_neighbors >= 1; "
                             f"got {num_clusters}, {num_heads}, {num_neighbors}")
        if selflabel_epochs < 0 or (scan_epochs is not None and scan_epochs < 0):
            raise ValueError(f"scan_epochs ({scan_epochs}) and selflabel_epochs ({selflabel_epochs}) "
                             "must be >= 0")
        self.pretext = pretext
        self.num_neighbors = num_neighbors
        self.entropy_weight = entropy_weight
        self.scan_epochs = scan_epochs
        self.selflabel_epochs = selflabel_epochs
        self.confidence = confidence
        self.class_balance = class_balance
        self.update_backbone = update_backbone
        self.freeze_backbone_epochs = freeze_backbone_epochs
        self.strong_augment = strong_augment
        self.cutout_fraction = cutout_fraction
        self.restart_schedule = restart_schedule
        self.mining_batch_size = mining_batch_size
        self._strong: ViewAugment | None = None

        head = ClusterHead(model.num_features, num_clusters, num_heads)
        if pretext is not None:
            source = load_pretext(pretext)
            copy_backbone_(source, model, f"pretext {pretext!r}")
            src_head = source.cluster_head
            if src_head is not None and src_head.heads[0].weight.shape == head.heads[0].weight.shape \
                    and len(src_head.heads) == num_heads:
                head.load_state_dict(src_head.state_dict())
            differ = [f"{key} {source.pretrained_cfg[key]} (this run: {model.pretrained_cfg[key]})"
                      for key in ("mean", "std")
                      if key in source.pretrained_cfg and key in model.pretrained_cfg
                      and list(source.pretrained_cfg[key]) != list(model.pretrained_cfg[key])]
            if differ:
                warnings.warn(f"pretext {pretext!r} was trained with " + ", ".join(differ), stacklevel=2)
        model.cluster_head = head
        model.num_clusters = num_clusters
        model.pretrained_cfg.update(num_clusters=num_clusters, num_cluster_heads=num_heads)
        if pretext is not None:
            model.pretrained_cfg["pretext"] = pretext
        if not update_backbone:
            for p in model.backbone.parameters():
                p.requires_grad_(False)

        # Mined neighbours [N,k] (resized when a checkpoint is loaded), and the summed SCAN loss of each
        # head over the current stage-2 epoch: both are checkpointed so a resume continues exactly.
        self.register_buffer("neighbors", torch.zeros(0, num_neighbors, dtype=torch.long))
        self.register_buffer("head_loss_sum", torch.zeros(num_heads))
        self.register_buffer("head_loss_count", torch.zeros((), dtype=torch.long))

    # -- stages ---------------------------------------------------------------------------
    def schedule_restarts(self, epochs: int) -> list[int]:
        # Optionally give self-labelling a fresh learning-rate schedule. Off by default: on mnist5k a
        # restart at lr 1e-3 pulled the head from ACC 0.94 down to 0.85 (see docs/benchmarks.md).
        start = self.selflabel_start(epochs)
        return [0, start] if self.restart_schedule and 0 < start < epochs else [0]

    def selflabel_start(self, epochs: int) -> int:
        """The first epoch of stage 3 (self-labelling) in a run of ``epochs`` epochs."""
        return self.scan_epochs if self.scan_epochs is not None else max(0, epochs - self.selflabel_epochs)

    def backbone_frozen(self, epoch: int) -> bool:
        return not self.update_backbone or epoch < self.freeze_backbone_epochs

    def features(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Backbone features ``[B,D]``; no gradient (and BN in eval mode) while the backbone is frozen."""
        if not self.backbone_frozen(ctx.epoch):
            return self.model.forward_features(x)
        self.model.backbone.eval()
        with torch.no_grad():
            f = self.model.forward_features(x)
        self.model.backbone.train(self.training)
        return f

    @property
    def head_losses(self) -> torch.Tensor:
        """``[H]`` mean SCAN loss of each head over the current (or last) stage-2 epoch; inf before a step."""
        if int(self.head_loss_count) == 0:
            return torch.full_like(self.head_loss_sum, float("inf"))
        return self.head_loss_sum / self.head_loss_count

    @torch.no_grad()
    def select_best_head(self) -> int:
        """Set ``cluster_head.best_head`` to the head with the lowest mean SCAN loss (kept as is before any
        stage-2 step); idempotent, since stage 3 no longer changes the losses."""
        best = self.model.cluster_head.best_head
        if int(self.head_loss_count) > 0:
            best.fill_(int(torch.argmin(self.head_loss_sum)))
        return int(best)

    # -- neighbour mining -----------------------------------------------------------------
    @torch.no_grad()
    def embed_shard(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised features ``[n_r,D]`` of this rank's shard of the un-augmented training set (all of
        it on one process) and their dataset indices ``[n_r]``; encoder in eval mode."""
        # model.embed already L2-normalises: no second normalisation
        return embed_shard(self.model.embed, ctx, normalize=False, module=self.model,
                           batch_size=self.mining_batch_size)

    def on_train_start(self, ctx: StepContext) -> None:
        """Mine the neighbours with the pretext features, once (a resumed run restores them instead).
        Under DDP the features stay in shards (:func:`mine_neighbors_sharded`); only the ``[N,k]``
        neighbour lists are gathered."""
        if self.neighbors.numel() > 0:
            if self.neighbors.shape[0] != ctx.dataset_size:
                raise ValueError(f"neighbours were mined for {self.neighbors.shape[0]} images, "
                                 f"the training set has {ctx.dataset_size}")
            return
        feats, ids = self.embed_shard(ctx)
        n = ctx.dataset_size
        if is_distributed():
            neighbors = gather_dataset(mine_neighbors_sharded(feats, n, self.num_neighbors), ids, n)
        else:  # one process: every row here, placed in dataset order
            neighbors = mine_neighbors(gather_dataset(feats, ids, n), self.num_neighbors)
        self.neighbors = neighbors.to(self.head_loss_sum.device)

    def _load_from_state_dict(
        self, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # The neighbours' count N is known only once mined: take the shape of the checkpoint's tensor.
        key = prefix + "neighbors"
        if key in state_dict and state_dict[key].shape != self.neighbors.shape:
            self.neighbors = torch.zeros_like(state_dict[key], device=self.neighbors.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_epoch_start(self, ctx: StepContext) -> None:
        if ctx.epoch < self.selflabel_start(ctx.epochs):  # per-epoch mean SCAN loss of each head
            self.head_loss_sum.zero_()
            self.head_loss_count.zero_()
        else:
            self.select_best_head()

    # -- training -------------------------------------------------------------------------
    def training_step(
        self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        if ctx.epoch >= self.selflabel_start(ctx.epochs):
            return self.selflabel_step(images, ctx)
        return self.scan_step(images, indices, ctx)

    def scan_step(
        self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """Stage 2: every head's SCAN loss on (anchor view, view of a random mined neighbour); summed."""
        if self.neighbors.numel() == 0:
            raise RuntimeError("SCAN: neighbours are not mined yet; on_train_start must run first")
        if ctx.fetch is None:
            raise RuntimeError("SCAN needs ctx.fetch to load the neighbours' images")
        anchors = ctx.augment(images, ctx.generator)
        pick = randint_per_sample(self.num_neighbors, images.shape[0], ctx.generator)
        nbr_idx = self.neighbors[indices.to(self.neighbors.device), pick.to(self.neighbors.device)].cpu()
        neighbors = ctx.augment(ctx.fetch(nbr_idx).to(images.device), ctx.generator)
        # Separate forward passes (separate BN batches), as the official code.
        f_anchor, f_neighbor = self.features(anchors, ctx), self.features(neighbors, ctx)
        heads = self.model.cluster_head.heads
        losses = [scan_loss(h(f_anchor), h(f_neighbor), self.entropy_weight) for h in heads]
        totals = torch.stack([t for t, _, _ in losses])  # [H]
        if self.training:  # evaluating the loss leaves the head statistics alone
            with torch.no_grad():
                self.head_loss_sum.add_(totals.detach().to(self.head_loss_sum.dtype))
                self.head_loss_count.add_(1)
        out = {"loss": totals.sum(), "stage": torch.tensor(2.0),
               "consistency": torch.stack([c for _, c, _ in losses]).mean().detach(),
               "entropy": torch.stack([e for _, _, e in losses]).mean().detach()}
        out.update({f"loss_head{i}": t.detach() for i, t in enumerate(totals)})
        return out

    def strong_view(self, images: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """A strongly augmented normalised view ``[B,3,h,w]`` (stronger colour distortions + Cutout)."""
        if self._strong is None or self._strong.cfg.size != ctx.augment.cfg.size:
            self._strong = ViewAugment(strong_augment_config(ctx.augment.cfg, self.strong_augment))
        return cutout(self._strong(images, ctx.generator), ctx.generator, self.cutout_fraction)

    def selflabel_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Stage 3: confident weak-view predictions of the best head supervise its strong-view logits."""
        head = self.model.cluster_head.heads[self.select_best_head()]
        weak = ctx.augment(images, ctx.generator)
        strong = self.strong_view(images, ctx)
        with torch.no_grad():
            weak_logits = head(self.features(weak, ctx))
        strong_logits = head(self.features(strong, ctx))
        loss = selflabel_loss(weak_logits, strong_logits, self.confidence, self.class_balance)
        _, mask = pseudo_labels(weak_logits, self.confidence)
        return {"loss": loss, "stage": torch.tensor(3.0), "confident": mask.float().mean()}

    def export(self) -> ZooModel:
        """The encoder with its cluster heads; ``best_head`` is the head with the lowest SCAN loss."""
        self.select_best_head()
        return self.model
