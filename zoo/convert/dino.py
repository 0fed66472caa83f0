"""DINO (facebookresearch/dino) -> torchvision VisionTransformer inside ``ViTEncoder`` (or a ResNet).

Official layouts:

- backbone weights (``dino_deitsmall16_pretrain.pth``): a plain timm-style ViT state dict
  (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``,
  ``norm.*``);
- full checkpoints (``*_full_checkpoint.pth`` / ``checkpoint.pth``): ``{"student", "teacher", "optimizer",
  "epoch", "args", "dino_loss", ...}``, each network keyed ``module.backbone.*`` / ``backbone.*`` with its
  head ``head.mlp.*`` and ``head.last_layer.weight_g`` / ``weight_v``. The teacher is the one DINO
  evaluates, so it is preferred.

- ResNet-50 backbone (``dino_resnet50_pretrain.pth``): a bare torchvision ResNet-50 state dict
  without ``fc``; detected as DINO when the file name says ``dino`` (the keys alone do not).

Both ViTs use pre-norm blocks, exact GELU, LayerNorm eps 1e-6, a qkv bias, and a position
embedding that includes the class token, so the mapping is a renaming; ``qkv`` is already torch's
packed ``in_proj`` (q, k, v stacked along the output dimension). The converted ViT takes other
input sizes by resizing its position embeddings as DINO does (:class:`zoo.backbones.ViTEncoder`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from zoo.checkpoint import CheckpointError
from zoo.convert.common import (
    IMAGENET_PRE,
    SMALL_STEM_CHOICE,
    Extracted,
    Hints,
    count_by_prefix,
    infer_resnet,
    is_plain_torchvision_resnet,
    is_state_dict,
    split_prefix,
    strip_module,
    tensors_of,
)

NAME = "dino"
LICENSE = "Apache-2.0"
_VIT_WIDTHS = {384: "vit_s16", 768: "vit_b16"}

_LAYER = "vit.encoder.layers.encoder_layer_"
_RULES = [
    (re.compile(r"^cls_token$"), "vit.class_token"),
    (re.compile(r"^pos_embed$"), "vit.encoder.pos_embedding"),
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"vit.conv_proj.\1"),
    (re.compile(r"^blocks\.(\d+)\.norm1\.(weight|bias)$"), _LAYER + r"\1.ln_1.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$"), _LAYER + r"\1.self_attention.in_proj_\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$"), _LAYER + r"\1.self_attention.out_proj.\2"),
    (re.compile(r"^blocks\.(\d+)\.norm2\.(weight|bias)$"), _LAYER + r"\1.ln_2.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$"), _LAYER + r"\1.mlp.0.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$"), _LAYER + r"\1.mlp.3.\2"),
    (re.compile(r"^norm\.(weight|bias)$"), r"vit.encoder.ln.\1"),
]


def _select(ckpt: Any) -> tuple[Mapping, str | None, dict[str, int], list[str]]:
    """``(network state, which network, dropped counts, ignored entries)``."""
    if isinstance(ckpt, Mapping) and ("teacher" in ckpt or "student" in ckpt):
        which = "teacher" if is_state_dict(ckpt.get("teacher")) else "student"
        if not is_state_dict(ckpt.get(which)):
            raise CheckpointError("DINO checkpoint without a usable 'teacher' or 'student' state dict")
        dropped = {}
        ignored = []
        for key, value in ckpt.items():
            if key == which:
                continue
            if key in ("teacher", "student") and is_state_dict(value):
                dropped[str(key)] = len(tensors_of(value))
            else:
                ignored.append(str(key))
        return ckpt[which], which, dropped, sorted(ignored)
    if isinstance(ckpt, Mapping) and is_state_dict(ckpt.get("state_dict")):
        return ckpt["state_dict"], None, {}, sorted(str(k) for k in ckpt if k != "state_dict")
    return ckpt, None, {}, []


def _backbone_and_rest(state: Mapping) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    state = strip_module(tensors_of(state))
    backbone, rest = split_prefix(state, "backbone.")
    if not backbone:  # a plain backbone state dict
        return rest, {}
    return backbone, rest


def matches(ckpt: Any) -> str | None:
    """What shows a DINO checkpoint (a truthy reason), or None."""
    if not isinstance(ckpt, Mapping):
        return None
    try:
        state, which, _, _ = _select(ckpt)
    except CheckpointError:
        return None
    if not isinstance(state, Mapping):
        return None
    backbone, _ = _backbone_and_rest(state)
    if which is not None and "conv1.weight" in backbone:
        return f"a '{which}' network with a torchvision ResNet backbone (DINO's full ResNet checkpoint)"
    if {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= set(backbone) and any(
        k.startswith("blocks.") for k in backbone
    ):
        where = f"'{which}' network" if which else "state dict"
        return f"a {where} with DINO's ViT keys (cls_token, pos_embed, patch_embed.proj.weight, blocks.*)"
    return None


def matches_plain_resnet(ckpt: Any, source: str | None) -> str | None:
    """DINO's ResNet-50 release (``dino_resnet50_pretrain.pth``): a bare torchvision state dict.

    Its keys alone are any torchvision ResNet's, so the file name must say ``dino`` too.
    """
    if isinstance(ckpt, Mapping) and is_plain_torchvision_resnet(ckpt) and "dino" in (source or "").lower():
        return f"a bare torchvision ResNet state dict in a file named {source!r} (DINO's ResNet release)"
    return None


def timm_vit_to_torchvision(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename timm/DINO ViT keys to ``ViTEncoder``'s; unknown keys keep their names (so the check reports them)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for pattern, repl in _RULES:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            out[key] = value
    return out


def _vit_arch(backbone: Mapping[str, torch.Tensor], source: str) -> tuple[str, dict[str, Any], list[str]]:
    width = int(backbone["cls_token"].shape[-1])
    arch = _VIT_WIDTHS.get(width)
    if arch is None:
        raise CheckpointError(
            f"{source}: a ViT of width {width}; the zoo has ViT-S ({384}) and ViT-B ({768}) encoders only"
        )
    patch = int(backbone["patch_embed.proj.weight"].shape[-1])
    tokens = int(backbone["pos_embed"].shape[1]) - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"{source}: pos_embed holds {tokens} patch positions, not a square grid")
    depth = len({k.split(".")[1] for k in backbone if k.startswith("blocks.")})
    reasons = [
        f"cls_token of width {width}: {arch[:5].replace('_', '-').upper()}",
        f"patch_embed.proj.weight of {patch}x{patch}: patch size {patch}",
        f"pos_embed of 1+{tokens} positions: a {grid}x{grid} grid, trained at {grid * patch}x{grid * patch}",
        f"blocks.0-{depth - 1}: {depth} blocks",
    ]
    return arch, {"image_size": grid * patch, "patch_size": patch}, reasons


def extract(ckpt: Any, source: str, method: str | None = None, hints: Hints | None = None) -> Extracted:
    state, which, dropped, ignored = _select(ckpt)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: not a DINO checkpoint (no state dict inside)")
    backbone, rest = _backbone_and_rest(state)
    heads = {k: v for k, v in rest.items() if k.startswith("head.")}
    # a plain backbone state dict may carry a classifier ("head.weight", a ResNet's "fc.*"): a head too
    classifier = ("head.", "fc.") if "conv1.weight" in backbone else ("head.",)
    heads.update({k: v for k, v in backbone.items() if k.startswith(classifier)})
    backbone = {k: v for k, v in backbone.items() if not k.startswith(classifier)}
    dropped = {**dropped, **count_by_prefix(k for k in rest if not k.startswith("head."))}
    network = f" ({which})" if which else ""
    stem_choice = None
    if "cls_token" in backbone:
        arch, arch_kwargs, reasons = _vit_arch(backbone, source)
        # every tensor must come from the file: DINO's ViTs all have a qkv bias, nothing is filled in
        mapped = timm_vit_to_torchvision(backbone)
        size = arch_kwargs["image_size"]
        kind = f"ViT-{'S' if arch == 'vit_s16' else 'B'}/{arch_kwargs['patch_size']}"
    else:
        mapped = backbone
        arch, arch_kwargs, reasons = infer_resnet(backbone)
        if arch_kwargs.get("cifar_stem"):
            stem_choice = SMALL_STEM_CHOICE  # DINO's ResNet-50 is torchvision's; a small stem is someone else's
        size = 224
        kind = "ResNet"
    if which:
        reasons.insert(0, f"the '{which}' network of the full checkpoint" + (" (DINO evaluates the teacher)" if which == "teacher" else ""))
    return Extracted(
        backbone=mapped,
        method=method or "dino",
        license=LICENSE,
        arch=arch,
        arch_kwargs=arch_kwargs,
        preprocessing={**IMAGENET_PRE, "input_size": [3, size, size]},
        dataset="imagenet-1k",
        description=f"DINO {kind} backbone{network}, converted from the official checkpoint {source}",
        heads=heads,
        dropped=dropped,
        ignored_entries=ignored,
        arch_from=reasons,
        stem_choice=stem_choice,
    )
