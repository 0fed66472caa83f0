"""SwAV / DeepCluster-v2 / SeLa-v2 (facebookresearch/swav) -> torchvision ResNet.

Official layout: a bare state dict (training checkpoints: under ``state_dict``) with keys
``module.<torchvision resnet key>`` plus the heads ``module.projection_head.*`` and
``module.prototypes.weight`` (SwAV) or ``module.prototypes.prototypesN.weight`` (several
prototype sets: DeepCluster-v2, SeLa-v2). The three methods share the code base and the layout;
which one a file is comes from the ``method`` asked for or its file name
(``swav_800ep_pretrain.pth.tar``, ``deepclusterv2_800ep_pretrain.pth.tar``, ``selav2_400ep_pretrain.pth.tar``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zoo.checkpoint import CheckpointError
from zoo.convert.common import (
    SMALL_STEM_CHOICE,
    Extracted,
    Hints,
    infer_resnet,
    strip_module,
    tensors_of,
    unwrap_state_dict,
)

NAME = "swav"
LICENSE = "CC BY-NC 4.0"
HEAD_PREFIXES = ("projection_head.", "prototypes.")
METHODS = ("swav", "deepcluster_v2", "sela_v2")


def matches(ckpt: Any) -> str | None:
    state, _ = unwrap_state_dict(ckpt)
    if not isinstance(state, Mapping):
        return None
    keys = set(strip_module(tensors_of(state)))
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys and any(k.startswith(HEAD_PREFIXES) for k in keys):
        return "torchvision ResNet keys with projection_head.* / prototypes.* (the SwAV code base)"
    return None


def method_from_name(source: str) -> str:
    low = source.lower().replace("-", "").replace("_", "")
    if "deepcluster" in low:
        return "deepcluster_v2"
    if "sela" in low:
        return "sela_v2"
    return "swav"


def extract(ckpt: Any, source: str, method: str | None = None, hints: Hints | None = None) -> Extracted:
    state, ignored = unwrap_state_dict(ckpt)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: not a SwAV checkpoint (no state dict inside)")
    state = strip_module(tensors_of(state))
    heads = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
    backbone = {k: v for k, v in state.items() if k not in heads}
    method = method or method_from_name(source)
    arch, arch_kwargs, reasons = infer_resnet(backbone)
    pretty = {"swav": "SwAV", "deepcluster_v2": "DeepCluster-v2", "sela_v2": "SeLa-v2"}.get(method, method)
    return Extracted(
        backbone=backbone,
        method=method,
        license=LICENSE,
        arch=arch,
        arch_kwargs=arch_kwargs,
        dataset="imagenet-1k",
        description=f"{pretty} ResNet encoder, converted from the official checkpoint {source}",
        heads=heads,
        ignored_entries=ignored,
        arch_from=reasons,
        stem_choice=SMALL_STEM_CHOICE if arch_kwargs.get("cifar_stem") else None,
    )
