"""Training and embedding throughput on 1 vs 2 processes (DDP, gloo, CPU), per method.

    python benchmarks/scaling.py --data mnist5k --backbone convnet --batch 128 --steps 6

Both settings train on the same global batch (strong scaling): 1 process with batch G vs 2 processes
with G/2 each, every process pinned to one intra-op thread, so "2 processes" means twice the cores.
A step is the trainer's whole step (augment, forward, gathers, backward, DDP all-reduce, optimizer,
hooks); the first ``--warmup`` steps (which include the methods' dataset-wide work at epoch start:
k-means, Sinkhorn labels, neighbour mining) are not timed. Images/s = G x timed steps / their wall
time on rank 0. ``zoo embed``'s sharded extraction is timed the same way (``--embed-model``).
Process CPU time is recorded too: ``cpu_ms_per_image`` sums the CPU time of all processes, so
``efficiency = cpu_ms_per_image(1 process) / cpu_ms_per_image(2 processes)`` is the share of the work
that is not DDP overhead (gathers, all-reduces, duplicated augmentation draws), and it holds up when
other jobs take cores away, which the wall-clock speed-up does not.

The machine this ran on is shared (2 cores, other jobs running): the load average before and after
is in the JSON; read the numbers as indicative. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = "simclr,moco,byol,swav,sela,deepcluster,pcl,scan,dcl,supcon"
SMALL = {  # method kwargs that keep the heads the size the recipes use for mnist5k, minus dataset-size queues
    "moco": {"queue_length": 4096},
    "pcl": {"queue_size": 4096, "num_clusters": [10, 20]},
    "swav": {"queue_length": 0},
    "scan": {"num_heads": 1},
}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist

    from train.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from train import distributed

    rows = []
    try:
        for method in args.methods.split(","):
            cfg = TrainConfig(method=method, data=args.data, backbone=args.backbone, batch_size=args.batch,
                              epochs=100, max_steps=args.warmup + args.steps, ckpt_every=10**9, log_every=10**9,
                              warmup_epochs=0, eval_protocols=[], method_kwargs=SMALL.get(method, {}),
                              sync_bn=args.sync_bn, channels_last=not args.no_channels_last)
            clock: list[tuple[float, float]] = []
            with tempfile.TemporaryDirectory() as tmp:
                trainer = Trainer(cfg, tmp, progress=False)
                after = trainer.method.on_after_optimizer_step

                def timed_hook(ctx, after=after, clock=clock):
                    after(ctx)
                    clock.append((time.perf_counter(), time.process_time()))

                trainer.method.on_after_optimizer_step = timed_hook
                clock.append((time.perf_counter(), time.process_time()))
                trainer.fit()
            (w0, c0), (w1, c1) = clock[args.warmup], clock[-1]
            cpu = float(distributed.all_reduce_mean(torch.tensor(c1 - c0, dtype=torch.float64))) * world
            images = args.batch * args.steps
            rows.append({"method": method, "img_s": images / (w1 - w0), "step_s": (w1 - w0) / args.steps,
                         "cpu_ms_per_image": 1000 * cpu / images})
        if args.embed_model:
            from train.embed import embed

            with tempfile.TemporaryDirectory() as tmp:
                tmp = distributed.broadcast_object(tmp)  # rank 0's folder for everyone
                distributed.barrier()
                start, cpu0 = time.perf_counter(), time.process_time()
                folder = embed(args.embed_model, Path(tmp) / "f", data=args.data, batch_size=256, progress=False,
                               overwrite=True)
                elapsed = time.perf_counter() - start
                cpu = float(distributed.all_reduce_mean(torch.tensor(time.process_time() - cpu0,
                                                                     dtype=torch.float64))) * world
                count = json.loads((folder / "meta.json").read_text())["count"]
                distributed.barrier()
            rows.append({"method": "embed", "img_s": count / elapsed, "step_s": elapsed,
                         "cpu_ms_per_image": 1000 * cpu / count})
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run(world: int, args: argparse.Namespace) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        mp.spawn(_worker, args=(world, port, args, out), nprocs=world)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--backbone", default="convnet")
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--sync-bn", action="store_true")
    p.add_argument("--no-channels-last", action="store_true", help="NCHW instead of the trainer's default NHWC")
    p.add_argument("--embed-model", default="scan_convnet_mnist5k", help="'' to skip the embedding timing")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    started = time.time()
    one, two = _run(1, args), _run(2, args)
    rows = []
    for a, b in zip(one, two):
        rows.append({"method": a["method"], "img_s_1proc": a["img_s"], "img_s_2proc": b["img_s"],
                     "speedup": b["img_s"] / a["img_s"], "step_s_1proc": a["step_s"], "step_s_2proc": b["step_s"],
                     "cpu_ms_per_image_1proc": a["cpu_ms_per_image"], "cpu_ms_per_image_2proc": b["cpu_ms_per_image"],
                     "efficiency": a["cpu_ms_per_image"] / b["cpu_ms_per_image"]})
    result = {"args": {k: v for k, v in vars(args).items()}, "platform": platform.platform(),
              "torch": torch.__version__, "cpus": os.cpu_count(), "threads_per_process": 1,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "wall_s": time.time() - started, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"global batch {args.batch}, {args.backbone} on {args.data}, 1 thread per process, "
          f"load average {load_before[0]:.1f} -> {result['loadavg_after'][0]:.1f} (shared machine)")
    print("| method | 1 process img/s | 2 processes img/s | wall speed-up | CPU ms/image 1 proc | "
          "CPU ms/image 2 procs | efficiency |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['img_s_1proc']:.0f} | {r['img_s_2proc']:.0f} | {r['speedup']:.2f} | "
              f"{r['cpu_ms_per_image_1proc']:.2f} | {r['cpu_ms_per_image_2proc']:.2f} | {r['efficiency']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
