"""The zoo's model: an encoder plus an optional cluster head, with its pretrained config.

Follows timm's split: ``forward_features`` gives the encoder's features ``[B,D]``;
``forward_head`` maps features to cluster logits ``[B,K]`` when there is a cluster head.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.backbones import create_backbone
from zoo.heads import ClusterHead


class ZooModel(nn.Module):
    """Encoder (+ optional cluster head) carrying ``pretrained_cfg``.

    - ``forward_features(x)``: ``[B,3,H,W] -> [B,D]`` encoder features.
    - ``embed(x)``: L2-normalised features ``[B,D]``.
    - ``forward_head(f)``: cluster logits ``[B,K]`` (identity when there is no cluster head).
    - ``predict_cluster(x)``: cluster probabilities ``[B,K]``.
    - ``forward(x)``: same as ``forward_features``.
    """

    def __init__(
        self,
        arch: str,
        arch_kwargs: dict[str, Any] | None = None,
        num_clusters: int | None = None,
        num_cluster_heads: int = 1,
        pretrained_cfg: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs or {})
        self.backbone = create_backbone(arch, **self.arch_kwargs)
        # Record every architecture argument, defaults included, so saved weights never depend on
        # a default that may change later.
        self.arch_kwargs = dict(getattr(self.backbone, "arch_kwargs", self.arch_kwargs))
        self.num_features: int = self.backbone.num_features
        self.num_clusters = num_clusters
        self.cluster_head = (
            ClusterHead(self.num_features, num_clusters, num_cluster_heads) if num_clusters else None
        )
        cfg = copy.deepcopy(pretrained_cfg or {})
        cfg.update(architecture=arch, arch_kwargs=self.arch_kwargs, embed_dim=self.num_features)
        if num_clusters:
            cfg.update(num_clusters=num_clusters, num_cluster_heads=num_cluster_heads)
        self.pretrained_cfg: dict[str, Any] = cfg

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.cluster_head is None else self.cluster_head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised features ``[B,D]`` (inference mode; call ``.eval()`` first for BN)."""
        return F.normalize(self.forward_features(x), dim=1)

    @torch.no_grad()
    def predict_cluster(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster probabilities ``[B,K]``; raises when the model has no cluster head."""
        if self.cluster_head is None:
            raise RuntimeError(f"model {self.pretrained_cfg.get('name', self.arch)!r} has no cluster head")
        return self.cluster_head(self.forward_features(x)).softmax(dim=1)

    @property
    def has_cluster_head(self) -> bool:
        return self.cluster_head is not None

    def config(self) -> dict[str, Any]:
        """The config.json content describing this model (architecture + pretrained config)."""
        return copy.deepcopy(self.pretrained_cfg)


def model_class(arch: str) -> type[ZooModel]:
    """The model class for an architecture name: :class:`zoo.clip.ClipModel` for CLIP ones."""
    from zoo.clip import CLIP_ARCHES, ClipModel  # lazy: zoo.clip imports this module

    return ClipModel if arch in CLIP_ARCHES else ZooModel
