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
  closed, so one client holding thousands of sockets cannot starve the event loop;
- the trailer section of a chunked body is bounded like a head (Envoy applies its
  header limits to trailers too): more than `max_header_count` fields or more than
  `max_header_size` bytes of them, or `max_header_size + 4KiB` raw bytes after the
  last chunk without the section ending, is `431` and the connection closed.

Every refusal made here (these, and uvicorn's plain `400` for a request llhttp refuses)
is counted, logged and shown on the status page by the data plane's logging phase
(`gateway/dataplane/logphase.py`), as every request it serves is. A refusal in the middle of a
body (a bad chunk, an oversized trailer) is answered only if that request's response
has not started, and ends the request the data plane is serving as a disconnect.

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
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import ClientDisconnected
from websockets.exceptions import InvalidState
from websockets.frames import Close, CloseCode

from gateway.config.models import ServerSettings
from gateway.dataplane.bodies import send_problem
from gateway.dataplane.headers import http_date, new_request_id
from gateway.dataplane.logphase import LoggingPhase, target_path
from gateway.dataplane.state import GatewayState
from gateway.dataplane.view import RuntimeView
from gateway.dataplane.websocket import answer_close_later
from gateway.errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    RequestTimeout,
    TooManyConnections,
    UriTooLong,
    problem_response,
)
from gateway.server.coalesce import CoalescingTransport
from gateway.server.h2 import PREFACE, H2Options, H2Protocol
from gateway.server.tls import tls_extension
from gateway.types import Receive, Scope, Send

__all__ = ["ClientLimits", "LimitedHttpProtocol", "protocol_class", "websocket_protocol"]

log = logging.getLogger("gateway.server")

# uvicorn's own answer to a request llhttp refuses, kept as it was (plus X-Request-ID).
_INVALID = b"Invalid HTTP request received."
_CLOSE = [(b"connection", b"close")]
_TRAILER_SLACK = 4 * 1024  # raw bytes allowed past max_header_size for line ends and colons


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """What one client connection may send or hold (the `server:` block's limits)."""

    max_request_line: int = 8 * 1024  # bytes of the request target; longer: 414
    max_header_size: int = 32 * 1024  # bytes of all header lines (and trailers); more: 431
    max_header_count: int = 100  # header (or trailer) fields; more: 431
    header_timeout: float = 10.0  # seconds for a whole head to arrive; else 408
    keepalive_timeout: float = 5.0  # seconds idle between two requests
    max_client_connections: int = 10_000  # open connections per worker; beyond: 503

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
    """A warning that repeats under load is logged at most once a second."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, message: str, **extra: object) -> None:
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._last = now
            log.warning(message, extra=extra)


def raw_problem(error: GatewayError, request_id: str) -> tuple[bytes, int]:
    """A whole problem+json response that closes the connection, as bytes on the wire,
    and the length of its body."""
    headers, body = problem_response(error, request_id, _CLOSE, date=http_date())
    head = [STATUS_LINE[error.status], *(name + b": " + value + b"\r\n" for name, value in headers)]
    return b"".join(head) + b"\r\n" + body, len(body)


def raw_invalid(request_id: str) -> tuple[bytes, int]:
    """uvicorn's plain `400` for what llhttp refuses, with the request ID added."""
    head = [
        STATUS_LINE[400],
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: %d\r\n" % len(_INVALID),
        b"x-request-id: " + request_id.encode("ascii") + b"\r\n",
        b"date: " + http_date() + b"\r\n",
        b"connection: close\r\n\r\n",
    ]
    return b"".join(head) + _INVALID, len(_INVALID)


class Http10Cycle(RequestResponseCycle):
    """The response side of an HTTP/1.0 request, where uvicorn has two gaps.

    - uvicorn closes every HTTP/1.0 connection, even one whose request asked for
      `Connection: keep-alive` (as `ab -k` and older clients do). Here, as in nginx, such
      a connection stays open when the response's length is known (`Content-Length`,
      `HEAD`, `204`, `304`), and the response says `Connection: keep-alive`, which a
      1.0 client needs to see (RFC 9112, 9.3 and Appendix C.2.2).
    - uvicorn frames a response without `Content-Length` as chunked whatever the
      request's version, and a 1.0 client does not know chunked coding: "A server MUST
      NOT send a response containing Transfer-Encoding unless the corresponding request
      indicates HTTP/1.1" (RFC 9112, 6.1). Such a response (a streamed upstream body)
      goes out with no framing header and `Connection: close`, and its end is the
      connection's close (RFC 9112, 6.3 rule 8).

    The protocol gives an HTTP/1.0 request's cycle this class once uvicorn has built it
    (`LimitedHttpProtocol.on_headers_complete`); HTTP/1.1 requests never meet it."""

    _until_close = False  # the body ends when the connection closes

    async def send(self, message: Any) -> None:
        kind = message["type"]
        if kind == "http.response.start" and not self.response_started:
            message = self._frame(message)
        elif kind == "http.response.body" and self._until_close and not self.response_complete:
            await self._send_until_close(message)
            return
        await super().send(message)

    def _frame(self, message: Any) -> Any:
        headers = list(message.get("headers", ()))
        names = {name.lower() for name, _ in headers}
        status = message["status"]
        if b"content-length" in names or self.scope["method"] == "HEAD" or status in (204, 304):
            if self.keep_alive and b"connection" not in names:
                headers.append((b"connection", b"keep-alive"))
        else:
            headers = [(n, v) for n, v in headers if n.lower() != b"transfer-encoding"]
            self.keep_alive = False  # uvicorn adds `connection: close` and closes at the end
            self.chunked_encoding = False  # and no chunked framing of its own
            self._until_close = True
        return {**message, "headers": headers}

    async def _send_until_close(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        body = message.get("body", b"")
        if body:
            self.transport.write(body)
        if not message.get("more_body", False):
            self.response_complete = True
            self.message_event.set()
            self.transport.close()
            self.on_response()


class LimitedHttpProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` with head size, head count, head timeout, trailer and
    connection limits.

    State per connection: `_in_head` is true from the end of one request (or the
    connection's start) until the next request's headers are complete; `_head_bytes`
    counts what arrived meanwhile; `_head_timer` is armed while a head is awaited and
    unfinished. In a chunked body, `_chunk_pending` is true from a chunk header until
    that chunk's data arrives: after the last (empty) chunk it stays true through the
    trailer section, whose raw bytes `_trailer_bytes` counts."""

    limits: ClassVar[ClientLimits] = ClientLimits()
    refusals: ClassVar[LoggingPhase | None] = None  # where refusals are recorded, if anywhere
    h2: ClassVar[H2Options | None] = None  # HTTP/2 served too (h2.py), or HTTP/1.1 only
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
        self._chunk_pending = False
        self._trailer_bytes = 0
        self._trailer_fields = 0
        self._trailer_size = 0
        self._tls: dict[str, Any] | None = None  # the ASGI `tls` extension, under TLS
        # Cleartext with HTTP/2 on: the first bytes, until they tell the HTTP/2 preface
        # from an HTTP/1.1 request line (None once told).
        self._sniff: bytes | None = None

    # Connection life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        ssl_object = transport.get_extra_info("ssl_object")
        if self.h2 is not None:
            if ssl_object is None:
                self._sniff = b""
            elif ssl_object.selected_alpn_protocol() == "h2":
                self._hand_over(transport, b"")
                return
        super().connection_made(transport)
        if ssl_object is not None:
            self._tls = tls_extension(ssl_object)
        # A response's head and body leave in one send() (coalesce.py).
        self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
        if len(self.connections) > self.limits.max_client_connections:
            self.app = self._too_many_connections
            self._warn(
                "client connection limit reached: new connections get 503",
                max_client_connections=self.limits.max_client_connections,
            )
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._sniff is not None:
            if self._sniff:
                data = self._sniff + data
            size = min(len(data), len(PREFACE))
            if data[:size] == PREFACE[:size]:
                if size < len(PREFACE):
                    self._sniff = data  # a prefix of the preface so far: wait for more
                    return
                self._sniff = None
                self.connections.discard(self)
                self._disarm()
                self._hand_over(self.transport._transport, data)  # type: ignore[attr-defined]
                return
            self._sniff = None
        self._unset_keepalive_if_required()
        if self._in_head:
            self._head_bytes += len(data)
        elif self._chunk_pending:
            self._trailer_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._refusal is not None:
                self._refuse(self._refusal)
            else:
                self.logger.warning("Invalid HTTP request received.")
                # llhttp's reason is one of its own fixed strings, never client bytes.
                self._refuse(BadRequest(f"invalid HTTP request: {exc}"[:200]), plain=True)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_head:
            # A head still unfinished after this read: bound its size and arm its timer.
            # (A head that completes within one read never costs a timer.)
            if self._head_bytes or self._began:
                if self._head_bytes > self._max_head:
                    self._refuse(HeadersTooLarge("the request head is too large"))
                else:
                    self._arm()
        elif (
            self._chunk_pending
            and self._trailer_bytes > self.limits.max_header_size + _TRAILER_SLACK
        ):
            # One trailer field sent in pieces and never finished: httptools buffers it
            # without calling back, so the raw byte count is what stops it.
            self._refuse(HeadersTooLarge("the trailer section is too large"))

    def _hand_over(self, transport: asyncio.Transport, data: bytes) -> None:
        """This connection speaks HTTP/2: `H2Protocol` takes the transport over, and
        the bytes already read."""
        assert self.h2 is not None
        protocol = H2Protocol(
            app=self.app,
            options=self.h2,
            limits=self.limits,
            connections=self.connections,
            tasks=self.tasks,
            app_state=self.app_state,
            refusals=self.refusals,
            loop=self.loop,
            over_limit=len(self.connections) >= self.limits.max_client_connections,
        )
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data:
            protocol.data_received(data)

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._began = True
        if self._tls is not None:
            self.scope["extensions"] = {"tls": self._tls}  # type: ignore[dict-item]

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_request_line:
            self._stop(
                UriTooLong(f"the request target exceeds {self.limits.max_request_line} bytes")
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.limits
        if not self._in_head:
            # A trailer field of a chunked body. uvicorn would append it to the request's
            # headers (the very list the app already holds); RFC 9110 forbids merging
            # trailers into the header section, and a proxy must never let one smuggle a
            # header past the checks made on the head. Counted, bounded, dropped.
            self._trailer_fields += 1
            self._trailer_size += len(name) + len(value) + 4
            if self._trailer_fields > limits.max_header_count:
                self._stop(HeadersTooLarge(f"more than {limits.max_header_count} trailer fields"))
            if self._trailer_size > limits.max_header_size:
                self._stop(HeadersTooLarge(f"trailer fields exceed {limits.max_header_size} bytes"))
            return
        super().on_header(name, value)
        self._header_bytes += len(name) + len(value) + 4
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
        cycle = self.cycle
        if (
            self.scope["http_version"] == "1.0"
            and cycle is not None
            and cycle.scope is self.scope
            and not cycle.response_started
        ):
            # uvicorn built this request's cycle and scheduled its task, which has not
            # run yet: HTTP/1.0's framing and keep-alive rules apply (`Http10Cycle`).
            cycle.__class__ = Http10Cycle
            cycle.keep_alive = self.parser.should_keep_alive()

    def on_chunk_header(self) -> None:
        # Called for chunked bodies only. Whether this is the last chunk (size 0, the
        # trailer section follows) shows only in that no data follows it.
        self._chunk_pending = True
        self._trailer_bytes = 0
        self._trailer_fields = 0
        self._trailer_size = 0

    def on_body(self, body: bytes) -> None:
        self._chunk_pending = False
        HttpToolsProtocol.on_body(self, body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # what follows on this connection is the next request's head
        self._chunk_pending = False

    # Helpers

    def _stop(self, error: GatewayError) -> None:
        self._refusal = error
        raise _Refused(error.detail)

    def _refuse(
        self, error: GatewayError, *, plain: bool = False, elapsed: float | None = None
    ) -> None:
        """Answer once, close and record it; never in the middle of another response.

        In a head, any response cycle is an earlier request's: answer only once it is
        complete. In a body, the cycle is this request's, its app still running: answer
        only if its response has not started, and end the app's exchange as a
        disconnect so nothing it sends later reaches the wire."""
        if elapsed is None:
            elapsed = self._head_elapsed()
        self._disarm()
        transport = self.transport
        if transport.is_closing():
            return
        cycle = self.cycle
        method: str | None = None
        path: str | None = None
        if self._in_head:
            answer = cycle is None or cycle.response_complete
            if self._began and self.url:  # before the target, llhttp's method reads DELETE
                method = self.parser.get_method().decode("ascii", "replace")
                path = target_path(self.url)
        else:
            answer = cycle is not None and not cycle.response_started
            if cycle is not None:
                cycle.disconnected = True
                cycle.message_event.set()
            method = self.scope["method"]
            path = target_path(self.url)
        request_id = new_request_id()
        sent = 0
        if answer:
            data, sent = raw_invalid(request_id) if plain else raw_problem(error, request_id)
            transport.write(data)
        transport.close()
        self._record(error, request_id, method, path, sent, elapsed)

    def _record(
        self,
        error: GatewayError,
        request_id: str,
        method: str | None,
        path: str | None,
        sent: int,
        elapsed: float,
    ) -> None:
        refusals = self.refusals
        if refusals is None:
            return
        try:
            refusals.refusal(
                status=error.status,
                code=error.code,
                detail=error.detail,
                request_id=request_id,
                method=method,
                path=path,
                client=self.client,
                bytes_out=sent,
                elapsed=elapsed,
            )
        except Exception:  # recording must never keep a refused connection alive
            log.exception("could not record a refused request")

    async def _too_many_connections(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app of a connection over `max_client_connections`."""
        error = TooManyConnections(
            "this gateway worker has too many open client connections; retry shortly"
        )
        request_id = new_request_id()
        sent = await send_problem(send, error, request_id, _CLOSE)
        path = target_path(scope.get("raw_path") or b"")
        self._record(error, request_id, scope["method"], path, sent, 0.0)

    def _head_elapsed(self) -> float:
        """How long the head being refused has taken, read off its timer (no timer: it
        arrived within one read)."""
        timer = self._head_timer
        if timer is None:
            return 0.0
        return max(0.0, self.loop.time() - timer.when() + self.limits.header_timeout)

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
            ),
            elapsed=self.limits.header_timeout,
        )


def protocol_class(
    limits: ClientLimits,
    state: GatewayState[RuntimeView] | None = None,
    h2: H2Options | None = None,
) -> type[LimitedHttpProtocol]:
    """The protocol class for one server: uvicorn instantiates it per connection.
    With `state`, its refusals are recorded in that state's metrics, access log and
    status board; with `h2`, a connection may become HTTP/2 (`h2.py`)."""
    return type(
        "GatewayHttpProtocol",
        (LimitedHttpProtocol,),
        {
            "limits": limits,
            "refusals": LoggingPhase(state) if state is not None else None,
            "h2": h2,
            "_warn": _WarnOncePerSecond(),
        },
    )


def websocket_protocol(base: type[Any]) -> type[Any]:
    """uvicorn's WebSocket protocol (`base`, the sans-I/O one) as the data plane needs it:

    - a close is relayed, not answered. uvicorn's protocol answers the client's close
      frame at once, echoing its code, before the upstream has said anything. Here the
      close is reported to the app (`websocket.disconnect` with the client's code and
      reason) and left unanswered (`answer_close_later`) until the app's
      `websocket.close`, whose code and reason (the upstream's answer) are the answer.
      The other way round, after the app's own `websocket.close` the app's
      `websocket.disconnect` carries the client's answer to it, where uvicorn reports
      the app's own code at once. An invalid close frame still fails the connection
      (1002, 1007) inside websockets, as before. An app that never answers, or ends
      without answering, leaves the client its own close back, as uvicorn would have
      sent it, after `close_timeout` (10 s) at the latest;
    - a close frame without a code and no close frame at all are told apart. uvicorn
      reports both as 1005 in `websocket.disconnect`; here 1005 means the client sent
      a close frame without a code, and a connection that ended without one (the
      client dropped it, or never answered the app's close) is 1006. The other way,
      the app's `websocket.close` with code 1005 (which may not go on the wire) sends
      a close frame without a code;
    - an upgrade over TLS carries the ASGI `tls` extension (the TLS version and client
      certificate) as a plain request does.

    Another implementation (wsproto's, uvicorn's legacy one) is returned as it is."""
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    except ImportError:  # an older uvicorn (before 0.35) has only those
        return base
    if not issubclass(base, WebSocketsSansIOProtocol) or getattr(base, "relays_closes", False):
        return base

    class GatewayWebSocketProtocol(base):  # type: ignore[misc]
        relays_closes = True  # also how `Listener.shutdown` tells WebSockets apart
        close_sent: bool  # (uvicorn's, set in its __init__)
        read_paused: bool

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            answer_close_later(self.conn)

        def handle_connect(self, event: Any) -> None:
            super().handle_connect(event)
            scope = getattr(self, "scope", None)  # unset when the handshake was refused
            ssl_object = self.transport.get_extra_info("ssl_object")
            if scope is not None and ssl_object is not None:
                scope["extensions"]["tls"] = tls_extension(ssl_object)

        def connection_lost(self, exc: Exception | None) -> None:
            if (
                self.handshake_complete
                and self.initial_response is None
                and self.conn.close_rcvd is None
            ):
                # No close frame came: 1006. uvicorn queues its 1005 after this one,
                # where the app, which stops at the first disconnect, never reads it.
                self.queue.put_nowait(_disconnect(None))
            super().connection_lost(exc)

        def handle_close(self, event: Any) -> None:
            received = self.conn.close_rcvd
            if self.close_sent:  # the client's answer to the app's close
                self.queue.put_nowait(_disconnect(received))
                super().handle_close(event)
            elif not self.transport.is_closing():  # the client's close: the app answers
                self.stop_keepalive()
                self.queue.put_nowait(_disconnect(received))
                self.close_timer = self.loop.call_later(
                    self.close_timeout, self._answer_close, received.code, received.reason
                )

        async def send(self, message: Any) -> None:
            if (
                message["type"] != "websocket.close"
                or not self.handshake_complete
                or self.initial_response is not None
            ):
                await super().send(message)
                return
            if self.disconnected:
                raise ClientDisconnected
            if self.close_sent or self.transport.is_closing():
                return  # the server side already closed (it failed the connection, a drain)
            code, reason = message.get("code", 1000), message.get("reason") or ""
            if self.conn.close_rcvd is not None:
                self._answer_close(code, reason)
                return
            # uvicorn's own close, except that `websocket.disconnect` waits for the
            # client's answer (`handle_close`) instead of repeating this close at once,
            # and that 1005 sends a close frame without a code.
            try:
                if code == CloseCode.NO_STATUS_RCVD:
                    self.conn.send_close()
                else:
                    self.conn.send_close(code, reason)
            except InvalidState:
                raise ClientDisconnected from None
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            if self.read_paused:  # the answer must be read
                self.read_paused = False
                self.transport.resume_reading()
            self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)

        def on_task_complete(self, task: asyncio.Task[None]) -> None:
            super().on_task_complete(task)
            received = self.conn.close_rcvd
            if received is not None and not self.close_sent:  # ended without answering
                self._answer_close(received.code, received.reason)

        def _answer_close(self, code: int, reason: str) -> None:
            if self.close_sent or self.transport.is_closing():
                return
            # 1005 is "no code": an answer without one is an empty close frame.
            if code == CloseCode.NO_STATUS_RCVD:
                self.conn.send_close()
            else:
                self.conn.send_close(code, reason)
            if self.close_timer is not None:
                self.close_timer.cancel()
                self.close_timer = None
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.transport.close()  # a server closes once both closes passed

    return GatewayWebSocketProtocol


def _disconnect(received: Close | None) -> dict[str, Any]:
    """The `websocket.disconnect` for the client's close frame (1005 when it had no
    code), or for its absence (1006: the connection ended without one)."""
    if received is None:
        return {"type": "websocket.disconnect", "code": int(CloseCode.ABNORMAL_CLOSURE)}
    return {"type": "websocket.disconnect", "code": received.code, "reason": received.reason}
