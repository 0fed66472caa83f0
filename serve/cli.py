"""``zoo export`` / ``zoo triton`` / ``zoo serve`` / ``zoo index`` / ``zoo demo``.

Parsers only: each command's work lives in its module (imported when the command runs, so
``zoo --help`` never imports torch, onnxruntime, faiss or gradio).
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Callable

DEFAULT_MODEL = "scan_convnet_mnist5k"
RAW = argparse.RawDescriptionHelpFormatter


def _runs(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """The command's handler ``serve.<module>.<function>(args)``, imported only when the command runs."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"serve.{module}"), function)(args)

    return run


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model to ONNX (+ parity check against PyTorch)",
                       formatter_class=RAW, epilog="example:\n  zoo export scan_convnet_mnist5k --onnx runs/scan.onnx")
    p.add_argument("model", help="registered name, model folder or hf-hub:ORG/NAME")
    p.add_argument("--onnx", required=True, help="output .onnx file (written atomically)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    p.add_argument("--check-data", help="dataset for the real-image parity check (default: the model's)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed (default 1e-4)")

    p.set_defaults(func=_runs("onnx", "cli_export"))


def _add_triton(sub) -> None:
    p = sub.add_parser("triton", help="write a Triton Inference Server model repository (onnxruntime_onnx)",
                       formatter_class=RAW,
                       epilog="example:\n  zoo triton scan_convnet_mnist5k --out runs/triton_repo")
    p.add_argument("model", help="registered name, model folder, hf-hub:ORG/NAME or an exported .onnx")
    p.add_argument("--out", required=True, help="model repository folder")
    p.add_argument("--name", help="model name in the repository (default: the zoo name)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-queue-delay-us", type=int, default=500, help="dynamic batching queue delay")
    p.add_argument("--instances", type=int, default=1, help="instance_group count")
    p.add_argument("--kind", choices=["auto", "gpu", "cpu"], default="gpu", help="instance_group kind")

    p.set_defaults(func=_runs("triton", "cli_triton"))


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="HTTP feature server (KServe v2 / Triton protocol, /embed /search /classify, demo)",
        formatter_class=RAW,
        epilog="examples:\n  zoo serve                      # shipped SCAN model, mnist5k index, demo at /demo\n"
               "  zoo serve --model simclr_convnet_mnist5k --index runs/idx --port 8080\n"
               "  zoo serve --model runs/swav_r50 --images ./my_photos   # any model folder, your images\n"
               "  zoo serve --backend triton     # same model inside a real Triton server (PyTriton)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model to serve (default {DEFAULT_MODEL})")
    p.add_argument("--index", help="index folder from `zoo index build` for /search (default: built "
                                   "in memory from --images / --data)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", help="folder of your images (recursive): embedded at start into the in-memory "
                                      "index and the demo; unreadable files are reported and skipped")
    src.add_argument("--data", default=None, help="dataset behind the in-memory index and the demo, test split "
                                                  "(default: the model's training dataset when this machine has "
                                                  "it; otherwise /search and /demo stay off until one is given)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001,
                   help="KServe v2 gRPC (Triton's GRPCInferenceService) port, embedded backend (default 8001 "
                        "as Triton; 0: a free port, printed at start; -1: no gRPC)")
    p.add_argument("--backend", choices=["embedded", "triton"], default="embedded")
    p.add_argument("--max-batch-size", type=int, default=32, help="dynamic batching: largest merged batch")
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0,
                   help="dynamic batching: how long the first request waits for others")
    p.add_argument("--api-key", default=os.environ.get("ZOO_API_KEY"),
                   help="bearer token required on everything but health (default: $ZOO_API_KEY)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="request body limit")
    p.add_argument("--timeout-s", type=float, default=30.0, help="per-request timeout")
    p.add_argument("--no-demo", action="store_true", help="do not mount the Gradio demo at /demo (it is mounted "
                                                          "only when there are images to show)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")

    p.set_defaults(func=_runs("server", "cli_serve"))


def _add_index(sub) -> None:
    p = sub.add_parser("index", help="image index (faiss or Milvus): build, search, add, remove, info",
                       formatter_class=RAW,
                       epilog="examples:\n  zoo index build scan_convnet_mnist5k --data mnist5k --out runs/idx\n"
                              "  zoo index build scan_convnet_mnist5k --data mnist5k --out runs/idx --backend milvus "
                              "--uri ./zoo.db\n"
                              "  zoo index search runs/idx query.png -k 10")
    isub = p.add_subparsers(dest="index_cmd", required=True, metavar="{build,search,add,remove,info}")

    b = isub.add_parser("build", help="embed images and build an index")
    b.add_argument("model", help="registered name, model folder or hf-hub:ORG/NAME")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (recursive)")
    src.add_argument("--data", help="bundled dataset name (mnist5k, digits, shapes, ...)")
    src.add_argument("--features", help="feature folder from `zoo embed` (sharded extraction)")
    b.add_argument("--split", default="train", help="dataset split for --data (default train)")
    b.add_argument("--out", required=True, help="index folder (written atomically)")
    b.add_argument("--type", default="auto", choices=["auto", "flat", "hnsw", "ivf", "ivfpq"])
    b.add_argument("--memory-budget-mb", type=float, default=1024.0, help="for --type auto")
    b.add_argument("--target-recall", type=float, default=0.95, help="recall@10 the search parameter is tuned for")
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--backend", default="faiss", choices=["faiss", "milvus"],
                   help="faiss: in-process, in the --out folder; milvus: a Milvus collection at --uri")
    b.add_argument("--uri", help="for --backend milvus: ./zoo.db (Milvus Lite) or http://host:19530")
    b.add_argument("--collection", help="for --backend milvus: collection name (default: the --out folder's name)")

    s = isub.add_parser("search", help="k nearest items of one or more query images")
    s.add_argument("index", help="index folder (or URI#collection for a Milvus index)")
    s.add_argument("images", nargs="+", help="query image files")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")

    a = isub.add_parser("add", help="embed more images into an existing index")
    a.add_argument("index", help="index folder")
    asrc = a.add_mutually_exclusive_group(required=True)
    asrc.add_argument("--images", help="folder of images")
    asrc.add_argument("--data", help="bundled dataset name")
    a.add_argument("--split", default="train")

    r = isub.add_parser("remove", help="remove items by id or by path")
    r.add_argument("index", help="index folder")
    r.add_argument("items", nargs="+", help="ids (integers) or item paths")

    i = isub.add_parser("info", help="what an index holds")
    i.add_argument("index", help="index folder")

    p.set_defaults(func=_runs("index", "cli_index"))


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="Gradio app: unlabelled images sorted into clusters, search by example",
                       formatter_class=RAW,
                       epilog="examples:\n  zoo demo                                # shipped SCAN model on mnist5k\n"
                              "  zoo demo --images ./my_photos --model dino_vits16_in1k --clusters 8")
    p.add_argument("--model", default=DEFAULT_MODEL)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", help="folder of images (recursive)")
    src.add_argument("--data", help="bundled dataset name (default: the model's dataset)")
    p.add_argument("--split", default="test", help="dataset split for --data (default test)")
    p.add_argument("--clusters", type=int, help="K for k-means (default: the cluster head, else chosen by "
                                                "silhouette over a range)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)

    p.set_defaults(func=_runs("demo", "cli_demo"))


def register(sub) -> None:
    _add_export(sub)
    _add_triton(sub)
    _add_serve(sub)
    _add_index(sub)
    _add_demo(sub)
