"""ASGI layers of the HTTP server: the guard (auth, body limit, metrics) and the KServe infer fast path."""

from __future__ import annotations

import collections
import hmac
import http.cookies
import json
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.applications import Starlette
from starlette.routing import Match

from serve.batching import ServerMetrics
from serve.kserve import ApiError

HEALTH_PREFIX = "/v2/health"
# Browsers cannot send a bearer header: with an API key set, opening /demo/?api_key=KEY once sets an
# HttpOnly cookie scoped to /demo that authorises the demo's own requests (and nothing else).
DEMO_PREFIX = "/demo"
DEMO_COOKIE = "zoo_api_key"


def bearer_token_ok(authorization: str, api_key: str) -> bool:
    """Whether an ``Authorization`` value is ``Bearer <api_key>`` (HTTP header or gRPC metadata alike)."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def _error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


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


_UNREAD: list[bytes] = []  # _admit's answer for a bodiless GET/HEAD/OPTIONS/DELETE: the app reads `receive`


class _Guard:
    """Pure ASGI middleware: auth, body limit (buffered, 413), in-flight gauge, request metrics."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics,
                 router: Any, fast: InferFastPath | None = None):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = int(max_body_bytes)
        self.metrics = metrics
        self.router = router
        self.fast = fast  # v2 infer requests go there once the body is read, not through FastAPI
        self._own: set[int] | None = None
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}

    def _observe(self, endpoint: str, method: str, code: int, seconds: float) -> None:
        """Count one answered request. The labelled children are looked up once per label set (bounded)."""
        key = (endpoint, method, code)
        children = self._children.get(key)
        if children is None:
            m = self.metrics
            kind = None if code < 400 else ("timeout" if code == 504 else ("client" if code < 500 else "server"))
            children = (m.requests.labels(endpoint, method, str(code)), m.latency.labels(endpoint),
                        None if kind is None else m.failures.labels(endpoint, kind))
            if len(self._children) < 4096:  # methods are client-chosen strings: never an unbounded cache
                self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if children[2] is not None:
            children[2].inc()

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
        hit = None if self.fast is None else self.fast.match(scope)
        if hit is not None:
            await self._fast_call(scope, receive, send, hit)
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
            self._observe(self._endpoint(scope, pristine), scope["method"], status["code"],
                          time.perf_counter() - start)

    async def _fast_call(self, scope: dict, receive: Callable, send: Callable, hit: re.Match) -> None:
        """A v2 infer request: the same checks as ``_handle``, then :class:`InferFastPath`, without the
        wrappers the general path needs (a send hook for the status, a copy of the scope for the label)."""
        m = self.metrics
        start = time.perf_counter()
        code = 500
        m.in_flight.inc()
        try:
            admitted = await self._admit(scope, receive, send)
            if isinstance(admitted, int):
                code = admitted
            elif admitted is not None:
                code = await self.fast.handle(scope, hit, admitted, send)
        finally:
            m.in_flight.dec()
            self._observe(self.fast.label(hit), "POST", code, time.perf_counter() - start)

    async def _admit(self, scope: dict, receive: Callable, send: Callable) -> list[bytes] | int | None:
        """Auth and the body limit, then the whole body read (bounded): its chunks; or the status already
        answered (401, 400, 413, a demo login's 303); or None when the client went away.

        GET/HEAD/OPTIONS/DELETE without a body are let through with ``[]`` unread (``receive`` intact).
        """
        headers = dict(scope.get("headers") or [])
        if self.api_key and not scope["path"].startswith(HEALTH_PREFIX) and not self._authorized(headers, scope["path"]):
            if await self._demo_login(scope, send):
                return 303
            missing = b"authorization" not in headers
            msg = ("missing API key: send 'Authorization: Bearer <key>'" if missing
                   else "invalid API key in the Authorization header")
            await self._reply(send, 401, msg, {"WWW-Authenticate": 'Bearer realm="zoo"' +
                                               ("" if missing else ', error="invalid_token"')})
            return 401
        limit = self.max_body_bytes
        too_big = f"request body exceeds the limit of {limit} bytes"
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                await self._reply(send, 400, f"invalid Content-Length header {declared!r}")
                return 400
            if declared_n > limit:
                # No "Connection: close": uvicorn then reads and drops the rest of the body, so the client
                # (still sending) gets this answer instead of a connection reset.
                await self._reply(send, 413, f"{too_big} (Content-Length: {declared_n})")
                return 413
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE") and declared is None \
                and b"transfer-encoding" not in headers:
            return _UNREAD
        # Read the whole body (bounded) before the app sees it: a chunked body over the limit is refused
        # while it streams, and handlers never run on a partial body.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._reply(send, 413, too_big)
                return 413
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks

    async def _handle(self, scope: dict, receive: Callable, send: Callable) -> None:
        admitted = await self._admit(scope, receive, send)
        if admitted is None or isinstance(admitted, int):
            return
        if admitted is _UNREAD:
            await self.app(scope, receive, send)
            return
        chunks = admitted
        # Replayed as the chunks that came in: joining a 15 MB body here would copy it on the event loop.
        pending = collections.deque(chunks) if chunks else collections.deque([b""])

        async def replay() -> dict:
            if pending:
                chunk = pending.popleft()
                return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
            return await receive()

        await self.app(scope, replay, send)


class InferFastPath:
    """``POST /v2/models/{name}[/versions/{v}]/infer`` straight from the guard to the server's infer function.

    Skips FastAPI's middleware stack, routing, dependency solving and exit stacks, Starlette's
    ``Request`` and ``Response`` objects, and a re-read of the body the guard has read already:
    profiling put these at more than half of the server's CPU for a small single-image request. Same
    function, same error bodies (ApiError -> its status, anything else -> 500), same metric labels
    (``scope["route"]``). ``endpoint(name, version, chunks, content_encoding, inference_header_length)``
    returns the response body and headers.
    """

    _PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")

    def __init__(self, *, endpoint: Callable[..., Awaitable[tuple[bytes, Mapping[str, str]]]],
                 routes: dict[bool, Any], skip: frozenset[str] = frozenset()):
        self.skip = skip  # models with routes of their own (text towers: serve/text.py), routed by FastAPI
        self.endpoint = endpoint
        self.routes = routes  # versioned? -> the FastAPI route (its path labels the metrics, as routed)

    def match(self, scope: dict) -> re.Match | None:
        """The path's match when this request is a v2 infer for a model served here (else None)."""
        if scope["method"] != "POST":
            return None
        m = self._PATH.fullmatch(scope["path"])
        return None if m is None or m.group(1) in self.skip else m

    def label(self, m: re.Match) -> str:
        """The metrics' endpoint label of a matched request: its FastAPI route's path template."""
        return str(self.routes[m.group(2) is not None].path)

    async def handle(self, scope: dict, m: re.Match, chunks: list[bytes], send: Callable) -> int:
        """Answer the request; returns the HTTP status sent."""
        scope["route"] = self.routes[m.group(2) is not None]
        encoding, header_length = "", None
        for key, value in scope["headers"]:
            if key == b"content-encoding":
                encoding = value.decode("latin-1")
            elif key == b"inference-header-content-length":
                header_length = value.decode("latin-1")
        try:
            # scope["path"] is percent-decoded already (ASGI), as FastAPI's path parameters are
            content, headers = await self.endpoint(m.group(1), m.group(2), [c for c in chunks if c], encoding,
                                                   header_length)
        except ApiError as e:
            error = _error_response(e.status, e.message, e.headers)
        except Exception as e:  # noqa: BLE001 - as the app's 500 handler
            error = _error_response(500, f"internal server error: {type(e).__name__}: {e}")
        else:
            raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
            raw.append((b"content-length", str(len(content)).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": raw})
            await send({"type": "http.response.body", "body": content})
            return 200
        await send({"type": "http.response.start", "status": error.status_code, "headers": error.raw_headers})
        await send({"type": "http.response.body", "body": error.body})
        return error.status_code


class _ZooApp(FastAPI):
    """FastAPI with the guard (auth, body limit, metrics, the v2 infer fast path) outside its own stack.

    FastAPI's outer layers (error, telemetry and body-limit middlewares) cost ~8 % of a small infer
    request's CPU; the guard does their work for the fast path, and FastAPI's stack still serves the
    rest (its 500 handler included) inside the guard.
    """

    guard: Callable[[Any], Any] | None = None
    TELEMETRY_RECHECK_S = 1.0
    _telemetry_checked = -1e9
    _telemetry_on = True

    def build_middleware_stack(self) -> Any:
        stack = super().build_middleware_stack()
        return stack if self.guard is None else self.guard(stack)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # FastAPI asks OpenTelemetry on every request whether a provider is configured (environment
        # reads, ~4 % of a small infer request's CPU). The answer is kept for TELEMETRY_RECHECK_S: a
        # provider set up while the server runs traces requests from then on, within that time.
        if scope["type"] == "http" and "fastapi.telemetry" not in scope:
            now = time.monotonic()
            if now - self._telemetry_checked > self.TELEMETRY_RECHECK_S:
                telemetry = getattr(self, "_native_telemetry", None)  # FastAPI >= 0.165; else: always ask
                self._telemetry_on = telemetry is None or bool(telemetry.enabled())
                self._telemetry_checked = now
            if not self._telemetry_on:  # as FastAPI.__call__ does when telemetry is off
                if self.root_path:
                    scope["root_path"] = self.root_path
                await Starlette.__call__(self, scope, receive, send)
                return
        await super().__call__(scope, receive, send)
