"""UIC: Unsupervised Image Classification for Deep Representation Learning (Wang, Liao & Shao, ECCV 2020
Workshops; arXiv:2006.11480), "unsupervised image classification without embedding clustering".

DeepCluster without the clustering: the pseudo-label of every image is the classifier's own argmax
prediction from the previous epoch, and encoder + classifier are trained with cross entropy on an
augmented view to predict it. No k-means, no re-initialised classifier (its outputs keep their meaning
from one epoch to the next). To avoid the trivial solution (every image in one class) the classes are
balanced: each epoch samples images uniformly over the pseudo-classes (``train.clustering.
uniform_cluster_order``, DeepCluster's sampler, which the paper reuses). The classifier is the exported
model's cluster head.

Where the paper's released code differs, and what this file does: the paper takes the labels from the
forward passes of the previous epoch's training batches (augmented views, a network that changes during
the epoch); here they come from one pass over the un-augmented training set at the start of each epoch
(eval mode, the network as the previous epoch left it), which is deterministic, needs no per-step
bookkeeping, and under DDP every rank labels its shard and the ``[N]`` labels are gathered
(``train.distributed.gather_dataset``), so all ranks sample the same order. Epoch 0 uses the initial
(or ``pretext``) network's predictions. ``pretext`` starts the encoder from a trained model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from train.clustering import embed_shard, epoch_seed, resize_buffers_to_state, uniform_cluster_order
from train.distributed import gather_dataset
from train.methods.base import Method, StepContext, register_method
from zoo.eval.metrics import nmi
from zoo.heads import ClusterHead
from zoo.model import ZooModel

_LAZY_BUFFERS = ("pseudo_labels",)


def uic_loss(logits: torch.Tensor, pseudo_labels: torch.Tensor) -> torch.Tensor:
    """``-1/B sum_i log softmax(logits_i)[y_i]``: logits ``[B,K]``, pseudo-labels ``[B]`` (previous argmax)."""
    if bool((pseudo_labels < 0).any()):
        raise RuntimeError("UIC: images without pseudo-labels; on_epoch_start must label the dataset first")
    return F.cross_entropy(logits, pseudo_labels)


@register_method("uic")
class UIC(Method):
    """Encoder + ``num_clusters``-way linear classifier (the cluster head) trained on its own argmax labels.

    Buffers (checkpointed): ``pseudo_labels [N]`` (-1 before the first labelling), ``label_change_nmi``
    (NMI between this epoch's labels and the previous epoch's; -1 until there are two), ``labelled_epoch``.
    """

    def __init__(self, model: ZooModel, num_clusters: int = 10, pretext: str | None = None,
                 balanced_sampling: bool = True):
        super().__init__(model)
        if num_clusters < 2:
            raise ValueError(f"num_clusters must be >= 2, got {num_clusters}")
        if pretext is not None:
            from train.methods.scan import copy_backbone_, load_pretext

            copy_backbone_(load_pretext(pretext), model, f"pretext {pretext!r}")
            model.pretrained_cfg["pretext"] = pretext
        self.num_clusters = num_clusters
        self.balanced_sampling = balanced_sampling
        model.cluster_head = ClusterHead(model.num_features, num_clusters, 1)
        model.num_clusters = num_clusters
        model.pretrained_cfg.update(num_clusters=num_clusters, num_cluster_heads=1)
        self.register_buffer("pseudo_labels", torch.full((0,), -1, dtype=torch.long))
        self.register_buffer("label_change_nmi", torch.tensor(-1.0))
        self.register_buffer("labelled_epoch", torch.tensor(-1, dtype=torch.long))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        resize_buffers_to_state(self, state_dict, prefix, _LAZY_BUFFERS)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def predict_labels(self, ctx: StepContext) -> torch.Tensor:
        """The classifier's argmax ``[N]`` (CPU int64) over the un-augmented training set."""
        logits, idx = embed_shard(lambda x: self.model.cluster_head(self.model.forward_features(x)), ctx,
                                  normalize=False, module=self.model)
        return gather_dataset(logits.argmax(dim=1), idx, ctx.dataset_size)

    def on_epoch_start(self, ctx: StepContext) -> None:
        if int(self.labelled_epoch) == ctx.epoch:  # already labelled (resumed mid-epoch never reaches here)
            return
        labels = self.predict_labels(ctx).to(self.pseudo_labels.device)
        if self.pseudo_labels.numel() == labels.numel() and int(self.labelled_epoch) >= 0:
            self.label_change_nmi.fill_(nmi(self.pseudo_labels.cpu().numpy(), labels.cpu().numpy()))
        self.pseudo_labels = labels.clone()
        self.labelled_epoch.fill_(ctx.epoch)

    def sample_order(self, epoch: int, seed: int, n: int) -> torch.Tensor | None:
        """Uniform over the epoch's pseudo-classes, from a generator seeded by ``(seed, epoch)``."""
        if not self.balanced_sampling or self.pseudo_labels.numel() != n:
            return None
        return uniform_cluster_order(self.pseudo_labels, n, torch.Generator().manual_seed(epoch_seed(seed, epoch, 3)))

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        (view,) = ctx.augment.views(images, ctx.generator, 1)
        logits = self.model.cluster_head(self.model.forward_features(view))  # [B,K]
        loss = uic_loss(logits, self.pseudo_labels[indices.to(self.pseudo_labels.device)])
        classes = torch.tensor(float(self.pseudo_labels.unique().numel()))
        return {"loss": loss, "label_change_nmi": self.label_change_nmi.detach().clone(), "classes": classes}
