"""``zoo embed``: features of an image folder or a dataset, one shard per process, as one feature folder.

``zoo embed MODEL --images DIR --out FEATS [--nproc N]`` (or ``--data NAME [--split train]``) writes the
feature folder that ``zoo index build MODEL --features FEATS`` reads (``serve/index/features.py``):

- ``features.npy``: float32 ``[N,D]``, the raw encoder output (``model.forward_features``, not L2-normalised;
  the index normalises), rows in dataset order: a folder's readable images sorted by path, or a
  dataset's indices ``0..N-1``;
- ``items.json``: ``N`` strings, a file's path relative to the folder (POSIX) or ``"NAME/SPLIT/i"``;
- ``labels.npy``: int64 ``[N]`` when the source is labelled (class subfolders, a labelled dataset);
- ``meta.json``: ``model_name``, ``model_source``, ``preprocess`` (input_size, mean, std, crop_pct,
  interpolation: what the index records and refuses to mix), ``dim``, ``count``, ``source``, ``processes``.

With ``W`` processes (torchrun, or ``--nproc``) rank ``r`` embeds the contiguous share
``[r*N/W, (r+1)*N/W)`` of the file list or dataset and writes ``features-<r>.npy`` / ``items-<r>.json`` /
``labels-<r>.npy`` (zero-padded ranks, so sorted order is rank order, which the index also reads
as is); rank 0 then merges the shards into the single file set above (``merge=False`` keeps the shards
for very large runs: the index reads them in order without loading a merged copy). Unreadable files
are checked by the rank that owns them (a full decode), skipped, and reported by rank 0.
The merge writes the merged files under hidden names, removes the shards, then renames the merged
files into place and writes ``meta.json`` last: an interrupted run never leaves both layouts side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from train import distributed

__all__ = ["cli_embed", "embed", "embed_into_collection"]

_OUR_FILES = ("features*.npy", "items*.json", "labels*.npy", "meta.json")
PREPROCESS_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation")


def _resolve_model(spec: Any) -> tuple[Any, str]:
    """(ZooModel, source): a ZooModel as is, or a MODEL argument (registered name, folder, ``hf-hub:``)."""
    import zoo

    if isinstance(spec, zoo.ZooModel):
        return spec, str(spec.pretrained_cfg.get("name") or spec.arch)
    spec = str(spec)
    if Path(spec).expanduser().is_dir():
        return zoo.resolve_model(spec), str(Path(spec).expanduser().resolve())
    if not spec.startswith("hf-hub:") and not zoo.get_entry(spec).weights:
        raise ValueError(f"model {spec!r} has no pretrained weights: features of a randomly initialised model "
                         "could not be matched by any later query")
    return zoo.resolve_model(spec), spec


def _folder_shard(root: Path, transform: Any, select: Callable[[int, int], np.ndarray] | None = None,
                  ids_out: list[int] | None = None) -> tuple[Any, list[str], list[str], bool, int]:
    """This rank's share of an image folder: (dataset, items, skipped paths, labelled, files listed).

    ``select(lo, hi)``: the positions of the sorted file list to embed (default: all of ``[lo, hi)``);
    ``ids_out`` receives the position of every kept file (its id in a collection)."""
    from zoo.data.base import ZooDataset
    from zoo.data.folder import ImageFolderDataset, check_image, find_images

    candidates = find_images(root)
    if not candidates:
        raise ValueError(f"no image files in {str(root)!r}")
    rel = [p.relative_to(root).parts for p in candidates]
    labelled = all(len(parts) >= 2 for parts in rel)  # the same rule as the imagefolder dataset
    classes = sorted({parts[0] for parts in rel}) if labelled else []
    class_index = {c: i for i, c in enumerate(classes)}
    lo, hi = distributed.shard_range(len(candidates))
    wanted = select(lo, hi) if select is not None else np.arange(lo, hi)
    paths, targets, items, skipped = [], [], [], []
    for i in wanted.tolist():
        p, parts = candidates[i], rel[i]
        if check_image(p, full=True) is not None:
            skipped.append(str(p))
            continue
        if ids_out is not None:
            ids_out.append(i)
        paths.append(str(p))
        targets.append(class_index[parts[0]] if labelled else -1)
        try:
            items.append(p.resolve().relative_to(root).as_posix())
        except ValueError:  # a symlink out of the folder: the absolute path, as the index names it
            items.append(str(p.resolve()))

    class _Shard(ImageFolderDataset):
        def __init__(self) -> None:  # noqa: D107 - the folder's listing is already made
            ZooDataset.__init__(self, "imagefolder", "train", targets, classes, transform)
            self.root, self.paths, self.skipped = str(root), paths, skipped

    return _Shard(), items, skipped, labelled, len(candidates)


def _dataset_shard(name: str, split: str, transform: Any, select: Callable[[int, int], np.ndarray] | None = None,
                   ids_out: list[int] | None = None) -> tuple[Any, list[str], bool, int]:
    """This rank's share of a named dataset: (subset, items, labelled, dataset size); ``select`` and
    ``ids_out`` as in :func:`_folder_shard`."""
    from torch.utils.data import Subset

    from zoo.data import load_dataset

    ds = load_dataset(name, split=split, transform=transform)
    lo, hi = distributed.shard_range(len(ds))
    wanted = (select(lo, hi) if select is not None else np.arange(lo, hi)).tolist()
    if ids_out is not None:
        ids_out.extend(wanted)
    labelled = bool(np.any(np.asarray(ds.targets) >= 0))
    return Subset(ds, wanted), [f"{name}/{split}/{i}" for i in wanted], labelled, len(ds)


def _existing(folder: Path) -> list[Path]:
    return sorted({p for pattern in _OUR_FILES for p in folder.glob(pattern)})


def _write_npy(path: Path, array: np.ndarray) -> None:
    from zoo.checkpoint import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    atomic_write(path, write)


def _merge_shards(folder: Path, world: int, labelled: bool) -> int:
    """Rank 0: shards ``-00000 .. -<world-1>`` -> ``features.npy``, ``items.json`` (+ ``labels.npy``); returns N."""
    from zoo.checkpoint import atomic_write, atomic_write_text

    suffixes = [f"-{r:05d}" for r in range(world)]
    parts = [np.load(folder / f"features{s}.npy", mmap_mode="r", allow_pickle=False) for s in suffixes]
    n, dim = sum(p.shape[0] for p in parts), parts[0].shape[1]
    items: list[str] = []
    for s in suffixes:
        items += json.loads((folder / f"items{s}.json").read_text(encoding="utf-8"))
    hidden = {name: folder / f".merged-{name}" for name in ("features.npy", "items.json", "labels.npy")}

    def write_features(tmp: str) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        start = 0
        for p in parts:  # one shard in memory at a time
            out[start : start + p.shape[0]] = p
            start += p.shape[0]
        out.flush()
        del out

    atomic_write(hidden["features.npy"], write_features)
    atomic_write_text(hidden["items.json"], json.dumps(items, ensure_ascii=False))
    if labelled:
        labels = np.concatenate([np.load(folder / f"labels{s}.npy", allow_pickle=False) for s in suffixes])
        _write_npy(hidden["labels.npy"], labels.astype(np.int64))
    parts.clear()  # release the memory maps before the shard files go
    for s in suffixes:
        for name in (f"features{s}.npy", f"items{s}.json", f"labels{s}.npy"):
            (folder / name).unlink(missing_ok=True)
    for name, path in hidden.items():
        if path.exists():
            os.replace(path, folder / name)
    return n


def embed(
    model: Any,
    out: str | os.PathLike,
    images: str | os.PathLike | None = None,
    data: str | None = None,
    split: str = "train",
    batch_size: int = 256,
    device: str = "auto",
    merge: bool = True,
    overwrite: bool = False,
    num_workers: int = 0,
    progress: bool = True,
) -> Path:
    """Embed ``images`` (a folder) or ``data`` (a dataset name) with ``model`` into the feature folder ``out``.

    Runs on every rank of a torchrun job (one shard each; see the module docstring) or on one process.
    ``model``: a ZooModel or a MODEL argument. ``overwrite`` replaces an existing feature folder's files
    (otherwise they are an error). Returns ``out``.
    """
    from zoo.checkpoint import atomic_write_text
    from zoo.data import transform_for
    from zoo.eval import extract_features

    if (images is None) == (data is None):
        raise ValueError("give exactly one of images (a folder) or data (a dataset name)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = distributed.setup(device)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    folder = Path(out).expanduser()
    # Rank 0 checks (and with overwrite clears) the output folder; every rank learns the outcome.
    problem = None
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        found = _existing(folder)
        if found and not overwrite:
            problem = (f"{folder} already holds a feature folder ({', '.join(p.name for p in found[:4])}); "
                       "pass --overwrite to replace it")
        for p in found if overwrite else []:
            p.unlink()
    problem = distributed.broadcast_object(problem)
    if problem:
        raise ValueError(problem)

    zmodel, model_source = _resolve_model(model)
    zmodel = zmodel.to(dev).eval()
    tf = transform_for(zmodel)
    skipped: list[str] = []
    if images is not None:
        root = Path(images).expanduser().resolve()
        if not root.is_dir():
            raise ValueError(f"--images {str(images)!r} is not a directory")
        ds, items, skipped, labelled, listed = _folder_shard(root, tf)
        source: dict[str, Any] = {"images": str(root), "files": listed}
    else:
        ds, items, labelled, listed = _dataset_shard(str(data), split, tf)
        source = {"data": data, "split": split}
    if len(ds):
        feats = extract_features(zmodel, ds, batch_size=batch_size, device=dev, num_workers=num_workers,
                                 progress=progress and rank == 0)
        x, labels = feats["features"].astype(np.float32), feats["labels"].astype(np.int64)
    else:  # a shard of unreadable files only (or more ranks than items)
        x, labels = np.zeros((0, zmodel.num_features), np.float32), np.zeros(0, np.int64)
    suffix = f"-{rank:05d}" if world > 1 else ""
    _write_npy(folder / f"features{suffix}.npy", x)
    atomic_write_text(folder / f"items{suffix}.json", json.dumps(items, ensure_ascii=False))
    if labelled:
        _write_npy(folder / f"labels{suffix}.npy", labels)
    gathered = _gather_objects((len(items), skipped))  # also a barrier: every shard is on disk
    n = sum(count for count, _ in gathered)
    all_skipped = [path for _, part in gathered for path in part]
    if rank == 0:
        if world > 1 and merge:
            _merge_shards(folder, world, labelled)
        if all_skipped:
            source["skipped"] = len(all_skipped)
            shown = "; ".join(all_skipped[:5]) + (f" and {len(all_skipped) - 5} more" if len(all_skipped) > 5 else "")
            warnings.warn(f"skipped {len(all_skipped)} unreadable image file(s): {shown}", stacklevel=2)
        meta = {
            "model_name": str(zmodel.pretrained_cfg.get("name") or zmodel.arch),
            "model_source": model_source,
            "preprocess": {k: zmodel.pretrained_cfg.get(k) for k in PREPROCESS_KEYS},
            "dim": int(zmodel.num_features),
            "count": int(n),
            "source": source,
            "processes": world,
            "shards": world if world > 1 and not merge else 1,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2) + "\n")
    distributed.barrier()  # the folder is complete for everyone
    return folder


def embed_into_collection(
    model: Any,
    uri: str,
    collection: str = "zoo_index",
    images: str | os.PathLike | None = None,
    data: str | None = None,
    split: str = "train",
    index_type: str = "auto",
    target_recall: float = 0.95,
    memory_budget_mb: float = 1024.0,
    seed: int = 0,
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int = 0,
    progress: bool = True,
    hooks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Embed ``images`` or ``data`` straight into the Milvus collection ``collection`` at ``uri``, one shard per rank.

    Rank ``r`` of ``W`` embeds the contiguous share ``[r*N/W, (r+1)*N/W)`` of the dataset (or of the sorted
    file list) and inserts it with ids = those global positions (an unreadable file leaves its id
    unused), so the collection equals a one-process build. Only ids not yet in the collection are
    embedded and inserted: a rerun after a killed rank completes the build, nothing twice. Rank 0
    then indexes, tunes and publishes it (``serve.index.milvus_shards``); until then searches see
    the collection as it was. Server URIs take every rank's inserts at once; a Milvus Lite ``.db``
    allows one process per file, so the ranks' inserts take turns (an ``fcntl`` lock next to the
    file). Returns ``{"inserted": rows (all ranks), "already": rows found there, "info": ...}`` (``info``
    on rank 0 only).
    """
    from serve.index import milvus_shards
    from serve.index.build import _model_name, _preprocess_config
    from zoo.data import load_dataset, transform_for
    from zoo.data.folder import find_images
    from zoo.eval import extract_features

    if (images is None) == (data is None):
        raise ValueError("give exactly one of images (a folder) or data (a dataset name)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    dev = distributed.setup(device)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    zmodel, model_source = _resolve_model(model)
    zmodel = zmodel.to(dev).eval()
    tf = transform_for(zmodel)
    root = Path(images).expanduser().resolve() if images is not None else None
    if root is not None and not root.is_dir():
        raise ValueError(f"--images {str(images)!r} is not a directory")
    plan: Any = None
    if rank == 0:  # the same checks and metadata as a one-process build, before anything is written
        try:
            meta: dict[str, Any]
            if root is not None:
                names = [p.relative_to(root).as_posix() for p in find_images(root)]
                n_ids, labelled = len(names), bool(names) and all("/" in s for s in names)
                key = {"images": str(root), "files": hashlib.sha256(json.dumps(names).encode()).hexdigest()}
                meta = {"images": str(root)}
                classes = sorted({s.split("/")[0] for s in names}) if labelled else []
            else:
                full = load_dataset(str(data), split=split, transform=None)
                n_ids, labelled = len(full), bool(np.any(np.asarray(full.targets) >= 0))
                key = meta = {"data": data, "split": split}
                classes = list(getattr(full, "classes", None) or [])
            if classes:
                meta = {**meta, "classes": classes}
            plan = milvus_shards.prepare(
                uri, collection, model_name=_model_name(zmodel), model_source=model_source,
                preprocess=_preprocess_config(zmodel), dim=int(zmodel.num_features), n_ids=n_ids,
                source={**key, "n": n_ids}, has_labels=labelled, index_type=index_type,
                memory_budget_mb=memory_budget_mb, target_recall=target_recall, seed=seed, progress=progress)
            plan.extra_meta = {"source": meta, "processes": world}
        except Exception as e:  # every rank stops with the reason
            distributed.broadcast_object(f"{type(e).__name__}: {e}")
            raise
    plan = distributed.broadcast_object(plan)
    if isinstance(plan, str):
        raise ValueError(f"rank 0 refused the build: {plan}")
    ids: list[int] = []
    wanted: list[int] = []

    def select(lo: int, hi: int) -> np.ndarray:  # only what the collection lacks: a rerun resumes
        todo = milvus_shards.missing_ids(plan, lo, hi)
        wanted.extend([hi - lo - len(todo)])
        return todo

    skipped: list[str] = []
    if root is not None:
        ds, items, skipped, _, _ = _folder_shard(root, tf, select, ids)
    else:
        ds, items, _, _ = _dataset_shard(str(data), split, tf, select, ids)
    if len(ds):
        out = extract_features(zmodel, ds, batch_size=batch_size, device=dev, num_workers=num_workers,
                               progress=progress and rank == 0)
        x, labels = out["features"], out["labels"] if plan.has_labels else None
    else:
        x, labels = np.zeros((0, plan.dim), np.float32), None
    inserted = milvus_shards.insert(plan, x, ids, items, labels, progress=progress and rank == 0, hooks=hooks)
    gathered = _gather_objects((inserted, wanted[0] if wanted else 0, skipped))  # every rank inserted
    result: dict[str, Any] = {"inserted": sum(g[0] for g in gathered), "already": sum(g[1] for g in gathered),
                              "info": None}
    if rank == 0:
        all_skipped = [p for g in gathered for p in g[2]]
        if all_skipped:
            plan.extra_meta["source"]["skipped"] = len(all_skipped)
            warnings.warn(f"skipped {len(all_skipped)} unreadable image file(s): {'; '.join(all_skipped[:5])}",
                          stacklevel=2)
        result["info"] = milvus_shards.finish(plan, progress=progress, t0=t0)
    return result


def _gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (small lists; in memory between our own ranks)."""
    if not distributed.is_distributed():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * distributed.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- CLI
def cli_embed(args: argparse.Namespace) -> int:
    """``zoo embed`` (flags in ``train/cli.py``): under ``--nproc N`` re-runs itself on N processes with torchrun."""
    if args.nproc is not None and not _under_torchrun():
        argv = distributed.argv_from_namespace(args, args._parser)
        return distributed.launch(args.nproc, ["embed", *argv])
    if getattr(args, "uri", None):
        return _cli_embed_collection(args)
    if not args.out:
        raise ValueError("zoo embed needs --out FEATS (a feature folder) or --uri URI (a Milvus collection)")
    try:
        folder = embed(args.model, args.out, images=args.images, data=args.data, split=args.split,
                       batch_size=args.batch_size, device=args.device, merge=not args.no_merge,
                       overwrite=args.overwrite, num_workers=args.workers, progress=not args.quiet)
        rank = distributed.get_rank()
    finally:
        distributed.cleanup()
    if rank == 0:
        meta = json.loads((folder / "meta.json").read_text())
        print(f"feature folder: {folder} ({meta['count']} items, dim {meta['dim']}, {meta['processes']} process(es))")
    return 0


def _cli_embed_collection(args: argparse.Namespace) -> int:
    """``zoo embed ... --uri URI [--collection NAME]``: every rank inserts its shard into the collection."""
    if args.out or args.no_merge or args.overwrite:
        raise ValueError("--uri writes into a collection (rebuilt, the alias moved when done): --out, --no-merge "
                         "and --overwrite are for a feature folder")
    try:
        res = embed_into_collection(
            args.model, args.uri, args.collection, images=args.images, data=args.data, split=args.split,
            index_type=args.type, target_recall=args.target_recall, memory_budget_mb=args.memory_budget_mb,
            batch_size=args.batch_size, device=args.device, num_workers=args.workers, progress=not args.quiet)
    finally:
        distributed.cleanup()
    info = res["info"]
    if info is not None:
        params = ", ".join(f"{k}={v}" for k, v in info["search_params"].items()) or "exact"
        print(f"collection {info['collection']} at {info['uri']}: {info['ntotal']} items, {info['index_type']} "
              f"({params}), dim {info['dim']}, model {info['model_name']}; inserted {res['inserted']} row(s) "
              f"on {info.get('processes', 1)} process(es), {res['already']} already there. "
              f"Search it: zoo index search '{info['uri']}#{info['collection']}' IMAGE")
    return 0


def _under_torchrun() -> bool:
    from train.cli import under_torchrun

    return under_torchrun()
