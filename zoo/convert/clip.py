"""CLIP releases -> zoo model folders: OpenAI's TorchScript archives and open_clip (LAION) state dicts.

OpenAI's ``RN50.pt`` / ``ViT-B-32.pt`` / ``ViT-B-16.pt`` are TorchScript archives. open_clip's
``load_openai_model`` calls ``torch.jit.load`` on them and rebuilds its own ``CLIP`` from the
scripted module's ``state_dict()``. ``torch.jit.load`` compiles the archive's ``code/`` and runs
TorchScript's deserializer on its pickles (and ``torch.load(weights_only=True)`` refuses TorchScript
archives, or dispatches to ``jit.load`` on older versions - the route behind CVE-2025-32434). Here
nothing from the file runs: :func:`read_torchscript_tensors` opens the archive as the zip it is,
reads ``data.pkl`` with a restricted unpickler that only rebuilds tensors from the archive's raw
storages and turns every scripted module into an inert attribute holder, and walks the module tree
into a flat ``name -> tensor`` dict - the same names ``state_dict()`` gives. The ``code/`` folder is
never read. Any other global in the pickle is refused.

LAION / open_clip releases are plain state dicts: ``open_clip_model.safetensors`` (read with
safetensors) or ``open_clip_pytorch_model.bin`` (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from zoo.checkpoint import CheckpointError, load_state_dict_strict, save_model_folder
from zoo.convert.check import ConversionCheck, account, left_behind
from zoo.convert.common import load_checkpoint

CLIP_FORMATS = ("openai_clip", "open_clip")
# tensors an OpenAI archive carries that are not weights of open_clip's CLIP (sizes, the causal mask)
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stands in for a scripted module/class: only keeps the attribute state the pickle gives it."""

    qualname = ""
    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageType:
    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return torch.as_strided(storage, tuple(size), tuple(stride), int(offset))


def _identity(value: Any, *_: Any) -> Any:
    return value


class _ArchiveUnpickler(pickle.Unpickler):
    """Builds tensors, containers and :class:`_ScriptObject` holders; refuses every other global."""

    def __init__(self, fh: Any, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(fh)
        self.archive, self.prefix, self.source = archive, prefix, source
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):  # a scripted class: an empty holder type (pickle's NEWOBJ needs a type)
            return type(name, (_ScriptObject,), {"qualname": f"{module}.{name}"})
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and name in ("restore_type_tag", "build_intlist", "build_doublelist",
                                                       "build_boollist", "build_tensorlist"):
            return _identity
        raise pickle.UnpicklingError(f"{self.source}: refused global {module}.{name} (only weights are read)")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self.source}: unexpected persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self.source}: storage {key} has no known dtype")
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            self.storages[key] = torch.frombuffer(raw, dtype=storage_type.dtype) if raw else torch.empty(
                0, dtype=storage_type.dtype)
        return self.storages[key]


def is_torchscript_archive(path: str | Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") for n in archive.namelist())


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive's module tree, by dotted name, without running it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{path}: not a TorchScript archive (not a zip file; truncated or corrupt?)") from exc
    with archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise CheckpointError(f"{path}: zip file without <name>/data.pkl: not a TorchScript archive")
        prefix = pkl[0][: -len("data.pkl")]
        try:
            with archive.open(pkl[0]) as fh:
                root = _ArchiveUnpickler(fh, archive, prefix, str(path)).load()
        except (pickle.UnpicklingError, KeyError, EOFError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read the archive's weights: {exc}") from exc
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, name: str) -> None:
        if isinstance(obj, torch.Tensor):
            tensors[name] = obj.clone()  # own memory: the storages are views of the zip's bytes
        elif isinstance(obj, _ScriptObject) and isinstance(obj.state, dict):
            for key, value in obj.state.items():
                walk(value, f"{name}.{key}" if name else str(key))

    walk(root, "")
    if not tensors:
        raise CheckpointError(f"{path}: the archive holds no tensors")
    return tensors


def _strip(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def read_clip_weights(path: str | Path, fmt: str) -> dict[str, torch.Tensor]:
    """The open_clip-named weights of a CLIP release file (``fmt``: ``openai_clip`` or ``open_clip``)."""
    path = Path(path)
    if fmt == "openai_clip" and is_torchscript_archive(path):
        state = read_torchscript_tensors(path)
        # the causal mask and size attributes are rebuilt by open_clip, not loaded
        return {k: v for k, v in state.items() if k not in _OPENAI_EXTRAS and not k.endswith("attn_mask")}
    state = load_checkpoint(path)  # safetensors, or torch.load(weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found a {type(state).__name__}")
    state = _strip(state)
    return {k: v for k, v in state.items() if k not in _OPENAI_EXTRAS}


def convert_clip(
    path: str | Path,
    fmt: str,
    arch_kwargs: dict[str, Any],
    name: str,
    out: str | Path | None = None,
    weights_source: str | None = None,
):
    """Build ``open_clip`` ``arch_kwargs['model_name']`` from a release file, strictly; optionally save it."""
    from zoo.clip import ClipModel

    if fmt not in CLIP_FORMATS:
        raise ValueError(f"unknown CLIP format {fmt!r}; known: {', '.join(CLIP_FORMATS)}")
    state = read_clip_weights(path, fmt)
    cfg = {"name": name, "method": "clip", "converted_from": fmt, "weights_source": weights_source or str(path)}
    model = ClipModel("open_clip", arch_kwargs, pretrained_cfg=cfg)
    # The same self-check as every other importer (zoo.convert.check): each tensor of the model is an
    # entry of the file, by name and shape, and nothing of the file is left unaccounted for.
    prefixed = {f"clip.{k}": v for k, v in state.items()}
    files = {id(v): k for k, v in state.items()}
    taken, absent = account(model.state_dict(), prefixed, files, {}, f"{path} ({fmt} format)")
    load_state_dict_strict(model, prefixed, f"{path} ({fmt} format)")
    model.pretrained_cfg["conversion_check"] = ConversionCheck(
        format=fmt, format_from=f"given (--format {fmt})", architecture="open_clip", arch_kwargs=dict(arch_kwargs),
        arch_from=[f"open_clip model {arch_kwargs.get('model_name')!r} given (arch_kwargs)"], taken=taken,
        absent=absent, file_tensors=len(files), left_behind=left_behind(files, set(taken.values())),
    ).to_config()
    model = model.float().eval()
    if out is not None:
        save_model_folder(model, out)
    return model
