"""Shared pieces of the checkpoint importers: safe loading, key helpers, the extraction record.

Nothing here unpickles arbitrary objects: ``.pth`` / ``.ckpt`` files go through
``torch.load(weights_only=True)`` (plain containers and tensors, plus the inert objects official
files hold: DINO's ``argparse.Namespace``, SCAN's numpy scalars), ``.safetensors`` files through
:func:`zoo.checkpoint.read_tensors`.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zoo.checkpoint import CheckpointError, read_tensors
from zoo.registry import IMAGENET_MEAN, IMAGENET_STD

IMAGENET_PRE = {"input_size": [3, 224, 224], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "crop_pct": 0.875}
CIFAR10_PRE = {
    "input_size": [3, 32, 32],
    "mean": [0.4914, 0.4822, 0.4465],
    "std": [0.2470, 0.2435, 0.2616],
    "crop_pct": 1.0,
}
SCAN_CIFAR10_PRE = {**CIFAR10_PRE, "mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}
SCAN_CIFAR20_PRE = {**CIFAR10_PRE, "mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761]}
SCAN_STL10_PRE = {**IMAGENET_PRE, "input_size": [3, 96, 96], "crop_pct": 1.0}  # configs/scan/scan_stl10.yml


class RefusedObject(Exception):
    """A pickled object outside what the narrow stand-ins below rebuild."""


_SCALAR_CODES = {  # numpy type codes a stand-in rebuilds -> (struct format, Python type)
    "b1": ("?", bool), "i1": ("b", int), "i2": ("h", int), "i4": ("i", int), "i8": ("q", int),
    "u1": ("B", int), "u2": ("H", int), "u4": ("I", int), "u8": ("Q", int),
    "f2": ("e", float), "f4": ("f", float), "f8": ("d", float),
}


class _NumpyDtype:
    """Stands in for ``numpy.dtype`` while unpickling: a plain numeric type code, nothing of numpy.

    Real dtypes are not allowed: a crafted dtype state (fields, flags) makes numpy read raw bytes as
    object pointers. Only the state of a plain number type is accepted.
    """

    def __init__(self, code: Any = None, align: Any = False, copy: Any = True):
        if not isinstance(code, str) or code not in _SCALAR_CODES:
            raise RefusedObject(f"numpy dtype {code!r} (only plain integer / float / bool numbers are read)")
        self.code, self.byteorder = code, "="

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags) of a plain number
        if not (isinstance(state, tuple) and len(state) == 8 and state[1] in ("<", ">", "|", "=")
                and state[2:5] == (None, None, None) and state[5:7] == (-1, -1) and state[7] == 0):
            raise RefusedObject(f"numpy dtype state {state!r} (not a plain number type)")
        self.byteorder = state[1]


def _numpy_scalar(dtype: Any, data: Any = None) -> int | float | bool:
    """Stands in for numpy's ``scalar(dtype, bytes)``: the Python number those bytes hold."""
    if not isinstance(dtype, _NumpyDtype) or not isinstance(data, bytes):
        raise RefusedObject("numpy scalar of something other than a plain number type and its bytes")
    fmt, kind = _SCALAR_CODES[dtype.code]
    order = ">" if dtype.byteorder == ">" else "<"
    if len(data) != struct.calcsize(fmt):
        raise RefusedObject(f"numpy {dtype.code} scalar of {len(data)} bytes")
    return kind(struct.unpack(order + fmt, data)[0])


def _named(fn: Any, module: str, name: str) -> Any:
    """A copy of the stand-in under the global name the pickle uses (torch keys its allowlist by it)."""
    def stand_in(*args: Any) -> Any:
        return fn(*args)

    stand_in.__module__, stand_in.__qualname__, stand_in.__name__ = module, name, name
    return stand_in


def _safe_globals() -> list:
    """The globals official checkpoints use besides containers and tensors, each a narrow stand-in.

    DINO saves its arguments as an ``argparse.Namespace`` (an attribute bag, inert); SCAN saves the
    best head as a numpy integer (``np.argmin``), pickled as ``numpy.core.multiarray.scalar`` (numpy
    1) or ``numpy._core.multiarray.scalar`` (numpy 2) of a ``numpy.dtype``. Those are rebuilt as
    plain Python numbers by :func:`_numpy_scalar` / :class:`_NumpyDtype`; numpy itself is never asked.
    """
    _NumpyDtype.__module__, _NumpyDtype.__qualname__ = "numpy", "dtype"  # the name torch looks it up by
    return [
        argparse.Namespace,
        _NumpyDtype,
        _named(_numpy_scalar, "numpy.core.multiarray", "scalar"),
        _named(_numpy_scalar, "numpy._core.multiarray", "scalar"),
    ]


SAFE_GLOBALS = _safe_globals()
# where torch names the global it refused, across its versions' wordings
_REFUSED_PATTERNS = (
    r"GLOBAL ([\w.]+) was not an allowed global",
    r"Unsupported global: (?:GLOBAL )?([\w.]+)",
    r"Unsupported class ([\w.]+)",
    r"unsupported GLOBAL ([\w.]+)",
    r"unrecognized function <[\w ]*?(?:function|method) ([\w.]+)",
    r"but got <class '([\w.]+)'>",
)


def refused_global(message: str) -> str | None:
    """The dotted name of the global a weights-only load refused, from torch's message (any wording)."""
    for pattern in _REFUSED_PATTERNS:
        m = re.search(pattern, message)
        if m:
            return m.group(1).rstrip(".")
    return None


@dataclass
class Extracted:
    """What a family's importer found in a checkpoint, in zoo naming.

    ``backbone`` keys are the zoo backbone's own (``conv1.weight``, ``vit.conv_proj.weight``);
    ``cluster_heads`` is a list of ``(weight, bias)`` for a SCAN-style cluster head.
    """

    backbone: dict[str, torch.Tensor]
    method: str
    license: str
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=lambda: dict(IMAGENET_PRE))
    dataset: str | None = None
    description: str = ""
    heads: dict[str, torch.Tensor] = field(default_factory=dict)  # projection / prototype heads (dropped unless kept)
    head_prefixes: tuple[str, ...] = ()  # how to group ``heads`` keys in the config (else by first component)
    dropped: dict[str, int] = field(default_factory=dict)  # other tensors left behind, counted by prefix
    ignored_entries: list[str] = field(default_factory=list)  # top-level non-weight entries (epoch, optimizer ...)
    cluster_heads: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    best_head: int = 0
    warnings: list[str] = field(default_factory=list)
    arch_from: list[str] = field(default_factory=list)  # what in the file showed the architecture
    # set when the weights fit several architectures: the choice to make (build_model refuses to guess)
    stem_choice: str | None = None
    derived: dict[str, str] = field(default_factory=dict)  # target entries built from a non-tensor entry


@dataclass
class Hints:
    """What the user said beyond the file: ``dataset`` (``--dataset``), ``arch`` / ``arch_kwargs``."""

    dataset: str | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- loading
def load_checkpoint(path: str | Path) -> Any:
    """Read an official checkpoint without running any code it might carry.

    ``.safetensors`` -> flat dict of tensors; anything else -> ``torch.load(weights_only=True)``.
    A pickle that names other classes or callables is refused with :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        tensors, _ = read_tensors(path)
        return tensors
    guard = (
        torch.serialization.safe_globals(SAFE_GLOBALS)
        if hasattr(torch.serialization, "safe_globals")
        else contextlib.nullcontext()
    )
    try:
        with guard:
            return torch.load(path, map_location="cpu", weights_only=True)
    except RefusedObject as exc:
        raise CheckpointError(f"{path}: refused to load: the file holds a {exc}") from None
    except pickle.UnpicklingError as exc:
        name = refused_global(str(exc))
        what = f"the Python global `{name}`" if name else "Python objects other than tensors and plain containers"
        raise CheckpointError(
            f"{path}: refused to load: the file names {what}, and only weights-only loading is done here "
            "(no code from the file runs). If you trust the file, re-save just its state dict "
            "(torch.save(ckpt['state_dict'], 'weights.pth')) and convert that."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {exc}") from exc


# ----------------------------------------------------------------------------- key helpers
def tensors_of(mapping: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor-valued entries of a state dict (drops stray numbers or strings)."""
    return {k: v for k, v in mapping.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def is_state_dict(obj: Any) -> bool:
    """A non-empty mapping whose values are mostly tensors."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    n = sum(isinstance(v, torch.Tensor) for v in obj.values())
    return n > 0 and n >= len(obj) / 2


def strip_module(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DistributedDataParallel's leading ``module.`` from every key that has it."""
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


def split_prefix(state: Mapping[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(keys under prefix with it stripped, the rest)``."""
    inside, rest = {}, {}
    for k, v in state.items():
        if k.startswith(prefix):
            inside[k[len(prefix) :]] = v
        else:
            rest[k] = v
    return inside, rest


def count_by_prefix(keys: Iterable[str], prefixes: Iterable[str] = (), depth: int = 1) -> dict[str, int]:
    """Count keys under the first matching prefix of ``prefixes``, else their first ``depth`` components."""
    prefixes = list(prefixes)
    counts: dict[str, int] = {}
    for key in keys:
        group = next((p for p in prefixes if key == p or key.startswith(p + ".")), None)
        if group is None:
            group = ".".join(key.split(".")[:depth])
        counts[group] = counts.get(group, 0) + 1
    return counts


def merge_counts(*parts: Mapping[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for k, n in part.items():
            out[k] = out.get(k, 0) + n
    return out


_RESNETS = {("basic", (2, 2, 2, 2)): "resnet18", ("bottleneck", (3, 4, 6, 3)): "resnet50"}
_OTHER_RESNETS = {("basic", (3, 4, 6, 3)): "ResNet-34", ("bottleneck", (3, 4, 23, 3)): "ResNet-101",
                  ("bottleneck", (3, 8, 36, 3)): "ResNet-152"}
SMALL_STEM_CHOICE = (
    "conv1.weight is 3x3, so the network has a small (CIFAR-style) stem, but the weights do not say whether a "
    "max-pool follows that conv or how it is padded; choose: --arch-kwargs '{\"cifar_stem\": true}' (3x3/1 conv, "
    "padding 1, no max-pool: SimCLR, SCAN CIFAR), add \"stem_padding\": 2 (solo-learn CIFAR) or "
    "\"stem_pool\": true (MaxPool2d(2, 2, padding=1) after it: SCAN STL-10)"
)


def infer_resnet(state: Mapping[str, torch.Tensor]) -> tuple[str | None, dict[str, Any], list[str]]:
    """torchvision-named ResNet weights -> ``("resnet18" | "resnet50", {"cifar_stem": bool}, reasons)``.

    Blocks per stage and their kind (``bn3``: bottleneck) give the depth: 2-2-2-2 basic blocks are
    ResNet-18, 3-4-6-3 bottlenecks ResNet-50; a 3x3 ``conv1`` means a small stem (what follows that
    conv is not in the weights: see :data:`SMALL_STEM_CHOICE`). ``reasons`` says which keys showed
    what. ``(None, {}, reasons)`` when the keys are not a torchvision ResNet-18/50's.
    """
    conv1 = state.get("conv1.weight")
    if not isinstance(conv1, torch.Tensor) or conv1.dim() != 4:
        return None, {}, ["no 4-d conv1.weight: not a torchvision-named ResNet"]
    k = tuple(conv1.shape[-2:])
    kwargs = {"cifar_stem": k == (3, 3)}
    reasons = [f"conv1.weight is {k[0]}x{k[1]}" + (": a small stem" if k == (3, 3) else ": the ImageNet stem (7x7/2 conv, max-pool)")]
    blocks: dict[int, set[int]] = {}
    bottleneck = False
    for key in state:
        m = re.match(r"^layer([1-4])\.(\d+)\.(bn3|conv3)?", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
            bottleneck |= m.group(3) is not None
    counts = tuple(len(blocks.get(i, ())) for i in range(1, 5))
    kind = "bottleneck" if bottleneck else "basic"
    arch = _RESNETS.get((kind, counts))
    reasons.append(f"layer1-4 hold {'-'.join(map(str, counts))} {kind} blocks" + (f": {arch}" if arch else ""))
    if arch is None:
        other = _OTHER_RESNETS.get((kind, counts))
        reasons.append(f"{other or 'that ResNet'} is not a zoo architecture (resnet18, resnet50)")
    return arch, kwargs, reasons


_TORCHVISION_RESNET_KEY = re.compile(r"^(conv1|bn1|layer[1-4]|fc)\.")


def is_plain_torchvision_resnet(state: Mapping[str, Any]) -> bool:
    """A bare torchvision ResNet state dict (optionally ``module.``-prefixed), nothing else in it."""
    if not is_state_dict(state):
        return False
    keys = list(strip_module(tensors_of(state)))
    return bool(keys) and "conv1.weight" in keys and all(_TORCHVISION_RESNET_KEY.match(k) for k in keys)


def cifar_stats_for(num_clusters: int | None) -> tuple[dict[str, Any], str | None]:
    """SCAN's CIFAR preprocessing, from its configs (``configs/scan/scan_cifar{10,20}.yml``)."""
    if num_clusters == 20:
        return dict(SCAN_CIFAR20_PRE), "cifar-20"
    return dict(SCAN_CIFAR10_PRE), ("cifar-10" if num_clusters == 10 else None)


def unwrap_state_dict(ckpt: Any) -> tuple[Mapping, list[str]]:
    """``(state dict, names of the other top-level entries)`` of ``{"state_dict": ..., ...}``, or the
    checkpoint itself when it is already a bare state dict."""
    if isinstance(ckpt, Mapping) and is_state_dict(ckpt.get("state_dict")):
        return ckpt["state_dict"], sorted(str(k) for k in ckpt if k != "state_dict")
    return ckpt, []


def checkpoint_tensors(ckpt: Any, source: str, family: str) -> tuple[dict, list[str]]:
    """The tensors of a checkpoint's state dict with any DDP ``module.`` prefix removed, and the names
    of the checkpoint's other top-level entries; CheckpointError when there is no state dict."""
    state, ignored = unwrap_state_dict(ckpt)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: not a {family} checkpoint (no state dict inside)")
    return strip_module(tensors_of(state)), ignored
