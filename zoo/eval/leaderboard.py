"""The leaderboard: every available model evaluated on one dataset with the same protocols.

``zoo leaderboard --data mnist5k`` evaluates each registered model whose weights are available
offline (shipped in the package, or an official checkpoint already fetched: its converted folder in
the zoo cache, or the raw file in the torch hub cache) plus any model folders named with
``--models``, with :func:`zoo.eval.evaluate` (each model sees the dataset through its own
``transform_for``, so input size and channels always fit), and writes ``leaderboard_<data>.md`` and
``.json`` sorted by a main metric. Results are cached per model in ``<out>/<data>/<model>.json``,
keyed by the protocols, their options and the SHA-256 of the weights file: a second run only
evaluates what changed (``force=True`` re-evaluates everything).
"""

from __future__ import annotations

import glob
import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo.checkpoint import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, atomic_write_text, file_sha256, read_config

__all__ = [
    "Candidate",
    "default_protocols",
    "find_models",
    "main_metric",
    "render_markdown",
    "run_leaderboard",
    "update_cards",
    "update_docs",
]

# Preferred main metrics, in order; the first one any row has sorts the table.
MAIN_METRICS = ("linear_top1", "knn_top1", "lt_linear_top1", "lt_knn_top1", "kmeans_acc", "head_acc")
_FIXED_COLUMNS = ("knn_top1", "linear_top1", "kmeans_acc", "kmeans_nmi", "kmeans_ari", "head_acc", "head_nmi",
                  "head_ari")
_CACHE_VERSION = 1


@dataclass
class Candidate:
    """A model the leaderboard may evaluate: a registered name or a model folder."""

    id: str  # registered name, or the folder path as given
    name: str  # display name
    method: str | None
    arch: str | None
    folder: Path | None  # where the weights live (None until an official checkpoint is converted)
    skip: str | None = None  # why it cannot be evaluated offline

    def load(self) -> Any:
        import zoo

        if self.folder is not None and self.id == str(self.folder):
            return zoo.create_model(self.id)
        return zoo.create_model(self.id, pretrained=True)


def _registered_candidate(name: str) -> Candidate:
    from zoo import registry

    entry = registry.get_entry(name)
    cand = Candidate(name, name, entry.method, entry.arch, None)
    kind, _, where = (entry.weights or "").partition(":")
    if kind == "package":
        cand.folder = registry.WEIGHTS_DIR / where
    elif kind == "url":
        folder = registry.zoo_cache_dir() / name
        if (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
            cand.folder = folder
        elif not registry.hub_checkpoint_path(where, entry.checkpoint_name).is_file():
            cand.skip = (f"official weights not available offline (no converted folder at {folder}, no checkpoint "
                         f"at {registry.hub_checkpoint_path(where, entry.checkpoint_name)}); "
                         f"run zoo.create_model({name!r}, pretrained=True) once with network")
    else:
        cand.skip = f"unsupported weights source {entry.weights!r}"
    return cand


def _folder_candidate(path: Path) -> Candidate:
    config = read_config(path)
    return Candidate(str(path), config.get("name") or str(path), config.get("method"), config.get("architecture"),
                     path)


def find_models(patterns: str | Sequence[str] | None = None) -> tuple[list[Candidate], list[Candidate]]:
    """``(available, skipped)`` candidates.

    ``patterns``: None (every registered model with weights), or shell-style patterns (a
    comma-separated string or a list). A pattern with a path separator, or naming an existing
    directory, matches model folders (``runs/bench/shapes_e8/*/model``: folders holding a
    ``config.json``); any other pattern matches registered names with weights
    (``zoo.list_models(pattern, pretrained=True)``). A pattern that matches nothing is an error.
    """
    from zoo import registry

    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    patterns = list(patterns or [])
    ids: list[Candidate] = []
    if not patterns:
        ids = [_registered_candidate(n) for n in registry.list_models(pretrained=True)]
    for pattern in patterns:
        if "/" in pattern or Path(pattern).is_dir():
            matches = [Path(m) for m in sorted(glob.glob(pattern))]
            folders = [m for m in matches if (m / CONFIG_NAME).is_file() and (m / WEIGHTS_NAME).is_file()]
            if not folders:
                raise ValueError(f"--models {pattern!r}: no model folder (config.json + model.safetensors) matches")
            ids += [_folder_candidate(f) for f in folders]
        else:
            names = registry.list_models(pattern, pretrained=True)
            if not names:
                raise ValueError(f"--models {pattern!r} matches no registered model with weights "
                                 f"(zoo list --pretrained lists them)")
            ids += [_registered_candidate(n) for n in names]
    seen: set[str] = set()
    unique = [c for c in ids if not (c.id in seen or seen.add(c.id))]  # type: ignore[func-returns-value]
    return [c for c in unique if c.skip is None], [c for c in unique if c.skip is not None]


def default_protocols(dataset: str, **dataset_kwargs: Any) -> tuple[str, ...]:
    """Every protocol that applies to ``dataset``: kNN, linear, k-means, few-shot; ``rlp`` when its
    test split has concept labels; ``longtail`` for a long-tailed (``*_lt*``) dataset."""
    from zoo.data import load_dataset
    from zoo.data.longtail import parse_longtail_name

    protocols = ["knn", "linear", "kmeans", "fewshot"]
    test = load_dataset(dataset, "test", **dataset_kwargs)
    if getattr(test, "concepts", None) and parse_longtail_name(dataset) is None:
        protocols.append("rlp")
    if parse_longtail_name(dataset) is not None:
        protocols.append("longtail")
    return tuple(protocols)


def _cache_file(out: Path, dataset: str, cand: Candidate) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", cand.id).strip("_") or "model"
    return out / dataset / f"{safe}.json"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def main_metric(rows: Sequence[dict[str, Any]]) -> str | None:
    """The first of :data:`MAIN_METRICS` that some row has (else the first numeric metric)."""
    for key in MAIN_METRICS:
        if any(_is_number(r.get(key)) for r in rows):
            return key
    for r in rows:
        for key, value in r.get("metrics", r).items():
            if _is_number(value):
                return key
    return None


def run_leaderboard(
    dataset: str,
    protocols: str | Iterable[str] | None = None,
    models: str | Sequence[str] | None = None,
    out: str | Path = "leaderboard",
    sort: str | None = None,
    force: bool = False,
    batch_size: int = 256,
    device: Any = None,
    progress: bool = True,
    seed: int = 0,
    rlp_clusters: int | None = None,
    fewshot_ways: int | None = None,
    fewshot_shots: Sequence[int] = (1, 5),
    fewshot_episodes: int = 600,
    log: Any = print,
    **dataset_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate every available model (:func:`find_models`) on ``dataset``; write the table and JSON.

    ``protocols`` defaults to :func:`default_protocols`. Writes ``<out>/leaderboard_<dataset>.md`` and
    ``.json``; returns the board: ``{"dataset", "protocols", "sort", "rows", "skipped", "markdown",
    "paths"}``. Rows are sorted by ``sort`` (default :func:`main_metric`), best first, models without
    it last; each row holds ``model`` (id), ``name``, ``method``, ``arch``, ``folder``,
    ``metrics`` (what :func:`zoo.eval.evaluate` returned) and ``seconds`` (evaluation wall time, 0 when
    cached).
    """
    from zoo.eval.protocols import _check_protocols, evaluate

    out = Path(out)
    protocols = _check_protocols(protocols) if protocols else default_protocols(dataset, **dataset_kwargs)
    available, skipped = find_models(models)
    for cand in skipped:
        log(f"skipped {cand.id}: {cand.skip}")
    if not available:
        raise ValueError("no model to evaluate: every matching model was skipped" if skipped else
                         "no model matches")
    options = {"seed": seed, "rlp_clusters": rlp_clusters, "fewshot_ways": fewshot_ways,
               "fewshot_shots": list(fewshot_shots), "fewshot_episodes": fewshot_episodes,
               "dataset_kwargs": {k: str(v) for k, v in sorted(dataset_kwargs.items())}}
    rows: list[dict[str, Any]] = []
    for cand in available:
        cache = _cache_file(out, dataset, cand)
        model = None
        if cand.folder is None:  # an official checkpoint in the hub cache: converted on load
            model = cand.load()
            cand.folder = _registered_candidate(cand.id).folder
        sha = file_sha256(Path(cand.folder) / WEIGHTS_NAME) if cand.folder else None
        key = {"version": _CACHE_VERSION, "dataset": dataset, "protocols": list(protocols), "options": options,
               "weights_sha256": sha}
        if not force and cache.is_file():
            try:
                cached = json.loads(cache.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                cached = {}
            if cached.get("key") == key:
                log(f"{cand.id}: cached ({cache})")
                rows.append({**cached["row"], "seconds": 0.0})
                continue
        log(f"{cand.id}: evaluating on {dataset} ({', '.join(protocols)})")
        start = time.perf_counter()
        model = model or cand.load()
        metrics = evaluate(model, dataset, protocols=protocols, batch_size=batch_size, device=device,
                           progress=progress, seed=seed, rlp_clusters=rlp_clusters, fewshot_ways=fewshot_ways,
                           fewshot_shots=fewshot_shots, fewshot_episodes=fewshot_episodes, **dataset_kwargs)
        seconds = time.perf_counter() - start
        row = {"model": cand.id, "name": cand.name, "method": cand.method, "arch": cand.arch,
               "folder": str(cand.folder) if cand.folder else None, "metrics": metrics}
        atomic_write_text(cache, json.dumps({"key": key, "row": row}, indent=2, sort_keys=True) + "\n")
        rows.append({**row, "seconds": round(seconds, 2)})
        del model
    sort = sort or main_metric([r["metrics"] for r in rows])
    if sort is not None and not any(_is_number(r["metrics"].get(sort)) for r in rows):
        raise ValueError(f"no model has the metric {sort!r} to sort by; it has {sorted(rows[0]['metrics'])}")
    rows.sort(key=lambda r: (not _is_number(r["metrics"].get(sort)), -(r["metrics"].get(sort) or 0.0), r["model"]))
    board = {"dataset": dataset, "protocols": list(protocols), "sort": sort, "rows": rows,
             "skipped": [{"model": c.id, "reason": c.skip} for c in skipped], "options": options}
    board["command"] = _command(dataset, protocols, models)
    board["markdown"] = render_markdown(board)
    md_path = atomic_write_text(out / f"leaderboard_{dataset}.md", board["markdown"])
    json_path = out / f"leaderboard_{dataset}.json"
    atomic_write_text(json_path, json.dumps({k: v for k, v in board.items() if k != "markdown"}, indent=2,
                                            sort_keys=True, default=str) + "\n")
    board["paths"] = [str(md_path), str(json_path)]
    return board


def _command(dataset: str, protocols: Sequence[str], models: str | Sequence[str] | None) -> str:
    cmd = f"zoo leaderboard --data {dataset} --protocols {','.join(protocols)}"
    if models:
        cmd += f" --models '{models if isinstance(models, str) else ','.join(models)}'"
    return cmd


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Metric columns present in some row: fixed ones first, then few-shot, RLP NMIs, long-tailed groups."""
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(k for k, v in r["metrics"].items() if _is_number(v)))
    cols = [c for c in _FIXED_COLUMNS if c in keys]
    cols += [k for k in keys if k.startswith("fewshot_") and not k.endswith("_ci95")]
    cols += [k for k in keys if k.startswith("rlp_nmi[")]
    cols += [k for k in keys if k.startswith("lt_") and not k.startswith("lt_num_")]
    return cols


def _cell(metrics: dict[str, Any], col: str) -> str:
    value = metrics.get(col)
    if not _is_number(value):
        return "-"
    ci = metrics.get(f"{col}_ci95")
    return f"{value:.3f} ± {ci:.3f}" if _is_number(ci) else f"{value:.3f}"


def render_markdown(board: dict[str, Any]) -> str:
    """The leaderboard as Markdown: a short header, one table (best first), the skipped models."""
    rows, sort = board["rows"], board["sort"]
    cols = _columns(rows)
    head = ["#", "model", "method", "arch", *[f"**{c}**" if c == sort else c for c in cols]]
    lines = [
        f"Dataset `{board['dataset']}` (test split), sorted by `{sort}`. Command: `{board['command']}`.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for i, r in enumerate(rows, 1):
        model = f"`{r['model']}`"
        lines.append("| " + " | ".join([str(i), model, str(r.get("method") or "-"), str(r.get("arch") or "-"),
                                         *[_cell(r["metrics"], c) for c in cols]]) + " |")
    protocol = next((r["metrics"].get("protocol") for r in rows if r["metrics"].get("protocol")), None)
    if protocol:
        lines += ["", f"Protocols: {protocol}."]
    if any(c.startswith("fewshot_") for c in cols):
        lines += ["Few-shot cells: mean ± 95 % half-width over episodes."]
    if board.get("skipped"):
        lines += ["", "Not evaluated (weights not available offline): "
                  + ", ".join(f"`{s['model']}`" for s in board["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def update_docs(path: str | Path, dataset: str, markdown: str) -> Path:
    """Replace the block between ``<!-- leaderboard:<dataset> start -->`` and ``... end -->`` in ``path``.

    When the file has no such block, a ``## Leaderboard: <dataset>`` section holding one is appended.
    Written atomically; raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a start
    marker without its end marker.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such documentation file to update")
    text = path.read_text(encoding="utf-8")
    start, end = f"<!-- leaderboard:{dataset} start -->", f"<!-- leaderboard:{dataset} end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    if start in text:
        i = text.index(start)
        j = text.find(end, i)
        if j < 0:
            raise ValueError(f"{path}: {start} has no matching {end}")
        text = text[:i] + block + text[j + len(end):]
    elif end in text:
        raise ValueError(f"{path}: {end} without {start}")
    else:
        text = text.rstrip("\n") + f"\n\n## Leaderboard: {dataset}\n\n{block}\n"
    return atomic_write_text(path, text)


def _inside_package(folder: Path) -> bool:
    import zoo

    package = Path(zoo.__file__).resolve().parent
    try:
        folder.resolve().relative_to(package)
    except ValueError:
        return False
    return True


def _evaluations_section(evaluations: dict[str, Any]) -> str:
    lines = ["", "## Evaluations (`zoo leaderboard`)", ""]
    for data, metrics in sorted(evaluations.items()):
        numbers = {k: v for k, v in metrics.items() if _is_number(v)}
        lines += [f"`{data}` test split:", "", "| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {v:.4f} |" for k, v in numbers.items()]
        if metrics.get("protocol"):
            lines += ["", f"Protocol: {metrics['protocol']}"]
        lines.append("")
    return "\n".join(lines)


def update_cards(board: dict[str, Any], log: Any = print) -> list[Path]:
    """Write each row's metrics into its model folder's ``config.json`` and model card (README.md).

    Only folders outside the installed ``zoo`` package are written (shipped weights are left alone).
    ``config["evaluations"][dataset]`` always gets the metrics; ``config["metrics"]`` is updated
    (merged, new values win) only when the dataset is the one the model was trained on. The card is
    :func:`zoo.hub.render_model_card` plus an "Evaluations" section. Returns the folders written.
    """
    from zoo.hub import render_model_card

    written = []
    for row in board["rows"]:
        folder = Path(row["folder"]) if row.get("folder") else None
        if folder is None or not (folder / CONFIG_NAME).is_file():
            continue
        if _inside_package(folder):
            log(f"{row['model']}: card not updated (its folder is inside the installed package)")
            continue
        config = read_config(folder)
        metrics = dict(row["metrics"])
        config.setdefault("evaluations", {})[board["dataset"]] = metrics
        if config.get("dataset") == board["dataset"]:
            config["metrics"] = {**(config.get("metrics") or {}), **metrics}
        atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        atomic_write_text(folder / CARD_NAME, render_model_card(config) + _evaluations_section(config["evaluations"]))
        written.append(folder)
    return written
