"""MoCo v1 / v2 (facebookresearch/moco) -> torchvision ResNet.

Official layout: ``{"epoch", "arch", "state_dict", "optimizer"}`` with ``state_dict`` keys
``module.encoder_q.<torchvision resnet key>``, the query encoder's head ``module.encoder_q.fc.weight``
(v1, linear) or ``module.encoder_q.fc.0/2.*`` (v2, MLP), the momentum encoder ``module.encoder_k.*``
and the queue ``module.queue`` / ``module.queue_ptr``. The query encoder without ``fc`` is the
encoder; the rest is left behind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zoo.checkpoint import CheckpointError
from zoo.convert.common import (
    SMALL_STEM_CHOICE,
    Extracted,
    Hints,
    checkpoint_tensors,
    count_by_prefix,
    infer_resnet,
    split_prefix,
    unwrap_state_dict,
)

NAME = "moco"
LICENSE = "MIT"


def matches(ckpt: Any) -> str | None:
    state, _ = unwrap_state_dict(ckpt)
    if isinstance(state, Mapping) and any(
        isinstance(k, str) and k.startswith(("module.encoder_q.", "encoder_q.")) for k in state
    ):
        return "keys under encoder_q.* (MoCo's query encoder)"
    return None


def extract(ckpt: Any, source: str, method: str | None = None, hints: Hints | None = None) -> Extracted:
    state, ignored = checkpoint_tensors(ckpt, source, "MoCo")
    query, rest = split_prefix(state, "encoder_q.")
    if not query:
        raise CheckpointError(f"{source}: no 'encoder_q.*' keys: not a MoCo v1/v2 checkpoint")
    head, backbone = split_prefix(query, "fc.")
    version = "v2" if any(k.startswith("0.") for k in head) else "v1"
    arch, arch_kwargs, reasons = infer_resnet(backbone)
    reasons.insert(0, "the query encoder encoder_q.* without its head fc.*")
    if arch is None and isinstance(ckpt, Mapping) and isinstance(ckpt.get("arch"), str):
        arch = ckpt["arch"]
        reasons.append(f"the file's 'arch' entry says {arch!r}")
    return Extracted(
        backbone=backbone,
        method=method or "moco",
        license=LICENSE,
        arch=arch,
        arch_kwargs=arch_kwargs,
        dataset="imagenet-1k",
        description=f"MoCo {version} ResNet encoder (query encoder), converted from the official checkpoint {source}",
        heads={f"encoder_q.fc.{k}": v for k, v in head.items()},
        head_prefixes=("encoder_q.fc",),
        dropped=count_by_prefix(rest, ["encoder_k", "queue", "queue_ptr"]),
        ignored_entries=ignored,
        arch_from=reasons,
        stem_choice=SMALL_STEM_CHOICE if arch_kwargs.get("cifar_stem") else None,
    )
