"""Novel category discovery on mnist5k: 5 labelled classes (0-4), 5 novel (5-9).

    python benchmarks/ncd.py                      # the recipe's budget
    python benchmarks/ncd.py --epochs 3 --json /tmp/ncd.json

Trains ``train/recipes/ncd_mnist5k.yaml`` and reports, on the balanced test split: ``novel_acc``
(Hungarian ACC of the test images of the novel classes, predicted among the novel prototypes),
``all_acc`` (Hungarian ACC over all test images, predicted among all ten prototypes) and
``labelled_acc`` (plain accuracy of the labelled classes' test images). Resumable; writes JSON
(default benchmarks/results/ncd.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from train.augment import normalize
    from train.methods.ncd import ncd_protocol
    from train.trainer import TrainConfig, Trainer
    from zoo.data import load_dataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_ncd"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "ncd.json"))
    args = parser.parse_args()
    cfg = TrainConfig.from_yaml(ROOT / "train" / "recipes" / "ncd_mnist5k.yaml", epochs=args.epochs,
                                max_steps=args.max_steps)
    out = Path(args.out) / f"e{cfg.epochs}" / (f"s{args.max_steps}" if args.max_steps else "")
    start = time.time()
    trainer = Trainer(cfg, out, progress=True)
    trainer.fit(resume=True)
    test = load_dataset("mnist5k", "test")
    images = test.images.float().div(255).expand(-1, 3, -1, -1)
    images = normalize(images, trainer.augment.cfg.mean, trainer.augment.cfg.std).to(trainer.device)
    row = {"data": "mnist5k", "labelled": "0-4", "novel": "5-9", "epochs": cfg.epochs, "steps": trainer.step,
           "train_seconds": round(time.time() - start, 1),
           **ncd_protocol(trainer.method, images, test.targets)}
    print("| " + " | ".join(row) + " |\n|" + "---|" * len(row) + "\n| " + " | ".join(
        f"{v:.3f}" if isinstance(v, float) and k != "train_seconds" else str(v) for k, v in row.items()) + " |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(row, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
