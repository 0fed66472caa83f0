"""SeLa: Self-labelling via simultaneous clustering and representation learning (Asano et al., ICLR 2020).

Alternates two steps on one objective, the cross-entropy between pseudo-labels and the
network's predictions under an equal-partition constraint on the labels:

1. label step (a few times over training, and once at the start): with the network fixed,
   the labels of the whole dataset are the optimal transport of its predictions onto equal
   clusters, solved by Sinkhorn-Knopp with ``P ∝ p(y|x)^lambda``;
2. representation step (every batch): cross-entropy of each head against the current labels.

Several heads (``num_heads`` independent clusterings) share the encoder, as the paper's
multi-head variant does. They are the encoder's cluster head (``ZooModel.cluster_head``), so the
exported model predicts clusters with head 0.

The label step holds the dataset's encoder features, not its ``[N,K]`` predictions: each Sinkhorn pass
recomputes every head's log-probabilities chunk by chunk (``sinkhorn_argmax_streamed``), so many heads
of many clusters cost no more memory than one. Under DDP it is distributed: each rank embeds its shard
of the dataset, Sinkhorn-Knopp balances the global problem (``train.sinkhorn`` all-reduces its column
sums) and the labels are gathered, so every rank holds all ``N`` labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.augment import normalize
from train.clustering import iterate_shard
from train.distributed import gather_dataset
from train.methods.base import Method, StepContext, register_method
from train.sinkhorn import sinkhorn_argmax_streamed, sinkhorn_knopp
from zoo.heads import ClusterHead
from zoo.model import ZooModel


def sela_labels(log_probs: torch.Tensor, lam: float = 25.0, n_iters: int = 50) -> torch.Tensor:
    """Pseudo-labels by SeLa's label step (Asano et al. 2020, eq. 6-8).

    Args:
        log_probs: ``[N,K]`` log p(y=k|x_n) of the whole dataset.
        lam: lambda; Sinkhorn balances ``p^lambda = exp(lambda * log p)``, i.e. ``epsilon = 1/lambda``.
        n_iters: Sinkhorn iterations.

    Returns:
        ``[N]`` long labels: the argmax of the equal-partition transport plan ``Q`` (columns
        summing to ``N/K``), so every cluster gets close to ``N/K`` samples.
    """
    q = sinkhorn_knopp(log_probs, epsilon=1.0 / lam, n_iters=n_iters)
    return q.argmax(dim=1)


def label_update_epochs(epochs: int, label_updates: int) -> set[int]:
    """Epochs whose start runs the label step: epoch 0, plus ``label_updates`` more spread evenly.

    A pure function of ``(epochs, label_updates)``, so a resumed run updates at the same epochs.
    Updates that fall on the same epoch merge (short runs get fewer distinct updates).
    """
    return {0} | {j * epochs // (label_updates + 1) for j in range(1, label_updates + 1)}


@register_method("sela")
class SeLa(Method):
    """Encoder + ``num_heads`` linear classifiers trained on Sinkhorn self-labels of the dataset."""

    def __init__(
        self, model: ZooModel, num_clusters: int = 10, num_heads: int = 2, lam: float = 25.0,
        label_updates: int = 2, sinkhorn_iters: int = 50, label_chunk: int = 65536,
    ):
        super().__init__(model)
        if model.cluster_head is None:  # the heads become the exported model's cluster head
            model.cluster_head = ClusterHead(model.num_features, num_clusters, num_heads)
            model.num_clusters = num_clusters
            model.pretrained_cfg.update(num_clusters=num_clusters, num_cluster_heads=num_heads)
        if len(model.cluster_head.heads) != num_heads or model.num_clusters != num_clusters:
            raise ValueError(f"model's cluster head does not have {num_heads} heads of {num_clusters} clusters")
        self.num_clusters = num_clusters
        self.lam = lam
        self.label_updates = label_updates
        self.sinkhorn_iters = sinkhorn_iters
        self.label_chunk = label_chunk  # rows whose log-probabilities the label step holds at a time
        # [num_heads, N] pseudo-labels of the whole training set; sized on train start (or by a checkpoint).
        self.register_buffer("labels", torch.zeros(num_heads, 0, dtype=torch.long))

    @property
    def heads(self) -> nn.ModuleList:
        """The ``num_heads`` linear classifiers ``[B,D] -> [B,K]``."""
        return self.model.cluster_head.heads

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        labels = state_dict.get(prefix + "labels")
        if labels is not None and labels.shape != self.labels.shape:  # sized by the dataset
            self.labels = torch.zeros_like(labels, device=self.labels.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_train_start(self, ctx: StepContext) -> None:
        if self.labels.shape[1] != ctx.dataset_size:
            self.labels = torch.zeros(len(self.heads), ctx.dataset_size, dtype=torch.long, device=ctx.device)

    @torch.no_grad()
    def dataset_features(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``([n, D] encoder features, [n] dataset indices)`` of the (unaugmented) training set: all ``N``
        images in index order on one process, this rank's shard under DDP."""
        if ctx.iterate_dataset is None:
            raise RuntimeError("SeLa needs ctx.iterate_dataset to label the whole dataset")
        was_training = self.training
        self.eval()
        cfg = ctx.augment.cfg  # no augmentation, only the views' normalisation
        parts, order = [], []
        for images, idx in iterate_shard(ctx):
            parts.append(self.model.forward_features(normalize(images.to(ctx.device), cfg.mean, cfg.std)))
            order.append(idx.long().cpu())
        self.train(was_training)
        return torch.cat(parts), torch.cat(order)

    @torch.no_grad()
    def update_labels(self, ctx: StepContext) -> None:
        """SeLa's label step for every head. Only the features are held (``[n, D]``, shared by the heads);
        each head's ``[n, K]`` log-probabilities are recomputed chunk by chunk in every Sinkhorn pass
        (:func:`train.sinkhorn.sinkhorn_argmax_streamed`, over all ranks' rows under DDP)."""
        self.on_train_start(ctx)
        feats, idx = self.dataset_features(ctx)
        for h, head in enumerate(self.heads):
            def log_probs(rows: slice, head: nn.Module = head) -> torch.Tensor:
                return F.log_softmax(head(feats[rows]).float(), dim=1)

            labels = sinkhorn_argmax_streamed(log_probs, feats.shape[0], 1.0 / self.lam, self.sinkhorn_iters,
                                              chunk=self.label_chunk)
            self.labels[h] = gather_dataset(labels, idx.to(labels.device), ctx.dataset_size).to(self.labels.device)

    def on_epoch_start(self, ctx: StepContext) -> None:
        if ctx.epoch in label_update_epochs(ctx.epochs, self.label_updates):
            self.update_labels(ctx)

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.labels.shape[1] == 0:
            raise RuntimeError("SeLa has no labels yet: the trainer's on_train_start/on_epoch_start label the dataset")
        (view,) = ctx.augment.views(images, ctx.generator, 1)
        feats = self.model.forward_features(view)
        targets = self.labels[:, indices.to(self.labels.device)]  # [H, B]
        losses = [F.cross_entropy(head(feats), targets[h]) for h, head in enumerate(self.heads)]
        return {"loss": torch.stack(losses).mean()}
