"""``zoo train``: run a method on a dataset from a recipe and/or flags; ``zoo embed``: sharded features.

``python -m train ARGS`` is ``zoo train ARGS`` and ``python -m train embed ARGS`` is ``zoo embed ARGS``:
the module torchrun runs (``--nproc N`` launches it for you on one machine).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields
from pathlib import Path

# Kept here (not read from the registry) so `zoo --help` does not import torch; a test keeps it in sync.
METHOD_NAMES = ("simclr", "moco", "byol", "swav", "sela", "deepcluster", "pcl", "scan", "dcl", "nnclr", "mochi",
                "supcon", "paco", "bcl", "supervised", "clip")
METHOD_NAMES += ("iif", "cmo", "tsc", "rescom", "boosted", "oupn", "simclr_stream", "ncd")  # long-tailed, online, NCD
METHOD_NAMES += ("carl", "uic", "ifnd_simclr", "ifnd_moco")  # clustering and contrast
METHOD_NAMES += ("ncc",)  # NCC / ProPos: BYOL + k-means prototypes
METHOD_NAMES += ("interclr",)  # MoCo v2 + inter-image invariance

EPILOG = """examples:
  zoo train --recipe train/recipes/simclr_mnist5k.yaml --out runs/simclr
  zoo train --method simclr --data digits --backbone convnet_tiny --epochs 2 --out runs/smoke
  zoo train --recipe train/recipes/simclr_mnist5k.yaml --out runs/simclr --resume
  zoo train --recipe train/recipes/scan_mnist5k.yaml --out runs/scan   # SCAN on the shipped SimCLR
  zoo train --recipe train/recipes/simclr_mnist5k.yaml --out runs/simclr2 --nproc 2 --sync-bn
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --max-restarts 3 \
      -m train --recipe R.yaml --out /shared/runs/x        # multi-node; restarts resume automatically
--batch-size is the global batch (split over the processes); the lr scales with it."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a self-supervised method", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="YAML recipe (train/recipes/*.yaml)")
    p.add_argument("--method", help=f"one of: {', '.join(METHOD_NAMES)}")
    p.add_argument("--data", help="mnist5k, digits, shapes, imagefolder, cifar10, ...")
    p.add_argument("--data-root", help="dataset folder (imagefolder, cifar10, ...)")
    p.add_argument("--backbone", help="convnet, convnet_tiny, resnet18, resnet50, vit_s16, vit_b16")
    p.add_argument("--backbone-kwargs", type=json.loads, help='JSON, e.g. \'{"cifar_stem": true}\'')
    p.add_argument("--method-kwargs", type=json.loads, help='JSON, e.g. \'{"temperature": 0.2}\'')
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="the global batch (split over the processes)")
    p.add_argument("--lr", type=float, help="base learning rate for batch 256 (scaled linearly)")
    p.add_argument("--optimizer", choices=["adamw", "sgd", "lars"])
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--max-steps", type=int, help="stop after this many steps")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints (default: each epoch)")
    p.add_argument("--name", help="name of the exported model")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, log.csv, model/")
    p.add_argument("--resume", nargs="?", const="yes", default="auto", choices=["yes", "no", "auto"],
                   help="continue from the newest good checkpoint in --out (bare --resume: yes; default auto: "
                        "only when torchrun restarted the workers)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("beyond one process (torchrun, DDP)")
    g.add_argument("--nproc", type=int, help="processes on this machine: re-runs under torchrun (NCCL on GPUs, "
                                            "gloo on the CPU)")
    g.add_argument("--max-restarts", type=int, help="with --nproc: torchrun restarts after a failure (resuming)")
    g.add_argument("--sync-bn", action="store_true", default=None,
                   help="BatchNorm statistics over the global batch (SyncBatchNorm)")
    g = p.add_argument_group("speed paths (amp, compile and pinned memory untested without a GPU)")
    g.add_argument("--amp", choices=["bf16"], help="autocast the step to bfloat16")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format (the default; --no-channels-last for NCHW)")
    g.add_argument("--torch-compile", action="store_true", default=None, help="torch.compile the backbone")
    g.add_argument("--pin-memory", action="store_true", default=None, help="pinned host batches, async copies")
    g.add_argument("--loader-workers", type=int, help="DataLoader processes decoding image files ahead (per rank)")
    p.set_defaults(func=run, _parser=p)
    register_embed(sub)


EMBED_EPILOG = """examples:
  zoo embed scan_convnet_mnist5k --data mnist5k --out runs/feats
  zoo embed runs/simclr/model --images ./photos --out runs/photo_feats --nproc 4
  zoo index build runs/simclr/model --features runs/photo_feats --out runs/photo_index
  torchrun --nnodes 2 --nproc_per_node 8 ... -m train embed MODEL --images /data --out /shared/feats"""


def register_embed(sub: argparse._SubParsersAction) -> None:
    """Add ``zoo embed`` to the ``zoo`` subcommands."""
    p = sub.add_parser("embed", help="embed a folder or dataset into a feature folder (sharded over processes)",
                       epilog=EMBED_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="registered name, model folder, or hf-hub:ORG/NAME")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (recursive)")
    src.add_argument("--data", help="dataset name (mnist5k, digits, shapes, cifar10, ...)")
    p.add_argument("--split", default="train", help="dataset split with --data (default: train)")
    p.add_argument("--out", required=True, help="feature folder to write")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    p.add_argument("--nproc", type=int, help="processes on this machine (runs torchrun); one shard each")
    p.add_argument("--no-merge", action="store_true", help="keep features-<rank>.npy shards (very large runs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing feature folder in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_embed, _parser=p)


def run_embed(args: argparse.Namespace) -> int:
    from train.embed import cli_embed

    return cli_embed(args)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "nproc", None) is not None and not under_torchrun():
        from train.distributed import argv_from_namespace, launch

        return launch(args.nproc, argv_from_namespace(args, args._parser), args.max_restarts or 0)
    from train import distributed
    from train.trainer import TrainConfig, Trainer

    names = {f.name for f in fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    cfg = TrainConfig.from_yaml(args.recipe, **overrides) if args.recipe else TrainConfig(**overrides)
    try:
        trainer = Trainer(cfg, args.out, progress=not args.quiet)
        trainer.fit(resume=args.resume)
        if trainer.rank != 0:  # rank 0 alone exports and evaluates
            return 0
        if trainer.resumed_from is not None and args.quiet:
            print(f"resumed from {trainer.resumed_from} at step {trainer.resumed_step}")
        folder = trainer.export(evaluate=not args.no_eval)
    finally:
        distributed.cleanup()
    metrics = json.loads((Path(folder) / "config.json").read_text()).get("metrics", {})
    print(f"model folder: {folder}")
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"  {key:12s} {value:.4f}")
    return 0


def under_torchrun() -> bool:
    """True inside a worker that torchrun started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
