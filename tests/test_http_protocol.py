"""serve.http_protocol: uvicorn's httptools protocol writing each response in one socket write.

The same bytes as uvicorn's own protocol (compared on raw sockets, several responses on one
keep-alive connection, chunked streaming, HEAD, Connection: close), one ``write`` per response where
uvicorn makes two, and a streamed chunk leaves before the next one is produced.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("httptools")

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: E402

from serve.http_protocol import CoalescingHttpToolsProtocol, CoalescingTransport  # noqa: E402

WRITES: list[int] = []  # bytes per write() that reached the real transport, in order


class _CountingTransport:
    def __init__(self, transport):
        self._t = transport

    def write(self, data):
        WRITES.append(len(data))
        self._t.write(data)

    def __getattr__(self, name):
        return getattr(self._t, name)


class _CountedPlain(HttpToolsProtocol):
    def connection_made(self, transport):
        super().connection_made(_CountingTransport(transport))


class _CountedCoalescing(CoalescingHttpToolsProtocol):
    def connection_made(self, transport):
        # the counter sits under the coalescing wrapper: it sees what goes to the socket
        HttpToolsProtocol.connection_made(self, CoalescingTransport(_CountingTransport(transport), self.loop))


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    path = scope["path"]
    if path == "/stream":  # chunked: no content-length
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for part in (b"first", b"second", b"third"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0.3)
        await send({"type": "http.response.body", "body": b""})
        return
    body = b"x" * (200_000 if path == "/big" else 11)
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    if path == "/close":
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Server:
    def __init__(self, protocol):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, http=protocol, log_level="warning", access_log=False, lifespan="off",
                                server_header=False, date_header=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def _exchange(port: int, raw: bytes, until: bytes | None = None, expect: int | None = None) -> bytes:
    """Send ``raw`` on one connection; read until the peer closes, ``until`` appears or ``expect`` bytes came."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        got = b""
        while True:
            if until is not None and got.endswith(until):
                return got
            if expect is not None and len(got) >= expect:
                return got
            chunk = s.recv(1 << 16)
            if not chunk:
                return got
            got += chunk


REQUESTS = (b"GET /fixed HTTP/1.1\r\nHost: t\r\n\r\n"
            b"POST /fixed HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
            b"HEAD /fixed HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /close HTTP/1.1\r\nHost: t\r\n\r\n")


def test_same_bytes_as_uvicorn_and_one_write_per_response():
    results = {}
    for name, protocol in (("plain", _CountedPlain), ("coalescing", _CountedCoalescing)):
        WRITES.clear()
        with _Server(protocol) as srv:
            results[name] = (_exchange(srv.port, REQUESTS), list(WRITES))
    plain, coalescing = results["plain"][0], results["coalescing"][0]
    assert plain == coalescing
    assert plain.count(b"HTTP/1.1 200 OK") == 6 and plain.endswith(b"x" * 11)
    assert b"5\r\nfirst\r\n6\r\nsecond\r\n5\r\nthird\r\n0\r\n\r\n" in plain
    # uvicorn: head + body per fixed-length response (HEAD: head only), head + 3 chunks + end for the stream
    assert len(results["plain"][1]) == 2 + 2 + 1 + 2 + 5 + 2
    # coalescing: one write per fixed-length response; the stream's head leaves with its first chunk
    # and each later chunk (produced 0.3 s apart) by itself
    assert len(results["coalescing"][1]) == 1 + 1 + 1 + 1 + 4 + 1
    assert sum(results["coalescing"][1]) == len(coalescing)


def test_a_streamed_chunk_leaves_before_the_next_is_produced():
    with _Server(CoalescingHttpToolsProtocol) as srv, \
            socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        t0 = time.perf_counter()
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        got = b""
        while b"first" not in got:
            got += s.recv(1 << 16)
        first_at = time.perf_counter() - t0
        while not got.endswith(b"0\r\n\r\n"):
            got += s.recv(1 << 16)
        done_at = time.perf_counter() - t0
    assert b"second" not in got.split(b"first")[0]
    assert first_at < 0.25 < 0.6 <= done_at, (first_at, done_at)


def test_close_sends_pending_bytes_first_and_abort_drops_them():
    class Fake:
        def __init__(self):
            self.log = []

        def write(self, data):
            self.log.append(("write", bytes(data)))

        def close(self):
            self.log.append(("close",))

        def abort(self):
            self.log.append(("abort",))

        def is_closing(self):
            return False

    loop = asyncio.new_event_loop()
    try:
        fake = Fake()
        t = CoalescingTransport(fake, loop)
        t.write(b"head")
        t.write(b"")  # nothing to send: no empty write later
        t.write(b"body")
        assert fake.log == []  # nothing sent until the loop step ends (or close)
        t.close()
        assert fake.log == [("write", b"headbody"), ("close",)]
        loop.run_until_complete(asyncio.sleep(0))  # the scheduled flush finds nothing left
        assert fake.log == [("write", b"headbody"), ("close",)]
        fake2 = Fake()
        t2 = CoalescingTransport(fake2, loop)
        t2.write(b"lost")
        t2.abort()
        loop.run_until_complete(asyncio.sleep(0))
        assert fake2.log == [("abort",)]
        assert t2.is_closing() is False  # everything else is the wrapped transport's
    finally:
        loop.close()
