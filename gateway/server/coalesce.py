"""Client-side writes made in one event-loop step leave as one `send()`.

uvicorn writes a response's head the moment `http.response.start` is sent and its body
with the next message: two system calls and two TCP segments for every small answer.
`CoalescingTransport` sits between the connection's protocol and its transport, keeps
small writes until the end of the current loop step (one `call_soon`) and hands them
over joined, for less CPU per proxied request (docs/performance.md). Large writes (a
streamed body's chunks) go straight through, after anything pending, so nothing is
copied twice and order is kept; `close`, `write_eof` and `writelines` flush first,
`abort` drops what is pending.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["CoalescingTransport"]

_SMALL = 64 * 1024  # writes up to this size are joined; larger ones are never copied


class CoalescingTransport:
    """A write-coalescing proxy for one connection's `asyncio.Transport`."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pending = self._pending
        if len(data) + (len(pending) if pending else 0) > _SMALL:
            # Large, or what is pending would grow large: out now, in order.
            if pending:
                self._pending = b""  # the scheduled flush finds nothing left
                self._transport.write(pending)
            self._transport.write(data)
        elif pending is None:
            self._pending = bytes(data)
            self._loop.call_soon(self._flush)
        else:
            self._pending = pending + data

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        pending = self._pending
        self._pending = None
        if pending and not self._transport.is_closing():
            self._transport.write(pending)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._pending or b"")

    def __getattr__(self, name: str) -> Any:
        # Everything else (pause/resume_reading, get_extra_info, set_protocol, ...).
        return getattr(self._transport, name)

    def __repr__(self) -> str:
        return f"CoalescingTransport({self._transport!r})"
