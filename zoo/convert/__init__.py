"""Importers that turn official release checkpoints into zoo model folders.

>>> from zoo.convert import convert
>>> model = convert("moco_v2_800ep_pretrain.pth.tar", out="models/moco_v2_r50")  # format detected from the keys
>>> model = convert("scan_model.pth.tar", fmt="scan")  # keeps SCAN's cluster heads, best head selected

Formats (one small module each): ``moco`` (MoCo v1/v2), ``swav`` (SwAV, DeepCluster-v2, SeLa-v2;
aliases ``deepcluster_v2`` / ``sela_v2`` set the method), ``dino`` (ViT or ResNet, teacher preferred),
``scan`` (pretext / scan / selflabel, cluster heads kept), ``solo`` (solo-learn ``.ckpt``) and
``lightly``; CLIP releases: ``openai_clip`` (OpenAI's TorchScript archives, read without running them)
and ``open_clip`` (LAION state dicts), see :mod:`zoo.convert.clip`. Projection / prototype heads are left behind and counted in the config's
``dropped_keys``; ``keep_head=True`` writes them to ``heads.safetensors`` next to the model instead.

Loading never runs code from the file: ``torch.load(weights_only=True)`` (``.safetensors`` through
:func:`zoo.checkpoint.read_tensors`). Every conversion is checked (:mod:`zoo.convert.check`): each
tensor of the zoo model is one of the file's (or documented absent), each tensor of the file is
used or listed as left behind, and the config's ``conversion_check`` records it with what showed
the format and architecture. Weights that do not fit raise :class:`zoo.checkpoint.CheckpointError`
naming the missing and unexpected keys; where the weights fit several architectures the importer
refuses and names the choice to make (``arch_kwargs`` / ``dataset``). See ``docs/convert.md``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from zoo.checkpoint import CheckpointError, atomic_save_tensors, save_model_folder
from zoo.convert import dino, lightly_ckpt, moco, scan, solo, swav
from zoo.convert.check import ConversionCheck, account, index_tensors, left_behind
from zoo.convert.clip import CLIP_FORMATS, convert_clip
from zoo.convert.common import (
    Extracted,
    Hints,
    count_by_prefix,
    is_plain_torchvision_resnet,
    load_checkpoint,
    merge_counts,
)
from zoo.model import ZooModel

# format -> (does this checkpoint look like it, extract the weights); detection tries them in this order
_FAMILIES: dict[str, tuple[Callable[[Any], bool], Callable[..., Extracted]]] = {
    "moco": (moco.matches, moco.extract),
    "dino": (dino.matches, dino.extract),
    "scan": (scan.matches, scan.extract),
    "solo": (solo.matches, solo.extract),
    "swav": (swav.matches, swav.extract),
    "lightly": (lightly_ckpt.matches, lightly_ckpt.extract),
}
FORMATS: tuple[str, ...] = ("moco", "swav", "dino", "scan", "solo", "lightly")
# other names accepted for ``fmt``: (format, method recorded in the config)
ALIASES: dict[str, tuple[str, str | None]] = {
    "deepcluster_v2": ("swav", "deepcluster_v2"),
    "sela_v2": ("swav", "sela_v2"),
    "solo-learn": ("solo", None),
}
HEADS_NAME = "heads.safetensors"
_EXTENSIONS = (".pth.tar", ".pth", ".pt", ".tar", ".ckpt", ".safetensors", ".bin")


def detect_format(state: Any, source: str | None = None) -> str:
    """The format of a loaded checkpoint (what ``torch.load`` returned), judged from its keys.

    ``source`` (the file name) settles the one layout the keys cannot: a bare torchvision ResNet
    state dict is DINO's ResNet-50 release only when the file says ``dino``.
    """
    return _detect(state, source)[0]


def _detect(state: Any, source: str | None) -> tuple[str, str]:
    """``(format, what showed it)``."""
    for fmt, (matches, _) in _FAMILIES.items():
        why = matches(state)
        if why:
            return fmt, why if isinstance(why, str) else "its keys"
    why = dino.matches_plain_resnet(state, source)
    if why:
        return "dino", why
    if isinstance(state, Mapping):
        keys = [str(k) for k in state][:8]
        seen = f"top-level keys {keys}{' ...' if len(state) > 8 else ''}"
    else:
        seen = f"a {type(state).__name__}"
    hint = ""
    if isinstance(state, Mapping) and is_plain_torchvision_resnet(state):
        hint = (" A bare torchvision ResNet state dict does not say which release it is: DINO's ResNet-50 file is "
                "dino_resnet50_pretrain.pth; pass --format dino (or swav, moco ...) for yours.")
    raise CheckpointError(
        f"cannot tell the checkpoint's format ({seen}); known formats: {', '.join(FORMATS)} "
        f"(pass one explicitly, e.g. fmt='swav' / --format swav).{hint}"
    )


def convert(
    src: str | Path,
    fmt: str = "auto",
    out: str | Path | None = None,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    name: str | None = None,
    keep_head: bool = False,
    dataset: str | None = None,
) -> ZooModel:
    """Convert an official checkpoint (a file, or an http(s)/file URL) into a :class:`ZooModel`.

    ``fmt``: ``"auto"`` or one of :data:`FORMATS` / :data:`ALIASES`. ``arch`` / ``arch_kwargs``
    override the architecture inferred from the weights (``"resnet50"``, ``{"cifar_stem": True}``).
    ``dataset``: what the file was trained on, where the weights fit several architectures (SCAN's
    CIFAR-10 and STL-10 ResNet-18s differ only in a max-pool: ``"cifar-10"`` / ``"stl-10"``).
    ``out``: write a model folder there (``model.safetensors``, ``config.json``, ``README.md``).
    ``keep_head``: keep projection / prototype heads (``model.converted_heads``, and
    ``heads.safetensors`` in ``out``) instead of dropping them.

    Every conversion is checked (``config["conversion_check"]``): each tensor of the model is one
    of the file's or documented absent, each tensor of the file is used or listed as left behind.
    """
    fmt = (fmt or "auto").lower()
    if fmt in CLIP_FORMATS:  # image-text releases: their own reader (TorchScript archives, open_clip dicts)
        path, weights_source = _resolve_source(src)
        return convert_clip(path, fmt, dict(arch_kwargs or {}), name or _default_name(path), out, weights_source)
    if fmt != "auto" and fmt not in _FAMILIES and fmt not in ALIASES:
        known = ", ".join(("auto", *FORMATS, *ALIASES, *CLIP_FORMATS))
        raise ValueError(f"unknown checkpoint format {fmt!r}; known: {known}")
    path, weights_source = _resolve_source(src)
    ckpt = load_checkpoint(path)
    family, method, fmt_from = _resolve_format(fmt, ckpt, path)
    if dataset and family != "scan":
        raise ValueError(
            f"dataset= (--dataset) chooses between SCAN's architectures only; for a {family} file "
            "pass the architecture itself (arch= / arch_kwargs=, --arch / --arch-kwargs)"
        )
    hints = Hints(dataset=dataset, arch=arch, arch_kwargs=dict(arch_kwargs or {}))
    extracted = _FAMILIES[family][1](ckpt, source=path.name, method=method, hints=hints)
    model = build_model(
        extracted,
        arch=arch,
        arch_kwargs=arch_kwargs,
        name=name or _default_name(path),
        weights_source=weights_source,
        fmt=family,
        keep_head=keep_head,
        source=f"{path} ({family} format)",
        file_tensors=index_tensors(ckpt),
        format_from=fmt_from,
    )
    if out is not None:
        write_folder(model, out)
    return model


def build_model(
    ex: Extracted,
    arch: str | None,
    arch_kwargs: dict | None,
    name: str,
    weights_source: str,
    fmt: str,
    keep_head: bool,
    source: str,
    file_tensors: dict[int, str] | None = None,
    format_from: str = "given",
) -> ZooModel:
    """Build the zoo model an extraction describes, check where each tensor comes from, and load it.

    ``file_tensors``: ``id(tensor) -> path`` of every tensor of the loaded file
    (:func:`zoo.convert.check.index_tensors`); without it the extraction's own tensors stand for the file.
    """
    if file_tensors is None:
        file_tensors = index_tensors({"backbone": ex.backbone, "heads": ex.heads, "cluster_heads": ex.cluster_heads})
    inferred = dict(ex.arch_kwargs)
    arch_from = list(ex.arch_from)
    if arch and ex.arch and _family(arch) != _family(ex.arch):
        inferred = {}  # another family than the weights suggest: its arguments do not apply (the load will fail)
    if arch:
        arch_from.append(f"architecture {arch!r} given (arch= / --arch)")
    if arch_kwargs:
        arch_from.append(f"arguments {arch_kwargs} given (arch_kwargs= / --arch-kwargs)")
    if ex.stem_choice and not ({"cifar_stem", "stem_pool"} & set(arch_kwargs or {})):
        raise CheckpointError(f"{source}: {ex.stem_choice}")
    arch = arch or ex.arch
    if not arch:
        why = f" ({'; '.join(ex.arch_from)})" if ex.arch_from else ""
        raise CheckpointError(f"{source}: cannot infer the architecture from the weights{why}; pass arch= (--arch)")
    kwargs = {**inferred, **(arch_kwargs or {})}
    heads = ex.heads if keep_head else {}
    dropped = merge_counts(ex.dropped, {} if keep_head else count_by_prefix(ex.heads, ex.head_prefixes))
    cfg: dict[str, Any] = {
        "name": name,
        "method": ex.method,
        "license": ex.license,
        "weights_source": weights_source,
        "converted_from": fmt,
        "dataset": ex.dataset,
        "description": ex.description,
        **ex.preprocessing,
        "interpolation": "bicubic" if fmt == "dino" else "bilinear",
        "dropped_keys": dict(sorted(dropped.items())),
        "ignored_entries": list(ex.ignored_entries),
    }
    if heads:
        cfg["kept_heads"] = dict(sorted(count_by_prefix(heads, ex.head_prefixes).items()))
    if ex.warnings:
        cfg["conversion_warnings"] = list(ex.warnings)
        for message in ex.warnings:
            warnings.warn(f"{source}: {message}", stacklevel=3)
    num_clusters = int(ex.cluster_heads[0][0].shape[0]) if ex.cluster_heads else None
    num_heads = len(ex.cluster_heads) if ex.cluster_heads else 1
    try:
        model = ZooModel(arch, kwargs, num_clusters=num_clusters, num_cluster_heads=num_heads, pretrained_cfg=cfg)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{source}: cannot build {arch!r} with {kwargs}: {exc}") from exc
    state = {f"backbone.{k}": v for k, v in ex.backbone.items()}
    for i, (weight, bias) in enumerate(ex.cluster_heads or []):
        state[f"cluster_head.heads.{i}.weight"] = weight
        state[f"cluster_head.heads.{i}.bias"] = bias
    derived = dict(ex.derived)
    if ex.cluster_heads:
        state["cluster_head.best_head"] = torch.tensor(ex.best_head, dtype=torch.long)
        derived.setdefault("cluster_head.best_head", f"best head index {ex.best_head}")
    taken, absent = account(model.state_dict(), state, file_tensors, derived, source)
    kept = sorted({file_tensors[id(v)] for v in heads.values() if id(v) in file_tensors})
    check = ConversionCheck(
        format=fmt,
        format_from=format_from,
        architecture=arch,
        arch_kwargs=dict(model.arch_kwargs),
        arch_from=arch_from,
        taken=taken,
        absent=absent,
        file_tensors=len(file_tensors),
        kept=kept,
        left_behind=left_behind(file_tensors, set(taken.values()) | set(kept)),
    )
    model.load_state_dict(state, strict=True)
    model.pretrained_cfg["conversion_check"] = check.to_config()
    if keep_head:
        model.converted_heads = {k: v.detach().clone() for k, v in heads.items()}
    return model.eval()


def write_folder(model: ZooModel, out: str | Path) -> Path:
    """Save a converted model as a model folder (plus ``heads.safetensors`` for kept heads)."""
    out = Path(out)
    heads = getattr(model, "converted_heads", None)
    if heads:
        atomic_save_tensors(out / HEADS_NAME, heads, {"format": "pt"})
        model.pretrained_cfg["heads_file"] = HEADS_NAME
    return save_model_folder(model, out)


def _resolve_format(fmt: str, ckpt: Any, path: Path) -> tuple[str, str | None, str]:
    """``(family, method or None, what decided the format)``."""
    if fmt == "auto":
        try:
            family, why = _detect(ckpt, path.name)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        return family, None, f"detected: {why}"
    family, method = ALIASES.get(fmt, (fmt, None))
    return family, method, f"given (--format {fmt})"


def _resolve_source(src: str | Path) -> tuple[Path, str]:
    """A local path, or an http(s)/file URL fetched into the torch hub cache (``<hub>/checkpoints``)."""
    text = str(src)
    if re.match(r"^(https?|file)://", text):
        import torch.hub

        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(text).path)
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(text, str(target), progress=False)
            except Exception as exc:  # network, DNS, HTTP errors
                raise CheckpointError(
                    f"cannot download {text} ({type(exc).__name__}: {exc}); download it yourself and pass the file"
                ) from exc
        return target, text
    path = Path(src)
    return path, path.name


def _family(arch: str) -> str:
    """``resnet50`` -> ``resnet``, ``vit_s16`` -> ``vit``, ``convnet_tiny`` -> ``convnet``."""
    return re.match(r"[a-z]*", arch).group()


def _default_name(path: Path) -> str:
    stem = path.name
    for ext in _EXTENSIONS:
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "converted"


__all__ = ["ALIASES", "FORMATS", "HEADS_NAME", "build_model", "convert", "detect_format", "write_folder"]
