"""DeepCluster: Deep Clustering for Unsupervised Learning of Visual Features (Caron et al., ECCV 2018).

Alternates two steps. At the start of every epoch the encoder embeds the whole training set
(no augmentation, eval mode), the features are optionally PCA-whitened, L2-normalised and
clustered with k-means into ``num_clusters`` pseudo-classes (empty clusters re-seeded); the linear
classifier on top of the encoder is re-initialised, since its output units no longer mean
anything. During the epoch images are sampled uniformly over pseudo-classes, and the encoder +
classifier are trained with cross-entropy to predict the pseudo-label of an augmented view.

Not reproduced: the Sobel input filter of the AlexNet/VGG models in the paper (the recipe's
augmentation decides the input). The paper over-clusters (k=10000 for 1000 ImageNet classes);
the default here is 30, three times the classes of the small datasets in this zoo.

Under DDP each rank embeds a shard of the training set and keeps it (``train.clustering.embed_shard``):
PCA statistics are all-reduced, k-means (``train.clustering.kmeans_sharded``) trains its centroids on
rank 0 from a sample of ``kmeans_sample_per_cluster * k`` rows (faiss's default, 256, as the paper's
faiss k-means; all rows on small datasets), every rank assigns its own rows and only the ``[N]``
pseudo-labels are gathered, so the sampling order and the targets are identical on all ranks and no
rank holds the ``[N,D]`` features.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from train.clustering import (
    embed_shard,
    epoch_seed,
    kmeans_sharded,
    pca_whiten,
    resize_buffers_to_state,
    uniform_cluster_order,
)
from train.distributed import gather_dataset
from train.methods.base import Method, StepContext, register_method
from zoo.eval.metrics import nmi
from zoo.model import ZooModel

_LAZY_BUFFERS = ("pseudo_labels", "prev_pseudo_labels")


def deepcluster_loss(logits: torch.Tensor, pseudo_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the classifier's logits ``[B,K]`` against the k-means pseudo-labels ``[B]``.

    ``-1/B sum_i log softmax(logits_i)[y_i]`` with ``y_i`` the cluster of image i at this epoch.
    """
    if bool((pseudo_labels < 0).any()):
        raise RuntimeError("DeepCluster: images without pseudo-labels; on_epoch_start must cluster first")
    return F.cross_entropy(logits, pseudo_labels)


@register_method("deepcluster")
class DeepCluster(Method):
    """Encoder + linear classifier over ``num_clusters`` k-means pseudo-classes, re-clustered every epoch.

    Buffers (checkpointed, so a resume continues bit-exactly): ``pseudo_labels`` ``[N]`` (this
    epoch's clusters, -1 before the first clustering), ``prev_pseudo_labels`` ``[N]`` (the clustering
    before), ``clustering_nmi`` (NMI between the two, the paper's measure of how much the
    assignment still changes; -1 until there are two), ``clustered_epoch`` (-1 before any).
    """

    def __init__(
        self, model: ZooModel, num_clusters: int = 30, pca_dim: int | None = None, kmeans_niter: int = 20,
        uniform_sampling: bool = True, kmeans_sample_per_cluster: int | None = 256,
    ):
        super().__init__(model)
        self.num_clusters = num_clusters
        self.pca_dim = pca_dim
        self.kmeans_niter = kmeans_niter
        self.kmeans_sample_per_cluster = kmeans_sample_per_cluster
        self.uniform_sampling = uniform_sampling
        self.classifier = nn.Linear(model.num_features, num_clusters)
        self._init_classifier(torch.Generator().manual_seed(0))
        self.register_buffer("pseudo_labels", torch.full((0,), -1, dtype=torch.long))
        self.register_buffer("prev_pseudo_labels", torch.full((0,), -1, dtype=torch.long))
        self.register_buffer("clustering_nmi", torch.tensor(-1.0))
        self.register_buffer("clustered_epoch", torch.tensor(-1, dtype=torch.long))

    # -- state ---------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        resize_buffers_to_state(self, state_dict, prefix, _LAZY_BUFFERS)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _ensure_size(self, n: int) -> None:
        for name in _LAZY_BUFFERS:
            if getattr(self, name).numel() != n:
                device = self.clustered_epoch.device
                setattr(self, name, torch.full((n,), -1, dtype=torch.long, device=device))

    @torch.no_grad()
    def _init_classifier(self, gen: torch.Generator) -> None:
        """The official code's top-layer init: weights ~ N(0, 0.01^2), bias 0, from ``gen``."""
        w = self.classifier.weight
        w.copy_(torch.randn(w.shape, generator=gen).mul_(0.01).to(w.device))
        self.classifier.bias.zero_()

    # -- hooks -----------------------------------------------------------------------------
    def on_train_start(self, ctx: StepContext) -> None:
        self._ensure_size(ctx.dataset_size)

    @torch.no_grad()
    def cluster(self, ctx: StepContext) -> torch.Tensor:
        """Embed the training set, k-means it; returns the pseudo-labels ``[N]`` (CPU, int64).
        The features stay in this rank's shard (all of them on one process)."""
        feats, idx = embed_shard(self.model, ctx, normalize=self.pca_dim is None)
        if self.pca_dim is not None:
            feats = F.normalize(pca_whiten(feats, self.pca_dim, sharded=True), dim=1)
        labels, _ = kmeans_sharded(feats, idx, ctx.dataset_size, self.num_clusters, epoch_seed(ctx.seed, ctx.epoch),
                                   niter=self.kmeans_niter, max_points_per_centroid=self.kmeans_sample_per_cluster)
        return gather_dataset(labels, idx, ctx.dataset_size)

    def on_epoch_start(self, ctx: StepContext) -> None:
        self._ensure_size(ctx.dataset_size)
        labels = self.cluster(ctx).to(self.pseudo_labels.device)
        if int(self.clustered_epoch) >= 0:
            self.clustering_nmi.fill_(nmi(self.pseudo_labels.cpu().numpy(), labels.cpu().numpy()))
        self.prev_pseudo_labels.copy_(self.pseudo_labels)
        self.pseudo_labels.copy_(labels)
        self.clustered_epoch.fill_(ctx.epoch)
        # New clusters: the old output units are meaningless; start the classifier (and its
        # optimizer state: momentum / Adam moments) afresh, seeded by (seed, epoch).
        self._init_classifier(torch.Generator().manual_seed(epoch_seed(ctx.seed, ctx.epoch, offset=1)))
        if ctx.optimizer is not None:
            for p in self.classifier.parameters():
                ctx.optimizer.state.pop(p, None)

    def sample_order(self, epoch: int, seed: int, n: int) -> torch.Tensor | None:
        """Uniform over this epoch's pseudo-classes, from a generator seeded by ``(seed, epoch)``."""
        labels = self.pseudo_labels
        if not self.uniform_sampling or labels.numel() != n or bool((labels < 0).all()):
            return None
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch, offset=2))
        return uniform_cluster_order(labels, n, gen)

    # -- training --------------------------------------------------------------------------
    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        (view,) = ctx.augment.views(images, ctx.generator, 1)
        logits = self.classifier(self.model.forward_features(view))  # [B,K]
        loss = deepcluster_loss(logits, self.pseudo_labels[indices.to(self.pseudo_labels.device)])
        return {"loss": loss, "clustering_nmi": self.clustering_nmi.detach().clone()}
