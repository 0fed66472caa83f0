"""HTTP feature server: KServe v2 / Triton protocol with dynamic batching, plus endpoints for people.

``create_app(encoder, index)`` builds a FastAPI app around an in-process onnxruntime encoder
(:class:`serve.onnx.OnnxEncoder`, or any object with the same attributes and ``run``):

- KServe v2 / Triton HTTP protocol (``/v2``, ``/v2/health/{live,ready}``, ``/v2/models/{name}[/versions/1]``,
  ``.../ready``, ``.../config``, ``/v2/repository/index``, ``.../infer`` with JSON tensors and the binary
  tensor data extension), so ``tritonclient.http.InferenceServerClient`` works unchanged;
- ``POST /embed`` (images -> features), ``POST /search`` (image -> nearest indexed items),
  ``POST /classify`` (image -> cluster of the model's cluster head);
- ``GET /metrics`` (Prometheus text: requests, failures, batch sizes, queue wait, compute time, in flight).

Requests are merged by a :class:`DynamicBatcher` per model: the first queued request waits at most
``max_queue_delay_ms`` for others, up to ``max_batch_size`` images go into ONE ``encoder.run`` call in a
worker thread (the event loop stays free), and the results are split back. Optional bearer-token auth
(everything but ``/v2/health/*``), a request body limit (413, from Content-Length and while streaming),
a per-request timeout (504). Client errors are 4xx with ``{"error": "..."}`` naming the problem.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hmac
import http.cookies
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

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
    Preprocessor,
    decode_and_preprocess,
    release_memory,
)

if TYPE_CHECKING:
    from serve.index import FeatureIndex
    from serve.onnx import OnnxEncoder

HEALTH_PREFIX = "/v2/health"
# Browsers cannot send a bearer header: with an API key set, opening /demo/?api_key=KEY once sets an
# HttpOnly cookie scoped to /demo that authorises the demo's own requests (and nothing else).
DEMO_PREFIX = "/demo"
DEMO_COOKIE = "zoo_api_key"
_NUMPY_TO_TRITON = {"float32": "FP32"}
# Request bodies below this size are parsed on the event loop (no worker-thread hop).
INLINE_PARSE_BYTES = 64 << 10


def bearer_token_ok(authorization: str, api_key: str) -> bool:
    """Whether an ``Authorization`` value is ``Bearer <api_key>`` (HTTP header or gRPC metadata alike)."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def _error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


# ----------------------------------------------------------------------------------------------- metrics


class ServerMetrics:
    """Prometheus metrics of one app, in their own registry (several apps can live in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("zoo_http_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.failures = Counter("zoo_http_failures", "requests answered with an error (kind: client 4xx, "
                                "server 5xx, timeout 504)", ["endpoint", "kind"], registry=r)
        self.latency = Histogram("zoo_http_request_duration_seconds", "request latency", ["endpoint"],
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                 registry=r)
        self.in_flight = Gauge("zoo_http_requests_in_flight", "HTTP requests being handled", registry=r)
        self.batch_size = Histogram("zoo_batch_size", "images per encoder call (dynamic batching); "
                                    "_sum/_count = average batch size", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_requests = Histogram("zoo_batch_requests", "requests merged into one encoder call", ["model"],
                                        buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.queue_wait = Histogram("zoo_queue_wait_seconds", "time a request waited in the batching queue",
                                    ["model"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                        0.5, 1, 2.5, 5), registry=r)
        self.compute = Histogram("zoo_compute_seconds", "encoder.run time per merged batch", ["model"],
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                 registry=r)
        self.images = Counter("zoo_images", "images encoded", ["model"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ------------------------------------------------------------------------------------- dynamic batching


@dataclass
class _Job:
    images: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Merges concurrent requests for one encoder into batched ``encoder.run`` calls.

    ``await submit(images)`` queues ``[n,3,H,W]`` float32 images (split into pieces of at most
    ``max_batch_size``) and returns the encoder outputs for exactly those images. A worker task takes
    the oldest job, waits until ``max_queue_delay_s`` after that job arrived for more (or until the batch
    is full), concatenates, runs the encoder once in a dedicated thread and splits the outputs back.
    ``calls`` / ``batch_sizes`` record what ran (tests and benchmarks read them).

    Per-request cost matters for small models (the server is then bound by it, not by compute), so the
    hot path avoids per-request tasks and wake-ups: ``submit`` awaits its job's future directly (its
    timeout is a timer on that future, not a ``wait_for`` task), and it wakes the worker only when the
    worker is idle or the batch just became full; the worker sleeps out the queue delay on one timer.
    """

    def __init__(self, encoder: Any, *, max_batch_size: int = 32, max_queue_delay_s: float = 0.002,
                 metrics: ServerMetrics | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay must be >= 0, got {max_queue_delay_s}")
        self.encoder = encoder
        self.name = str(encoder.name)
        self.max_batch_size = int(max_batch_size)
        self.max_queue_delay_s = float(max_queue_delay_s)
        self.metrics = metrics
        self.calls = 0
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=10_000)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"zoo-encode-{self.name}")
        self._jobs: collections.deque[_Job] = collections.deque()
        self._queued = 0  # images in _jobs (abandoned jobs included until popped: at worst an early run)
        self._waiter: asyncio.Future | None = None  # what the worker sleeps on
        self._idle = True  # the worker waits for a first job (vs. sleeping out the queue delay)
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        if metrics is not None:  # labelled children resolved once, not per batch
            self._m = (metrics.batch_size.labels(self.name), metrics.batch_requests.labels(self.name),
                       metrics.compute.labels(self.name), metrics.images.labels(self.name),
                       metrics.queue_wait.labels(self.name))

    def _ensure_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop = loop
            self._waiter = None
            self._idle = True
            self._task = loop.create_task(self._worker(), name=f"zoo-batcher-{self.name}")

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    @staticmethod
    def _expire(fut: asyncio.Future, timeout: float) -> None:
        if not fut.done():  # the worker skips done jobs
            fut.set_exception(TimeoutError(f"not computed within {timeout:g} s"))

    async def submit(self, images: np.ndarray, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Encoder outputs for ``images`` ``[n,3,H,W]``, computed in merged batches.

        ``timeout`` (seconds): raise ``TimeoutError`` when the outputs are not there by then (the queued
        work is dropped).
        """
        if self._closed:
            raise RuntimeError("the server is shutting down")
        loop = asyncio.get_running_loop()
        self._ensure_worker(loop)
        step = self.max_batch_size
        jobs = [_Job(images[i:i + step], loop.create_future()) for i in range(0, len(images), step)]
        self._jobs.extend(jobs)
        self._queued += len(images)
        if self._idle or self._queued >= self.max_batch_size:
            self._wake()
        timers = [loop.call_later(timeout, self._expire, j.future, timeout) for j in jobs] if timeout else []
        try:
            if len(jobs) == 1:
                return await jobs[0].future
            parts = await asyncio.gather(*(j.future for j in jobs))
        except BaseException:
            for j in jobs:  # timed out / disconnected: the worker skips these
                j.future.cancel()
            raise
        finally:
            for t in timers:
                t.cancel()
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    async def _sleep(self, loop: asyncio.AbstractEventLoop, deadline: float | None) -> None:
        """Until ``_wake`` (or ``deadline``, a ``perf_counter`` time, passes)."""
        fut = self._waiter = loop.create_future()
        timer = None
        if deadline is not None:
            timer = loop.call_later(max(0.0, deadline - time.perf_counter()), self._wake)
        try:
            await fut
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._jobs:
                self._idle = True
                await self._sleep(loop, None)
            self._idle = False
            first = self._jobs[0]
            if first.future.done():
                self._queued -= len(self._jobs.popleft().images)
                continue
            # Wait until the oldest job is max_queue_delay old, unless the batch fills up first
            # (submit wakes this sleep when it does).
            deadline = first.enqueued + self.max_queue_delay_s
            while self._queued < self.max_batch_size and time.perf_counter() < deadline:
                await self._sleep(loop, deadline)
            batch: list[_Job] = []
            n = 0
            while self._jobs:
                job = self._jobs[0]
                if job.future.done():
                    self._queued -= len(self._jobs.popleft().images)
                    continue
                if batch and n + len(job.images) > self.max_batch_size:
                    break
                batch.append(self._jobs.popleft())
                self._queued -= len(job.images)
                n += len(job.images)
            if batch:
                await self._run(batch, n, loop)

    async def _run(self, batch: list[_Job], n: int, loop: asyncio.AbstractEventLoop) -> None:
        start = time.perf_counter()
        x = batch[0].images if len(batch) == 1 else np.concatenate([j.images for j in batch])
        try:
            out = await loop.run_in_executor(self._executor, self.encoder.run, x)
        except Exception as e:  # noqa: BLE001 - handed to every waiting request
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        finally:
            self.calls += 1
            self.batch_sizes.append(n)
        compute = time.perf_counter() - start
        if self.metrics is not None:
            size, requests, compute_s, images, queue_wait = self._m
            size.observe(n)
            requests.observe(len(batch))
            compute_s.observe(compute)
            images.inc(n)
            for j in batch:
                queue_wait.observe(max(0.0, start - j.enqueued))
        offset = 0
        for j in batch:
            k = len(j.images)
            if not j.future.done():
                j.future.set_result({name: v[offset:offset + k] for name, v in out.items()})
            offset += k

    async def aclose(self) -> None:
        """Stop the worker; queued requests fail with 'shutting down'."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        while self._jobs:
            j = self._jobs.popleft()
            if not j.future.done():
                j.future.set_exception(RuntimeError("the server is shutting down"))
        self._queued = 0
        self._executor.shutdown(wait=False)


# ------------------------------------------------------------------------------------ served models


class ServedModel:
    """One encoder with its batcher, preprocessing and KServe v2 metadata."""

    def __init__(self, encoder: Any, batcher: DynamicBatcher, max_batch_size: int, max_queue_delay_s: float):
        self.encoder = encoder
        self.name = str(encoder.name)
        self.batcher = batcher
        self.input_name = str(getattr(encoder, "input_name", "images"))
        self.input_shape = tuple(int(s) for s in encoder.input_shape)
        self.output_names = [str(n) for n in encoder.output_names]
        self.embed_dim = int(encoder.embed_dim)
        self.num_clusters = int(encoder.num_clusters) if getattr(encoder, "num_clusters", None) else None
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self._preprocessor: Preprocessor | None = None
        self._lock = threading.Lock()

    @property
    def preprocessor(self) -> Preprocessor:
        """The model's image preprocessing, built on first use (it imports torch, which the v2 API needs not)."""
        with self._lock:
            if self._preprocessor is None:
                pre = Preprocessor(self.encoder.pretrained_cfg)
                if tuple(pre.input_shape) != self.input_shape:
                    raise ValueError(f"model {self.name!r}: preprocessing gives {pre.input_shape} but the "
                                     f"encoder takes {self.input_shape}")
                self._preprocessor = pre
            return self._preprocessor

    def output_dim(self, name: str) -> int:
        if name == "features":
            return self.embed_dim
        if name == "cluster_probs" and self.num_clusters:
            return self.num_clusters
        shape = getattr(self.encoder, "output_shapes", {}).get(name)
        return int(shape[-1]) if shape else -1

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [MODEL_VERSION],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": self.input_name, "datatype": "FP32", "shape": [-1, *self.input_shape]}],
            "outputs": [{"name": n, "datatype": "FP32", "shape": [-1, self.output_dim(n)]} for n in self.output_names],
        }

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "max_batch_size": self.max_batch_size,
            "input": [{"name": self.input_name, "data_type": "TYPE_FP32", "dims": list(self.input_shape)}],
            "output": [{"name": n, "data_type": "TYPE_FP32", "dims": [self.output_dim(n)]} for n in self.output_names],
            "dynamic_batching": {"max_queue_delay_microseconds": int(round(self.max_queue_delay_s * 1e6))},
            "parameters": {"zoo_config": {"string_value": json.dumps(self.encoder.pretrained_cfg, default=str)}},
        }


# -------------------------------------------------------------------------------- KServe v2 request


# KServe v2 request parsing and response building live in serve/kserve.py (shared with other front ends);
# the names stay importable from here.
_decompress = decompress
_requested_outputs = requested_outputs


# ------------------------------------------------------------------------------------ ASGI guard


def _under_demo(path: str) -> bool:
    return path == DEMO_PREFIX or path.startswith(DEMO_PREFIX + "/")


def _cookie(headers: Mapping[bytes, bytes], name: str) -> str:
    """The value of cookie ``name`` in the request's Cookie header ('' when absent)."""
    jar = http.cookies.SimpleCookie()
    try:
        jar.load(headers.get(b"cookie", b"").decode("latin-1"))
    except http.cookies.CookieError:
        return ""
    morsel = jar.get(name)
    return urllib.parse.unquote(morsel.value) if morsel else ""


class _Guard:
    """Pure ASGI middleware: auth, body limit (buffered, 413), in-flight gauge, request metrics."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics,
                 router: Any):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = int(max_body_bytes)
        self.metrics = metrics
        self.router = router
        self._own: set[int] | None = None

    def _endpoint(self, scope: dict, pristine: dict) -> str:
        """The route template (``/v2/models/{name}/infer``) or mount path (``/demo``): bounded label values.

        ``scope["route"]`` when routing reached one of this app's routes; otherwise (answered before
        routing, or a mounted app, which rewrites ``route`` and ``root_path``) match ``pristine``, the
        scope as it came in.
        """
        if self._own is None:
            self._own = {id(r) for r in self.router.routes}
        route = scope.get("route")
        if route is not None and id(route) in self._own:
            return str(route.path)
        scope = pristine
        partial = None
        for r in self.router.routes:
            match, _ = r.matches(scope)
            if match == Match.FULL:
                return str(getattr(r, "path", None) or "unmatched")
            if match == Match.PARTIAL and partial is None:
                partial = r  # e.g. the right path with another method (405)
        return str(getattr(partial, "path", None) or "unmatched")

    async def _reply(self, send: Callable, status: int, message: str, headers: Mapping[str, str] | None = None
                     ) -> None:
        body = json.dumps({"error": message}).encode()
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, headers: dict[bytes, bytes], path: str = "") -> bool:
        if bearer_token_ok(headers.get(b"authorization", b"").decode("latin-1"), self.api_key):
            return True
        return _under_demo(path) and hmac.compare_digest(_cookie(headers, DEMO_COOKIE).encode(), self.api_key.encode())

    async def _demo_login(self, scope: dict, send: Callable) -> bool:
        """``GET /demo...?api_key=KEY`` with the right key: set the demo cookie and redirect without the key."""
        if scope["method"] != "GET" or not _under_demo(scope["path"]):
            return False
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        key = (query.pop("api_key", None) or [""])[0]
        if not key or not hmac.compare_digest(key.encode(), self.api_key.encode()):
            return False
        rest = urllib.parse.urlencode(query, doseq=True)
        location = scope["root_path"] + scope["path"] + (f"?{rest}" if rest else "")
        cookie = f"{DEMO_COOKIE}={urllib.parse.quote(key)}; Path={DEMO_PREFIX}; HttpOnly; SameSite=Strict"
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", location.encode("latin-1")), (b"set-cookie", cookie.encode("latin-1")),
                                (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return True

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket" and self.api_key and not scope["path"].startswith(HEALTH_PREFIX):
                headers = dict(scope.get("headers") or [])
                if not self._authorized(headers, scope["path"]):
                    await send({"type": "websocket.close", "code": 1008})
                    return
            await self.app(scope, receive, send)
            return
        m = self.metrics
        pristine = dict(scope)
        status = {"code": 500}
        start = time.perf_counter()

        async def send_wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        m.in_flight.inc()
        try:
            await self._handle(scope, receive, send_wrapped)
        finally:
            m.in_flight.dec()
            endpoint = self._endpoint(scope, pristine)
            code = status["code"]
            m.requests.labels(endpoint, scope["method"], str(code)).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - start)
            if code >= 400:
                kind = "timeout" if code == 504 else ("client" if code < 500 else "server")
                m.failures.labels(endpoint, kind).inc()

    async def _handle(self, scope: dict, receive: Callable, send: Callable) -> None:
        headers = dict(scope.get("headers") or [])
        if self.api_key and not scope["path"].startswith(HEALTH_PREFIX) and not self._authorized(headers, scope["path"]):
            if await self._demo_login(scope, send):
                return
            missing = b"authorization" not in headers
            msg = ("missing API key: send 'Authorization: Bearer <key>'" if missing
                   else "invalid API key in the Authorization header")
            await self._reply(send, 401, msg, {"WWW-Authenticate": 'Bearer realm="zoo"' +
                                               ("" if missing else ', error="invalid_token"')})
            return
        limit = self.max_body_bytes
        too_big = f"request body exceeds the limit of {limit} bytes"
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                await self._reply(send, 400, f"invalid Content-Length header {declared!r}")
                return
            if declared_n > limit:
                # No "Connection: close": uvicorn then reads and drops the rest of the body, so the client
                # (still sending) gets this answer instead of a connection reset.
                await self._reply(send, 413, f"{too_big} (Content-Length: {declared_n})")
                return
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE") and declared is None \
                and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        # Read the whole body (bounded) before the app sees it: a chunked body over the limit is refused
        # while it streams, and handlers never run on a partial body.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._reply(send, 413, too_big)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        # Replayed as the chunks that came in: joining a 15 MB body here would copy it on the event loop.
        pending = collections.deque(chunks) if chunks else collections.deque([b""])

        async def replay() -> dict:
            if pending:
                chunk = pending.popleft()
                return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
            return await receive()

        await self.app(scope, replay, send)


class _InferFastPath:
    """Pure ASGI: ``POST /v2/models/{name}[/versions/{v}]/infer`` straight to the route's own endpoint.

    Skips FastAPI's per-request routing, dependency solving and exit stacks, which profiling put at
    ~40% of the server's CPU for a small single-image request. Same function, same error bodies
    (ApiError -> its status, anything else -> 500); other paths go on to FastAPI unchanged.
    """

    _PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")

    def __init__(self, app: Any, *, endpoint: Callable[..., Awaitable[Response]], routes: dict[bool, Any],
                 skip: frozenset[str] = frozenset()):
        self.app = app
        self.skip = skip  # models with routes of their own (text towers: serve/text.py), routed by FastAPI
        self.endpoint = endpoint
        self.routes = routes  # versioned? -> the FastAPI route (its path labels the metrics, as routed)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        m = self._PATH.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if m is None or m.group(1) in self.skip:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.routes[m.group(2) is not None]
        try:
            response = await self.endpoint(m.group(1), Request(scope, receive), m.group(2))
        except ApiError as e:
            response = _error_response(e.status, e.message, e.headers)
        except Exception as e:  # noqa: BLE001 - as the app's 500 handler
            response = _error_response(500, f"internal server error: {type(e).__name__}: {e}")
        await response(scope, receive, send)


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
    app = FastAPI(title="selfsup-zoo feature server", version=server_version, lifespan=lifespan,
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

    @app.post("/v2/models/{name}/infer", tags=["kserve-v2"])
    @app.post("/v2/models/{name}/versions/{version}/infer", tags=["kserve-v2"])
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        mdl = get_model(name, version)
        chunks = [c async for c in request.stream()]
        body = chunks[0] if len(chunks) == 1 else await off_loop(b"".join, chunks)
        del chunks
        encoding = request.headers.get("content-encoding", "")
        header_length = request.headers.get(INFER_HEADER)

        def parse() -> tuple[dict[str, Any], np.ndarray]:
            req, images = parse_infer_request(decompress(body, encoding, max_body_bytes), header_length, mdl)
            requested_outputs(req, mdl)  # validate before computing
            return req, images

        # Small bodies parse in microseconds: a thread hop would cost more than it frees the loop.
        small = len(body) < INLINE_PARSE_BYTES and encoding in ("", "identity")
        req, images = parse() if small else await off_loop(parse)
        if len(body) >= 4 << 20:  # the parsed lists and copies are freed: give their pages back
            del body
            await off_loop(release_memory)
        try:  # the batcher's own timeout: no wait_for task per request on this hot path
            out = await mdl.batcher.submit(images, timeout=timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            raise ApiError(504, f"request did not finish within the server timeout of {timeout_s:g} s") from None
        if small and len(images) <= 64:
            content, headers = build_infer_response(req, mdl, out)
        else:
            content, headers = await off_loop(build_infer_response, req, mdl, out)
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
    app.add_middleware(_InferFastPath, endpoint=infer, routes=infer_routes,
                       skip=frozenset(n for n, m in models.items() if type(m) is not ServedModel))  # inside _Guard: after auth, limits
    app.add_middleware(_Guard, api_key=api_key or None, max_body_bytes=max_body_bytes, metrics=metrics,
                       router=app.router)
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
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_shutdown_s,
                            access_log=False)
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
