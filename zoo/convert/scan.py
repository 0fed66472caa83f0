"""SCAN (wvangansbeke/Unsupervised-Classification) -> ResNet (+ cluster heads).

Official layouts, all with ``backbone.*`` for the encoder:

- pretext (``pretext_model.pth.tar`` / ``checkpoint.pth.tar``): a bare state dict, or ``{"model": ...,
  "optimizer", "epoch"}``, with the SimCLR head ``contrastive_head.*``;
- scan (``scan_model.pth.tar``): ``{"model": {... "cluster_head.0.weight" ... "cluster_head.N.*"}, "head": best}``
  (training checkpoints name it ``best_loss_head``);
- selflabel (``selflabel_model.pth.tar``): one head ``cluster_head.0.*``, bare or under ``model``.

SCAN's CIFAR ResNet-18 (``models/resnet_cifar.py``, from SupContrast) is torchvision's ResNet-18
with the CIFAR stem (3x3/1 conv, no max-pool) except that projection shortcuts are named
``shortcut.0`` / ``shortcut.1`` instead of ``downsample.0`` / ``downsample.1``. Its STL-10 ResNet-18
(``models/resnet_stl.py``) is the same plus ``MaxPool2d(2, 2, padding=1)`` after the stem, at 96x96
input (its ``AvgPool2d(7)`` is the global pool there): the same weights, so which one a file is
comes from ``dataset`` (``--dataset``), an explicit ``stem_pool`` or, for 20 clusters, CIFAR-100-20
(SCAN's only 20-cluster release); otherwise the conversion refuses and names the choice. Its
ImageNet models use torchvision's ResNet-50. The cluster heads are kept: the zoo model predicts
clusters with the file's best head.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from zoo.checkpoint import CheckpointError
from zoo.convert.common import (
    IMAGENET_PRE,
    SCAN_STL10_PRE,
    Extracted,
    Hints,
    cifar_stats_for,
    count_by_prefix,
    infer_resnet,
    is_state_dict,
    split_prefix,
    strip_module,
    tensors_of,
)

NAME = "scan"
LICENSE = "CC BY-NC 4.0"
_SHORTCUT = re.compile(r"\.shortcut\.(\d+)\.")
_HEAD = re.compile(r"^(\d+)\.(weight|bias)$")


def _select(ckpt: Any) -> tuple[Mapping, Any, list[str]]:
    """``(state dict, best head entry or None, ignored top-level entries)``."""
    if isinstance(ckpt, Mapping) and is_state_dict(ckpt.get("model")):
        head = ckpt.get("head", ckpt.get("best_loss_head"))
        ignored = sorted(str(k) for k in ckpt if k not in ("model", "head", "best_loss_head"))
        return ckpt["model"], head, ignored
    return ckpt, None, []


def matches(ckpt: Any) -> str | None:
    state, _, _ = _select(ckpt)
    if not isinstance(state, Mapping):
        return None
    keys = list(strip_module(tensors_of(state)))
    if any(k.startswith("backbone.") for k in keys) and any(
        k.startswith(("cluster_head.", "contrastive_head.")) for k in keys
    ):
        return "backbone.* with cluster_head.* / contrastive_head.* (SCAN's ClusteringModel / ContrastiveModel)"
    return None


def scan_resnet_to_torchvision(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SCAN/SupContrast CIFAR ResNet keys -> torchvision's (``shortcut.i`` -> ``downsample.i``)."""
    return {_SHORTCUT.sub(r".downsample.\1.", k): v for k, v in state.items()}


def _cluster_heads(heads: Mapping[str, torch.Tensor], source: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in heads.items():
        m = _HEAD.match(key)
        if not m:
            raise CheckpointError(f"{source}: unexpected cluster head key 'cluster_head.{key}' (expected cluster_head.N.weight/bias)")
        found.setdefault(int(m.group(1)), {})[m.group(2)] = value
    n = len(found)
    if sorted(found) != list(range(n)) or any(set(p) != {"weight", "bias"} for p in found.values()):
        raise CheckpointError(
            f"{source}: cluster heads must be cluster_head.0..N-1 each with weight and bias; found {sorted(heads)}"
        )
    out = [(found[i]["weight"], found[i]["bias"]) for i in range(n)]
    shapes = {tuple(w.shape) for w, _ in out}
    if len(shapes) != 1:
        raise CheckpointError(f"{source}: cluster heads of different shapes {sorted(shapes)}")
    return out


_DATASETS = {  # --dataset spellings -> SCAN's dataset
    "cifar-10": "cifar-10", "cifar10": "cifar-10",
    "cifar-20": "cifar-20", "cifar20": "cifar-20", "cifar-100-20": "cifar-20", "cifar100-20": "cifar-20",
    "stl-10": "stl-10", "stl10": "stl-10",
    "imagenet-50": "imagenet-50", "imagenet_50": "imagenet-50", "imagenet50": "imagenet-50",
    "imagenet-100": "imagenet-100", "imagenet_100": "imagenet-100", "imagenet100": "imagenet-100",
    "imagenet-200": "imagenet-200", "imagenet_200": "imagenet-200", "imagenet200": "imagenet-200",
}
_CLUSTERS = {"cifar-10": 10, "cifar-20": 20, "stl-10": 10, "imagenet-50": 50, "imagenet-100": 100, "imagenet-200": 200}
STEM_CHOICE = (
    "SCAN's CIFAR and STL-10 ResNet-18s have the same weights: the STL-10 one (models/resnet_stl.py, 96x96 input) "
    "puts MaxPool2d(2, 2, padding=1) after the 3x3 conv, the CIFAR one (models/resnet_cifar.py, 32x32) does not, "
    "and nothing in the file says which it is. Choose: --dataset cifar-10 or --dataset stl-10 "
    "(convert(..., dataset=...)), or --arch-kwargs '{\"cifar_stem\": true, \"stem_pool\": false}' / '... true'"
)


def _dataset(hints: Hints | None, source: str) -> str | None:
    if hints is None or not hints.dataset:
        return None
    name = _DATASETS.get(hints.dataset.lower())
    if name is None:
        known = ", ".join(sorted(set(_DATASETS.values())))
        raise CheckpointError(f"{source}: unknown SCAN dataset {hints.dataset!r}; SCAN's releases: {known}")
    return name


def _small_stem(
    num_clusters: int | None, hints: Hints | None, source: str, reasons: list[str]
) -> tuple[str | None, bool]:
    """``(dataset, stem_pool)`` of SCAN's 3x3-stem ResNet-18: from --dataset, an explicit stem_pool, or 20 clusters."""
    dataset = _dataset(hints, source)
    given = hints.arch_kwargs if hints is not None else {}
    if dataset is not None:
        if dataset.startswith("imagenet"):
            raise CheckpointError(f"{source}: --dataset {dataset} but the file's ResNet has a 3x3 stem (SCAN's ImageNet models are ResNet-50s)")
        reasons.append(f"dataset {dataset} given: " + ("models/resnet_stl.py (max-pool after the stem)" if dataset == "stl-10" else "models/resnet_cifar.py (no max-pool)"))
        if "stem_pool" in given and bool(given["stem_pool"]) != (dataset == "stl-10"):
            raise CheckpointError(f"{source}: --dataset {dataset} contradicts stem_pool={given['stem_pool']}")
        return dataset, dataset == "stl-10"
    if "stem_pool" in given:
        pool = bool(given["stem_pool"])
        reasons.append(f"stem_pool={pool} given")
        if pool:
            return "stl-10", True
        return ("cifar-20" if num_clusters == 20 else ("cifar-10" if num_clusters == 10 else None)), False
    if num_clusters == 20:
        reasons.append("20 clusters: CIFAR-100-20, SCAN's only 20-cluster release (models/resnet_cifar.py, no max-pool)")
        return "cifar-20", False
    raise CheckpointError(f"{source}: {STEM_CHOICE}")


def extract(ckpt: Any, source: str, method: str | None = None, hints: Hints | None = None) -> Extracted:
    state, best, ignored = _select(ckpt)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: not a SCAN checkpoint (no state dict inside)")
    state = strip_module(tensors_of(state))
    backbone, rest = split_prefix(state, "backbone.")
    if not backbone:
        raise CheckpointError(f"{source}: no 'backbone.*' keys: not a SCAN checkpoint")
    backbone = scan_resnet_to_torchvision(backbone)
    cluster, rest = split_prefix(rest, "cluster_head.")
    heads = {k: v for k, v in rest.items() if k.startswith("contrastive_head.")}
    dropped = count_by_prefix(k for k in rest if k not in heads)
    arch, arch_kwargs, reasons = infer_resnet(backbone)

    cluster_heads = _cluster_heads(cluster, source) if cluster else None
    num_clusters = int(cluster_heads[0][0].shape[0]) if cluster_heads else None
    best_head = 0
    derived = {}
    if best is not None:
        if not cluster_heads:
            raise CheckpointError(f"{source}: a best head index ({best!r}) but no cluster_head.* weights")
        if isinstance(best, torch.Tensor) and best.numel() == 1 and not best.is_floating_point():
            best = best.item()
        if isinstance(best, bool) or not isinstance(best, int):  # the loader rebuilds numpy integers as int
            raise CheckpointError(f"{source}: best head entry {best!r} is not an integer")
        best_head = best
        if not 0 <= best_head < len(cluster_heads):
            raise CheckpointError(f"{source}: best head {best_head} but the file has {len(cluster_heads)} cluster heads")
        derived["cluster_head.best_head"] = f"the file's best head entry ({best_head})"
    elif cluster_heads:
        derived["cluster_head.best_head"] = "a single cluster head: head 0" if len(cluster_heads) == 1 else "no best head entry in the file: head 0"
    if arch_kwargs.get("cifar_stem"):
        dataset, pool = _small_stem(num_clusters, hints, source, reasons)
        if pool:
            arch_kwargs["stem_pool"] = True
        preprocessing = dict(SCAN_STL10_PRE) if pool else cifar_stats_for(20 if dataset == "cifar-20" else 10)[0]
    else:
        dataset = _dataset(hints, source) or {50: "imagenet-50", 100: "imagenet-100", 200: "imagenet-200"}.get(num_clusters or 0)
        preprocessing = dict(IMAGENET_PRE)
    if dataset and num_clusters and _CLUSTERS[dataset] != num_clusters:
        raise CheckpointError(f"{source}: the file's heads predict {num_clusters} clusters, but {dataset} has {_CLUSTERS[dataset]}")
    stage = "pretext (SimCLR)" if not cluster_heads else ("scan" if len(cluster_heads) > 1 or best is not None else "selflabel")
    desc = f"SCAN {stage} ResNet encoder"
    if cluster_heads:
        desc += f" with {len(cluster_heads)} cluster head(s) of {num_clusters} clusters (best head {best_head})"
    return Extracted(
        backbone=backbone,
        method=method or "scan",
        license=LICENSE,
        arch=arch,
        arch_kwargs=arch_kwargs,
        preprocessing=preprocessing,
        dataset=dataset,
        description=f"{desc}, converted from the official checkpoint {source}",
        heads=heads,
        dropped=dropped,
        ignored_entries=ignored,
        cluster_heads=cluster_heads,
        best_head=best_head,
        arch_from=reasons,
        derived=derived,
    )
