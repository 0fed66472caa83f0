"""KServe v2 gRPC front end (Triton's ``inference.GRPCInferenceService``) beside the HTTP server.

``attach_grpc(app, host, port)`` adds a ``grpc.aio`` server to an app from :func:`serve.server.create_app`.
It runs in the SAME asyncio loop as uvicorn (started and stopped by the app's lifespan) and submits to
the same :class:`~serve.server.DynamicBatcher` of each model: HTTP and gRPC requests are merged into the
same encoder calls, and the in-flight count is one plain counter on that loop. It shares with HTTP the model table, the bearer-token check (metadata
``authorization: Bearer KEY``; ServerLive/ServerReady exempt like ``/v2/health/*``), the limits (largest
message = the HTTP body limit, the per-request timeout, the input checks) and the Prometheus counters
(``zoo_http_*`` with ``method="GRPC"``, ``endpoint`` = the RPC path, ``status`` = the gRPC status name).

The messages are the generated ``tritonclient.grpc.service_pb2`` / ``model_config_pb2`` modules, so
``tritonclient.grpc.InferenceServerClient`` works unchanged. Inputs come as ``raw_input_contents``
(what tritonclient sends) or typed ``contents.fp32_contents``; outputs go back as
``raw_output_contents``, as Triton does. Client errors get a gRPC status (INVALID_ARGUMENT, NOT_FOUND,
UNAUTHENTICATED, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, UNAVAILABLE) with a message naming the problem.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from serve.batching import ServedModel, ServerMetrics
from serve.guard import bearer_token_ok
from serve.kserve import MODEL_VERSION, ApiError, check_fp32_tensor

SERVICE = "inference.GRPCInferenceService"
HEALTH_RPCS = frozenset({"ServerLive", "ServerReady"})  # like /v2/health/*: no API key needed
_HTTP_TO_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_FAILURE_KIND = {grpc.StatusCode.DEADLINE_EXCEEDED: "timeout", grpc.StatusCode.INTERNAL: "server",
                 grpc.StatusCode.UNAVAILABLE: "server", grpc.StatusCode.UNKNOWN: "server"}


class GrpcPortInUseError(OSError):
    """The gRPC host:port is taken (the CLI answers with exit status 2)."""


def check_grpc_port(host: str, port: int) -> None:
    """Fail fast (before models load) when ``host:port`` cannot be bound; port 0 always can."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise GrpcPortInUseError(f"cannot listen for gRPC on {host}:{port}: {e.strerror or e}; choose another "
                                     "port with --grpc-port, or --grpc-port -1 to serve HTTP only") from None


# ------------------------------------------------------------------------------------- input / output


def checked_images(images: np.ndarray, model: ServedModel) -> np.ndarray:
    """The ONE place every decoded gRPC input array passes: ``[B,3,H,W]`` C-contiguous float32.

    Values follow HTTP's rule (:func:`serve.kserve.check_fp32_tensor`): NaN / Inf are refused, naming the index.
    """
    images = check_fp32_tensor(images, model.input_name).reshape(images.shape)
    if images.ndim != 4 or images.shape[0] < 1 or tuple(images.shape[1:]) != model.input_shape:
        raise ApiError(400, f"input {model.input_name!r}: shape {list(images.shape)} does not match the model's "
                            f"{[-1, *model.input_shape]} (batch >= 1)")
    return np.ascontiguousarray(images, dtype=np.float32)


def decode_infer_request(request: pb.ModelInferRequest, model: ServedModel) -> np.ndarray:
    """The input images of a ``ModelInferRequest`` (raw or typed contents); ApiError(400) naming the problem."""
    if len(request.inputs) != 1:
        raise ApiError(400, f"model {model.name!r} takes exactly one input {model.input_name!r}; the request "
                            f"has {len(request.inputs)}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ApiError(400, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; give one per input")
    inp = request.inputs[0]
    name = inp.name
    if name != model.input_name:
        raise ApiError(400, f"unknown input {name!r} for model {model.name!r}; it takes one input "
                            f"{model.input_name!r}")
    if inp.datatype != "FP32":
        raise ApiError(400, f"input {name!r}: datatype {inp.datatype!r} not supported; model {model.name!r} "
                            "takes FP32")
    if "shared_memory_region" in inp.parameters:
        raise ApiError(400, f"input {name!r}: shared memory is not supported by this server")
    shape = [int(s) for s in inp.shape]
    if len(shape) != 4 or shape[0] < 1 or tuple(shape[1:]) != model.input_shape:
        raise ApiError(400, f"input {name!r}: shape {shape} does not match the model's {[-1, *model.input_shape]} "
                            "(batch >= 1)")
    count = math.prod(shape)
    c = inp.contents
    typed = {f.name: len(v) for f, v in c.ListFields()}
    if raw:
        if typed:
            raise ApiError(400, f"input {name!r}: both raw_input_contents and typed contents {sorted(typed)}")
        if len(raw[0]) != count * 4:
            raise ApiError(400, f"input {name!r}: {len(raw[0])} bytes of raw_input_contents but shape {shape} FP32 "
                                f"needs {count * 4}")
        arr = np.frombuffer(raw[0], dtype="<f4")
    else:
        if set(typed) - {"fp32_contents"}:
            raise ApiError(400, f"input {name!r}: FP32 data goes in contents.fp32_contents, got {sorted(typed)}")
        if not typed:
            raise ApiError(400, f"input {name!r} has no data (neither raw_input_contents nor contents.fp32_contents)")
        if typed["fp32_contents"] != count:
            raise ApiError(400, f"input {name!r}: {typed['fp32_contents']} values in contents but shape {shape} "
                                f"needs {count}")
        arr = np.array(c.fp32_contents, dtype=np.float32)
    return checked_images(arr.reshape(shape), model)


def requested_outputs(request: pb.ModelInferRequest, model: ServedModel) -> list[str]:
    """Names of the outputs to return (all when none is named); ApiError(400) for unknown or unsupported ones."""
    if not request.outputs:
        return list(model.output_names)
    wanted = []
    for o in request.outputs:
        if o.name not in model.output_names:
            raise ApiError(400, f"unknown output {o.name!r} for model {model.name!r}; it has {model.output_names}")
        if "classification" in o.parameters:
            raise ApiError(400, f"output {o.name!r}: the classification extension is not supported")
        if "shared_memory_region" in o.parameters:
            raise ApiError(400, f"output {o.name!r}: shared memory is not supported by this server")
        wanted.append(o.name)
    return wanted


def build_infer_response(request: pb.ModelInferRequest, model: ServedModel, out: dict[str, np.ndarray],
                         names: list[str]) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=model.name, model_version=MODEL_VERSION, id=request.id)
    for name in names:
        arr = np.ascontiguousarray(out[name], dtype="<f4")
        resp.outputs.add(name=name, datatype="FP32", shape=arr.shape)
        resp.raw_output_contents.append(arr.tobytes())
    return resp


# ------------------------------------------------------------------------------------------ servicer


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over the models of one app (shared with its HTTP routes)."""

    def __init__(self, models: dict[str, ServedModel], metrics: ServerMetrics, *, api_key: str | None,
                 timeout_s: float, version: str):
        self.models = models
        self.metrics = metrics
        self.api_key = api_key
        self.timeout_s = float(timeout_s)
        self.version = version
        for rpc in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
                    "RepositoryIndex", "ModelInfer"):
            setattr(self, rpc, self._wrap(rpc, getattr(self, "_" + rpc)))

    def _wrap(self, rpc: str, fn: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]):
        """Auth, metrics and error -> status mapping around one RPC."""
        endpoint = f"/{SERVICE}/{rpc}"
        m = self.metrics
        requests = {}  # status name -> bound counter child (labels() costs a lock and a dict lookup per call)
        latency = m.latency.labels(endpoint)
        needs_key = self.api_key is not None and rpc not in HEALTH_RPCS

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            m.in_flight.inc()
            code, details = grpc.StatusCode.OK, ""
            try:
                if needs_key:
                    self._authorize(context)
                return await fn(request, context)
            except ApiError as e:
                code, details = _HTTP_TO_GRPC.get(e.status, grpc.StatusCode.INVALID_ARGUMENT), e.message
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED  # the client went away
                raise
            except Exception as e:  # noqa: BLE001 - answered with a status, the server keeps serving
                if isinstance(e, RuntimeError) and "shutting down" in str(e):  # DynamicBatcher closed
                    code, details = grpc.StatusCode.UNAVAILABLE, str(e)
                else:
                    code, details = grpc.StatusCode.INTERNAL, f"internal server error: {type(e).__name__}: {e}"
            finally:
                m.in_flight.dec()
                latency.observe(time.perf_counter() - start)
                counter = requests.get(code)
                if counter is None:
                    counter = requests[code] = m.requests.labels(endpoint, "GRPC", code.name)
                counter.inc()
                if code is not grpc.StatusCode.OK and code is not grpc.StatusCode.CANCELLED:
                    m.failures.labels(endpoint, _FAILURE_KIND.get(code, "client")).inc()
            await context.abort(code, details)

        return call

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        got = [v for k, v in (context.invocation_metadata() or ()) if k == "authorization"]
        if not got:
            raise ApiError(401, "missing API key: send metadata 'authorization: Bearer <key>'")
        if not bearer_token_ok(str(got[0]), self.api_key):
            raise ApiError(401, "invalid API key in the authorization metadata")

    def _model(self, name: str, version: str) -> ServedModel:
        mdl = self.models.get(name)
        if mdl is None:
            raise ApiError(404, f"unknown model {name!r}; this server has {sorted(self.models)}")
        if version not in ("", MODEL_VERSION):
            raise ApiError(404, f"model {name!r} has no version {version!r}; versions: [{MODEL_VERSION!r}]")
        return mdl

    async def _ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def _ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def _ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            self._model(request.name, request.version)
        except ApiError:
            return pb.ModelReadyResponse(ready=False)  # as Triton: not an error, just not ready
        return pb.ModelReadyResponse(ready=True)

    async def _ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="selfsup-zoo", version=self.version,
                                         extensions=["model_configuration", "model_repository"])

    async def _ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        # The same dict as HTTP's /v2/models/{name}: both protocols describe the model identically.
        return json_format.ParseDict(self._model(request.name, request.version).metadata(),
                                     pb.ModelMetadataResponse())

    async def _ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        cfg = json_format.ParseDict(self._model(request.name, request.version).config(), mc.ModelConfig())
        return pb.ModelConfigResponse(config=cfg)

    async def _RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any
                               ) -> pb.RepositoryIndexResponse:
        resp = pb.RepositoryIndexResponse()
        for n in self.models:
            resp.models.add(name=n, version=MODEL_VERSION, state="READY")
        return resp

    async def _ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ModelInferResponse:
        mdl = self._model(request.model_name, request.model_version)
        images = decode_infer_request(request, mdl)
        names = requested_outputs(request, mdl)  # validate before computing
        timeout = self.timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, max(remaining, 0.0))
        try:
            out = await mdl.batcher.submit(images, timeout=timeout)  # a timer, not a task per request
        except (TimeoutError, asyncio.TimeoutError):
            raise ApiError(504, f"request did not finish within {timeout:g} s (server timeout "
                                f"{self.timeout_s:g} s or the client's deadline)") from None
        return build_infer_response(request, mdl, out, names)


# ------------------------------------------------------------------------------------------ server


class GrpcFrontend:
    """A ``grpc.aio`` server for one app; ``start``/``stop`` run in the app's event loop (its lifespan)."""

    def __init__(self, servicer: InferenceServicer, host: str, port: int, *, max_message_bytes: int,
                 grace_s: float, announce: bool = False):
        self.servicer = servicer
        self.host = host
        self.port = int(port)  # the bound port once started (port 0: chosen by the OS)
        self.max_message_bytes = int(max_message_bytes)
        self.grace_s = float(grace_s)
        self.announce = announce
        self.server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server(options=[
            # The HTTP body limit is the largest request message: bigger ones get RESOURCE_EXHAUSTED.
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", -1),
            # Without this a second server could bind the same port (SO_REUSEPORT) and steal half the calls.
            ("grpc.so_reuseport", 0),
        ])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        host = f"[{self.host}]" if ":" in self.host else self.host
        try:
            port = server.add_insecure_port(f"{host}:{self.port}")
        except RuntimeError as e:
            raise GrpcPortInUseError(f"cannot listen for gRPC on {host}:{self.port}: {e}") from None
        if port == 0:
            raise GrpcPortInUseError(f"cannot listen for gRPC on {host}:{self.port}")
        self.port = port
        await server.start()
        self.server = server
        if self.announce:
            print(f"  gRPC     {self.address}  (KServe v2 inference.GRPCInferenceService)", flush=True)

    async def stop(self) -> None:
        """Refuse new calls, let those in flight finish (up to ``grace_s``)."""
        if self.server is not None:
            await self.server.stop(self.grace_s)
            self.server = None


def attach_grpc(app: Any, host: str = "127.0.0.1", port: int = 8001, *, announce: bool = False) -> GrpcFrontend:
    """Serve ``app``'s models over gRPC on ``host:port`` (0: a free port) while the app runs (its lifespan)."""
    state = app.state.zoo
    servicer = InferenceServicer(state["models"], state["metrics"], api_key=state["api_key"],
                                 timeout_s=state["timeout_s"], version=state["version"])
    frontend = GrpcFrontend(servicer, host, port, max_message_bytes=state["max_body_bytes"],
                            grace_s=state["timeout_s"] + 5.0, announce=announce)
    state["services"].append(frontend)
    state["grpc"] = frontend
    return frontend
