"""Peer of the low-label fine-tune column: the same recipe from a random init of the shipped encoder's architecture.

    PYTHONPATH=. python benchmarks/lowlabel_random_init.py --model simclr_convnet_mnist5k \
        --json benchmarks/results/lowlabel_finetune_random_init_convnet_mnist5k.json

What ``zoo eval MODEL --protocol lowlabel --lowlabel-mode finetune`` does, on the model's architecture
with no pretrained weights (``torch.manual_seed(seed)`` before it is built): the gap to the pretrained
row is what pretraining brings to fine-tuning on 1 % and 10 % of the labels.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="simclr_convnet_mnist5k")
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--fractions", default="0.01,0.1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/results/lowlabel_finetune_random_init_convnet_mnist5k.json")
    args = parser.parse_args()
    from zoo.cli import load_model_arg
    from zoo.data import load_dataset, transform_for
    from zoo.eval.finetune import FINETUNE_DEFAULTS, finetune_lowlabel

    torch.manual_seed(args.seed)
    model = load_model_arg(args.model, pretrained=False)
    tf = transform_for(model)
    train, test = load_dataset(args.data, "train", transform=tf), load_dataset(args.data, "test", transform=tf)
    start = time.time()
    res = finetune_lowlabel(model, train, test, [float(f) for f in args.fractions.split(",")], seed=args.seed,
                            progress=True)
    payload = {"model": f"{args.model} architecture, random init (torch.manual_seed({args.seed}))",
               "data": args.data, "recipe": FINETUNE_DEFAULTS, **res, "seconds": round(time.time() - start, 1)}
    print(json.dumps(payload, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
