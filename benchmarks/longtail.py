"""Long-tailed recognition on mnist5k_lt and shapes_lt: every long-tailed method beside its base.

    python benchmarks/longtail.py                                    # the real run (recipes' epochs)
    python benchmarks/longtail.py --epochs 1 --max-steps 2 --imbalances 10 --out /tmp/lt --json /tmp/lt.json
    python benchmarks/longtail.py --bases mnist5k,shapes --imbalances 100 --methods all   # the full table

Each method trains from ``train/recipes/<method>_<base>_lt.yaml`` on ``<base>_lt<imbalance>``
(400 ... 400/imbalance train images per class, balanced 1,000-image test split), then its frozen
encoder is evaluated on the test split, overall and on many- (> 100 train images), medium-
(20-100) and few-shot (< 20) classes (zoo.eval.longtail):

- ``knn``: weighted kNN (k=20, T=0.07) over the long-tailed train features;
- ``linear``: L-BFGS logistic regression on the long-tailed train features;
- ``head``: the method's own classifier (cross entropy, PaCo's centres, BCL's classifier; SupCon has
  none), with the plain logits (no logit adjustment at test time).

Finished runs are skipped when the script is run again; an interrupted run resumes from its last
checkpoint. Prints a Markdown table, writes JSON (default benchmarks/results/longtail.json) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["supervised", "supcon", "paco", "bcl"]  # the default set (the first table)
# --methods all: each long-tailed method beside its base (cross entropy, SupCon, SimCLR) at the same budget
ALL_METHODS = ["supervised", "iif", "cmo", "supcon", "paco", "bcl", "tsc", "rescom", "simclr", "boosted"]
PROTOCOLS = ["linear", "knn", "head"]
GROUPS = ["top1", "many", "medium", "few"]
COLOURS = {"top1": "C0", "many": "C1", "medium": "C2", "few": "C3"}


def evaluate_run(trainer, data: str) -> dict:
    """kNN / linear / own-classifier accuracy of a trained method, overall and per shot group."""
    from zoo.data import load_dataset, transform_for
    from zoo.eval import evaluate_longtail, extract_features, shot_accuracy

    method = trainer.method.eval()
    model = method.export()
    transform = transform_for(model)
    train = extract_features(model, load_dataset(data, "train", transform=transform), progress=False)
    test = extract_features(model, load_dataset(data, "test", transform=transform), progress=False)
    metrics = evaluate_longtail(train, test)
    if hasattr(method, "classify_features"):
        with torch.no_grad():
            feats = torch.as_tensor(test["features"], device=next(method.parameters()).device)
            pred = method.classify_features(feats).argmax(dim=1).cpu().numpy()
        counts = np.bincount(train["labels"], minlength=method.num_classes)
        acc = shot_accuracy(pred, test["labels"], counts)
        metrics.update({"head_top1": acc["overall"], **{f"head_{g}": acc[g] for g in GROUPS[1:]}})
    return metrics


def run_one(method: str, imbalance: int, epochs: int | None, max_steps: int | None, out_root: Path,
            base: str = "mnist5k") -> dict:
    from train.trainer import TrainConfig, Trainer

    out = out_root / (f"{method}_lt{imbalance}" if base == "mnist5k" else f"{method}_{base}_lt{imbalance}")
    result_file = out / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    data = f"{base}_lt{imbalance}"
    overrides = {"data": data, "epochs": epochs, "max_steps": max_steps, "name": f"{method}_convnet_{data}"}
    cfg = TrainConfig.from_yaml(ROOT / "train" / "recipes" / f"{method}_{base}_lt.yaml", **overrides)
    start = time.time()
    trainer = Trainer(cfg, out, progress=True)
    trainer.fit(resume=True)
    train_seconds = time.time() - start
    result = {"method": method, "imbalance": imbalance, "data": data, "epochs": cfg.epochs, "steps": trainer.step,
              "train_seconds": round(train_seconds, 1),
              "final_loss": trainer.history[-1]["loss"] if trainer.history else None,
              **evaluate_run(trainer, data)}
    result_file.write_text(json.dumps(result, indent=2))
    return result


def markdown(rows: list[dict]) -> str:
    cols = ["data", "imbalance", "method"] + [f"{p}_{g}" for p in PROTOCOLS for g in GROUPS] + ["train_seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None else f"{v:.3f}" if isinstance(v, float) and c != "train_seconds" else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], datasets: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(PROTOCOLS), len(datasets), figsize=(5 * len(datasets), 2.6 * len(PROTOCOLS)),
                             squeeze=False)
    width = 0.8 / len(GROUPS)
    for col, data in enumerate(datasets):
        sub = [r for r in rows if r["data"] == data]
        for row, protocol in enumerate(PROTOCOLS):
            ax = axes[row][col]
            for i, g in enumerate(GROUPS):
                values = [r.get(f"{protocol}_{g}") for r in sub]
                xs = [x + i * width for x, v in zip(range(len(sub)), values) if v is not None]
                ax.bar(xs, [v for v in values if v is not None], width, color=COLOURS[g])
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(sub))], [r["method"] for r in sub])
            ax.set_ylim(0, 1)
            ax.set_xticks(ax.get_xticks(), ax.get_xticklabels(), rotation=45, fontsize=7)
            ax.set_title(f"{protocol}, {data}", fontsize=9)
    handles = [Patch(color=COLOURS[g], label="overall" if g == "top1" else f"{g}-shot") for g in GROUPS]
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=len(GROUPS), fontsize=8)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list, or 'all' (every long-tailed method)")
    parser.add_argument("--bases", default="mnist5k", help="comma list of long-tailed bases: mnist5k, shapes")
    parser.add_argument("--imbalances", default="10,100", help="comma-separated imbalance factors (10, 50, 100)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipes' epochs")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each run early (smoke tests)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_longtail"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "longtail.json"))
    args = parser.parse_args()
    imbalances = [int(x) for x in args.imbalances.split(",")]
    tag = f"e{args.epochs or 'recipe'}" + (f"_s{args.max_steps}" if args.max_steps else "")
    out_root = Path(args.out) / tag
    methods = ALL_METHODS if args.methods == "all" else args.methods.split(",")
    bases = args.bases.split(",")
    datasets = [f"{b}_lt{i}" for b in bases for i in imbalances]
    rows = []
    for base in bases:
        for imbalance in imbalances:
            for method in methods:
                print(f"== {method} on {base}_lt{imbalance}", flush=True)
                rows.append(run_one(method, imbalance, args.epochs, args.max_steps, out_root, base))
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).with_suffix(".partial.json").write_text(json.dumps(rows, indent=2))  # as it goes
    table = markdown(rows)
    print(table)
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
               "device": "cuda" if torch.cuda.is_available() else "cpu"}
    payload = {"data": datasets, "imbalances": imbalances, "epochs": args.epochs, "max_steps": args.max_steps,
               "shot_thresholds": {"many": "> 100 train images", "medium": "20-100", "few": "< 20"},
               "machine": machine, "rows": rows}
    json_path.write_text(json.dumps(payload, indent=2))
    plot(rows, datasets, json_path.with_suffix(".png"),
         f"{', '.join(datasets)}: balanced test accuracy by shot group ({args.epochs or 'recipe'} epochs"
         + (f", {args.max_steps} steps" if args.max_steps else "") + ")")
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
