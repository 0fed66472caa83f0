"""uvicorn's httptools protocol with one socket write per response instead of two.

uvicorn writes a response's status line and headers on ``http.response.start`` and its body on
``http.response.body``: two ``send()`` system calls, and on loopback or a LAN two packets the client
wakes up for. py-spy on the server under load (a small model, binary v2 infer, 32 connections) put
uvicorn's ``send`` at a fifth of the event loop's samples, most of it those system calls. Here the
transport is wrapped so that the writes made during one event-loop step are joined and leave in one
call, at the end of that step: same bytes, same order, no delay a client could see.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """An asyncio transport whose ``write`` calls within one loop step go out as one ``write``.

    Everything else (``close``, ``is_closing``, ``pause_reading``, ``get_extra_info``, ...) is the
    wrapped transport's; ``close`` sends what is pending first, ``abort`` drops it.
    """

    __slots__ = ("_transport", "_loop", "_pending", "_scheduled")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._pending.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        """Send what is pending now (called at the end of the loop step that wrote it)."""
        self._scheduled = False
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's ``HttpToolsProtocol`` writing through a :class:`CoalescingTransport` (``uvicorn.Config(http=...)``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
