"""The data plane's HTTP/1.1 protocol: uvicorn's httptools protocol plus the client
limits neither uvicorn nor httptools (llhttp) enforce on their own.

llhttp already refuses ambiguous framing (Content-Length with Transfer-Encoding,
duplicate or non-numeric lengths, unknown codings, obs-fold, control characters) and
uvicorn answers those with its plain `400` and closes. What is missing there, and added
here per connection:

- the head (request line and headers) is bounded in size and count: a target longer
  than `max_request_line` is `414`, headers beyond `max_header_size` or
  `max_header_count` are `431`, both answered once and the connection closed;
- a head must be complete within `header_timeout` of the connection opening or of its
  first byte (slowloris): a connection that sent nothing is closed quietly, one that
  sent part of a head gets `408` and is closed;
- the idle time between requests is `keepalive_timeout` (uvicorn's own timer, with
  sub-second precision);
- beyond `max_client_connections` open connections in this worker, a new connection's
  first request is answered `503 too_many_connections` at once and the connection
  closed, so one client holding thousands of sockets cannot starve the event loop.

uvicorn builds the protocol itself (`config.http_protocol_class(config=..., ...)`), so
the limits ride on a subclass made per server by `protocol_class(limits)`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.errors import GatewayError, RequestTimeout, problem_body
from gateway.proxy import new_request_id
from gateway.settings import ServerSettings
from gateway.types import Receive, Scope, Send

__all__ = [
    "ClientLimits",
    "HeadersTooLarge",
    "LimitedHttpProtocol",
    "TooManyConnections",
    "UriTooLong",
    "protocol_class",
]

log = logging.getLogger("gateway.server")


class UriTooLong(GatewayError):
    status, code, title = 414, "uri_too_long", "Request target too long"


class HeadersTooLarge(GatewayError):
    status, code, title = 431, "headers_too_large", "Request header fields too large"


class TooManyConnections(GatewayError):
    status, code, title = 503, "too_many_connections", "Too many client connections"


@dataclass(frozen=True, slots=True)
class ClientLimits:
    max_request_line: int = 8 * 1024
    max_header_size: int = 32 * 1024
    max_header_count: int = 100
    header_timeout: float = 10.0
    keepalive_timeout: float = 5.0
    max_client_connections: int = 10_000

    @classmethod
    def from_settings(cls, server: ServerSettings) -> ClientLimits:
        return cls(
            max_request_line=server.max_request_line,
            max_header_size=server.max_header_size,
            max_header_count=server.max_header_count,
            header_timeout=server.header_timeout,
            keepalive_timeout=server.keepalive_timeout,
            max_client_connections=server.max_client_connections,
        )


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; `data_received` answers it."""


class _WarnOncePerSecond:
    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, message: str, **extra: object) -> None:
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._last = now
            log.warning(message, extra=extra)


def raw_problem(error: GatewayError) -> bytes:
    """A whole problem+json response that closes the connection, as bytes on the wire."""
    request_id = new_request_id()
    body = problem_body(error, request_id)
    head = [
        STATUS_LINE[error.status],
        b"content-type: application/problem+json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"x-request-id: " + request_id.encode("ascii") + b"\r\n",
        *(name + b": " + value + b"\r\n" for name, value in error.headers),
        b"connection: close\r\n\r\n",
    ]
    return b"".join(head) + body


async def _too_many_connections(scope: Scope, receive: Receive, send: Send) -> None:
    error = TooManyConnections(
        "this gateway worker has too many open client connections; retry shortly"
    )
    request_id = new_request_id()
    body = problem_body(error, request_id)
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", request_id.encode("ascii")),
                (b"retry-after", b"1"),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class LimitedHttpProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` with head size, head count, head timeout and connection limits.

    State per connection: `_in_head` is true from the end of one request (or the
    connection's start) until the next request's headers are complete; `_head_bytes`
    counts what arrived meanwhile; `_head_timer` is armed while a head is awaited and
    unfinished."""

    limits: ClassVar[ClientLimits] = ClientLimits()
    _warn: ClassVar[_WarnOncePerSecond] = _WarnOncePerSecond()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits = self.limits
        self.timeout_keep_alive = limits.keepalive_timeout  # type: ignore[assignment]
        self._max_head = limits.max_request_line + limits.max_header_size + 4 * 1024
        self._in_head = True
        self._head_bytes = 0
        self._began = False  # the parser has seen the first byte of the awaited request
        self._header_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: GatewayError | None = None

    # Connection life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_client_connections:
            self.app = _too_many_connections
            self._warn(
                "client connection limit reached: new connections get 503",
                max_client_connections=self.limits.max_client_connections,
            )
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._refuse(self._refusal)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        # A head still unfinished after this read: bound its size and arm its timer.
        # (A head that completes within one read never costs a timer.)
        if self._in_head and (self._head_bytes or self._began):
            if self._head_bytes > self._max_head:
                self._refuse(HeadersTooLarge("the request head is too large"))
            else:
                self._arm()

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._began = True

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_request_line:
            self._stop(
                UriTooLong(f"the request target exceeds {self.limits.max_request_line} bytes")
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # A trailer field of a chunked body. uvicorn would append it to the request's
            # headers (the very list the app already holds); RFC 9110 forbids merging
            # trailers into the header section, and a proxy must never let one smuggle a
            # header past the checks made on the head. Dropped.
            return
        super().on_header(name, value)
        self._header_bytes += len(name) + len(value) + 4
        limits = self.limits
        if len(self.headers) > limits.max_header_count:
            self._stop(HeadersTooLarge(f"more than {limits.max_header_count} header fields"))
        if self._header_bytes > limits.max_header_size:
            self._stop(HeadersTooLarge(f"header fields exceed {limits.max_header_size} bytes"))

    def on_headers_complete(self) -> None:
        self._disarm()
        self._in_head = False
        self._began = False
        self._head_bytes = 0
        self._header_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # what follows on this connection is the next request's head

    # Helpers

    def _stop(self, error: GatewayError) -> None:
        self._refusal = error
        raise _Refused(error.detail)

    def _refuse(self, error: GatewayError) -> None:
        """Answer once and close; never in the middle of another response."""
        self._disarm()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self.transport.write(raw_problem(error))
        self.transport.close()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout, self._head_timed_out
            )

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes == 0 and not self._began:
            self.transport.close()  # never began a request: nobody to answer
            return
        self._refuse(
            RequestTimeout(
                f"the request head was not complete within {self.limits.header_timeout:g}s"
            )
        )


def protocol_class(limits: ClientLimits) -> type[LimitedHttpProtocol]:
    """The protocol class for one server: uvicorn instantiates it per connection."""
    return type(
        "GatewayHttpProtocol",
        (LimitedHttpProtocol,),
        {"limits": limits, "_warn": _WarnOncePerSecond()},
    )
