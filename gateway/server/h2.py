"""The data plane's HTTP/2 protocol: the `h2` library (sans-I/O framing, HPACK, flow
control) driven by the gateway's own asyncio protocol, each stream an ASGI `http`
exchange with the same data plane HTTP/1.1 requests reach.

A connection becomes HTTP/2 in one of two ways, both decided by the HTTP/1.1 protocol
(`protocol.py`) that every connection starts with: under TLS when ALPN chose `h2`, on
cleartext when the first bytes are the HTTP/2 connection preface (h2c with prior
knowledge, RFC 9113 3.3). `Upgrade: h2c` is not honoured: such a request is served over
HTTP/1.1. The protocol then hands its transport to `H2Protocol` (`take_over`).

What a client may do to one connection, as Envoy and nginx learned to bound it:

- streams beyond `max_concurrent_streams` (advertised in SETTINGS) are refused with
  RST_STREAM(REFUSED_STREAM) and the others continue (RFC 9113 5.1.2);
- a header list over `max_header_size` bytes or `max_header_count` fields is answered
  `431` on its stream; one past a hard cap (twice `max_header_size`, at least 64KiB,
  decoded) or spread over more than 64 CONTINUATION frames closes the connection with
  GOAWAY, as any protocol error does;
- rapid reset (CVE-2023-44487): of the last 500 streams closed, when at least half
  (and at least 250) were reset by the client within a second of opening and before
  their answer, the connection is closed with GOAWAY(ENHANCE_YOUR_CALM); a stream reset
  before its task ran never reaches an upstream;
- control-frame floods: more than 1,000 PING/SETTINGS acknowledgements queued while the
  client does not read (Envoy's `max_outbound_control_frames`), more than 100 PRIORITY
  frames per stream opened, or more than 100 empty DATA frames in a row close the
  connection with GOAWAY(ENHANCE_YOUR_CALM);
- `header_timeout` bounds the time from the connection's start to its first request,
  and a header block left unfinished; `keepalive_timeout` is how long a connection
  with no open stream is kept. Both end with GOAWAY(NO_ERROR) and a close.

Drain (`shutdown`): GOAWAY at once with the last stream accepted, streams in flight
finish (the listener gives them `drain_timeout`), then the connection closes.

Requests reach the data plane with the client's cookie crumbs joined with `; ` (RFC
9113 8.2.3; `h2` does it), `:authority` as `host`, and no pseudo-header; answers leave
without connection-specific fields (`connection`, `keep-alive`, `transfer-encoding`,
`upgrade`, `proxy-connection`), which HTTP/2 forbids.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Protocol, cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from h2.stream import StreamClosedBy
from hpack import Decoder, Encoder
from hpack.exceptions import HPACKError
from hyperframe.frame import GoAwayFrame, HeadersFrame, RstStreamFrame
from uvicorn.protocols.utils import get_local_addr, get_remote_addr

from gateway.config.models import ServerSettings
from gateway.dataplane.headers import http_date, new_request_id
from gateway.dataplane.logphase import LoggingPhase, target_path
from gateway.errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    TooManyConnections,
    problem_response,
)
from gateway.server.tls import tls_extension

__all__ = ["PREFACE", "H2Options", "H2Protocol"]

log = logging.getLogger("gateway.server")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Connection-specific fields HTTP/2 forbids in an answer (RFC 9113 8.2.2).
_NOT_IN_H2 = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
# A request's own checks (RFC 9113 8.2 and 8.3), made in the one pass over its fields
# that builds the scope, rather than h2's chain of generators (a sixth of its cost).
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_BAD_NAME = re.compile(rb"[^a-z0-9!#$%&'*+\-.^_`|~]")  # field names are lower-case tokens
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
# Answer fields whose values change with every answer: never put in HPACK's table,
# where they would only push out the ones that repeat.
_VOLATILE = frozenset(
    {b"x-request-id", b"date", b"content-length", b"set-cookie", b"etag", b"last-modified", b"age"}
)
_RESET_WINDOW = 500  # closed streams the rapid-reset rule looks back over (Envoy's)
_RESET_MIN = _RESET_WINDOW // 2  # and how many of them must be premature resets
_PREMATURE = 1.0  # seconds: a reset sooner than this after opening is premature
_MAX_CONTROL_QUEUED = 1_000  # PING/SETTINGS ACKs queued while the client does not read
_MAX_PRIORITY_PER_STREAM = 100
_MAX_EMPTY_DATA = 100
_HARD_HEADER_CAP = 64 * 1024  # decoded bytes; the hard cap is at least this
_CONNECTION_WINDOW = 16 * 1024 * 1024  # bytes all streams together may have unread
_UNSIZED = (b"transfer-encoding", b"chunked")  # a request body of unknown length
_LINGER = 1.0  # seconds a connection closed for an error keeps reading (and dropping)
_FLUSH_NOW = 64 * 1024  # pending output larger than this is written at once


@dataclass(frozen=True, slots=True)
class H2Options:
    """What `server.http2` sets, read once at start (`from_settings`). The limits it
    shares with HTTP/1.1 (header size and count, header and keep-alive timeouts) come
    from the connection's `ClientLimits` (`protocol.py`)."""

    max_concurrent_streams: int = 128  # SETTINGS_MAX_CONCURRENT_STREAMS, enforced
    initial_window_size: int = 1024 * 1024  # SETTINGS_INITIAL_WINDOW_SIZE, bytes

    @classmethod
    def from_settings(cls, server: ServerSettings) -> H2Options | None:
        """The options of `server.http2`, or None when it is disabled."""
        http2 = server.http2
        if not http2.enabled:
            return None
        return cls(http2.max_concurrent_streams, http2.initial_window_size)


class Limits(Protocol):
    """The client limits HTTP/2 shares with HTTP/1.1 (`protocol.ClientLimits`)."""

    @property
    def max_header_size(self) -> int: ...
    @property
    def max_header_count(self) -> int: ...
    @property
    def header_timeout(self) -> float: ...
    @property
    def keepalive_timeout(self) -> float: ...


class _Encoder(Encoder):
    """HPACK without Huffman coding of literals: an answer's changing values (the
    request ID, the date) are literals every time, and Huffman-coding them in Python
    cost about a tenth of the CPU of a small h2 answer, to save a few bytes."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)

    def add(self, to_add: tuple[bytes, bytes], sensitive: bool, huffman: bool = False) -> bytes:
        return super().add(to_add, sensitive or to_add[0] in _VOLATILE, huffman)


class _Connection(H2Connection):
    """`H2Connection` that refuses a stream over the concurrency limit with
    RST_STREAM(REFUSED_STREAM) instead of failing the whole connection (h2 raises
    TooManyStreamsError), and any new stream after the gateway's own GOAWAY."""

    refuse_new = False  # set once a graceful GOAWAY went out

    def _receive_headers_frame(self, frame: HeadersFrame) -> Any:
        stream_id = frame.stream_id
        if (
            stream_id not in self.streams
            and stream_id % 2 == 1
            and stream_id > self.highest_inbound_stream_id
            and (
                self.refuse_new
                or (  # (counting open streams walks them all: only when it may matter)
                    len(self.streams) >= self.local_settings.max_concurrent_streams
                    and self.open_inbound_streams >= self.local_settings.max_concurrent_streams
                )
            )
        ):
            try:  # decoded all the same: HPACK's table must stay in step with the client
                self.decoder.decode(frame.data, raw=True)
            except HPACKError as exc:
                raise ProtocolError(f"Error decoding header block: {exc}") from exc
            self.highest_inbound_stream_id = stream_id
            self._closed_streams[stream_id] = StreamClosedBy.SEND_RST_STREAM
            reset = RstStreamFrame(stream_id)
            reset.error_code = ErrorCodes.REFUSED_STREAM
            return [reset], []
        return super()._receive_headers_frame(frame)


class _Stream:
    """One request stream: its ASGI scope, the body received and not yet read, and the
    answer's progress."""

    __slots__ = (
        "body",
        "done",
        "ended",
        "head",
        "id",
        "opened",
        "protocol",
        "reset",
        "scope",
        "started",
        "status_sent",
        "task",
        "told_end",
        "trailers",
        "waiter",
        "window",
    )

    def __init__(self, protocol: H2Protocol, stream_id: int, scope: dict[str, Any]) -> None:
        self.protocol = protocol
        self.id = stream_id
        self.scope = scope
        self.body: collections.deque[tuple[bytes, int]] = collections.deque()
        self.ended = False  # the client's END_STREAM arrived
        self.told_end = False  # the data plane was given the body's last message
        self.trailers = False  # the answer ends with trailers (`http.response.trailers`)
        # What `receive` awaits, made only when it has to wait: resolved when body or
        # the end arrives, or on a reset (`notify`).
        self.waiter: asyncio.Future[None] | None = None
        self.window: asyncio.Future[None] | None = None  # awaited for send window
        self.head: list[tuple[bytes, bytes]] | None = None  # answer head not yet sent
        self.status_sent = False
        self.done = False  # the answer is complete
        self.reset = False  # the stream is gone (reset by either side, connection lost)
        self.started = False  # the app's task has begun running
        self.opened = protocol.loop.time()
        self.task: asyncio.Task[None] | None = None

    # The ASGI side

    def notify(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        waiter = self.waiter = self.protocol.loop.create_future()
        try:
            await waiter
        finally:
            self.waiter = None

    async def receive(self) -> dict[str, Any]:
        while not self.body and not self.ended and not self.reset:
            await self._wait()
        if self.reset:
            return {"type": "http.disconnect"}
        if self.body:
            data, size = self.body.popleft()
            if size:
                self.protocol.acknowledge(self.id, size)
            more = bool(self.body) or not self.ended
            self.told_end = not more
            return {"type": "http.request", "body": data, "more_body": more}
        if not self.told_end:
            self.told_end = True
            return {"type": "http.request", "body": b"", "more_body": False}
        # The whole body was read: the next message is the disconnect, whenever it comes.
        while not self.reset and not self.done:
            await self._wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if self.reset or self.done:
            return
        kind = message["type"]
        protocol = self.protocol
        if kind == "http.response.start":
            if self.head is not None or self.status_sent:
                raise RuntimeError("http.response.start sent twice")
            self.head = protocol.answer_head(message["status"], message.get("headers", ()))
            self.trailers = bool(message.get("trailers", False))
        elif kind == "http.response.body":
            head = self.head
            if head is None and not self.status_sent:
                raise RuntimeError("http.response.body before http.response.start")
            body = message.get("body", b"")
            last = not message.get("more_body", False) and not self.trailers
            if self.scope["method"] == "HEAD":
                body = b""
            if head is not None:
                self.head = None
                self.status_sent = True
                protocol.send_head(self, head, end=not body and last)
            if body:
                await protocol.send_body(self, body, end=last)
            elif last and not self.done and not self.reset:
                protocol.end(self)
            if last:
                self.done = True
                self.notify()
        elif kind == "gateway.http.reset":  # the upstream reset its stream: so do we
            protocol.reset(self, int(message.get("code", ErrorCodes.INTERNAL_ERROR)))
        elif kind == "http.response.trailers":
            if not self.trailers:
                raise RuntimeError("http.response.trailers without trailers: true")
            if self.head is not None:  # no body at all: the head goes first
                head, self.head = self.head, None
                self.status_sent = True
                protocol.send_head(self, head, end=False)
            if message.get("more_trailers", False):
                raise RuntimeError("trailers in several messages are not supported")
            fields = [(name.lower(), value) for name, value in message.get("headers", ())]
            protocol.send_trailers(self, fields)
            self.done = True
            self.notify()


class H2Protocol(asyncio.Protocol):
    """One HTTP/2 connection of the data listener (see the module docstring)."""

    def __init__(
        self,
        *,
        app: Any,
        options: H2Options,
        limits: Limits,
        connections: set[Any],
        tasks: set[asyncio.Task[None]],
        app_state: dict[str, Any],
        refusals: LoggingPhase | None,
        loop: asyncio.AbstractEventLoop,
        over_limit: bool = False,
    ) -> None:
        self.app = app
        self.over_limit = over_limit  # past max_client_connections: every stream gets 503
        self.limits = limits
        self.connections = connections
        self.tasks = tasks
        self.app_state = app_state
        self.refusals = refusals
        self.loop = loop
        config = H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,  # answer_head builds them valid
            validate_inbound_headers=False,  # _request checks them (_BAD_NAME, ...)
            normalize_outbound_headers=False,
        )
        conn = _Connection(config=config)
        conn.encoder = _Encoder()
        conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: options.max_concurrent_streams,
                SettingCodes.INITIAL_WINDOW_SIZE: options.initial_window_size,
                SettingCodes.ENABLE_PUSH: 0,
            },
        )
        decoder: Decoder = conn.decoder
        decoder.max_header_list_size = max(_HARD_HEADER_CAP, 2 * limits.max_header_size)
        self.conn = conn
        self.streams: dict[int, _Stream] = {}
        self.transport: asyncio.Transport | None = None
        self.server: tuple[str, int | None] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        self.extensions: dict[str, Any] = {}
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._served_any = False
        self._closing = False  # a GOAWAY went out: no new streams, close when idle
        self._lingering = False  # closing after an error: input dropped, nothing written
        self._last_stream = 0  # the highest stream handed to the data plane
        self._closed: collections.deque[bool] = collections.deque(maxlen=_RESET_WINDOW)
        self._premature = 0  # premature resets among `_closed`
        self._control_queued = 0
        self._priority_frames = 0
        self._streams_opened = 0
        self._empty_data = 0

    # Connection life

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        self.connections.add(self)
        self.server = get_local_addr(transport)
        self.client = get_remote_addr(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.scheme = "https"
            self.extensions = {"tls": tls_extension(ssl_object)}
        conn = self.conn
        conn.initiate_connection()
        conn.increment_flow_control_window(_CONNECTION_WINDOW - 65_535)
        self._flush()
        self._arm(self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self._disarm()
        for stream in list(self.streams.values()):
            self._gone(stream)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._control_queued = 0
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # closing: what the client still sends is read and dropped
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as exc:
            # h2 has queued a GOAWAY with the error's code: send it and go.
            log.debug("h2 protocol error: %s", exc, extra={"client": self.client})
            self._abandon()
            return
        for event in events:
            if isinstance(event, DataReceived):
                self._data(event)
            elif isinstance(event, RequestReceived):
                self._request(event)
            elif isinstance(event, StreamEnded):
                self._ended(event.stream_id)
            elif isinstance(event, WindowUpdated):
                self._window_opened(event.stream_id or 0)
            elif isinstance(event, RemoteSettingsChanged):
                self._window_opened(0)
                self._control()
            elif isinstance(event, StreamReset):
                self._client_reset(event)
            elif isinstance(event, PingReceived):
                self._control()
            elif isinstance(event, PriorityUpdated):
                self._priority_frames += 1
                if self._priority_frames > _MAX_PRIORITY_PER_STREAM * (1 + self._streams_opened):
                    self._calm("too many PRIORITY frames")
            elif isinstance(event, TrailersReceived):
                if event.stream_ended is not None and event.stream_id is not None:
                    self._ended(event.stream_id)
            elif isinstance(event, ConnectionTerminated):
                # The client is leaving; h2 allows nothing more to be sent.
                self._abandon()
                return
            if self.transport is None or self.transport.is_closing():
                return
        if self._streams_opened == 0 or not self.streams:
            pending = getattr(self.conn.incoming_buffer, "_headers_buffer", None)
            if pending and self._timer is None:
                self._arm(self.limits.header_timeout)
        self._flush()

    def shutdown(self) -> None:
        """Drain: GOAWAY now, close once the streams in flight have finished."""
        if self._closing:
            return
        self._goaway(ErrorCodes.NO_ERROR)
        if not self.streams:
            self._close()

    # Streams

    def _request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        self._streams_opened += 1
        self._disarm()
        headers = event.headers or []
        limits = self.limits
        pseudo: dict[bytes, bytes] = {}
        fields: list[tuple[bytes, bytes]] = []
        size = 0
        malformed: str | None = None
        for name, value in headers:
            size += len(name) + len(value) + 4
            if _BAD_VALUE.search(value) is not None:
                malformed = f"the value of {name[:64]!r} is not allowed"
            elif name[:1] == b":":
                if fields or name not in _PSEUDO or name in pseudo:
                    malformed = f"pseudo-header {name[:64]!r} is misplaced or unknown"
                pseudo[name] = value
            elif _BAD_NAME.search(name) is not None or name in _NOT_IN_H2:
                malformed = f"header field {name[:64]!r} is not allowed in HTTP/2"
            elif name == b"te" and value != b"trailers":
                malformed = "TE other than trailers is not allowed in HTTP/2"
            else:
                fields.append((name, value))
        method = pseudo.get(b":method")
        path = pseudo.get(b":path")
        authority = pseudo.get(b":authority")
        if authority is not None:
            fields = [(n, v) for n, v in fields if n != b"host"]
            fields.insert(0, (b"host", authority))
        method_text = (method or b"-").decode("latin-1")
        if self.over_limit:
            self._refuse(
                stream_id,
                TooManyConnections(
                    "this gateway worker has too many open client connections; retry shortly"
                ),
                method_text,
                path,
            )
            self._goaway(ErrorCodes.NO_ERROR)
            self._close()
            return
        if len(fields) > limits.max_header_count:
            self._refuse(
                stream_id,
                HeadersTooLarge(f"more than {limits.max_header_count} header fields"),
                method_text,
                path,
            )
            return
        if size > limits.max_header_size:
            self._refuse(
                stream_id,
                HeadersTooLarge(f"header fields exceed {limits.max_header_size} bytes"),
                method_text,
                path,
            )
            return
        if method == b"CONNECT":
            malformed = "CONNECT is not served over HTTP/2"
        elif method is None or not path or b":scheme" not in pseudo:
            malformed = malformed or "a request needs :method, :scheme and :path"
        if malformed is not None or path is None:
            # A malformed request (RFC 9113 8.1.1): answered, then reset.
            self._refuse(stream_id, BadRequest(malformed or "no :path"), method_text, path)
            self._reset_id(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        raw_path, _, query = path.partition(b"?")
        text = raw_path.decode("ascii", "replace")
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "2",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "method": method_text,
            "root_path": "",
            "path": urllib.parse.unquote(text) if "%" in text else text,
            "raw_path": raw_path,
            "query_string": query,
            "headers": fields,
            "state": self.app_state.copy(),
        }
        # The ASGI `http.response.trailers` extension (gRPC's status travels in them),
        # beside the connection's `tls` one.
        scope["extensions"] = {
            **self.extensions,
            "http.response.trailers": {},
            "gateway.http.reset": {},  # reset this stream with a given code
        }
        stream = _Stream(self, stream_id, scope)
        if event.stream_ended is not None:
            stream.ended = True
        elif not any(name == b"content-length" for name, _ in fields):
            # A body of unknown length follows (gRPC's always does): to the data plane
            # that is what HTTP/1.1 calls chunked, and it streams it as such (unless it
            # is all in by the time the stream's task starts: `_run`).
            fields.append(_UNSIZED)
        self.streams[stream_id] = stream
        self._last_stream = stream_id
        self._served_any = True
        task = self.loop.create_task(self._run(stream))
        stream.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, stream: _Stream) -> None:
        stream.started = True
        if stream.ended and stream.scope["headers"][-1] is _UNSIZED:
            # The whole body came with the request (a unary gRPC call's usually does):
            # its length is known after all, so the data plane may keep it for replay.
            size = sum(len(data) for data, _ in stream.body)
            stream.scope["headers"][-1] = (b"content-length", b"%d" % size)
        try:
            await self.app(stream.scope, stream.receive, stream.send)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.error("Exception in ASGI application", exc_info=exc)
            if not stream.status_sent and not stream.reset:
                self._plain_500(stream)
            elif not stream.done:
                self._reset(stream, ErrorCodes.INTERNAL_ERROR)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            if not stream.done and not stream.reset:
                log.error("ASGI callable returned without completing response.")
                self._reset(stream, ErrorCodes.INTERNAL_ERROR)
        finally:
            self._finished(stream, premature=False)

    def _finished(self, stream: _Stream, *, premature: bool) -> None:
        if self.streams.pop(stream.id, None) is None:
            return
        closed = self._closed
        if len(closed) == closed.maxlen and closed[0]:
            self._premature -= 1
        closed.append(premature)
        if premature:
            self._premature += 1
            if self._premature >= _RESET_MIN and 2 * self._premature >= len(closed):
                self._calm("rapid reset: most streams are reset by the client")
                return
        if not self.streams and not self._lingering:
            if self._closing:
                self._close()
            elif self.transport is not None and not self.transport.is_closing():
                self._arm(self.limits.keepalive_timeout)

    def _client_reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        premature = not stream.done and self.loop.time() - stream.opened < _PREMATURE
        stream.reset = True
        stream.notify()
        self._wake(stream)
        task = stream.task
        if task is not None and not stream.started:
            task.cancel()  # reset before it ran: it never reaches an upstream
        self._finished(stream, premature=premature)

    def _ended(self, stream_id: int | None) -> None:
        stream = self.streams.get(stream_id or 0)
        if stream is not None:
            stream.ended = True
            stream.notify()

    def _gone(self, stream: _Stream) -> None:
        stream.reset = True
        stream.notify()
        self._wake(stream)

    def _data(self, event: DataReceived) -> None:
        size = event.flow_controlled_length
        data = event.data
        if not data and event.stream_ended is None:
            self._empty_data += 1
            if self._empty_data > _MAX_EMPTY_DATA:
                self._calm("too many empty DATA frames")
                return
        else:
            self._empty_data = 0
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.reset:
            if size:
                self.acknowledge(event.stream_id, size)
            return
        stream.body.append((data, size))
        stream.notify()

    def acknowledge(self, stream_id: int, size: int) -> None:
        """The data plane has read `size` flow-controlled bytes of this stream: let the
        client send as much again (h2 sends WINDOW_UPDATE once half a window is due)."""
        try:
            self.conn.acknowledge_received_data(size, stream_id)
        except (ProtocolError, StreamClosedError):
            return
        self._schedule_flush()

    # Answers

    def answer_head(self, status: int, headers: Any) -> list[tuple[bytes, bytes]]:
        head = [(b":status", b"%d" % status)]
        for name, value in headers:
            name = name.lower()
            if name in _NOT_IN_H2 or (name == b"te" and value.lower() != b"trailers"):
                continue
            head.append((name, value))
        return head

    def send_head(self, stream: _Stream, head: list[tuple[bytes, bytes]], *, end: bool) -> None:
        try:
            self.conn.send_headers(stream.id, head, end_stream=end)
        except (ProtocolError, StreamClosedError):
            self._gone(stream)
            return
        self._schedule_flush()

    async def send_body(self, stream: _Stream, body: bytes, *, end: bool) -> None:
        conn = self.conn
        view = memoryview(body)
        while view:
            if stream.reset:
                return
            try:
                window = conn.local_flow_control_window(stream.id)
            except (ProtocolError, StreamClosedError):
                self._gone(stream)
                return
            size = min(window, conn.max_outbound_frame_size, len(view))
            if size <= 0:
                stream.window = self.loop.create_future()
                await stream.window
                stream.window = None
                continue
            chunk = body if size == len(body) else view[:size].tobytes()
            view = view[size:]
            try:
                conn.send_data(stream.id, chunk, end_stream=end and not view)
            except (ProtocolError, StreamClosedError):
                self._gone(stream)
                return
            if view or self._pending() > _FLUSH_NOW:
                self._flush()
            else:
                self._schedule_flush()
            if self._write_paused:
                await self._drain()

    def send_trailers(self, stream: _Stream, fields: list[tuple[bytes, bytes]]) -> None:
        """The answer's trailer section, which ends the stream (none: an empty DATA)."""
        if stream.reset:
            return
        if not fields:
            self.end(stream)
            return
        try:
            self.conn.send_headers(stream.id, fields, end_stream=True)
        except (ProtocolError, StreamClosedError):
            self._gone(stream)
            return
        self._schedule_flush()

    def end(self, stream: _Stream) -> None:
        try:
            self.conn.end_stream(stream.id)
        except (ProtocolError, StreamClosedError):
            self._gone(stream)
            return
        self._schedule_flush()

    def _plain_500(self, stream: _Stream) -> None:
        body = b"Internal Server Error"
        head = [
            (b":status", b"500"),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
        ]
        try:
            self.conn.send_headers(stream.id, head)
            self.conn.send_data(stream.id, body, end_stream=True)
        except (ProtocolError, StreamClosedError):
            return
        stream.done = True
        self._schedule_flush()

    def _refuse(self, stream_id: int, error: GatewayError, method: str, path: bytes | None) -> None:
        """Answer a request the data plane never sees (its head broke a limit) with the
        contract's problem+json on its own stream, and record it as the HTTP/1.1
        protocol records its refusals."""
        request_id = new_request_id()
        headers, body = problem_response(error, request_id, [], date=http_date())
        try:
            self.conn.send_headers(stream_id, self.answer_head(error.status, headers))
            self.conn.send_data(stream_id, body, end_stream=True)
        except (ProtocolError, StreamClosedError):
            return
        self._schedule_flush()
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
                path=target_path(path) if path else None,
                client=self.client,
                bytes_out=len(body),
                elapsed=0.0,
            )
        except Exception:
            log.exception("could not record a refused request")

    def reset(self, stream: _Stream, code: int) -> None:
        """Reset a stream with `code` (the data plane passing on an upstream's reset)."""
        self._reset(stream, code)

    def _reset_id(self, stream_id: int, code: ErrorCodes) -> None:
        try:
            self.conn.reset_stream(stream_id, code)
        except (ProtocolError, StreamClosedError):
            return
        self._schedule_flush()

    def _reset(self, stream: _Stream, code: ErrorCodes | int) -> None:
        if stream.reset:
            return
        stream.reset = True
        stream.notify()
        try:
            self.conn.reset_stream(stream.id, code)
        except (ProtocolError, StreamClosedError):
            return
        self._schedule_flush()

    def _window_opened(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None:
                self._wake(stream)
            return
        for stream in self.streams.values():
            self._wake(stream)

    @staticmethod
    def _wake(stream: _Stream) -> None:
        waiter = stream.window
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # Writing

    def _pending(self) -> int:
        return len(self.conn._data_to_send)

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        data = self.conn.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing() and not self._lingering:
            transport.write(data)

    async def _drain(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = self.loop.create_future()
        await self._drained

    def _control(self) -> None:
        """A PING or SETTINGS the client sent: h2 queued its ACK. Counted while the
        client is not reading what is written to it."""
        if self._write_paused:
            self._control_queued += 1
            if self._control_queued > _MAX_CONTROL_QUEUED:
                self._calm("control-frame flood: acknowledgements are not being read")

    # Closing

    def _goaway(self, code: ErrorCodes, detail: bytes = b"") -> None:
        """A GOAWAY naming the last stream handed to the data plane, leaving h2's own
        state open so the streams below it can still be answered."""
        if self._lingering:
            return
        self._closing = True
        self.conn.refuse_new = True
        self._flush()
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._last_stream
        frame.error_code = code
        frame.additional_data = detail
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(frame.serialize())

    def _calm(self, reason: str) -> None:
        """Abuse: GOAWAY(ENHANCE_YOUR_CALM), then close without waiting for streams."""
        log.warning(
            "h2: closing a connection: %s", reason, extra={"client": self.client, "reason": reason}
        )
        self._goaway(ErrorCodes.ENHANCE_YOUR_CALM, reason.encode("ascii", "replace")[:128])
        self._linger()

    def _abandon(self) -> None:
        self._flush()
        self._linger()

    def _linger(self) -> None:
        """Close after a GOAWAY the client may not have read yet. Closing a socket with
        unread input makes the kernel send a reset, which can destroy the GOAWAY on its
        way: so no more is written (a FIN follows the GOAWAY where the transport can
        half-close), what arrives is read and dropped, and the connection closes
        `_LINGER` seconds later, or sooner if the client closes (nginx's lingering
        close)."""
        transport = self.transport
        if self._lingering or transport is None or transport.is_closing():
            return
        self._flush()
        self._lingering = True
        self._disarm()
        for stream in list(self.streams.values()):
            self._gone(stream)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = self.loop.call_later(_LINGER, transport.close)

    def _close(self) -> None:
        self._disarm()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self._flush()  # what is queued goes out first
            transport.close()

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.streams and not getattr(self.conn.incoming_buffer, "_headers_buffer", None):
            return  # busy: the streams' own deadlines apply
        self._goaway(ErrorCodes.NO_ERROR)
        self._close()
