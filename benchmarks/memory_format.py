"""Training-step speed of NHWC (``channels_last``, the trainer's default) versus NCHW, per method.

    python benchmarks/memory_format.py --threads 1,2 --batches 64,128 --rounds 10

The same method, weights and batch in both formats; a step = augment + forward + backward + optimizer
(+ EMA/queue hooks), as ``benchmarks/throughput_vs_lightly.py`` times it. The two formats alternate in
ABBA rounds so machine noise hits both alike; reported: NCHW median step time / NHWC median step time
(> 1: NHWC faster) with a 95 % bootstrap interval of the median per-round ratio. One row per
(threads, per-process batch, method): 1 thread and half the batch is what each of 2 DDP ranks on
this 2-core machine runs. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from throughput_vs_lightly import make_ours, our_step_fn, paired_ratio_interval

from train.augment import AugmentConfig, ViewAugment
from zoo.model import ZooModel

ROOT = Path(__file__).resolve().parents[1]


def step_fn(method: str, channels_last: bool, images: torch.Tensor, backbone: str):
    torch.manual_seed(0)
    model = make_ours(method, ZooModel(backbone, {}), 2 if method == "swav" else 0).train()
    if channels_last:  # as Trainer.prepare_step does
        model.to(memory_format=torch.channels_last)
    return our_step_fn(model, images, ViewAugment(AugmentConfig(size=images.shape[-1])))


def bench(method: str, threads: int, batch: int, args: argparse.Namespace) -> dict:
    torch.set_num_threads(threads)
    images = torch.rand(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    steps = {"nhwc": step_fn(method, True, images, args.backbone), "nchw": step_fn(method, False, images, args.backbone)}
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {"nhwc": [], "nchw": []}
    for r in range(args.rounds):
        for name in ("nhwc", "nchw") if r % 2 == 0 else ("nchw", "nhwc"):
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            times[name].append((time.perf_counter() - start) / args.steps)
    nhwc, nchw = statistics.median(times["nhwc"]), statistics.median(times["nchw"])
    low, high = paired_ratio_interval(times["nchw"], times["nhwc"])
    return {"method": method, "threads": threads, "batch": batch, "nhwc_img_s": batch / nhwc,
            "nchw_img_s": batch / nchw, "speedup": nchw / nhwc, "speedup_ci95": [low, high]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="simclr,moco,byol,swav")
    parser.add_argument("--backbone", default="convnet")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", default="1,2", help="intra-op threads, comma-separated")
    parser.add_argument("--batches", default="64,128", help="batch sizes, comma-separated")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "memory_format.json"))
    args = parser.parse_args()
    rows = [bench(m, int(t), int(b), args) for t in args.threads.split(",") for b in args.batches.split(",")
            for m in args.methods.split(",")]
    print(f"backbone={args.backbone} size={args.size} device=cpu")
    print("| threads | batch | method | NHWC img/s | NCHW img/s | NHWC speed-up | 95 % interval |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["speedup_ci95"]
        print(f"| {r['threads']} | {r['batch']} | {r['method']} | {r['nhwc_img_s']:.0f} | {r['nchw_img_s']:.0f} "
              f"| {r['speedup']:.2f} | {low:.2f}-{high:.2f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "platform": platform.platform(),
                                           "torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
