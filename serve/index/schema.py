"""The schema of an index folder's ``meta.json``, checked before any value is used.

A small explicit validator (no dependency): every key has a type and a range, some are required
per backend, and the first violation is an :class:`~serve.index.base.IndexFileError` naming the
file, the key, what it must be and the value found (``"dim" must be an integer >= 1, got null``).
Unknown keys are allowed (newer writers may add some), but known keys must be well-formed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve.index.base import BACKENDS, FORMAT_NAME, FORMAT_VERSION, META_FILE, IndexFileError, _read_json

Check = Callable[[Any], bool]
INDEX_KINDS = ("flat", "hnsw", "ivf", "ivfpq")


def _int(lo: int) -> tuple[str, Check]:
    return f"an integer >= {lo}", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _str() -> tuple[str, Check]:
    return "a non-empty string", lambda v: isinstance(v, str) and bool(v)


def _enum(values: tuple[str, ...]) -> tuple[str, Check]:
    return "one of " + ", ".join(map(repr, values)), lambda v: v in values


def _obj(nullable: bool = False) -> tuple[str, Check]:
    return "a JSON object" + (" or null" if nullable else ""), lambda v: isinstance(v, dict) or (nullable and v is None)


def _str_or_null() -> tuple[str, Check]:
    return "a string or null", lambda v: v is None or isinstance(v, str)


def _search_params() -> tuple[str, Check]:
    return ("an object of integer parameters (efSearch, nprobe)",
            lambda v: isinstance(v, dict) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                                                  for x in v.values()))


def _checksums() -> tuple[str, Check]:
    return ("an object of file name -> SHA-256 hex digest",
            lambda v: isinstance(v, dict) and all(isinstance(d, str) and len(d) == 64 for d in v.values()))


# key -> (what it must be, check); REQUIRED lists the keys each backend cannot do without.
FIELDS: dict[str, tuple[str, Check]] = {
    "format": ("the string " + repr(FORMAT_NAME), lambda v: v == FORMAT_NAME),
    "format_version": (f"an integer between 1 and {FORMAT_VERSION} (newer versions need a newer selfsup-zoo)",
                       lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= FORMAT_VERSION),
    "backend": _enum(BACKENDS),
    "model_name": _str(),
    "model_source": _str_or_null(),
    "index_type": _enum(INDEX_KINDS),
    "dim": _int(1),
    "ntotal": _int(0),
    "next_id": _int(0),
    "tombstones": _int(0),
    "preprocess": _obj(nullable=True),
    "search_params": _search_params(),
    "build_params": _obj(),
    "tuning": _obj(),
    "source": _obj(),
    "files": _checksums(),
    "uri": _str(),
    "collection": _str(),
    "created_at": _str_or_null(),
    "updated_at": _str_or_null(),
    "seed": _int(0),
}
REQUIRED = {
    "faiss": ("format", "model_name", "index_type", "dim", "next_id", "files"),
    "milvus": ("format", "backend", "model_name", "index_type", "dim", "uri", "collection"),
}


def validate_meta(meta: Any, path: Path | str) -> dict[str, Any]:
    """``meta`` if it is a valid index ``meta.json`` (``path`` names it in errors), else ``IndexFileError``."""
    if not isinstance(meta, dict):
        raise IndexFileError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT_NAME:
        raise IndexFileError(f"{path}: not a selfsup-zoo index (format {meta.get('format')!r})")
    backend = meta.get("backend", "faiss")
    if backend not in REQUIRED:
        raise IndexFileError(f"{path}: \"backend\" must be {FIELDS['backend'][0]}, got {_show(backend)}")
    missing = [k for k in REQUIRED[backend] if k not in meta]
    if missing:
        raise IndexFileError(f"{path}: missing keys {missing}")
    for key, (what, check) in FIELDS.items():
        if key in meta and not check(meta[key]):
            raise IndexFileError(f"{path}: \"{key}\" must be {what}, got {_show(meta[key])}")
    return meta


def read_meta(folder: Path) -> dict[str, Any]:
    """The validated ``meta.json`` of an index folder (errors name the folder or the file)."""
    if not folder.is_dir():
        hint = ""
        if folder.parent.is_dir():
            aside = sorted(folder.parent.glob(f".{folder.name}.old-*"))
            if aside:
                hint = f" (an interrupted save left the previous index at {aside[-1]})"
        raise IndexFileError(f"index folder {folder} not found{hint}")
    path = folder / META_FILE
    return validate_meta(_read_json(path), path)


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
