"""``zoo index build|search|add|remove|info`` (flags in serve/cli.py), on any backend."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serve.index.base import FeatureIndex, SearchResult, is_uri
from serve.index.build import _embed_source, _model_for_index, _model_name, build_index, embed_images


def _report_skipped(skipped: list[str]) -> None:
    """Print the unreadable files that were skipped, with the reason, on stderr."""
    if skipped:
        from zoo.data.folder import check_image

        lines = [f"{p} ({check_image(p, full=True) or 'unreadable'})" for p in skipped[:20]]
        more = f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        print(f"skipped {len(skipped)} unreadable image file(s):\n  " + "\n  ".join(lines) + more, file=sys.stderr)


def _summary(index: FeatureIndex) -> str:
    tuning = index.meta.get("tuning") or {}
    params = ", ".join(f"{k}={v}" for k, v in index.search_params.items()) or "exact"
    rec = tuning.get("recall_at_10")
    rec_s = f", tuned recall@10={rec:.3f}" if rec is not None and index.index_type != "flat" else ""
    return f"{index.ntotal} items, {index.index_type} ({params}{rec_s}), dim {index.dim}, model {index.model_name}"


def _print_results(paths: Sequence[str], result: SearchResult, as_json: bool) -> None:
    rows = result.to_list()
    if as_json:
        print(json.dumps([{"query": str(p), "results": r} for p, r in zip(paths, rows)], indent=2))
        return
    from zoo.cli import format_table

    for p, r in zip(paths, rows):
        print(f"query: {p}")
        cols = ["rank", "score", "id", "item"] + (["label"] if result.labels is not None else [])
        print(format_table(r, cols))
        print()


def cli_index(args: Any) -> int:
    """``zoo index build|search|add|remove|info`` (flags in serve/cli.py)."""
    cmd = args.index_cmd
    if cmd == "build":
        t0 = time.perf_counter()
        backend = getattr(args, "backend", None) or "faiss"
        options: dict[str, Any] = {}
        if backend != "faiss":
            if not getattr(args, "uri", None):
                raise ValueError(f"--backend {backend} needs --uri (a Milvus Lite file like ./zoo.db, or a "
                                 "server like http://host:19530)")
            options = {"uri": args.uri, "collection": getattr(args, "collection", None) or _collection_name(args.out)}
        elif getattr(args, "uri", None):
            raise ValueError("--uri is for a database backend: add --backend milvus")
        index = build_index(
            args.model, images=args.images, data=args.data, split=args.split, index_type=args.type,
            features=args.features, memory_budget_mb=args.memory_budget_mb, target_recall=args.target_recall,
            batch_size=args.batch_size, progress=True, backend=backend, **options,
        )
        _report_skipped(index.skipped)
        path = index.save(args.out)
        print(f"built {path}: {_summary(index)} in {time.perf_counter() - t0:.1f} s")
        return 0
    index = FeatureIndex.load(args.index)
    try:
        return _on_index(cmd, index, args)
    finally:
        index.close()  # a database backend: close the connection (Milvus Lite: stop and flush the engine)


def _on_index(cmd: str, index: FeatureIndex, args: Any) -> int:
    """``zoo index search|add|remove|info`` on an opened index."""
    if cmd == "info":
        info = index.info()
        if not is_uri(args.index):
            info["size_bytes"] = sum(p.stat().st_size for p in Path(args.index).iterdir() if p.is_file())
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    if cmd == "search":
        model = _model_for_index(index)
        q = embed_images(model, args.images, index.preprocess)
        result = index.search(q, k=args.k, model_name=_model_name(model))
        _print_results(args.images, result, args.json)
        return 0
    if cmd == "add":
        model = _model_for_index(index)
        root = (index.meta.get("source") or {}).get("images")
        x, items, labels, skipped, _, _ = _embed_source(
            model, args.images, args.data, args.split, getattr(args, "batch_size", 128), None, True,
            item_root=Path(root) if root else None,
        )
        _report_skipped(skipped)
        keep = ~index.contains(items)
        if not keep.all():
            print(f"{int((~keep).sum())} item(s) already in the index, not added again", file=sys.stderr)
        new = index.add(x[keep], [it for it, k in zip(items, keep) if k],
                        labels=None if labels is None else labels[keep], model_name=_model_name(model))
        _save(index, args.index)
        print(f"added {len(new)} item(s) (ids {new[0]}..{new[-1]}): {_summary(index)}" if len(new)
              else f"nothing added: {_summary(index)}")
        return 0
    if cmd == "remove":
        present = index.contains(list(args.items))
        keys: list[int | str] = []
        for tok, known in zip(args.items, present):
            # an existing item name wins over an id reading of the same token
            keys.append(tok if known or not tok.lstrip("-").isdigit() else int(tok))
        n = index.remove(keys)
        _save(index, args.index)
        print(f"removed {n} item(s): {_summary(index)}")
        return 0
    raise ValueError(f"unknown index command {cmd!r}")  # pragma: no cover - argparse restricts it


def _save(index: FeatureIndex, location: str) -> None:
    """Write back an index opened from a folder (a ``URI#collection`` has no folder: the database holds it)."""
    if not is_uri(location):
        index.save(location)


def _collection_name(out: str) -> str:
    """A Milvus collection name from the index folder's name (letters, digits and ``_``)."""
    import re

    name = re.sub(r"[^0-9A-Za-z_]", "_", Path(out).resolve().name) or "zoo_index"
    return name if not name[0].isdigit() else f"zoo_{name}"
