"""Train every method with one shared budget per dataset and compare the representations.

    python benchmarks/methods.py --data mnist5k --epochs 5 --methods all
    python benchmarks/methods.py --data shapes --epochs 8 --methods simclr,swav,scan

Each row is a method (or a variant of one) run from ``train/recipes/<recipe>_<data>.yaml`` with the
epochs overridden by --epochs, so every row gets the same budget. Variants are named rows built from
their base recipe by overrides, not separate recipe files: ``simclr+unmix`` is ``simclr`` with
``unmix: true`` in ``method_kwargs``; ``simclr+bgaug`` is ``simclr_shapes_bgaug.yaml`` on ``shapes``
(the generator's exact masks) and ``simclr`` with background removal/swap on saliency masks
(:func:`train.augment.saliency_masks`) elsewhere (``ROWS`` below).

For each row it evaluates the exported encoder (kNN top-1, linear top-1, k-means ACC/NMI/ARI on the test
split; cluster-head ACC/NMI/ARI for methods with a head) and records the wall time. SCAN, and on
``mnist5k`` CARL and UIC (whose recipes start from a trained encoder), use the SimCLR model trained
earlier in the same run as their pretext, so they see the same budget of pretext training.
A row whose method or recipe does not exist in this checkout is reported as missing, not run.
Finished rows are skipped when the script is run again (resumable); a row interrupted mid-training
resumes from its last checkpoint. Prints a Markdown table (and one of each new method against its
base), writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["knn_top1", "linear_top1", "kmeans_acc", "kmeans_nmi", "kmeans_ari", "head_acc", "head_nmi", "head_ari"]
# Background augmentation where the data has no exact masks (Ryali et al. 2021's BG_RM / BG_Random
# probabilities): saliency-estimated foregrounds, gray background 20 %, another image's background 60 %.
BGAUG_SALIENCY = {"bg_remove_p": 0.2, "bg_swap_p": 0.6, "bg_masks": "saliency"}

# row name -> recipe stem (``<stem>_<data>.yaml``), overrides, the base it is compared with, and
# ``recipe_for``: a per-dataset recipe stem that replaces the override (the shapes bgaug recipes).
ROWS: dict[str, dict[str, Any]] = {
    "simclr": {}, "moco": {}, "byol": {}, "swav": {}, "sela": {}, "deepcluster": {}, "pcl": {},
    "scan": {"pretext": True},
    "dcl": {"base": "simclr"}, "nnclr": {"base": "simclr"}, "mochi": {"base": "moco"},
    "supcon": {"base": "simclr"}, "paco": {"base": "supcon"}, "bcl": {"base": "supcon"}, "supervised": {},
    "carl": {"pretext": True}, "uic": {"pretext": True},
    "ncc": {"base": "byol"}, "interclr": {"base": "moco"},
    "ifnd_simclr": {"base": "simclr"}, "ifnd_moco": {"base": "moco"},
    **{f"{b}+unmix": {"recipe": b, "method_kwargs": {"unmix": True}, "base": b} for b in ("simclr", "moco", "byol")},
    **{f"{b}+bgaug": {"recipe": b, "augment": BGAUG_SALIENCY, "recipe_for": {"shapes": f"{b}_shapes_bgaug"}, "base": b}
       for b in ("simclr", "moco", "byol")},
}
ALL = list(ROWS)  # simclr first: the rows with a pretext use its model
DEFAULT = ["simclr", "moco", "byol", "swav", "sela", "deepcluster", "pcl", "scan"]


def recipe_path(name: str, data: str) -> Path:
    spec = ROWS.get(name, {})
    stem = spec.get("recipe_for", {}).get(data)
    if stem is not None:
        return ROOT / "train" / "recipes" / f"{stem}.yaml"
    return ROOT / "train" / "recipes" / f"{spec.get('recipe', name)}_{data}.yaml"


def row_config(name: str, data: str, epochs: int, pretext: str | None):
    """The ``TrainConfig`` of row ``name`` on ``data`` at ``epochs`` (overrides applied)."""
    from train.trainer import TrainConfig

    spec = ROWS.get(name, {})
    recipe = recipe_path(name, data)
    cfg = TrainConfig.from_yaml(recipe, epochs=epochs)
    cfg.log_every = 1  # every step in log.csv: the probes of docs/benchmarks.md read it
    if data not in spec.get("recipe_for", {}):
        cfg.method_kwargs = {**cfg.method_kwargs, **spec.get("method_kwargs", {})}
        cfg.augment = {**cfg.augment, **spec.get("augment", {})}
    if spec.get("pretext") and (name == "scan" or "pretext" in cfg.method_kwargs):
        if pretext is None:
            raise RuntimeError(f"{name} needs the simclr run of this benchmark as its pretext; run simclr first")
        cfg.method_kwargs = {**cfg.method_kwargs, "pretext": pretext}
        if name == "scan":  # keep the recipe's share of self-labelling epochs
            full = TrainConfig.from_yaml(recipe).epochs
            cfg.method_kwargs["selflabel_epochs"] = max(
                1, epochs * cfg.method_kwargs.get("selflabel_epochs", 0) // max(1, full))
    return cfg


def missing_reason(name: str, data: str) -> str | None:
    """Why row ``name`` cannot run in this checkout (unknown method or no recipe), or None."""
    from train.methods import METHODS

    if name not in ROWS:
        return f"unknown row {name!r}; known: {', '.join(ALL)}"
    recipe = recipe_path(name, data)
    if not recipe.exists():
        return f"no recipe {recipe.relative_to(ROOT)}"
    import yaml

    method = (yaml.safe_load(recipe.read_text()) or {}).get("method")
    if method not in METHODS:
        return f"method {method!r} is not in this checkout"
    return None


def run_method(name: str, data: str, epochs: int, out_root: Path, pretext: str | None) -> dict:
    from train.trainer import Trainer

    out = out_root / name
    result_file = out / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    reason = missing_reason(name, data)
    if reason is not None:
        print(f"   {name}: not run ({reason})", flush=True)
        return {"method": name, "missing": reason}
    cfg = row_config(name, data, epochs, pretext)
    start = time.time()
    trainer = Trainer(cfg, out, progress=True)
    trainer.fit(resume=True)
    train_seconds = time.time() - start
    folder = trainer.export(evaluate=True)
    metrics = json.loads((folder / "config.json").read_text())["metrics"]
    result = {"method": name, "recipe": str(recipe_path(name, data).relative_to(ROOT)), "epochs": epochs,
              "steps": trainer.step, "train_seconds": round(train_seconds, 1),
              "eval_seconds": round(time.time() - start - train_seconds, 1),
              "final_loss": trainer.history[-1]["loss"] if trainer.history else None, "model": str(folder),
              **{k: metrics[k] for k in COLUMNS if k in metrics}}
    result_file.write_text(json.dumps(result, indent=2))
    return result


def _cell(row: dict, col: str) -> str:
    value = row.get(col)
    if value is None:
        return "-"
    if isinstance(value, float) and col not in ("train_seconds", "eval_seconds"):
        return f"{value:.3f}"
    return f"{value:.0f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
    cols = ["method", *COLUMNS, "train_seconds"]
    header = ["method", "kNN", "linear", "k-means ACC", "NMI", "ARI", "head ACC", "head NMI", "head ARI", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "missing" in r:
            lines.append(f"| {r['method']} | not run: {r['missing']} |" + " |" * (len(cols) - 2))
            continue
        lines.append("| " + " | ".join(_cell(r, c) for c in cols) + " |")
    return "\n".join(lines)


def versus_base(rows: list[dict]) -> str:
    """Each new method or variant against its base: the base's value and the change."""
    by_name = {r["method"]: r for r in rows if "missing" not in r}
    cols = ["knn_top1", "linear_top1", "kmeans_acc", "kmeans_nmi"]
    lines = ["| method | base | " + " | ".join(f"{c} (base -> new)" for c in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for r in rows:
        base = ROWS.get(r["method"], {}).get("base")
        if base is None:
            continue
        if r["method"] not in by_name or base not in by_name:
            lines.append(f"| {r['method']} | {base} | not run |" + " |" * (len(cols) - 1))
            continue
        new, old = by_name[r["method"]], by_name[base]
        cells = [f"{old[c]:.3f} -> {new[c]:.3f} ({new[c] - old[c]:+.3f})" if c in new and c in old else "-" for c in cols]
        lines.append(f"| {r['method']} | {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "missing" not in r]
    metrics = ["knn_top1", "linear_top1", "kmeans_acc", "kmeans_nmi", "head_acc"]
    fig, ax = plt.subplots(figsize=(max(10.0, 0.55 * len(rows)), 4.5))
    width = 0.8 / len(metrics)
    for i, m in enumerate(metrics):
        ax.bar([x + i * width for x in range(len(rows))], [r.get(m) or 0 for r in rows], width, label=m)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], [r["method"] for r in rows],
                  rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=len(metrics), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--methods", default=",".join(DEFAULT), help=f"comma-separated rows, or 'all' ({len(ALL)} rows)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    parser.add_argument("--json", default=None, help="default: benchmarks/results/methods_<data>.json")
    args = parser.parse_args()
    names = ALL if args.methods == "all" else args.methods.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ALL)}")
    out_root = Path(args.out) / f"{args.data}_e{args.epochs}"
    pretext_file = out_root / "simclr" / "result.json"
    rows, pretext = [], None
    for name in names:
        if pretext is None and pretext_file.exists():  # simclr of an earlier, resumed invocation
            pretext = json.loads(pretext_file.read_text())["model"]
        print(f"== {name} on {args.data}, {args.epochs} epochs", flush=True)
        rows.append(run_method(name, args.data, args.epochs, out_root, pretext))
    table = markdown(rows)
    print(table)
    print()
    print(versus_base(rows))
    json_path = Path(args.json or ROOT / "benchmarks" / "results" / f"methods_{args.data}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
               "device": "cuda" if torch.cuda.is_available() else "cpu"}
    json_path.write_text(json.dumps({"data": args.data, "epochs": args.epochs, "machine": machine, "rows": rows},
                                    indent=2))
    plot(rows, json_path.with_suffix(".png"), f"{args.data}, {args.epochs} epochs per method")
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
