"""Model folders in the Hugging Face layout, and pickle-free training states.

A model folder holds ``model.safetensors``, ``config.json`` and ``README.md`` (model card).
Every write goes to a temporary file in the same folder and is renamed into place, so a
crash never leaves a half-written file under the real name. Nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
FORMAT_VERSION = 1


_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(RuntimeError):
    """A checkpoint or model folder that cannot be read: the message names the file and the problem."""


# ----------------------------------------------------------------------------- atomic writes
def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Fill the yielded temporary folder (a sibling of ``path``); on success it takes ``path``'s place.

    A previous folder at ``path`` is moved aside (``.NAME.old-*``) and removed once the new one is
    in; if moving the new one in fails, the previous one is put back. On any error the temporary
    folder is removed and ``path`` is left as it was. The folder gets the usual permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old: Path | None = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not path.exists():
            os.rename(old, path)  # put the previous folder back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every platform has directory fds)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    # clone: safetensors refuses tensors that share memory (tied weights, views of one buffer)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file and its metadata; a missing, truncated or corrupt file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        size = path.stat().st_size
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({size} bytes; truncated or corrupt?): {exc}"
        ) from exc
    return tensors, metadata


# ----------------------------------------------------------------------------- nested states
def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tensors, numbers, strings) into tensors + a JSON skeleton.

    Used for optimizer and RNG states so that training checkpoints are safetensors too.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            name = f"t{len(tensors)}"  # counter, not the path: dict keys may contain dots
            tensors[name] = obj
            return {"__tensor__": name}
        if isinstance(obj, Mapping):
            keys = list(obj.keys())
            return {
                "__dict__": [[_encode_key(k), walk(obj[k], f"{key}.{_encode_key(k)[1]}")] for k in keys]
            }
        if isinstance(obj, (list, tuple)):
            items = [walk(v, f"{key}.{i}") for i, v in enumerate(obj)]
            return {"__tuple__": items} if isinstance(obj, tuple) else items
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if hasattr(obj, "tolist"):  # numpy arrays and scalars
            return {"__array__": obj.tolist(), "dtype": str(getattr(obj, "dtype", ""))}
        raise TypeError(f"cannot store object of type {type(obj).__name__} at {key!r} in a checkpoint")

    skeleton = walk(state, "s")
    return tensors, skeleton


def unflatten_state(tensors: Mapping[str, torch.Tensor], skeleton: Any) -> Any:
    def build(node: Any) -> Any:
        if isinstance(node, dict):
            if "__tensor__" in node:
                return tensors[node["__tensor__"]]
            if "__dict__" in node:
                return {_decode_key(k): build(v) for k, v in node["__dict__"]}
            if "__tuple__" in node:
                return tuple(build(v) for v in node["__tuple__"])
            if "__array__" in node:
                import numpy as np

                return np.asarray(node["__array__"], dtype=node["dtype"] or None)
        if isinstance(node, list):
            return [build(v) for v in node]
        return node

    return build(skeleton)


def _encode_key(key: Any) -> list:
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"unsupported state key {key!r}")
    return ["i", str(key)] if isinstance(key, int) else ["s", key]


def _decode_key(key: list) -> Any:
    kind, value = key
    return int(value) if kind == "i" else value


def save_state(path: str | os.PathLike, state: Any, metadata: dict[str, str] | None = None) -> Path:
    """Atomically save a nested training state (model, optimizer, RNG, counters) as safetensors."""
    tensors, skeleton = flatten_state(state)
    meta = dict(metadata or {})
    meta["state"] = json.dumps(skeleton)
    return atomic_save_tensors(path, tensors, meta)


def load_state(path: str | os.PathLike) -> Any:
    tensors, metadata = read_tensors(path)
    if "state" not in metadata:
        raise CheckpointError(f"{path}: safetensors file has no 'state' metadata; not a training checkpoint")
    return unflatten_state(tensors, json.loads(metadata["state"]))


# ----------------------------------------------------------------------------- model folders
def save_model_folder(model: torch.nn.Module, folder: str | os.PathLike, card: str | None = None) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``README.md`` for a :class:`zoo.model.ZooModel`."""
    from zoo.hub import render_model_card

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config()
    config["format_version"] = FORMAT_VERSION
    state = {k: v for k, v in model.state_dict().items()}
    atomic_save_tensors(folder / WEIGHTS_NAME, state, {"format": "pt"})
    atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    atomic_write_text(folder / CARD_NAME, card if card is not None else render_model_card(config))
    return folder


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (a model folder needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(config, dict) or "architecture" not in config:
        raise CheckpointError(f"{path}: missing the 'architecture' field")
    return config


def model_from_config(config: dict[str, Any]):
    from zoo.model import model_class

    cfg = {k: v for k, v in config.items() if k not in ("format_version",)}
    arch = cfg.pop("architecture")
    return model_class(arch)(
        arch=arch,
        arch_kwargs=cfg.pop("arch_kwargs", {}),
        num_clusters=cfg.pop("num_clusters", None),
        num_cluster_heads=cfg.pop("num_cluster_heads", 1),
        pretrained_cfg=cfg,
    )


def load_state_dict_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; any missing/unexpected key or shape mismatch raises CheckpointError."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_name_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_name_keys(unexpected)}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]) + (" ..." if len(shapes) > 5 else ""))
        raise CheckpointError(f"{source}: weights do not fit the model: " + " | ".join(parts))
    model.load_state_dict(state, strict=True)


def _name_keys(keys: list[str], limit: int = 12) -> str:
    """The keys themselves (not their groups): the first ``limit`` by name, then how many more."""
    shown = ", ".join(keys[:limit])
    return f"({len(keys)}) {shown}" + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def load_model_folder(folder: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Load a model folder written by :func:`save_model_folder` (or converted/published later)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: model folder not found")
    config = read_config(folder)
    try:
        model = model_from_config(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / CONFIG_NAME}: cannot build the model it describes: {exc}") from exc
    tensors, _ = read_tensors(folder / WEIGHTS_NAME)
    load_state_dict_strict(model, tensors, str(folder / WEIGHTS_NAME))
    return model.to(map_location).eval()
