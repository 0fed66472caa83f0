"""Training-step throughput of our SimCLR, MoCo v2, BYOL and SwAV versus lightly's, side by side.

    python benchmarks/throughput_vs_lightly.py --backbone convnet --size 32 --batch 128 --rounds 5
    python benchmarks/throughput_vs_lightly.py --memory-format nchw   # like for like: both sides NCHW
    python benchmarks/throughput_vs_lightly.py --device cuda --amp --backbone resnet18 --batch 256  # a GPU

Both sides use the same backbone, batch size, input size and the same augmentation call
(``train.augment.ViewAugment``, so augmentation cost is identical); the method-specific parts
(heads, losses, momentum encoders, queues, Sinkhorn) are ours vs lightly's building blocks as in
lightly's own examples. A step = augment + forward + backward + optimizer step (+ EMA update).
Steps alternate ours / lightly in ABBA rounds so machine noise hits both alike; the ratio of median
step times is reported (>1 means ours is faster), for wall time and for process CPU time (the
latter is less sensitive to other load on a shared machine). Prints a table and writes JSON.

``--memory-format``: ``trainer`` (default) runs each side as it runs by default: ours as ``zoo train``
does (NHWC, the trainer's ``channels_last``), lightly's step as its examples write it (NCHW);
``nchw`` / ``nhwc`` give both sides the same format, to compare the methods' own work alone.
``swav`` is our default crop batching (one pass per crop on the CPU); ``swav_resolution`` is the
official per-resolution batching.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from train.augment import AugmentConfig, ViewAugment
from train.methods import StepContext, get_method
from zoo.model import ZooModel

ROOT = Path(__file__).resolve().parents[1]


def lightly_step_fn(method: str, backbone: nn.Module, dim: int, n_small: int):
    """A lightly training step for ``method`` (modules from lightly, as in its examples)."""
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss, SwaVLoss
    from lightly.models.modules import (
        BYOLPredictionHead,
        BYOLProjectionHead,
        MoCoProjectionHead,
        SimCLRProjectionHead,
        SwaVProjectionHead,
        SwaVPrototypes,
    )
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    if method == "simclr":
        head, loss_fn = SimCLRProjectionHead(dim, 512, 128), NTXentLoss(temperature=0.5)
        params = list(backbone.parameters()) + list(head.parameters())

        def step(views):
            z = head(backbone(torch.cat(views)))
            return loss_fn(*z.chunk(2))

    elif method == "moco":
        head = MoCoProjectionHead(dim, 512, 128)
        key_backbone, key_head = copy.deepcopy(backbone), copy.deepcopy(head)
        deactivate_requires_grad(key_backbone)
        deactivate_requires_grad(key_head)
        loss_fn = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))
        params = list(backbone.parameters()) + list(head.parameters())

        def step(views):
            update_momentum(backbone, key_backbone, 0.99)
            update_momentum(head, key_head, 0.99)
            q = head(backbone(views[0]))
            with torch.no_grad():
                k = key_head(key_backbone(views[1]))
            return loss_fn(q, k)

    elif method == "byol":
        proj, pred = BYOLProjectionHead(dim, 1024, 256), BYOLPredictionHead(256, 1024, 256)
        t_backbone, t_proj = copy.deepcopy(backbone), copy.deepcopy(proj)
        deactivate_requires_grad(t_backbone)
        deactivate_requires_grad(t_proj)
        loss_fn = NegativeCosineSimilarity()
        params = list(backbone.parameters()) + list(proj.parameters()) + list(pred.parameters())

        def step(views):
            update_momentum(backbone, t_backbone, 0.99)
            update_momentum(proj, t_proj, 0.99)
            p0, p1 = pred(proj(backbone(views[0]))), pred(proj(backbone(views[1])))
            with torch.no_grad():
                z0, z1 = t_proj(t_backbone(views[0])), t_proj(t_backbone(views[1]))
            return 0.5 * (loss_fn(p0, z1) + loss_fn(p1, z0))

    elif method == "swav":
        head, protos = SwaVProjectionHead(dim, 512, 128), SwaVPrototypes(128, 30)
        loss_fn = SwaVLoss()
        params = list(backbone.parameters()) + list(head.parameters()) + list(protos.parameters())

        def step(views):
            protos.normalize()
            outs = [protos(nn.functional.normalize(head(backbone(v)), dim=1)) for v in views]
            return loss_fn(outs[:2], outs[2:])

    else:
        raise ValueError(method)
    return step, params


def make_ours(method: str, model: ZooModel, n_small: int):
    kwargs = {
        "simclr": {"proj_hidden_dim": 512, "proj_dim": 128, "temperature": 0.5},
        "moco": {"proj_hidden_dim": 512, "proj_dim": 128, "queue_length": 4096, "momentum": 0.99},
        "byol": {"proj_hidden_dim": 1024, "proj_dim": 256, "pred_hidden_dim": 1024, "tau_base": 0.99},
        # default batching ("auto": one encoder pass per crop on the CPU, the work lightly's step does)
        "swav": {"num_prototypes": 30, "proj_hidden_dim": 512, "proj_dim": 128, "n_small_crops": n_small},
        # the official batching: one pass per crop size
        "swav_resolution": {"num_prototypes": 30, "proj_hidden_dim": 512, "proj_dim": 128, "n_small_crops": n_small,
                            "crop_batching": "resolution"},
    }[method]
    return get_method(base_method(method))(model, **kwargs)


def base_method(method: str) -> str:
    return method.removesuffix("_resolution")


def our_step_fn(ours: nn.Module, images: torch.Tensor, aug: ViewAugment,
                autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Callable[[], None]:
    """One of our training steps on ``images`` as the trainer runs it: augment + forward (under
    ``autocast``) + backward + AdamW + the method's hooks (EMA, queues, prototype normalisation)."""
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    ctx = StepContext(augment=aug, generator=torch.Generator().manual_seed(0), total_steps=1000)
    ours.on_train_start(ctx)
    indices = torch.arange(images.shape[0])

    def step() -> None:
        with autocast():
            out = ours.training_step(images, indices, ctx)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        ours.on_before_optimizer_step(ctx)
        opt.step()
        ours.on_after_optimizer_step(ctx)
        ctx.step += 1

    return step


def bench(method: str, args) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    aug = ViewAugment(AugmentConfig(size=args.size))
    images = torch.rand(args.batch, 3, args.size, args.size).to(device)
    n_small = 2 if method.startswith("swav") else 0
    ours_nhwc = args.memory_format in ("trainer", "nhwc")
    lightly_nhwc = args.memory_format == "nhwc"
    # --amp: both sides' forward and loss under bf16 autocast (the trainer's `amp: bf16`)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp else contextlib.nullcontext

    def sync() -> None:  # CUDA runs asynchronously: wait for the step before reading the clock
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with device:  # modules (and lightly's memory bank) are created on the device
        ours = make_ours(method, ZooModel(args.backbone, {}), n_small).train()
        lb = ZooModel(args.backbone, {}).backbone.train()
        l_fn, l_params = lightly_step_fn(base_method(method), lb, lb.num_features, n_small)
    if ours_nhwc:  # as Trainer.prepare_step does
        ours.to(memory_format=torch.channels_last)
    if lightly_nhwc:  # the heads are linear layers: only the backbone has a memory format
        lb.to(memory_format=torch.channels_last)
    if args.compile:  # both backbones, as the trainer's `torch_compile` does for ours
        ours.model.backbone.compile()
        lb.compile()
    our_step = our_step_fn(ours, images, aug, autocast)
    l_opt = torch.optim.AdamW(l_params, lr=1e-3)
    lgen = torch.Generator().manual_seed(0)

    def lightly_step():
        with autocast():  # augmentation inside too, as in our training_step
            if method.startswith("swav"):
                views = aug.multi_crop(images, lgen, n_large=2, n_small=n_small)
            else:
                views = aug.views(images, lgen, 2)
            loss = l_fn(views)
        l_opt.zero_grad(set_to_none=True)
        loss.backward()
        l_opt.step()

    for _ in range(args.warmup):
        our_step()
        lightly_step()
    sync()
    wall = {"ours": [], "lightly": []}
    cpu = {"ours": [], "lightly": []}
    steps = {"ours": our_step, "lightly": lightly_step}
    for r in range(args.rounds):
        # ABBA order: neither side always runs first (caches, frequency scaling, a neighbour's load)
        for name in ("ours", "lightly") if r % 2 == 0 else ("lightly", "ours"):
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                steps[name]()
            sync()
            wall[name].append((time.perf_counter() - start) / args.steps)
            cpu[name].append((time.process_time() - start_cpu) / args.steps)
    ours_t, lightly_t = statistics.median(wall["ours"]), statistics.median(wall["lightly"])
    ours_c, lightly_c = statistics.median(cpu["ours"]), statistics.median(cpu["lightly"])
    low, high = paired_ratio_interval(wall["lightly"], wall["ours"])
    return {"method": method, "ours_img_s": args.batch / ours_t, "lightly_img_s": args.batch / lightly_t,
            "ratio": lightly_t / ours_t, "ratio_ci95": [low, high], "cpu_ratio": lightly_c / ours_c,
            "ours_step_s": ours_t, "lightly_step_s": lightly_t, "ours_cpu_s": ours_c, "lightly_cpu_s": lightly_c}


def paired_ratio_interval(lightly: list[float], ours: list[float], n_boot: int = 2000) -> tuple[float, float]:
    """95 % bootstrap interval of the median per-round ratio lightly / ours (rounds are paired: the
    two sides of a round ran back to back, so machine load hits both alike)."""
    import numpy as np

    ratios = np.asarray(lightly) / np.asarray(ours)
    rng = np.random.default_rng(0)
    boots = np.median(rng.choice(ratios, size=(n_boot, len(ratios)), replace=True), axis=1)
    return float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="simclr,moco,byol,swav,swav_resolution")
    parser.add_argument("--memory-format", choices=["trainer", "nchw", "nhwc"], default="trainer",
                        help="trainer: each side's default (ours NHWC, lightly NCHW); nchw/nhwc: both sides")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on both sides")
    parser.add_argument("--compile", action="store_true", help="torch.compile both backbones")
    parser.add_argument("--backbone", default="convnet")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "throughput_vs_lightly.json"))
    args = parser.parse_args()
    rows = [bench(m, args) for m in args.methods.split(",")]
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"cpu threads={torch.get_num_threads()}"
    print(f"backbone={args.backbone} size={args.size} batch={args.batch} device={where} "
          f"memory format={args.memory_format} amp={'bf16' if args.amp else 'off'} compile={args.compile}")
    print("| method | ours img/s | lightly img/s | ours / lightly (wall) | 95 % interval | ours / lightly (CPU time) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["ratio_ci95"]
        print(f"| {r['method']} | {r['ours_img_s']:.1f} | {r['lightly_img_s']:.1f} | {r['ratio']:.2f} "
              f"| {low:.2f}-{high:.2f} | {r['cpu_ratio']:.2f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "platform": platform.platform(),
                                           "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
