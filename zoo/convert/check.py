"""The self-check of every conversion: where each tensor of the zoo model came from, and what of the file was left.

Every tensor of the loaded file is indexed by identity (``id``) with its path in the file
(``state_dict/module.encoder_q.conv1.weight``). The importers only rename and regroup those tensor
objects, so each target tensor is traced back to the exact file entry it is. A target tensor that
is not one of the file's must be documented: built from a non-tensor entry (SCAN's best head
index) or a BatchNorm batch counter the file lacks (it never enters eval-mode features). Anything
else (a missing, unexpected or reshaped tensor) fails the conversion naming the keys.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from zoo.checkpoint import CheckpointError

_LIST_AT_MOST = 40  # keys named in one error message before "... and N more"
_COUNTER = "num_batches_tracked"


def index_tensors(obj: Any, prefix: str = "") -> dict[int, str]:
    """``id(tensor) -> its path in the loaded file`` for every tensor inside containers / Namespaces."""
    out: dict[int, str] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, torch.Tensor):
            out.setdefault(id(value), path)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{path}/{k}" if path else str(k))
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(v, f"{path}/{i}" if path else str(i))
        elif isinstance(value, argparse.Namespace):
            walk(vars(value), path)

    walk(obj, prefix)
    return out


def name_keys(keys: list[str]) -> str:
    """All the keys (up to a limit), not their groups."""
    keys = sorted(keys)
    shown = ", ".join(keys[:_LIST_AT_MOST])
    return shown + (f" ... and {len(keys) - _LIST_AT_MOST} more" if len(keys) > _LIST_AT_MOST else "")


@dataclass
class ConversionCheck:
    """The record written to ``config.json`` (``conversion_check``) and printed by ``zoo convert``."""

    format: str
    format_from: str
    architecture: str
    arch_kwargs: dict[str, Any]
    arch_from: list[str]
    taken: dict[str, str] = field(default_factory=dict)  # target key -> file path
    absent: dict[str, str] = field(default_factory=dict)  # target key -> why it is not in the file
    file_tensors: int = 0
    kept: list[str] = field(default_factory=list)  # file paths of heads kept in heads.safetensors
    left_behind: dict[str, list[str]] = field(default_factory=dict)  # group in the file -> its keys

    @property
    def target_tensors(self) -> int:
        return len(self.taken) + len(self.absent)

    def to_config(self) -> dict[str, Any]:
        return {
            "ok": True,
            "format": self.format,
            "format_inferred_from": self.format_from,
            "architecture": self.architecture,
            "arch_kwargs": dict(self.arch_kwargs),
            "architecture_inferred_from": list(self.arch_from),
            "target_tensors": self.target_tensors,
            "from_file": len(self.taken),
            "documented_absent": dict(sorted(self.absent.items())),
            "file_tensors": self.file_tensors,
            "file_tensors_used": len(set(self.taken.values()) | set(self.kept)),
            "kept_in_heads_file": sorted(self.kept),
            "left_behind": {k: sorted(v) for k, v in sorted(self.left_behind.items())},
            "taken_from": dict(sorted(self.taken.items())),
        }


def summarize(record: Mapping[str, Any]) -> list[str]:
    """A few lines for people from a ``conversion_check`` record: counts, reasons, what was left behind."""
    absent = record.get("documented_absent", {})
    left = record.get("left_behind", {})
    lines = [
        f"check: {record['target_tensors']} target tensors: {record['from_file']} taken from the file, "
        f"{len(absent)} documented absent; file: {record['file_tensors']} tensors, "
        f"{record['file_tensors_used']} used, {sum(map(len, left.values()))} left behind",
        f"format {record['format']}: {record['format_inferred_from']}",
        f"architecture {record['architecture']} {record['arch_kwargs']}: "
        + "; ".join(record["architecture_inferred_from"]),
    ]
    if record.get("kept_in_heads_file"):
        lines.append(f"kept in heads.safetensors: {len(record['kept_in_heads_file'])} tensors")
    lines += [f"absent from the file: {key} ({why})" for key, why in sorted(absent.items())]
    if left:
        lines.append("left behind: " + ", ".join(f"{g} ({len(k)})" for g, k in sorted(left.items())))
    return lines


def account(
    expected: Mapping[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    files: dict[int, str],
    derived: Mapping[str, str],
    source: str,
) -> tuple[dict[str, str], dict[str, str]]:
    """Check ``state`` against the model's ``expected`` tensors; ``(taken, absent)`` or CheckpointError.

    Fills the documented-absent BatchNorm counters into ``state`` (zeros).
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    absent: dict[str, str] = {}
    for key in [k for k in missing if k.rsplit(".", 1)[-1] == _COUNTER]:
        state[key] = torch.zeros_like(expected[key])
        absent[key] = "BatchNorm batch counter, not in the file; it does not enter eval-mode features"
    missing = [k for k in missing if k not in absent]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s) of the model: {name_keys(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) the model does not have: {name_keys(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:10]) + (" ..." if len(shapes) > 10 else ""))
    if parts:
        raise CheckpointError(f"{source}: weights do not fit the model: " + " | ".join(parts))
    taken: dict[str, str] = {}
    foreign = []
    for key, value in state.items():
        if key in absent:
            continue
        if key in derived:
            absent[key] = derived[key]
        elif id(value) in files:
            taken[key] = files[id(value)]
        else:
            foreign.append(key)
    if foreign:  # an importer made a tensor up: never silently
        raise CheckpointError(f"{source}: tensors not taken from the file: {name_keys(foreign)}")
    return taken, absent


def left_behind(files: dict[int, str], used: set[str]) -> dict[str, list[str]]:
    """File tensors no target tensor is, grouped by their top-level entry and first key component."""
    groups: dict[str, list[str]] = {}
    for path in files.values():
        if path in used:
            continue
        parts = path.split("/")
        if len(parts) > 2:  # deep inside an entry (optimizer state ...): the entry
            group = parts[0]
        else:
            comps = parts[-1].split(".")
            n = 2 if comps[0] == "module" and len(comps) > 1 else 1
            group = "/".join([*parts[:-1], ".".join(comps[:n])])
        groups.setdefault(group, []).append(path)
    return groups
