"""Background-swap gap of trained shapes models: the long-tailed table's shapes_lt100 runs, and zoo models.

    python benchmarks/bgswap.py --runs runs/bench_longtail_table/erecipe --data shapes_lt100 \
        --json benchmarks/results/bgswap_shapes_lt100.json
    python benchmarks/bgswap.py --models clip_convnet_shapes --data shapes --json /tmp/bg.json

Every ``*_shapes_lt*`` run folder under ``--runs`` (made by ``benchmarks/longtail.py``) is exported from
its newest checkpoint to ``<run>/model`` (once), then evaluated with ``zoo.eval.evaluate(model, data,
protocols=("bgswap",))``: each test image's foreground (exact mask) on another test image's different
background; linear probe and kNN fitted on the unswapped train features; the gap is orig - swapped.
``--models`` adds registered names or model folders. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

COLS = ["linear_orig", "linear_swapped", "linear_gap", "knn_orig", "knn_swapped", "knn_gap"]


def export_run(run: Path) -> Path:
    """``run/model`` from the run's newest checkpoint (a finished ``benchmarks/longtail.py`` run)."""
    from train.trainer import TrainConfig, Trainer

    if (run / "model" / "config.json").is_file():
        return run / "model"
    trainer = Trainer(TrainConfig.from_yaml(run / "config.yaml"), run, progress=False)
    if trainer.resume() is None:
        raise FileNotFoundError(f"{run} has no readable checkpoint")
    return trainer.export(evaluate=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", help="folder of benchmarks/longtail.py runs (e.g. .../bench_longtail_table/erecipe)")
    parser.add_argument("--models", default="", help="comma list of registered names or model folders")
    parser.add_argument("--data", default="shapes_lt100", help="shapes or a shapes_lt* split (needs exact masks)")
    parser.add_argument("--seed", type=int, default=0, help="draws the background partners")
    parser.add_argument("--json", default="benchmarks/results/bgswap.json")
    args = parser.parse_args()
    from zoo.checkpoint import load_model_folder
    from zoo.cli import load_model_arg
    from zoo.eval import evaluate

    entries: list[tuple[str, object]] = []
    if args.runs:
        for run in sorted(Path(args.runs).glob("*_shapes_lt*")):
            if (run / "result.json").is_file():
                entries.append((run.name.split("_shapes_lt")[0], lambda r=run: load_model_folder(export_run(r))))
    for name in filter(None, args.models.split(",")):
        entries.append((name, lambda n=name: load_model_arg(n)))
    rows = []
    for name, load in entries:
        start = time.time()
        metrics = evaluate(load(), args.data, protocols=("bgswap",), progress=False, seed=args.seed)
        rows.append({"model": name, **{c: metrics[f"bgswap_{c}"] for c in COLS},
                     "eval_seconds": round(time.time() - start, 1)})
        print(f"{name}: linear gap {rows[-1]['linear_gap']:.3f}, kNN gap {rows[-1]['knn_gap']:.3f}", flush=True)
    lines = ["| model | " + " | ".join(COLS) + " |", "|" + "---|" * (len(COLS) + 1)]
    lines += ["| " + r["model"] + " | " + " | ".join(f"{r[c]:.3f}" for c in COLS) + " |" for r in rows]
    print("\n".join(lines))
    payload = {"data": args.data, "seed": args.seed, "rows": rows,
               "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                           "torch": torch.__version__}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
