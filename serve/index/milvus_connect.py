"""Connecting to Milvus: a server URI, or a local ``.db`` file that runs Milvus Lite in this process.

Errors name the URI (:class:`~serve.index.base.IndexUnreachableError`). Local files are reference
counted per process: closing the last index on a file stops its embedded engine (which flushes it),
so closing and reopening is a real restart of the engine.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from serve.index.base import URI_SCHEMES, IndexUnreachableError

_local_refs: dict[str, int] = {}
_local_lock = threading.Lock()


def _is_local(uri: str) -> bool:
    return not uri.startswith(URI_SCHEMES)


def _norm_uri(uri: str) -> str:
    """A local Milvus Lite file as an absolute path (so a folder pointing at it works from anywhere)."""
    return str(Path(uri).expanduser().resolve()) if _is_local(uri) else uri


def connect(uri: str, timeout: float = 10.0) -> Any:
    """A ``MilvusClient`` for ``uri``; :class:`IndexUnreachableError` naming it when it cannot connect."""
    try:
        from pymilvus import MilvusClient
    except ImportError as e:  # pragma: no cover - a serve dependency
        raise ImportError("the milvus index backend needs pymilvus and milvus-lite: "
                          "pip install 'selfsup-zoo[serve]' (or pymilvus milvus-lite)") from e
    uri = _norm_uri(uri)
    if _is_local(uri):
        if not uri.endswith(".db"):
            raise ValueError(f"Milvus URI {uri!r}: a local Milvus Lite file must end in .db (or give "
                             "http://host:19530 for a server)")
        if not Path(uri).parent.is_dir():
            raise IndexUnreachableError(f"cannot open Milvus Lite file {uri}: folder {Path(uri).parent} does not "
                                        "exist")
    import logging

    quiet = logging.getLogger("milvus_lite.server_manager")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its own traceback for a locked file; we say it in one line below
    try:
        client = MilvusClient(uri=uri, timeout=timeout)
        client.list_collections()
    except Exception as e:  # noqa: BLE001 - pymilvus raises MilvusException / grpc errors / OSError
        why = str(getattr(e, "message", None) or e).splitlines()[0][:300]
        hint = (" (Milvus Lite allows one process per file: is another zoo process using it?)"
                if _is_local(uri) else " (is the Milvus server running and reachable?)")
        raise IndexUnreachableError(f"cannot reach Milvus at {uri}: {why}{hint}") from None
    finally:
        quiet.setLevel(level)
    if _is_local(uri):
        with _local_lock:
            _local_refs[uri] = _local_refs.get(uri, 0) + 1
    return client


def _release(client: Any, uri: str) -> None:
    """Close the client; the last one of a local file also stops its embedded engine (flushing it)."""
    try:
        client.close()
    except Exception:  # noqa: BLE001 - already closed
        pass
    if not _is_local(uri):
        return
    with _local_lock:
        left = _local_refs.get(uri, 1) - 1
        if left > 0:
            _local_refs[uri] = left
            return
        _local_refs.pop(uri, None)
    try:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)
    except ImportError:  # pragma: no cover - a server URI never gets here
        pass
