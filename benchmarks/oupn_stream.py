"""OUPN vs SimCLR on the same non-stationary stream: mnist5k ordered by class in blocks, no labels.

    python benchmarks/oupn_stream.py                      # the recipes (one pass of the stream)
    python benchmarks/oupn_stream.py --max-steps 2 --out /tmp/oupn --json /tmp/oupn.json   # smoke

Both methods train from their recipes (``train/recipes/{oupn,simclr_stream}_mnist5k.yaml``: one pass of
the 4,000-image stream, class 0's images first). Reported:

- ``online_acc`` (OUPN only): Hungarian clustering accuracy of each image's most probable prototype at
  the moment it arrived, over the stream (``zoo.eval.cluster_accuracy``; more prototypes than classes:
  images of unmatched prototypes count as wrong), and the number of prototypes created;
- after the stream, on the balanced test split: k-means ACC (k = 10) and 5-way 1- / 5-shot
  nearest-centroid accuracy (600 episodes) of the frozen encoder, for both.

Finished runs are skipped when the script runs again; an interrupted one resumes. Prints a Markdown table
and writes JSON (default benchmarks/results/oupn_stream.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["oupn", "simclr_stream"]


def run_one(method: str, max_steps: int | None, out_root: Path) -> dict:
    from train.trainer import TrainConfig, Trainer
    from zoo.eval import cluster_accuracy, evaluate

    out = out_root / method
    result_file = out / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    cfg = TrainConfig.from_yaml(ROOT / "train" / "recipes" / f"{method}_mnist5k.yaml", max_steps=max_steps)
    start = time.time()
    trainer = Trainer(cfg, out, progress=True)
    trainer.fit(resume=True)
    row: dict = {"method": method, "steps": trainer.step, "train_seconds": round(time.time() - start, 1)}
    m = trainer.method
    if hasattr(m, "online_pred"):
        seen = m.online_pred.cpu().numpy() >= 0
        row["online_acc"] = cluster_accuracy(trainer.targets.numpy()[seen], m.online_pred.cpu().numpy()[seen])
        row["prototypes"] = int(m.active.sum())
    metrics = evaluate(m.export().eval(), "mnist5k", protocols=("kmeans", "fewshot"), progress=False)
    row.update({k: v for k, v in metrics.items() if isinstance(v, float)})
    result_file.write_text(json.dumps(row, indent=2))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_oupn_stream"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "oupn_stream.json"))
    args = parser.parse_args()
    out_root = Path(args.out) / (f"s{args.max_steps}" if args.max_steps else "recipe")
    rows = [run_one(m, args.max_steps, out_root) for m in METHODS]
    cols = ["method", "steps", "online_acc", "prototypes", "kmeans_acc", "fewshot_5way_1shot", "fewshot_5way_5shot",
            "train_seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(c) is None else f"{r[c]:.3f}" if isinstance(r[c], float)
                                       and c != "train_seconds" else str(r[c]) for c in cols) + " |")
    print("\n".join(lines))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"data": "mnist5k, class-blocked stream", "rows": rows,
                                           "max_steps": args.max_steps}, indent=2, default=float))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
