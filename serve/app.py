"""What ``zoo serve`` (the embedded backend) serves, from its arguments: the encoder, the index behind
``/search`` and the demo at ``/demo``.

Any model the zoo can load is served: a registered name, a folder from ``zoo train`` / ``zoo convert``
/ ``zoo publish``, ``hf-hub:ORG/NAME`` or a bare ``.onnx``. ``/v2``, ``/embed`` and ``/classify`` need
only the model. ``/search`` and the demo need images, which come from

- ``--index DIR``: an index folder from ``zoo index build`` (``/search`` only);
- ``--images DIR``: a folder of the user's images, embedded at start (progress bar; unreadable files
  reported and skipped);
- ``--data NAME``: a dataset the zoo loads (``mnist5k``, ``digits``, ``shapes``, ``cifar10`` where its
  files are), test split;
- by default, the model's own training dataset when this machine can load it (the shipped
  ``scan_convnet_mnist5k`` on mnist5k). When it cannot (``imagenet-1k``, ``cifar10`` without its
  files, no dataset recorded), the server still starts: ``/search`` and ``/demo`` answer saying why
  and how to attach images.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

# Datasets that ship with installed packages or are generated: loadable on any machine, no probe needed.
BUNDLED_DATASETS = ("mnist5k", "digits", "shapes")
HOW_TO_ATTACH = ("start the server with --index DIR (an index from `zoo index build`), --images DIR (a folder "
                 "of your images, embedded at start) or --data NAME (a dataset: mnist5k, digits, shapes, ...)")


@dataclass
class ImageSource:
    """Where the in-memory index and the demo get their images: a folder, a dataset, or nothing (and why)."""

    images: str | None = None
    data: str | None = None
    why_none: str = ""

    @property
    def label(self) -> str:
        return f"folder {self.images}" if self.images else f"{self.data} test split"


def dataset_available(name: str | None) -> tuple[bool, str]:
    """Whether ``load_dataset(name, "test")`` works on this machine (no download), else the reason."""
    from zoo.data import list_datasets, load_dataset

    if not name:
        return False, "the model records no training dataset"
    base = name.split("_lt")[0]
    if base in BUNDLED_DATASETS and name in list_datasets():
        return True, ""
    if name not in list_datasets():
        return False, f"the model's training dataset {name!r} is not one the zoo can load here"
    try:
        load_dataset(name, "test")
    except (FileNotFoundError, RuntimeError, OSError, ValueError) as e:
        return False, f"the model's training dataset {name!r} is not on this machine ({e})"
    return True, ""


def image_source(args: argparse.Namespace, cfg: dict[str, Any], have_model: bool) -> ImageSource:
    """The images behind the default index and the demo, from ``--images`` / ``--data`` / the model's dataset.

    ``have_model`` is False for a bare ``.onnx`` (no PyTorch model to embed with). Explicit ``--images``
    / ``--data`` that cannot be used raise ``ValueError``; a default that cannot be loaded gives no
    source and the reason.
    """
    images, data = getattr(args, "images", None), getattr(args, "data", None)
    if images and data:
        raise ValueError("give --images DIR or --data NAME, not both")
    if not have_model:
        if images or data:
            raise ValueError("--images / --data embed images with the PyTorch model, which a bare .onnx file does "
                             "not have: serve the model's name or folder, or build an index with `zoo index "
                             "build` and pass --index DIR")
        return ImageSource(why_none="the server runs a bare .onnx file, which cannot embed a dataset at start")
    if images:
        return ImageSource(images=str(images))
    if data:
        return ImageSource(data=str(data))
    ok, why = dataset_available(cfg.get("dataset"))
    return ImageSource(data=cfg["dataset"]) if ok else ImageSource(why_none=why)


def _no_demo_route(app: FastAPI, why: str) -> None:
    """``/demo`` (and below) answers 404 saying why there is no demo and how to get one."""
    message = f"no demo on this server: {why}"

    async def no_demo() -> JSONResponse:
        return JSONResponse({"error": message}, status_code=404)

    for path in ("/demo", "/demo/", "/demo/{rest:path}"):
        app.add_api_route(path, no_demo, methods=["GET", "POST"], include_in_schema=False)


def _report_skipped(skipped: list[tuple[str, str]]) -> None:
    for path, reason in skipped[:20]:
        print(f"zoo serve: skipped unreadable image {path}: {reason}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"zoo serve: ... and {len(skipped) - 20} more unreadable images skipped", file=sys.stderr)


def build_embedded(args: argparse.Namespace) -> tuple[FastAPI, dict[str, Any]]:
    """The app for ``zoo serve`` (embedded backend) and what it serves: ``info`` has ``model``, ``backend``,
    ``index`` (a description or None), ``demo`` (bool) and ``notes`` (why /search or /demo is off)."""
    from serve.onnx import OnnxEncoder, load_model, onnx_for_model
    from serve.server import create_app

    info: dict[str, Any] = {"backend": "embedded, onnxruntime", "index": None, "demo": False, "notes": []}
    model = None
    if str(args.model).endswith(".onnx"):
        encoder = OnnxEncoder(args.model, threads=args.threads)
    else:
        model = load_model(args.model)  # registered name (pretrained when it has weights), folder, hf-hub:
        encoder = OnnxEncoder(onnx_for_model(model), threads=args.threads)
    encoders = [encoder]
    if model is not None and hasattr(model, "embed_text"):  # image-text model: its text tower beside it
        from serve.onnx_text import OnnxTextEncoder, text_onnx_for_model

        encoders.append(OnnxTextEncoder(text_onnx_for_model(model), threads=args.threads))
    info["model"] = encoder.name
    source = image_source(args, encoder.pretrained_cfg, have_model=model is not None)
    want_demo = not args.no_demo
    index = session = None
    if args.index:
        from serve.index import FeatureIndex

        index = FeatureIndex.load(args.index)
        if index.model_name != encoder.name:
            raise ValueError(f"index {args.index} was built by model {index.model_name!r}, but the server runs "
                             f"{encoder.name!r}; build one with `zoo index build {encoder.name} ... --out DIR`")
        info["index"] = f"{args.index} ({index.ntotal} items)"
        if source.images and not want_demo:
            raise ValueError("--images builds the in-memory index and the demo; with --index and --no-demo "
                             "there is nothing left for it to do")
    if model is not None and (source.images or source.data) and (want_demo or index is None):
        if want_demo:
            from serve import demo

            session = demo.build_session(model, images=source.images, data=source.data, split="test", progress=True)
            skipped = session.skipped
            built = session.index
        else:
            from serve.index import build_index
            from zoo.data.folder import check_image

            built = build_index(model, images=source.images, data=source.data, split="test", progress=True)
            skipped = [(p, check_image(p, full=True) or "unreadable") for p in getattr(built, "skipped", [])]
        _report_skipped(skipped)
        if index is None:
            index = built
            extra = f", {len(skipped)} unreadable skipped" if skipped else ""
            info["index"] = f"{source.label}, in memory ({index.ntotal} items{extra})"
    if index is None:
        why = source.why_none or "no images were given"
        info["notes"].append(f"/search is off: {why}; to attach an index, {HOW_TO_ATTACH}")
    if session is not None:
        demo_why = ""
    elif args.no_demo:
        demo_why = "it was turned off with --no-demo"
    elif model is None:
        demo_why = "the server runs a bare .onnx file and the demo needs the PyTorch model; serve the model's " \
                   "name or folder instead"
    else:
        demo_why = f"{source.why_none}; to get one, start the server with --images DIR (a folder of your " \
                   "images) or --data NAME (a dataset: mnist5k, digits, shapes, ...)"
    if demo_why and not args.no_demo:
        info["notes"].append(f"/demo is off: {demo_why}")
    info["demo"] = session is not None

    def demo_mount(app: FastAPI) -> None:
        if session is not None:
            from serve import demo

            demo.mount_demo(app, session, path="/demo")
        else:
            _no_demo_route(app, demo_why)

    app = create_app(encoders, index, api_key=args.api_key, max_batch_size=args.max_batch_size,
                     max_queue_delay_ms=args.max_queue_delay_ms, max_body_bytes=int(args.max_body_mb * 2**20),
                     timeout_s=args.timeout_s, demo_mount=demo_mount)
    for served in app.state.zoo["models"].values():
        served.preprocessor  # noqa: B018 - build (and check) the preprocessing before the first request
    return app, info
