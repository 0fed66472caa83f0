"""``zoo convert``: an official checkpoint -> a zoo model folder."""

from __future__ import annotations

import argparse
import json

EPILOG = """example:
  zoo convert moco_v2_800ep_pretrain.pth.tar --out models/moco_v2_resnet50
  zoo convert deepclusterv2_800ep_pretrain.pth.tar --format deepcluster_v2 --out models/dcv2_resnet50
  zoo convert scan_model.pth.tar --format scan --dataset cifar-10 --out models/scan_cifar10 --name scan_resnet18_cifar10
  zoo convert scan_stl-10.pth.tar --dataset stl-10 --out models/scan_stl10
  zoo convert solo_simclr.ckpt --arch resnet18 --arch-kwargs '{"cifar_stem": true}' --out models/simclr_r18"""


def cmd_convert(args: argparse.Namespace) -> int:
    from zoo.convert import convert

    arch_kwargs = None
    if args.arch_kwargs:
        try:
            arch_kwargs = json.loads(args.arch_kwargs)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--arch-kwargs is not JSON: {exc}") from exc
        if not isinstance(arch_kwargs, dict):
            raise ValueError("--arch-kwargs must be a JSON object, e.g. '{\"cifar_stem\": true}'")
    model = convert(
        args.src,
        fmt=args.format,
        out=args.out,
        arch=args.arch,
        arch_kwargs=arch_kwargs,
        name=args.name,
        keep_head=args.keep_head,
        dataset=args.dataset,
    )
    cfg = model.config()
    clusters = f", {cfg['num_clusters']} clusters x {cfg['num_cluster_heads']} head(s)" if model.has_cluster_head else ""
    print(
        f"converted {args.src} ({cfg['converted_from']}, method {cfg['method']}) -> {args.out}: "
        f"{cfg['architecture']} {cfg['arch_kwargs']}, {cfg['embed_dim']}-d features{clusters}"
    )
    for message in cfg.get("conversion_warnings", []):
        print(f"warning: {message}")
    from zoo.convert.check import summarize

    for line in summarize(cfg["conversion_check"]):
        print(line)
    return 0


def register(sub) -> None:
    from zoo.convert import ALIASES, FORMATS

    p = sub.add_parser(
        "convert",
        help="convert an official checkpoint (MoCo, SwAV, DINO, SCAN, solo-learn, lightly) to a model folder",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="checkpoint file (.pth, .pth.tar, .ckpt, .safetensors) or http(s) URL")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS, *ALIASES], help="checkpoint layout (default: detect)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--arch", help="architecture (default: inferred from the weights), e.g. resnet50, vit_s16")
    p.add_argument("--arch-kwargs", help="architecture arguments as JSON, e.g. '{\"cifar_stem\": true}'")
    p.add_argument(
        "--dataset",
        help="what the file was trained on, where the weights fit several architectures "
        "(SCAN: cifar-10, cifar-20, stl-10)",
    )
    p.add_argument("--name", help="model name in the config (default: the file's name)")
    p.add_argument("--keep-head", action="store_true", help="keep projection/prototype heads in heads.safetensors")
    p.set_defaults(func=cmd_convert)
