"""lightly (lightly-ai/lightly) checkpoints -> torchvision ResNet.

lightly has no release files: users save their own models. The layouts it documents:

- a model's ``state_dict()`` (plain, or a Lightning checkpoint's ``state_dict``) with the backbone
  under ``backbone.*`` and heads ``projection_head.*``, ``prediction_head.*``, ``prototypes.*``
  (SwAV), momentum copies ``backbone_momentum.*`` ... (left behind);
- the tutorials' file ``{"resnet18_parameters": backbone.state_dict()}``;
- the backbone saved on its own.

The backbone is one of:

- torchvision's ResNet as ``nn.Sequential(*list(resnet.children())[:-1])``: keys ``0.weight``
  (conv1), ``1.*`` (bn1), ``4.*``-``7.*`` (layer1-4);
- lightly's ``ResNetGenerator("resnet-18" | "resnet-50")`` as ``nn.Sequential(*list(resnet.children())[:-1],
  nn.AdaptiveAvgPool2d(1))``: ``0.weight``, ``1.*``, ``2.*``-``5.*`` (layer1-4), shortcuts named
  ``shortcut.0/1``. Its 3x3/1 stem has no max-pool, and its ReLU lives in the generator's ``forward``,
  so the Sequential has none after ``bn1``: converted with ``stem_relu=False``;
- either network itself: torchvision names (``conv1.weight`` ... ``fc.*``), or the generator's
  (``conv1.weight``, ``layer1.0.shortcut``..., ``linear.*``; with its ReLU; its ``avg_pool2d(out, 4)``
  is the global pool at the 32x32 input it is made for).

Torchvision-named weights with a 3x3 ``conv1`` are a user's modified ResNet: what follows that
conv is not in the weights, so ``arch_kwargs`` must say (see ``SMALL_STEM_CHOICE``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from zoo.checkpoint import CheckpointError
from zoo.convert.common import (
    CIFAR10_PRE,
    IMAGENET_PRE,
    SMALL_STEM_CHOICE,
    Extracted,
    Hints,
    count_by_prefix,
    infer_resnet,
    is_state_dict,
    split_prefix,
    strip_module,
    tensors_of,
    unwrap_state_dict,
)

LICENSE = "MIT"
HEADS = ("projection_head.", "prediction_head.", "prototypes.")
_TUTORIAL = re.compile(r"^resnet\d+_parameters$")
# children of nn.Sequential(*list(net.children())[:-1]) by index
_TORCHVISION_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
_GENERATOR_CHILDREN = {"0": "conv1", "1": "bn1", "2": "layer1", "3": "layer2", "4": "layer3", "5": "layer4"}
_INDEXED = re.compile(r"^(\d+)\.")
_SHORTCUT = re.compile(r"\.shortcut\.(\d+)\.")


def _unwrap(ckpt: Any) -> tuple[Any, list[str], str | None]:
    """``(state dict, other top-level entries, wrapper)``: the tutorial's ``{"resnet18_parameters": ...}`` too."""
    if isinstance(ckpt, Mapping):
        wrapped = [k for k in ckpt if isinstance(k, str) and _TUTORIAL.match(k) and is_state_dict(ckpt[k])]
        if len(wrapped) == 1:
            key = wrapped[0]
            return ckpt[key], sorted(str(k) for k in ckpt if k != key), key
    state, ignored = unwrap_state_dict(ckpt)
    return state, ignored, ("state_dict" if state is not ckpt else None)


def _layout(state: Mapping[str, Any]) -> str | None:
    """Which backbone layout the keys are: torchvision / generator, indexed / named; None if neither."""
    keys = set(state)
    if "0.weight" in keys and any(k.startswith("2.0.") for k in keys):
        return "generator-sequential"
    if "0.weight" in keys and any(k.startswith("4.0.") for k in keys) and not any(k.startswith("2.") for k in keys):
        return "torchvision-sequential"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        named_generator = "linear.weight" in keys or any(".shortcut." in k for k in keys)
        return "generator" if named_generator else "torchvision"
    return None


def _split(ckpt: Any) -> tuple[dict, dict, list[str], str | None, str | None]:
    """``(backbone, rest, ignored entries, wrapper, layout)``."""
    state, ignored, wrapper = _unwrap(ckpt)
    if not isinstance(state, Mapping):
        return {}, {}, ignored, wrapper, None
    state = strip_module(tensors_of(state))
    backbone, rest = split_prefix(state, "backbone.")
    if not backbone:
        backbone, rest = state, {}
    return backbone, rest, ignored, wrapper, _layout(backbone)


def matches(ckpt: Any) -> str | None:
    backbone, rest, _, wrapper, layout = _split(ckpt)
    if layout is None:
        return None
    where = f"under '{wrapper}' " if wrapper and wrapper != "state_dict" else ""
    if rest:
        if not any(k.startswith(HEADS + ("backbone_momentum.",)) for k in rest):
            return None
        return f"a lightly model: backbone.* ({layout} layout) {where}with lightly's heads"
    if layout.endswith("sequential") or layout == "generator" or wrapper:
        return f"a lightly backbone {where}({layout} layout)"
    return None  # a bare torchvision ResNet: not lightly's in particular


def _rename(backbone: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    children = {"torchvision-sequential": _TORCHVISION_CHILDREN, "generator-sequential": _GENERATOR_CHILDREN}.get(layout)
    out = {}
    for key, value in backbone.items():
        m = _INDEXED.match(key)
        if children is not None and m and m.group(1) in children:
            key = children[m.group(1)] + key[m.end() - 1 :]
        if layout.startswith("generator"):
            key = _SHORTCUT.sub(r".downsample.\1.", key)
        out[key] = value
    return out


def _check_split_bn(backbone: Mapping[str, torch.Tensor], source: str) -> None:
    for key, value in backbone.items():
        if key.endswith(".running_mean"):
            weight = backbone.get(key[: -len("running_mean")] + "weight")
            if weight is not None and value.numel() != weight.numel() and value.numel() % weight.numel() == 0:
                raise CheckpointError(
                    f"{source}: {key} holds {value.numel() // weight.numel()} sets of statistics: lightly's "
                    "SplitBatchNorm (ResNetGenerator(num_splits=...)), which this importer does not convert; "
                    "build the generator with num_splits=0 or save the model after .eval()-averaging into plain BatchNorm"
                )


def extract(ckpt: Any, source: str, method: str | None = None, hints: Hints | None = None) -> Extracted:
    backbone, rest, ignored, wrapper, layout = _split(ckpt)
    if layout is None:
        raise CheckpointError(f"{source}: no ResNet backbone in a layout lightly documents (see zoo.convert.lightly_ckpt)")
    _check_split_bn(backbone, source)
    backbone = _rename(backbone, layout)
    heads = {k: v for k, v in rest.items() if k.startswith(HEADS)}
    # a whole network saved as the backbone still has its classifier (torchvision fc, generator linear)
    classifier = ("fc.", "linear.")
    heads.update({f"backbone.{k}": v for k, v in backbone.items() if k.startswith(classifier)})
    backbone = {k: v for k, v in backbone.items() if not k.startswith(classifier)}
    dropped = count_by_prefix(k for k in rest if k not in heads)
    arch, arch_kwargs, reasons = infer_resnet(backbone)
    reasons.insert(0, f"{layout} backbone layout" + (f" under '{wrapper}'" if wrapper else ""))
    stem_choice = None
    if layout.startswith("generator"):
        if not arch_kwargs.get("cifar_stem"):
            raise CheckpointError(f"{source}: lightly ResNetGenerator keys but a conv1 that is not 3x3")
        reasons.append("lightly's ResNetGenerator: 3x3/1 conv, padding 1, no max-pool")
        if layout == "generator-sequential":
            arch_kwargs["stem_relu"] = False
            reasons.append("nn.Sequential(*children[:-1]) of the generator: no ReLU after bn1 (it lives in forward)")
    elif arch_kwargs.get("cifar_stem"):
        stem_choice = SMALL_STEM_CHOICE
    small = arch_kwargs.get("cifar_stem")
    return Extracted(
        backbone=backbone,
        method=method or "lightly",
        license=LICENSE,
        arch=arch,
        arch_kwargs=arch_kwargs,
        preprocessing=dict(CIFAR10_PRE if small else IMAGENET_PRE),
        description=f"lightly ResNet backbone ({layout} layout), converted from {source}",
        heads=heads,
        head_prefixes=("backbone.fc", "backbone.linear"),
        dropped=dropped,
        ignored_entries=ignored,
        arch_from=reasons,
        stem_choice=stem_choice,
    )
