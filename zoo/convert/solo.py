"""solo-learn checkpoints -> torchvision ResNet (lightly's: :mod:`zoo.convert.lightly_ckpt`).

- solo-learn (vturrisi/solo-learn) ``.ckpt``: a PyTorch Lightning checkpoint
  ``{"state_dict": {"backbone.<torchvision key>", "projector.*", "classifier.*", "momentum_backbone.*" ...},
  "hyper_parameters", "epoch", ...}``. Its ResNets are torchvision's with ``fc`` removed; on
  CIFAR it swaps in a 3x3/1 ``conv1`` **with padding 2** and drops the max-pool.

Architecture: ``arch`` / ``arch_kwargs`` when given, else inferred from the weights (ResNet-50 when
``layer4`` has bottleneck blocks of 2048 channels, ResNet-18 for basic blocks of 512; CIFAR stem
when ``conv1`` is 3x3: solo-learn's CIFAR stem).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zoo.checkpoint import CheckpointError
from zoo.convert.common import (
    CIFAR10_PRE,
    IMAGENET_PRE,
    Extracted,
    Hints,
    checkpoint_tensors,
    count_by_prefix,
    infer_resnet,
    split_prefix,
    strip_module,
    tensors_of,
    unwrap_state_dict,
)

SOLO_LICENSE = "MIT"
SOLO_HEADS = ("projector.", "predictor.", "prototypes.", "classifier.")
SOLO_MARKERS = SOLO_HEADS + ("momentum_backbone.", "momentum_projector.")
LIGHTLY_ONLY = ("projection_head.", "prediction_head.", "backbone_momentum.", "projection_head_momentum.")
CIFAR100_PRE = {**CIFAR10_PRE, "mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]}


def _keys(ckpt: Any) -> list[str]:
    state, _ = unwrap_state_dict(ckpt)
    return list(strip_module(tensors_of(state))) if isinstance(state, Mapping) else []


def _preprocessing(arch_kwargs: dict[str, Any], dataset: str | None) -> dict[str, Any]:
    if not arch_kwargs.get("cifar_stem"):
        return dict(IMAGENET_PRE)
    return dict(CIFAR100_PRE if dataset == "cifar100" else CIFAR10_PRE)


# ----------------------------------------------------------------------------- solo-learn
def matches(ckpt: Any) -> str | None:
    keys = _keys(ckpt)
    # solo-learn's backbone is a torchvision ResNet by name (lightly's models index theirs, or name
    # their heads projection_head / prediction_head)
    if (
        "backbone.conv1.weight" in keys
        and any(k.startswith(SOLO_MARKERS) for k in keys)
        and not any(k.startswith(LIGHTLY_ONLY) for k in keys)
    ):
        return "backbone.* with solo-learn's heads (projector / predictor / classifier / momentum_backbone)"
    return None


def _solo_dataset(ckpt: Any) -> str | None:
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, Mapping) else None
    if not isinstance(hp, Mapping):
        return None
    cfg = hp.get("cfg", hp)
    data = cfg.get("data") if isinstance(cfg, Mapping) else None
    for where in (data, hp):
        if isinstance(where, Mapping) and isinstance(where.get("dataset"), str):
            return where["dataset"]
    return None


def extract(ckpt: Any, source: str, method: str | None = None, hints: Hints | None = None) -> Extracted:
    state, ignored = checkpoint_tensors(ckpt, source, "solo-learn")
    backbone, rest = split_prefix(state, "backbone.")
    if not backbone:
        raise CheckpointError(f"{source}: no 'backbone.*' keys: not a solo-learn checkpoint")
    heads = {k: v for k, v in rest.items() if k.startswith(SOLO_HEADS)}
    dropped = count_by_prefix(k for k in rest if k not in heads)
    arch, arch_kwargs, reasons = infer_resnet(backbone)
    if arch_kwargs.get("cifar_stem"):
        arch_kwargs["stem_padding"] = 2  # solo-learn pads its CIFAR conv1 by 2 (SimCLR and SCAN by 1)
        reasons.append("solo-learn's only small stem (its CIFAR ResNets): 3x3/1 conv padded by 2, no max-pool")
    dataset = _solo_dataset(ckpt)
    return Extracted(
        backbone=backbone,
        method=method or "solo-learn",
        license=SOLO_LICENSE,
        arch=arch,
        arch_kwargs=arch_kwargs,
        preprocessing=_preprocessing(arch_kwargs, dataset),
        dataset=dataset,
        description=f"solo-learn ResNet backbone, converted from {source}",
        heads=heads,
        dropped=dropped,
        ignored_entries=ignored,
        arch_from=reasons,
    )
