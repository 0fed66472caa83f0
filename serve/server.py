"""HTTP feature server: KServe v2 / Triton protocol with dynamic batching, plus endpoints for people.

``create_app(encoder, index)`` builds a FastAPI app around an in-process onnxruntime encoder
(:class:`serve.onnx.OnnxEncoder`, or any object with the same attributes and ``run``):

- KServe v2 / Triton HTTP protocol (``/v2``, ``/v2/health/{live,ready}``, ``/v2/models/{name}[/versions/1]``,
  ``.../ready``, ``.../config``, ``/v2/repository/index``, ``.../infer`` with JSON tensors and the binary
  tensor data extension), so ``tritonclient.http.InferenceServerClient`` works unchanged;
- ``POST /embed`` (images -> features), ``POST /search`` (image -> nearest indexed items),
  ``POST /classify`` (image -> cluster of the model's cluster head);
- ``GET /metrics`` (Prometheus text: requests, failures, batch sizes, queue wait, compute time, in flight).

The per-model core (:class:`ServerMetrics`, :class:`DynamicBatcher`, :class:`ServedModel`) lives in
:mod:`serve.batching`, shared with the gRPC front end (:mod:`serve.grpc_server`); the ASGI guard (auth,
limits, metrics) and the infer fast path in :mod:`serve.guard`; KServe parsing in :mod:`serve.kserve`.

Requests are merged by a :class:`DynamicBatcher` per model: the first queued request waits at most
``max_queue_delay_ms`` for others, up to ``max_batch_size`` images go into ONE ``encoder.run`` call in a
worker thread (the event loop stays free), and the results are split back. Optional bearer-token auth
(everything but ``/v2/health/*``), a request body limit (413, from Content-Length and while streaming),
a per-request timeout (504). Client errors are 4xx with ``{"error": "..."}`` naming the problem.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.batching import DynamicBatcher, ServedModel, ServerMetrics, _Job  # noqa: F401 - re-exported
from serve.guard import (  # noqa: F401 - re-exported
    DEMO_COOKIE,
    DEMO_PREFIX,
    HEALTH_PREFIX,
    InferFastPath,
    _error_response,
    _Guard,
    _ZooApp,
    bearer_token_ok,
)
from serve.kserve import (
    INFER_HEADER,
    MODEL_VERSION,
    ApiError,
    build_infer_response,
    decompress,
    parse_infer_request,
    requested_outputs,
)
from serve.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_and_preprocess,
    release_memory,
)

if TYPE_CHECKING:
    from serve.index import FeatureIndex
    from serve.onnx import OnnxEncoder

# Request bodies below this size are parsed on the event loop (no worker-thread hop).
INLINE_PARSE_BYTES = 64 << 10


# -------------------------------------------------------------------------------- KServe v2 request


# KServe v2 request parsing and response building live in serve/kserve.py (shared with other front ends);
# the names stay importable from here.
_decompress = decompress
_requested_outputs = requested_outputs


# ----------------------------------------------------------------------------------------- the app


def create_app(
    encoder: OnnxEncoder | Sequence[OnnxEncoder],
    index: FeatureIndex | None = None,
    *,
    api_key: str | None = None,
    max_batch_size: int = 32,
    max_queue_delay_ms: float = 2.0,
    max_body_bytes: int = 16 * 2**20,
    timeout_s: float = 30.0,
    demo_mount: Callable[[FastAPI], Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_files: int = 256,
    parse_workers: int | None = None,
) -> FastAPI:
    """The feature server app for ``encoder`` (or several), with ``index`` behind ``/search``.

    ``index`` must have been built by the served model (same name); ``demo_mount(app)`` mounts extra
    routes (the Gradio demo). Everything but ``/v2/health/*`` needs ``Authorization: Bearer <api_key>``
    when ``api_key`` is set. ``app.state.zoo`` holds the served models, batchers and metrics.

    Request bodies are parsed and images decoded off the event loop, in a pool of ``parse_workers``
    threads (default ``min(4, CPUs)``), one image at a time per request; that bounds the memory of
    decoding to ``parse_workers`` images in flight (see :mod:`serve.preprocess` for the per-image bound).
    """
    encoders = list(encoder) if isinstance(encoder, (list, tuple)) else [encoder]
    if not encoders:
        raise ValueError("create_app needs at least one encoder")
    if timeout_s <= 0 or max_body_bytes <= 0:
        raise ValueError("timeout_s and max_body_bytes must be positive")
    metrics = ServerMetrics()
    delay_s = max_queue_delay_ms / 1000.0
    models: dict[str, ServedModel] = {}
    for enc in encoders:
        batcher = DynamicBatcher(enc, max_batch_size=max_batch_size, max_queue_delay_s=delay_s, metrics=metrics)
        served = ServedModel(enc, batcher, max_batch_size, delay_s)
        if served.name in models:
            raise ValueError(f"two encoders named {served.name!r}")
        models[served.name] = served
    default = next(iter(models.values()))
    if index is not None:
        if index.model_name not in models:
            raise ValueError(f"the index was built by model {index.model_name!r} but the server runs "
                             f"{sorted(models)}; rebuild it with `zoo index build {default.name} ...`")
        if int(index.dim) != models[index.model_name].embed_dim:
            raise ValueError(f"the index holds {index.dim}-d features but model {index.model_name!r} gives "
                             f"{models[index.model_name].embed_dim}-d")

    # Front ends beside HTTP (serve.grpc_server) started/stopped with the app, in uvicorn's event loop:
    # they share the batchers, which live on that loop. Stopped before the batchers close.
    services: list[Any] = []

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        started = []
        try:
            for svc in services:
                await svc.start()
                started.append(svc)
            yield
        finally:
            for svc in reversed(started):
                await svc.stop()
            for mdl in models.values():
                await mdl.batcher.aclose()
            parse_pool.shutdown(wait=False)

    try:
        from importlib.metadata import version as _pkg_version

        server_version = _pkg_version("selfsup-zoo")
    except Exception:  # noqa: BLE001 - running from a source tree
        server_version = "0"
    app = _ZooApp(title="selfsup-zoo feature server", version=server_version, lifespan=lifespan,
                  description="KServe v2 / Triton HTTP protocol (+ binary tensor data), image upload -> "
                              "features / nearest neighbours / cluster, Prometheus /metrics.")
    workers = parse_workers if parse_workers is not None else min(4, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"parse_workers must be >= 1, got {workers}")
    # Bounded pool for JSON parsing and image decoding: the event loop keeps answering /v2/health and
    # /metrics while large bodies are parsed, and at most `workers` images are decoded at once.
    parse_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zoo-parse")
    app.state.zoo = {"models": models, "index": index, "metrics": metrics, "default": default.name,
                     "parse_pool": parse_pool,
                     "api_key": api_key or None, "max_body_bytes": int(max_body_bytes), "timeout_s": float(timeout_s),
                     "version": server_version, "services": services}

    # ---- errors: always {"error": "..."}
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(ImageDecodeError)
    async def _decode_error(_req: Request, exc: ImageDecodeError) -> JSONResponse:
        return _error_response(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query"))
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return _error_response(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception) -> JSONResponse:
        return _error_response(500, f"internal server error: {type(exc).__name__}: {exc}")

    # ---- helpers
    def get_model(name: str, version: str | None = None) -> ServedModel:
        mdl = models.get(name)
        if mdl is None:
            raise ApiError(404, f"unknown model {name!r}; this server has {sorted(models)}")
        if version not in (None, "", MODEL_VERSION):
            raise ApiError(404, f"model {name!r} has no version {version!r}; versions: [{MODEL_VERSION!r}]")
        return mdl

    async def timed(coro: Awaitable[Any]) -> Any:
        try:
            return await asyncio.wait_for(coro, timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            raise ApiError(504, f"request did not finish within the server timeout of {timeout_s:g} s") from None

    async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(parse_pool, fn, *args)

    def uploads_of(file: list[UploadFile] | None, files: list[UploadFile] | None) -> list[UploadFile]:
        """The uploaded images under either form field name (``file`` or ``files``, one or several)."""
        uploads = [*(file or []), *(files or [])]
        if not uploads:
            raise ApiError(400, "no image file in the request (multipart form field 'file' or 'files')")
        if len(uploads) > max_files:
            raise ApiError(400, f"{len(uploads)} files in one request; the limit is {max_files}")
        return uploads

    async def encode_uploads(mdl: ServedModel, uploads: Sequence[UploadFile], output: str
                             ) -> tuple[np.ndarray, list[str]]:
        """``output`` rows of the encoder for each upload, and the file names.

        Images are decoded and preprocessed one at a time in the parse pool and sent to the batcher in
        chunks of ``max_batch_size``: a request holds one decoded image and one chunk of model inputs.
        """
        names = [u.filename or f"file{i}" for i, u in enumerate(uploads)]
        pre = mdl.preprocessor
        parts = []
        for start in range(0, len(uploads), mdl.max_batch_size):
            chunk = range(start, min(start + mdl.max_batch_size, len(uploads)))
            x = np.empty((len(chunk), *mdl.input_shape), dtype=np.float32)
            for row, i in enumerate(chunk):
                data = await uploads[i].read()
                x[row] = await off_loop(partial(decode_and_preprocess, data, pre, max_pixels=max_pixels,
                                                name=names[i]))
                del data
            parts.append((await mdl.batcher.submit(x))[output])
            del x
        return np.concatenate(parts), names

    from serve.text import register_text_routes  # text towers of image-text models (serve/text.py)

    app.state.zoo["text"] = register_text_routes(app, models, index, timed)

    # ---- KServe v2 / Triton
    @app.get("/v2", tags=["kserve-v2"])
    async def server_metadata() -> dict[str, Any]:
        return {"name": "selfsup-zoo", "version": server_version,
                "extensions": ["binary_tensor_data", "model_configuration", "model_repository"]}

    @app.get(HEALTH_PREFIX + "/live", tags=["kserve-v2"])
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get(HEALTH_PREFIX + "/ready", tags=["kserve-v2"])
    async def ready() -> dict[str, Any]:
        return {"ready": True}

    @app.get("/v2/models/{name}", tags=["kserve-v2"])
    @app.get("/v2/models/{name}/versions/{version}", tags=["kserve-v2"])
    async def model_metadata(name: str, version: str | None = None) -> dict[str, Any]:
        return get_model(name, version).metadata()

    @app.get("/v2/models/{name}/ready", tags=["kserve-v2"])
    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["kserve-v2"])
    async def model_ready(name: str, version: str | None = None) -> dict[str, Any]:
        get_model(name, version)
        return {"name": name, "ready": True}

    @app.get("/v2/models/{name}/config", tags=["kserve-v2"])
    @app.get("/v2/models/{name}/versions/{version}/config", tags=["kserve-v2"])
    async def model_config(name: str, version: str | None = None) -> dict[str, Any]:
        return get_model(name, version).config()

    @app.post("/v2/repository/index", tags=["kserve-v2"])
    async def repository_index() -> list[dict[str, Any]]:
        return [{"name": n, "version": MODEL_VERSION, "state": "READY"} for n in models]

    @app.post("/v2/repository/models/{name}/load", tags=["kserve-v2"])
    async def repository_load(name: str) -> dict[str, Any]:
        get_model(name)  # every served model is loaded for the life of the server
        return {}

    @app.post("/v2/repository/models/{name}/unload", tags=["kserve-v2"])
    async def repository_unload(name: str) -> dict[str, Any]:
        get_model(name)
        raise ApiError(400, "the embedded server cannot unload models; stop the server instead")

    async def infer_body(name: str, version: str | None, chunks: list[bytes], encoding: str,
                         header_length: str | None) -> tuple[bytes, dict[str, str]]:
        """One v2 infer request's body (as received, in chunks) -> response body and headers."""
        mdl = get_model(name, version)
        body = chunks[0] if len(chunks) == 1 else (b"" if not chunks else await off_loop(b"".join, chunks))
        del chunks

        def parse() -> tuple[dict[str, Any], np.ndarray, list[tuple[str, bool]]]:
            req, images = parse_infer_request(decompress(body, encoding, max_body_bytes), header_length, mdl)
            return req, images, requested_outputs(req, mdl)  # validated before computing

        # Small bodies parse in microseconds: a thread hop would cost more than it frees the loop.
        small = len(body) < INLINE_PARSE_BYTES and encoding in ("", "identity")
        req, images, wanted = parse() if small else await off_loop(parse)
        if len(body) >= 4 << 20:  # the parsed lists and copies are freed: give their pages back
            del body
            await off_loop(release_memory)
        try:  # the batcher's own timeout: no wait_for task per request on this hot path
            out = await mdl.batcher.submit(images, timeout=timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            raise ApiError(504, f"request did not finish within the server timeout of {timeout_s:g} s") from None
        if small and len(images) <= 64:
            return build_infer_response(req, mdl, out, wanted)
        return await off_loop(build_infer_response, req, mdl, out, wanted)

    # The route (OpenAPI, and the path for text towers); image models' requests take serve.guard.InferFastPath,
    # which calls infer_body straight from ASGI (serve/guard.py).
    @app.post("/v2/models/{name}/infer", tags=["kserve-v2"])
    @app.post("/v2/models/{name}/versions/{version}/infer", tags=["kserve-v2"])
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        chunks = [c async for c in request.stream() if c]  # Starlette ends the stream with an empty chunk
        content, headers = await infer_body(name, version, chunks, request.headers.get("content-encoding", ""),
                                            request.headers.get(INFER_HEADER))
        return Response(content, headers=headers, media_type=headers["Content-Type"])

    # ---- for people
    @app.get("/", tags=["info"])
    async def root() -> dict[str, Any]:
        return {"service": "selfsup-zoo feature server", "models": sorted(models),
                "index": None if index is None else {"model": index.model_name, "size": int(index.ntotal)},
                "endpoints": ["/embed", "/search", "/classify", "/v2", "/metrics", "/docs"]}

    upload_doc = ("image file(s): the form field may be named 'file' or 'files' (either, or both), each "
                  "holding one or several files")

    def per_file(names: list[str], rows: list[dict[str, Any]], common: dict[str, Any]) -> dict[str, Any]:
        """One file: its result at the top level; several: ``results``, one entry per file, in order."""
        if len(rows) == 1:
            return {**common, "file": names[0], **rows[0]}
        return {**common, "results": [{"file": n, **r} for n, r in zip(names, rows, strict=True)]}

    @app.post("/embed", tags=["images"], description="Features of each uploaded image. " + upload_doc + ".")
    async def embed(
        file: list[UploadFile] | None = File(None, description=upload_doc),
        files: list[UploadFile] | None = File(None, description=upload_doc),
        normalize: bool = Query(True, description="L2-normalise (like model.embed); false: raw forward_features"),
        model: str | None = Query(None, description="served model (default: the first)"),
    ) -> dict[str, Any]:
        mdl = get_model(model or default.name)
        uploads = uploads_of(file, files)

        async def work() -> dict[str, Any]:
            feats, names = await encode_uploads(mdl, uploads, "features")
            feats = feats.astype(np.float32)
            if normalize:
                feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
            return {"model": mdl.name, "dim": int(feats.shape[1]), "normalized": normalize,
                    "embeddings": feats.tolist(), "files": names}

        return await timed(work())

    @app.post("/search", tags=["images"],
              description="Nearest indexed items of the uploaded image; several images: one result each. "
                          + upload_doc + ".")
    async def search(
        file: list[UploadFile] | None = File(None, description=upload_doc),
        files: list[UploadFile] | None = File(None, description=upload_doc),
        k: int = Query(10, ge=1, le=1000, description="number of neighbours"),
    ) -> dict[str, Any]:
        if index is None:
            raise ApiError(409, "no index is loaded, so there is nothing to search: start the server with "
                                "--index DIR (an index from `zoo index build`), --images DIR (a folder of your "
                                "images, embedded at start) or --data NAME (a dataset: mnist5k, digits, shapes, ...)")
        mdl = get_model(index.model_name)
        uploads = uploads_of(file, files)

        async def work() -> dict[str, Any]:
            feats, names = await encode_uploads(mdl, uploads, "features")
            res = await asyncio.to_thread(index.search, feats.astype(np.float32), k, mdl.name)
            rows = [{"neighbours": nb} for nb in res.to_list()]  # [{"rank", "id", "item", "score"[, "label"]}]
            return per_file(names, rows, {"model": mdl.name, "k": k, "index_size": int(index.ntotal)})

        return await timed(work())

    @app.post("/classify", tags=["images"],
              description="Cluster of the uploaded image (the model's cluster head); several images: one result "
                          "each. " + upload_doc + ".")
    async def classify(
        file: list[UploadFile] | None = File(None, description=upload_doc),
        files: list[UploadFile] | None = File(None, description=upload_doc),
        model: str | None = Query(None, description="served model (default: the first)"),
        labels: str | None = Query(None, description="zero-shot: comma-separated class names (image-text models)"),
    ) -> dict[str, Any]:
        mdl = get_model(model or default.name)
        if labels is not None:  # zero-shot over the user's labels (serve/text.py), checked before the image
            text_api = app.state.zoo["text"]
            wanted = text_api.labels(mdl, labels)
            uploads = uploads_of(file, files)
            if len(uploads) != 1:
                raise ApiError(400, f"zero-shot /classify takes one image per request, got {len(uploads)}")
            name = uploads[0].filename or "file0"
            data = await uploads[0].read()
            x = await off_loop(partial(decode_and_preprocess, data, mdl.preprocessor, max_pixels=max_pixels,
                                       name=name))
            return await timed(text_api.classify(mdl, x[None], name, wanted))
        if "cluster_probs" not in mdl.output_names:
            raise ApiError(400, f"model {mdl.name!r} has no cluster head, so /classify cannot assign clusters; "
                                "serve a model with one (e.g. scan_convnet_mnist5k) or use /embed + /search")
        uploads = uploads_of(file, files)

        async def work() -> dict[str, Any]:
            probs, names = await encode_uploads(mdl, uploads, "cluster_probs")
            rows = []
            for p in probs.astype(np.float64):
                c = int(np.argmax(p))
                rows.append({"cluster": c, "confidence": float(p[c]), "num_clusters": int(p.shape[0]),
                             "probabilities": p.tolist()})
            return per_file(names, rows, {"model": mdl.name})

        return await timed(work())

    @app.get("/metrics", tags=["info"])
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if demo_mount is not None:
        demo_mount(app)
    infer_routes = {"/versions/" in r.path: r for r in app.router.routes
                    if getattr(r, "endpoint", None) is infer and "POST" in getattr(r, "methods", ())}
    fast = InferFastPath(endpoint=infer_body, routes=infer_routes,
                         skip=frozenset(n for n, m in models.items() if type(m) is not ServedModel))
    app.guard = partial(_Guard, api_key=api_key or None, max_body_bytes=max_body_bytes, metrics=metrics,
                        router=app.router, fast=fast)
    return app


# ----------------------------------------------------------------------------------------- running


class PortInUseError(OSError):
    """The requested host:port is taken (the CLI answers with exit status 2)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket for uvicorn; PortInUseError names the port when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only when the socket says
    # it is TCP; without it, Nagle + delayed ACKs add ~40 ms to every POST with a small response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PortInUseError(f"cannot listen on {host}:{port}: {e.strerror or e}; is another server running "
                             "there? choose another port with --port") from None
    sock.set_inheritable(True)
    return sock


GC_YOUNG_THRESHOLD = 50_000


def tune_gc_for_serving(young_threshold: int = GC_YOUNG_THRESHOLD) -> None:
    """Fewer, cheaper garbage collections for a long-running server (as Instagram's ``gc.freeze`` note).

    Every request allocates hundreds of short-lived containers (scope, headers, JSON, futures), so
    with Python's default young-generation threshold (700 allocations) a collection ran every few
    requests, and each older collection re-scanned everything loaded at startup (torch,
    onnxruntime, the app). ``gc.freeze()`` moves the startup objects out of the collector's view and
    a higher threshold collects the young generation less often. Reference counting still frees all
    acyclic garbage at once; only reference cycles wait for the next collection. Measured: ~10 us
    less CPU per small infer request (docs/benchmarks.md).
    """
    import gc

    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(int(young_threshold), max(older, 20), max(oldest, 100))


def run_server(app: FastAPI, sock: socket.socket, *, graceful_shutdown_s: float = 30.0,
               log_level: str = "info") -> int:
    """Serve ``app`` on ``sock`` with uvicorn until SIGINT/SIGTERM; requests in flight finish first.

    Returns 0 after a graceful shutdown (uvicorn re-raises the signal it caught once it has shut down;
    the handler installed here absorbs it so the exit status is 0, not -15).
    """
    import uvicorn

    # Parsing and decoding run in worker threads; a 1 ms GIL switch interval (Python's default is 5 ms)
    # lets the event loop take the GIL back quickly, so /v2/health and /metrics answer within
    # milliseconds while a large request is parsed.
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
    tune_gc_for_serving()
    from serve.http_protocol import CoalescingHttpToolsProtocol  # one socket write per response

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_shutdown_s,
                            access_log=False, http=CoalescingHttpToolsProtocol)
    server = uvicorn.Server(config)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return 0 if server.started else 1


def cli_serve(args: argparse.Namespace) -> int:
    """``zoo serve``: the embedded server (onnxruntime in-process) or ``--backend triton``."""
    if args.backend == "triton":
        from serve.triton import serve_triton_backend

        return serve_triton_backend(args)

    try:  # fail fast, before any model is loaded
        sock = bind_socket(args.host, args.port)
    except PortInUseError as e:
        print(f"zoo serve: {e}", file=sys.stderr)
        return 2
    grpc_port = int(getattr(args, "grpc_port", -1))  # -1: no gRPC front end
    if grpc_port >= 0:
        from serve.grpc_server import GrpcPortInUseError, check_grpc_port

        try:
            check_grpc_port(args.host, grpc_port)
        except GrpcPortInUseError as e:
            sock.close()
            print(f"zoo serve: {e}", file=sys.stderr)
            return 2
    try:
        from serve.app import build_embedded

        app, urls = build_embedded(args)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        sock.close()
        print(f"zoo serve: {e}", file=sys.stderr)
        return 2
    if grpc_port >= 0:
        from serve.grpc_server import attach_grpc

        attach_grpc(app, args.host, grpc_port, announce=True)  # prints its address once listening
    host = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{host}:{args.port}"
    print(f"zoo serve: model {urls['model']} ({urls['backend']})")
    print(f"  API      {base}/v2  (KServe v2 / Triton protocol; /embed /search /classify)")
    print(f"  docs     {base}/docs")
    if urls.get("demo"):
        print(f"  demo     {base}/demo")
    print(f"  metrics  {base}/metrics")
    if urls.get("index"):
        print(f"  index    {urls['index']}")
    for note in urls.get("notes", ()):
        print(f"  note     {note}")
    sys.stdout.flush()
    return run_server(app, sock, graceful_shutdown_s=float(args.timeout_s) + 5.0)
