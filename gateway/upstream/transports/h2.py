"""HTTP/2 to upstreams (`upstreams.<name>.protocol: http2`): the `h2` library's framing
and HPACK, driven by an asyncio protocol of our own, one pool of connections per target.

- `https://` targets speak h2 by ALPN (the context offers only "h2"; an upstream that
  picks anything else is a connect error); `http://` targets speak h2c with prior
  knowledge (RFC 9113 3.3): the preface goes out first, no `Upgrade: h2c`.
- One connection carries many requests at once, as many as the upstream's
  SETTINGS_MAX_CONCURRENT_STREAMS allows; when every connection is full another is
  opened, up to `max_connections` per target, and requests wait for a free stream.
  A connection still opening counts for the streams it will likely take, so a burst
  of requests shares it instead of each opening one.
- Full duplex: `open` returns once the answer's head is in, while a streamed request
  body still goes out from a task tied to the stream (`_Sender`), so a caller can read
  an answer between the messages it sends (gRPC's bidirectional calls). A bytes body
  that fits the window goes out inline, without that task.
- Trailers both ways: an answer's are kept on it (`H2Response.trailers`, complete once
  its body is); a request's are sent after its body (`open(..., trailers=...)`).
- Cancelling a request (its task cancelled, or its answer closed before the end)
  resets just its stream (RST_STREAM CANCEL) and stops its body's sender; the other
  streams go on. A reset by the upstream is an error for the reader, its code kept on
  the answer (`H2Response.reset_code`).
- A GOAWAY makes the connection take no new stream; the streams it names as not
  processed (ids above its last stream id), and streams refused with REFUSED_STREAM,
  never reached the application: they are sent again on another connection, the
  request body included while it is replayable (bytes, or a stream whose first
  `_REPLAY_LIMIT` bytes were kept). The streams at or below the last stream id finish.
  A connection that dies without a GOAWAY under a stream with no answer yet is the
  keep-alive race every pool has: that request is sent once more when the connection
  had served others before, the method is idempotent and the body replayable.
- Flow control both ways: a request body goes out as the upstream's windows allow;
  an answer's data is acknowledged (WINDOW_UPDATE) as the consumer reads it, so a
  slow client slows the upstream down instead of filling memory (`_STREAM_WINDOW` per
  stream is the most buffered).
- Timeouts as the h1 client has them: `connect_timeout` for TCP, TLS and the
  upstream's SETTINGS; `read_timeout` between two reads of one answer, and for one
  wait for window or a writable socket while sending.

Errors are raised as httpx exceptions, like every transport of the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import httpx
from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple
from hpack.hpack import encode_integer
from hpack.table import HeaderTable
from hyperframe.frame import Frame, GoAwayFrame, RstStreamFrame

from gateway.upstream.transports.base import (
    RawTransport,
    TransportSettings,
    connect,
    connect_failed,
    default_tls_context,
    host_port,
)

__all__ = ["H2Response", "H2Transport", "RequestTrailers"]

Fields = Sequence[tuple[bytes, bytes]]
# A request's trailers: the fields, or an async callable that gives them once the body
# has gone out (see `H2Transport.open`).
RequestTrailers = Fields | Callable[[], Awaitable[Fields]]

_STREAM_WINDOW = 256 * 1024  # answer bytes buffered per stream before the upstream waits
_CONNECTION_WINDOW = 1 << 30  # per connection: the stream windows are the real bound
_MAX_HEADER_LIST = 64 * 1024  # the answer's header block, decoded (h2 enforces it)
# What a connection still opening is assumed to take (RFC 9113 6.5.2 recommends
# servers allow at least 100); corrected by the first SETTINGS seen from the target.
_ASSUMED_STREAMS = 100
_STREAM_CAP = 1000  # streams used on one connection at most, whatever the upstream allows
_LAST_STREAM_ID = 2**31 - 1 - 2 * 1000  # retire a connection before its ids run out
_REPLAY_LIMIT = 64 * 1024  # streamed request body kept for sending it again
_MAX_TRIES = 4  # one request's sends: refused streams, GOAWAY, the keep-alive race
_FLUSH_NOW = 64 * 1024  # output pending past this is written at once, not at the turn's end
# Methods that may be sent again after the connection died under them (RFC 9110, 9.2.2).
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
# Never put in the HPACK table (RFC 7541 7.1.3): one connection carries many clients'
# requests, and a secret in the shared table is one a compression oracle can probe.
_SENSITIVE = frozenset({b"authorization", b"proxy-authorization", b"cookie"})
# Connection-specific fields (RFC 9113 8.2.2), never sent; `host` becomes `:authority`.
_DROPPED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"te",
        b"http2-settings",
    }
)


class _Refused(httpx.RemoteProtocolError):
    """The upstream did not process this stream (GOAWAY above it, REFUSED_STREAM): it
    is safe to send it again."""


# Request fields whose values change with every request: never cached (`_Encoder`).
_VOLATILE = frozenset(
    {
        b":path",
        b"x-request-id",
        b"x-request-timeout-ms",
        b"grpc-timeout",
        b"content-length",
        b"traceparent",
        b"tracestate",
        b"b3",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-parentspanid",
    }
)
_STATIC = HeaderTable.STATIC_TABLE_MAPPING  # name -> (its first index, {value: index})
_ENCODED_KEPT = 1024  # encoded fields cached per connection (cleared when full)


def _hpack_int(value: int, prefix: int, flags: int) -> bytes:
    """An HPACK integer with a `prefix`-bit prefix, `flags` in the first byte's top."""
    if value < (1 << prefix) - 1:
        return bytes((flags | value,))  # (most: one byte)
    encoded = encode_integer(value, prefix)
    encoded[0] |= flags
    return bytes(encoded)


def _hpack_field(name: bytes, value: bytes, never: bool) -> bytes:
    """One field, from the static table alone: indexed when it holds name and value,
    else a literal (never indexed when `never`, else without indexing) naming its
    name by index where it can. Literals are not Huffman-coded."""
    flags = 0x10 if never else 0x00
    entry = _STATIC.get(name)
    literal = _hpack_int(len(value), 7, 0) + value
    if entry is None:
        return bytes((flags,)) + _hpack_int(len(name), 7, 0) + name + literal
    index = entry[1].get(value)
    if index is not None and not never:
        return _hpack_int(index, 7, 0x80)
    return _hpack_int(entry[0], 4, flags) + literal


class _Encoder:
    """HPACK for requests with the static table only, no dynamic one: an encoded field
    then depends on nothing but itself, so a connection keeps the bytes of those that
    repeat (`:authority`, `user-agent`, `content-type`, `te`, ...) and a request's
    header block is mostly joined from that cache. hpack's stateful encoder (a search
    of its table, Huffman coding, a log call or two per field) was the largest part
    of the cost of sending a request. The price is header blocks larger on the wire
    (literals where the table would give one byte), a few hundred bytes per request
    to an upstream that is usually near. Credentials (`NeverIndexedHeaderTuple`) are
    never-indexed literals, never cached; volatile fields are not cached either.

    The table's size is signalled as 0 in the first header block, and again after
    every change of the upstream's SETTINGS_HEADER_TABLE_SIZE (RFC 7541 4.2, 6.3),
    which h2 reports by setting `header_table_size`."""

    __slots__ = ("_cache", "_signal")

    def __init__(self) -> None:
        self._cache: dict[tuple[bytes, bytes], bytes] = {}
        self._signal = True  # a dynamic table size update (to 0) is due

    @property
    def header_table_size(self) -> int:
        return 0

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._signal = True

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        cache = self._cache
        parts: list[bytes] = []
        if self._signal:
            self._signal = False
            parts.append(b"\x20")  # dynamic table size update: 0
        for field in headers:
            if type(field) is tuple:
                block = cache.get(field)
                if block is None:
                    name, value = field
                    block = _hpack_field(name, value, never=False)
                    if name not in _VOLATILE:
                        if len(cache) >= _ENCODED_KEPT:
                            cache.clear()
                        cache[field] = block
            else:  # hpack's HeaderTuple: NeverIndexedHeaderTuple is not `indexable`
                block = _hpack_field(field[0], field[1], never=not field.indexable)
            parts.append(block)
        return b"".join(parts)


class _H2(h2.connection.H2Connection):
    """h2's connection with GOAWAY as RFC 9113 6.8 has it: the streams at or below the
    last stream id still complete. h2 closes its whole state machine on a GOAWAY and
    would refuse their remaining DATA as a protocol error.

    And a cheaper count of open streams: h2 walks every stream it keeps (dropping the
    closed ones as it goes) for each new one, O(streams) per request. Until the walk
    could matter, the number it keeps, closed ones included, is an upper bound that
    passes the same check; the walk runs once that many have piled up, so its cost is
    spread over as many requests as it finds open streams.

    And frames received without `repr(frame)` (a hex dump of each payload, built for a
    trace logger that drops it): h2's `_receive_frame` less its first line."""

    _sweep_at = 64  # streams kept before the next walk

    @property
    def open_outbound_streams(self) -> int:
        kept = len(self.streams)
        if kept < self._sweep_at and kept < self.remote_settings.max_concurrent_streams:
            return kept
        count = self._open_streams(1)
        self._sweep_at = 2 * count + 64
        return count

    def _receive_frame(self, frame: Frame) -> list[h2.events.Event]:
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as exc:
            # A frame on a stream closed by RST_STREAM: a stream error, answered with
            # RST_STREAM; on one closed otherwise, a connection error.
            if not self._stream_is_closed_by_reset(exc.stream_id):
                raise
            reset = RstStreamFrame(exc.stream_id)
            reset.error_code = exc.error_code
            self._prepare_for_sending([reset])
            return exc._events
        except h2.exceptions.StreamIDTooLowError as exc:
            # A stream cleaned up already: a stream error if a reset closed it, else
            # a connection error (STREAM_CLOSED after END_STREAM, else PROTOCOL_ERROR).
            if self._stream_is_closed_by_reset(exc.stream_id):
                reset = RstStreamFrame(exc.stream_id)
                reset.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([reset])
                return []
            if self._stream_is_closed_by_end(exc.stream_id):
                raise h2.exceptions.StreamClosedError(exc.stream_id) from exc
            raise
        self._prepare_for_sending(frames)
        return events  # type: ignore[no-any-return]

    def _receive_goaway_frame(
        self, frame: GoAwayFrame
    ) -> tuple[list[Frame], list[h2.events.Event]]:
        event = h2.events.ConnectionTerminated()
        try:
            event.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


# Outbound header blocks are built valid by `_request_headers` (lower-case names, no
# connection-specific field, `te: trailers` only, no CR/LF/NUL): h2 checking them again
# was a third of the cost of a request. What comes from the upstream is checked by
# `_malformed`, in one pass with regular expressions, instead of h2's chain of
# generators looping over every byte in Python (a sixth of the cost of an answer).
_CONFIG = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
    normalize_inbound_headers=False,  # (it joins a request's cookie crumbs: none here)
)
# RFC 9113 8.2: field names are lower-case tokens, values hold no NUL, CR or LF and no
# whitespace at either end; connection-specific fields are malformed (8.2.2).
_BAD_NAME = re.compile(rb"[^a-z0-9!#$%&'*+\-.^_`|~]")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
_CONTROL = re.compile(rb"[\x00\r\n]")  # never in a request's field value
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


def _malformed(headers: Sequence[tuple[bytes, bytes]], head: bool) -> str | None:
    """What makes an answer's header block (`head`) or trailer block malformed (RFC
    9113 8.1.1, 8.2, 8.3.2), None when nothing does."""
    regular = status = False
    for name, value in headers:
        if _BAD_VALUE.search(value) is not None:
            return f"the value of {name[:64]!r} is not allowed"
        if name[:1] == b":":
            if name != b":status" or not head or regular or status:
                return f"pseudo-header {name[:64]!r} is misplaced or unknown"
            if not (len(value) == 3 and value.isdigit()):
                return f"the status {value[:16]!r} is not three digits"
            status = True
        elif not name or _BAD_NAME.search(name) is not None or name in _CONNECTION_SPECIFIC:
            return f"the header field {name[:64]!r} is not allowed in HTTP/2"
        elif name == b"te" and value != b"trailers":
            return "TE other than trailers is not allowed in HTTP/2"
        else:
            regular = True
    if head and not status:
        return "the answer has no :status"
    return None


class _Stream:
    """One request on a connection: its answer as it arrives, and its windows.

    Two tasks may wait on it at once, which is what full duplex is: the reader of the
    answer (for its head and data) and the sender of the request body (for window).
    Each has its own waiter; an error or the end wakes both."""

    __slots__ = (
        "_send_waiter",
        "_waiter",
        "blocked",
        "buffered",
        "chunks",
        "conn",
        "ended",
        "error",
        "finished",
        "head",
        "headers",
        "id",
        "local_ended",
        "reset",
        "reset_code",
        "status",
        "trailers",
        "unacked",
    )

    def __init__(self, conn: _Conn, stream_id: int, local_ended: bool) -> None:
        self.conn = conn
        self.id = stream_id
        self.local_ended = local_ended  # our END_STREAM is out
        self.head = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.unacked = 0  # flow-controlled bytes received and not yet handed back
        self.ended = False  # the upstream's END_STREAM is in: the answer is complete
        self.reset = False  # RST_STREAM either way
        self.reset_code: int | None = None  # the upstream's RST_STREAM error code
        self.finished = False  # no longer counts against the connection's streams
        self.error: Exception | None = None
        self.blocked = False  # waiting for send window
        self._waiter: asyncio.Future[None] | None = None  # the answer's reader
        self._send_waiter: asyncio.Future[None] | None = None  # the body's sender

    def __repr__(self) -> str:
        state = (
            "error"
            if self.error is not None
            else "ended"
            if self.ended
            else "reset"
            if self.reset
            else "open"
        )
        return f"_Stream({self.id} {state} buffered={self.buffered})"

    # --- events from the connection ---------------------------------------------------

    def on_head(self, headers: list[tuple[bytes, bytes]]) -> None:
        problem = _malformed(headers, head=True)
        if problem is not None:
            self.malformed(problem)
            return
        fields = []
        for name, value in headers:
            if name == b":status":
                self.status = int(value)
            elif not name.startswith(b":"):
                fields.append((name, value))
        self.headers = fields
        self.head = True
        self.wake_reader()

    def on_data(self, data: bytes, length: int) -> None:
        if data:
            self.chunks.append(data)
            self.buffered += len(data)
            self.unacked += length
        elif length:
            self.conn.ack(self.id, length)  # padding only
        self.wake_reader()

    def on_end(self) -> None:
        self.ended = True
        self._maybe_finish()
        self.wake()

    def on_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        problem = _malformed(headers, head=False)
        if problem is not None:
            self.malformed(problem)
            return
        self.trailers.extend(headers)

    def malformed(self, problem: str) -> None:
        """A malformed answer is a stream error (RFC 9113 8.1.1): reset it
        (PROTOCOL_ERROR), and its reader sees the error."""
        if self.error is None:
            self.error = httpx.RemoteProtocolError(f"upstream sent a malformed answer: {problem}")
        self.cancel(ErrorCodes.PROTOCOL_ERROR)
        self.wake()

    def on_reset(self, code: int) -> None:
        """The upstream reset the stream (RST_STREAM with `code`)."""
        self.reset_code = code
        self._closed(code)

    def _closed(self, code: int) -> None:
        self.reset = True
        if not self.ended and self.error is None:
            if code == ErrorCodes.REFUSED_STREAM and not self.head:
                self.error = _Refused("upstream refused the stream")
            else:
                self.error = httpx.RemoteProtocolError(
                    f"upstream reset the stream ({_code_name(code)})"
                )
        self._finish()
        self.wake()

    def fail(self, error: Exception) -> None:
        """The connection is gone, or will never answer this stream."""
        if not self.ended and self.error is None:
            self.error = error
        self._finish()
        self.wake()

    def wake(self) -> None:
        self.wake_reader()
        self.wake_sender()

    def wake_reader(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def wake_sender(self) -> None:
        waiter = self._send_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the request's side -----------------------------------------------------------

    async def _wait(self, timeout_error: Callable[[], Exception]) -> None:
        """Wait as the answer's reader (the head, data, the end), `read_timeout` at most
        once the request is sent in full: while its body still goes out, the sender's
        own waits are timed, and an upstream may rightly say nothing until it has it all
        (the clock then starts at our END_STREAM, which wakes this wait)."""
        loop = self.conn.loop
        waiter = loop.create_future()
        self._waiter = waiter
        timer = (
            loop.call_later(self.conn.read_timeout, self._timed_out, timeout_error)
            if self.local_ended
            else None
        )
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None

    async def _wait_window(self) -> None:
        """Wait as the body's sender for the upstream's window, `read_timeout` at most."""
        loop = self.conn.loop
        waiter = loop.create_future()
        self._send_waiter = waiter
        self.blocked = True
        blocked = self.conn.blocked
        blocked.add(self)
        timer = loop.call_later(self.conn.read_timeout, self._timed_out, _write_timeout)
        try:
            await waiter
        finally:
            timer.cancel()
            self.blocked = False
            blocked.discard(self)
            self._send_waiter = None

    def _timed_out(self, timeout_error: Callable[[], Exception]) -> None:
        if self.error is None:
            self.error = timeout_error()
        self.cancel()
        self.wake()

    def stopped(self) -> bool:
        """Whether sending must stop: failed, or the upstream is done with the stream."""
        if self.error is not None:
            raise self.error
        if self.ended or self.reset:
            # Answered in full before the body was (RFC 9113 8.1): stop sending.
            self.cancel()
            return True
        return False

    def window(self) -> int:
        """Request body bytes the upstream takes now without waiting."""
        return self.conn.h2.local_flow_control_window(self.id)

    async def send(self, data: bytes, end: bool) -> None:
        """Send `data` as the windows allow; END_STREAM with its last frame when `end`."""
        conn = self.conn
        connection = conn.h2
        view = memoryview(data)
        offset, size, flushed = 0, len(data), 0
        while offset < size:
            if self.stopped():
                return
            window = connection.local_flow_control_window(self.id)
            if window <= 0:
                await self._wait_window()
                continue
            n = min(window, connection.max_outbound_frame_size, size - offset)
            last = end and offset + n == size
            try:
                connection.send_data(self.id, bytes(view[offset : offset + n]), end_stream=last)
            except h2.exceptions.StreamClosedError:
                self._closed(ErrorCodes.STREAM_CLOSED)
                continue
            offset += n
            if last:
                self.local_ended = True
                self.wake_reader()  # its read timeout starts now
            # Frames go out together: when the window is used up, and every
            # `_STREAM_WINDOW` bytes in between; the end of the body at the end of this
            # turn of the event loop, with the HEADERS and other streams' frames.
            if n == window or offset - flushed >= _STREAM_WINDOW:
                flushed = offset
                conn.flush()
                if conn.write_paused:
                    await conn.drain()
            elif offset == size:
                conn.flush_soon()
                if conn.write_paused:
                    await conn.drain()
        if end and not self.local_ended and not self.stopped():
            connection.end_stream(self.id)
            self.local_ended = True
            self.wake_reader()
            conn.flush_soon()
        self._maybe_finish()

    def send_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        """End the request with `fields` as its trailers (a HEADERS frame with
        END_STREAM; not flow-controlled, so it never waits)."""
        if self.stopped():
            return
        try:
            self.conn.h2.send_headers(self.id, fields, end_stream=True)
        except h2.exceptions.StreamClosedError:
            self._closed(ErrorCodes.STREAM_CLOSED)
            self.stopped()
            return
        self.local_ended = True
        self.wake_reader()
        self.conn.flush_soon()
        self._maybe_finish()

    async def wait_head(self) -> None:
        while not self.head:
            if self.error is not None:
                raise self.error
            await self._wait(_read_timeout)

    async def read(self) -> bytes:
        """The next body bytes (everything buffered, joined), b"" at the end."""
        while True:
            if self.chunks:
                return self.take()
            if self.error is not None:
                raise self.error  # with the end too: malformed trailers
            if self.ended:
                return b""
            await self._wait(_read_timeout)

    def take(self) -> bytes:
        """Everything buffered, joined, and handed back to the upstream's window."""
        chunks = self.chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.unacked:
            self.conn.ack(self.id, self.unacked)
            self.unacked = 0
        return data

    def abort(self, error: Exception) -> None:
        """The request's side failed (its body source, a write): reset the stream and
        let the answer's reader see `error`."""
        if self.error is None and not self.ended:
            self.error = error
        self.cancel()
        self.wake()

    def cancel(self, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """Done with this stream before its end both ways: reset it (CANCEL) unless it
        is closed already, and hand back the window of what was never read."""
        conn = self.conn
        if not self.reset and not (self.ended and self.local_ended) and not conn.closed:
            self.reset = True
            try:
                conn.h2.reset_stream(self.id, code)
            except h2.exceptions.ProtocolError:
                pass  # closed in h2 already (a GOAWAY'd connection, a reset crossing ours)
            conn.flush_soon()
        if self.unacked:
            conn.ack(self.id, self.unacked)
            self.unacked = 0
        self._finish()

    def _maybe_finish(self) -> None:
        if self.ended and self.local_ended:
            self._finish()

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.conn.stream_finished(self)


def _read_timeout() -> Exception:
    return httpx.ReadTimeout("upstream read timed out")


def _write_timeout() -> Exception:
    return httpx.WriteTimeout("upstream did not take the request body in time")


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


class _Conn(asyncio.Protocol):
    """One HTTP/2 connection to a target and the streams open on it."""

    __slots__ = (
        "_drains",
        "_flush_handle",
        "blocked",
        "closed",
        "error",
        "h2",
        "idle_since",
        "loop",
        "pool",
        "read_timeout",
        "ready",
        "retired",
        "served",
        "streams",
        "transport",
        "write_paused",
    )

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.read_timeout = pool.read_timeout
        self.h2 = _H2(_CONFIG)
        self.h2.encoder = _Encoder()  # type: ignore[assignment]
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: _MAX_HEADER_LIST,
            },
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.blocked: set[_Stream] = set()  # streams whose sender waits for window
        self.ready: asyncio.Future[None] = self.loop.create_future()  # SETTINGS are in
        self.closed = False
        self.retired = False  # takes no new stream (GOAWAY, ids running out, closing)
        self.error: Exception | None = None
        self.served = 0  # streams started on it
        self.idle_since = self.loop.time()
        self.write_paused = False
        self._drains: list[asyncio.Future[None]] = []
        self._flush_handle: asyncio.Handle | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "retired" if self.retired else "open"
        return f"_Conn({state} streams={len(self.streams)}/{self.limit()} served={self.served})"

    def limit(self) -> int:
        """Streams this connection may carry at once."""
        return min(self.h2.remote_settings.max_concurrent_streams, _STREAM_CAP)

    def has_room(self) -> bool:
        return (
            not self.retired
            and not self.closed
            and self.ready.done()
            and len(self.streams) < self.limit()
        )

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except Exception as exc:  # h2's ProtocolError, and hyperframe's or hpack's below it
            self._broken(httpx.RemoteProtocolError(f"upstream broke HTTP/2: {exc!r}"))
            return
        streams = self.streams
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_data(event.data, event.flow_controlled_length)
                elif event.flow_controlled_length:
                    # A stream we gave up on (refused by a GOAWAY): the connection's
                    # window still counts it.
                    self.ack(event.stream_id, event.flow_controlled_length)
            elif isinstance(event, h2.events.WindowUpdated):
                if event.stream_id:
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        stream.wake_sender()
                else:
                    self._wake_senders()
            elif isinstance(event, h2.events.ResponseReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_head(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_end()
            elif isinstance(event, h2.events.TrailersReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_trailers(event.headers)
            elif isinstance(event, h2.events.StreamReset):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_reset(event.error_code)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self._settings_changed(event)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._goaway(event)
        self.flush()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.retired = True
        if self.error is None:
            self.error = (
                httpx.ReadError(str(exc) or type(exc).__name__)
                if exc is not None
                else httpx.RemoteProtocolError("upstream closed the connection")
            )
        for stream in list(self.streams.values()):
            stream.fail(self.error)
        if not self.ready.done():
            self.ready.set_result(None)  # the connect sees `closed`
        self._wake_drains()
        self.pool.lost(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drains()

    # --- connection events ------------------------------------------------------------

    def _settings_changed(self, event: h2.events.RemoteSettingsChanged) -> None:
        if not self.ready.done():
            self.ready.set_result(None)
        changed = event.changed_settings
        if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in changed:
            self._wake_senders()
        if h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS in changed:
            self.pool.room(self)

    def _goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self.retired = True
        last = event.last_stream_id if event.last_stream_id is not None else 0
        for stream in list(self.streams.values()):
            if stream.id > last:
                # Never processed: the upstream promises so; send it elsewhere.
                stream.fail(
                    _Refused("upstream went away before this stream")
                    if not stream.head
                    else httpx.RemoteProtocolError("upstream went away mid-answer")
                )
        self.pool.retired(self)
        if not self.streams:
            self.close()

    def _broken(self, error: Exception) -> None:
        """A connection error: every stream on it fails; GOAWAY (h2 queued it) and close."""
        if self.error is None:
            self.error = error
        self.retired = True
        for stream in list(self.streams.values()):
            stream.fail(error)
        self.flush()
        self.abort()

    # --- for the streams --------------------------------------------------------------

    def start(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> _Stream:
        """Open a stream: its HEADERS go out now."""
        connection = self.h2
        stream_id = connection.get_next_available_stream_id()
        connection.send_headers(stream_id, headers, end_stream=end_stream)
        stream = _Stream(self, stream_id, end_stream)
        self.streams[stream_id] = stream
        self.served += 1
        if stream_id >= _LAST_STREAM_ID:
            self.retired = True
            self.pool.retired(self)
        self.flush_soon()
        return stream

    def stream_finished(self, stream: _Stream) -> None:
        if self.streams.pop(stream.id, None) is None:
            return
        if not self.streams:
            self.idle_since = self.loop.time()
        self.pool.freed(self)

    def ack(self, stream_id: int, length: int) -> None:
        """Hand `length` bytes back to the upstream's windows (h2 decides when a
        WINDOW_UPDATE is worth sending)."""
        if self.closed:
            return
        self.h2.acknowledge_received_data(length, stream_id)
        self.flush_soon()

    def flush_soon(self) -> None:
        """Write what h2 has queued at the end of this turn of the event loop: the frames
        of every request started in it (HEADERS, a small body, END_STREAM) leave in one
        write instead of one each. At once when much is pending."""
        if len(self.h2._data_to_send) > _FLUSH_NOW:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        data = self.h2.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    async def drain(self) -> None:
        while self.write_paused and not self.closed:
            drain = self.loop.create_future()
            self._drains.append(drain)
            try:
                async with asyncio.timeout(self.read_timeout):
                    await drain
            except TimeoutError:
                raise _write_timeout() from None
        if self.closed and self.error is not None:
            raise self.error

    def _wake_drains(self) -> None:
        drains, self._drains = self._drains, []
        for drain in drains:
            if not drain.done():
                drain.set_result(None)

    def _wake_senders(self) -> None:
        """The connection's window grew: wake the senders waiting for window (a set of
        its own: walking every stream for each WINDOW_UPDATE was O(streams))."""
        for stream in list(self.blocked):
            stream.wake_sender()

    def close(self) -> None:
        """No stream left that matters: GOAWAY and close."""
        self.retired = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            try:
                self.h2.close_connection()
            except h2.exceptions.ProtocolError:
                pass
            self.flush()
            transport.close()

    def abort(self) -> None:
        self.retired = True
        if self.transport is not None and not self.closed:
            self.transport.abort()


_NOT_REPLAYABLE = (
    "upstream refused the stream after more of its body was sent than can be sent again"
)


class _Replay:
    """A request body as numbered chunks: bytes, or a stream whose first
    `_REPLAY_LIMIT` bytes are kept so that a stream the upstream refused can be sent
    again from chunk 0. A source that failed fails every later read the same way."""

    __slots__ = (
        "_done",
        "_failed",
        "_fetched",
        "_kept",
        "_last",
        "_pending",
        "_size",
        "_source",
        "replayable",
    )

    def __init__(self, source: AsyncIterable[bytes] | None, data: bytes = b"") -> None:
        self._source = aiter(source) if source is not None else None
        self._kept: list[bytes] = [data] if data else []
        self._fetched = len(self._kept)  # chunks taken from the source (or given)
        self._last: bytes | None = None  # the chunk last taken, kept or not
        self._size = len(data)
        self._done = source is None
        self._failed: BaseException | None = None
        self._pending: asyncio.Task[None] | None = None  # a detached read of the source
        self.replayable = True

    def __repr__(self) -> str:
        state = "failed" if self._failed else "done" if self._done else "open"
        return f"_Replay({state} chunks={self._fetched} replayable={self.replayable})"

    async def chunk(self, index: int, detached: bool) -> bytes | None:
        """Chunk `index` (0 is the first), None past the end. `detached` reads the
        source in a task of its own, so that cancelling this wait (its sender moved to
        another stream) leaves the chunk coming for the next sender instead of
        cancelling the source."""
        while True:
            if index < len(self._kept):
                return self._kept[index]
            if index == self._fetched - 1 and self._last is not None:
                return self._last
            if index < self._fetched:
                raise httpx.RemoteProtocolError(_NOT_REPLAYABLE)
            if self._failed is not None:
                raise self._failed
            if self._done:
                return None
            pending = self._pending
            if pending is None:
                if not detached:
                    await self._pull()
                    continue
                pending = self._pending = asyncio.get_running_loop().create_task(self._pull())
            await asyncio.shield(pending)

    async def _pull(self) -> None:
        source = self._source
        if source is None:
            self._done = True
            return
        try:
            chunk = await anext(source)
        except StopAsyncIteration:
            self._done = True
            return
        except BaseException as exc:
            self._failed = exc
            raise
        finally:
            self._pending = None
        self._fetched += 1
        self._last = chunk
        if self.replayable:
            self._size += len(chunk)
            if self._size > _REPLAY_LIMIT:
                self.replayable = False
                self._kept.clear()
            else:
                self._kept.append(chunk)

    def cancel(self) -> asyncio.Task[None] | None:
        """Cancel a detached read of the source in progress; that read, or None."""
        pending = self._pending
        if pending is not None:
            pending.cancel()
        return pending


class _Sender:
    """The request body (and its trailers) going out in a task of its own while the
    answer is read: what makes a stream full duplex.

    It follows the request from stream to stream: when the stream it sends on fails
    before the answer's head, `open` either sends the request again on another stream
    (`move`: a new task starts over from chunk 0) or stops it. Until the head is in, the
    source is read detached, so that a move never cancels it: a client that waits for an
    answer before sending more is not cut off. Any other failure of its own (the source
    raising, a write timing out) resets the stream and becomes the error the answer's
    reader sees."""

    __slots__ = ("_asking", "_later", "_task", "_trailers", "replay", "stream")

    def __init__(
        self,
        replay: _Replay,
        trailers: list[tuple[bytes, bytes]] | None,
        later: Callable[[], Awaitable[Fields]] | None,
        stream: _Stream,
    ) -> None:
        self.replay = replay
        self._trailers = trailers
        self._later = later  # the trailers, asked for once the body is out
        self._asking: asyncio.Future[Fields] | None = None
        self.stream = stream
        self._task = stream.conn.loop.create_task(self._run(stream))

    def __repr__(self) -> str:
        state = "done" if self._task.done() else "sending"
        return f"_Sender({state} on {self.stream!r} {self.replay!r})"

    def move(self, stream: _Stream) -> None:
        """Send the request again, from its first byte, on `stream`."""
        self.stream = stream
        self._task.cancel()  # it is done with the failed stream, or waits detached
        self._task = stream.conn.loop.create_task(self._run(stream))

    async def stop(self) -> None:
        """Stop sending, with the source's read and the trailers' callable in progress
        (the stream is reset by whoever stops it), and wait until they are over."""
        running: list[asyncio.Future[Any]] = []
        for future in (self._task, self.replay.cancel(), self._asking):
            if future is not None and not future.done():
                future.cancel()
                running.append(future)
        if running:
            await asyncio.wait(running)

    async def _run(self, stream: _Stream) -> None:
        replay = self.replay
        index = 0
        try:
            while (
                chunk := await replay.chunk(index, replay.replayable and not stream.head)
            ) is not None:
                index += 1
                if chunk:
                    await stream.send(chunk, end=False)
                if stream.ended or stream.reset or stream.error is not None:
                    stream.stopped()  # raises the stream's error, if any
                    return
            trailers = self._trailers
            if trailers is None and self._later is not None:
                if self._asking is None:
                    self._asking = asyncio.ensure_future(self._later())
                trailers = self._trailers = _trailer_block(await asyncio.shield(self._asking))
            if trailers:
                stream.send_trailers(trailers)
            else:
                await stream.send(b"", end=True)
        except asyncio.CancelledError:
            # Stopped or moved: the stream is reset already. A source that raises
            # CancelledError of its own must still leave no reader waiting.
            stream.abort(httpx.WriteError("sending the request body was cancelled"))
            raise
        except Exception as exc:
            if stream.error is None:
                stream.abort(_body_error(exc))
            # Else the stream failed first (reset, lost, timed out): its reader sees
            # that, and before the answer's head `open` may send the request again.


def _body_error(exc: Exception) -> Exception:
    """A failure of the request's side as the httpx error the answer's reader raises;
    the source's own exception is its `__cause__`."""
    if isinstance(exc, httpx.HTTPError):
        return exc
    error = httpx.WriteError(f"the request body failed ({type(exc).__name__}: {exc})")
    error.__cause__ = exc
    return error


def _trailer_block(trailers: Fields) -> list[tuple[bytes, bytes]]:
    """Request trailers as a header block: lower-case names, connection-specific fields
    dropped, credentials never indexed; a pseudo-field or CR, LF or NUL is refused."""
    fields: list[tuple[bytes, bytes]] = []
    for name, value in trailers:
        name = name.lower()
        if name in _DROPPED:
            continue
        if not name or name[:1] == b":" or b"\r" in value or b"\n" in value or b"\0" in value:
            raise httpx.LocalProtocolError("a trailer holds CR, LF or NUL, or a bad name")
        if name in _SENSITIVE:
            fields.append(NeverIndexedHeaderTuple(name, value))
        else:
            fields.append((name, value))
    return fields


class H2Response:
    """What `open` returns: status and headers now, the body as it arrives, and the
    trailers once it has ended.

    - `trailers`: the answer's trailing fields (`grpc-status`, `grpc-message`, `-bin`
      metadata, as bytes exactly as received), filled in place when they arrive: they
      are all there once `body()` is exhausted, or when `whole()` returned the body.
      An answer that is only a HEADERS frame with END_STREAM (gRPC's trailers-only
      answer) has them in `headers` and an empty body.
    - `reset_code`: the error code of the RST_STREAM the upstream sent on this stream,
      None when it sent none (a reset of ours, a connection lost or a timeout are not
      the upstream's reset). Read it after `body()` raised, or after the end.
    - `aclose()` stops the request body still being sent and resets the stream
      (RST_STREAM CANCEL) unless both sides have ended; always call it.
    """

    __slots__ = ("_sender", "_stream", "headers", "status", "trailers")

    def __init__(self, stream: _Stream, sender: _Sender | None = None) -> None:
        self._stream = stream
        self._sender = sender
        self.status = stream.status
        self.headers = stream.headers
        # The stream's own list: filled in place when the trailers arrive.
        self.trailers: list[tuple[bytes, bytes]] = stream.trailers

    def __repr__(self) -> str:
        return f"H2Response({self.status} {self._stream!r} sender={self._sender!r})"

    @property
    def reset_code(self) -> int | None:
        return self._stream.reset_code

    def whole(self) -> bytes | None:
        """The entire body if it arrived with the head, else None and it streams from
        `body`. Once taken, `body` yields nothing."""
        stream = self._stream
        if not stream.ended or stream.error is not None:
            return None
        return stream.take()

    async def body(self) -> AsyncIterator[bytes]:
        read = self._stream.read
        while chunk := await read():
            yield chunk

    async def aclose(self) -> None:
        stream = self._stream
        if stream.ended or stream.error is not None:
            stream.cancel()
        else:
            # A reader still waiting in `body()` (another task) fails now instead of
            # waiting for data that will never come.
            stream.abort(httpx.ReadError("the answer was closed"))
        if self._sender is not None:
            await self._sender.stop()


class _Pool:
    """The HTTP/2 connections to one target (host:port)."""

    def __init__(
        self,
        host: str,
        port: int,
        authority: bytes,
        settings: TransportSettings,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.host = host
        self.port = port
        self.authority = authority  # `:authority` when the request has no `host`
        self.max_connections = settings.max_connections
        self.max_keepalive = settings.max_keepalive
        self.keepalive_expiry = settings.keepalive_expiry
        self.connect_timeout = settings.connect_timeout
        self.read_timeout = settings.read_timeout
        self.tls = tls
        self.server_hostname = (settings.server_name or host) if tls is not None else None
        self.conns: list[_Conn] = []  # connected (ready), oldest first; retired ones too
        self.total = 0  # connections open or opening
        self.opening = 0
        self.streams_per_conn = _ASSUMED_STREAMS  # what the target allowed last
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.closed = False
        self._sweeper: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        streams = sum(len(conn.streams) for conn in self.conns)
        return (
            f"_Pool({self.host}:{self.port} total={self.total} opening={self.opening} "
            f"streams={streams} waiters={len(self.waiters)}{' closed' if self.closed else ''})"
        )

    async def stream(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> _Stream:
        """A new stream on a connection with room, opening one when all are full."""
        while True:
            if self.closed:
                raise httpx.PoolTimeout("the upstream pool was closed")
            for conn in self.conns:
                if conn.has_room():
                    try:
                        return conn.start(headers, end_stream)
                    except (
                        h2.exceptions.TooManyStreamsError,
                        h2.exceptions.NoAvailableStreamIDError,
                    ):
                        conn.retired = True  # out of step with h2's count: no more here
                        if not conn.streams:
                            conn.close()
                    except h2.exceptions.ProtocolError as exc:
                        raise httpx.LocalProtocolError(str(exc)) from exc
            if (not self.max_connections or self.total < self.max_connections) and len(
                self.waiters
            ) >= self.opening * self.streams_per_conn:
                await self._open()
            else:
                await self._wait()

    async def _wait(self) -> None:
        waiter = self.loop.create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._wake(1)  # woken and cancelled in the same tick: pass it on
            else:
                try:
                    self.waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    def _wake(self, count: int) -> None:
        waiters = self.waiters
        while count > 0 and waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    def _wake_all(self) -> None:
        self._wake(len(self.waiters))

    async def _open(self) -> None:
        self.total += 1
        self.opening += 1
        try:
            conn = await self._connect()
        except BaseException:
            self.total -= 1
            self._wake_all()  # they may open one themselves, or see the error
            raise
        finally:
            self.opening -= 1
        if self.closed:
            self.total -= 1
            conn.abort()
            return
        self.conns.append(conn)
        self.streams_per_conn = max(conn.limit(), 1)
        self._wake_all()

    async def _connect(self) -> _Conn:
        conn = _Conn(self)
        timeout = self.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                await connect(
                    self.loop, conn, self.host, self.port, self.tls, self.server_hostname, timeout
                )
                if self.tls is not None:
                    _check_alpn(conn)
                await asyncio.shield(conn.ready)
        except BaseException as exc:
            conn.abort()
            failed = connect_failed(exc, self.host, self.port)
            if failed is None:
                raise
            raise failed from (None if isinstance(exc, TimeoutError) else exc)
        if conn.closed or conn.retired:
            conn.abort()
            raise httpx.ConnectError(
                f"upstream closed the connection before its HTTP/2 settings ({conn.error})"
                if conn.closed
                else "upstream went away (GOAWAY) as the connection opened"
            )
        return conn

    # --- from the connections ---------------------------------------------------------

    def freed(self, conn: _Conn) -> None:
        """A stream of `conn` finished."""
        if self.waiters and conn.has_room():
            self._wake(1)
        if conn.retired:
            if not conn.streams:
                conn.close()
            return
        if conn.streams or self.waiters:
            return
        if self.max_keepalive <= 0 or self._idle_count() > self.max_keepalive:
            conn.close()
        elif self._sweeper is None:
            self._sweeper = self.loop.call_later(self.keepalive_expiry, self._sweep)

    def room(self, conn: _Conn) -> None:
        """`conn` may take more streams than it did."""
        self.streams_per_conn = max(conn.limit(), 1)
        if conn.has_room():
            self._wake_all()

    def retired(self, conn: _Conn) -> None:
        """`conn` takes no new stream: the waiters look elsewhere."""
        self._wake_all()

    def lost(self, conn: _Conn) -> None:
        try:
            self.conns.remove(conn)
        except ValueError:
            return  # never made it into the pool: `_open` counts it
        self.total -= 1
        self._wake_all()

    def _idle_count(self) -> int:
        return sum(1 for conn in self.conns if not conn.streams and not conn.retired)

    def _sweep(self) -> None:
        """Close connections idle past `keepalive_expiry` (one timer per pool)."""
        self._sweeper = None
        now = self.loop.time()
        deadline = now - self.keepalive_expiry
        next_due: float | None = None
        for conn in list(self.conns):
            if conn.streams or conn.closed:
                continue
            if conn.idle_since <= deadline:
                conn.close()
            else:
                due = conn.idle_since + self.keepalive_expiry
                next_due = due if next_due is None else min(next_due, due)
        if next_due is not None and not self.closed:
            self._sweeper = self.loop.call_later(max(next_due - now, 0.05), self._sweep)

    def connections(self) -> int:
        return self.total

    def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.conns):
            conn.abort()
        self._wake_all()


def _check_alpn(conn: _Conn) -> None:
    transport = conn.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
    if chosen != "h2":
        raise httpx.ConnectError(
            f"upstream did not agree to HTTP/2 by ALPN (it chose {chosen or 'nothing'})"
        )


def _split(url: str) -> tuple[bool, str, str, bytes | None]:
    """`http(s)://[user:pw@]authority/target` → (tls, authority, target, basic
    credentials or None)."""
    if url.startswith("http://"):
        tls, start = False, 7
    elif url.startswith("https://"):
        tls, start = True, 8
    else:
        raise httpx.UnsupportedProtocol(f"not an http or https URL: {url[:40]!r}")
    end = len(url)
    for mark in "/?#":
        found = url.find(mark, start)
        if 0 <= found < end:
            end = found
    authority, target = url[start:end], url[end:]
    if "#" in target:
        target = target[: target.index("#")]
    if not target.startswith("/"):
        target = "/" + target
    credentials = None
    if "@" in authority:
        userinfo, _, authority = authority.rpartition("@")
        user, _, password = userinfo.partition(":")
        credentials = b"Basic " + base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode())
    if not authority:
        raise httpx.UnsupportedProtocol(f"no host in {url[:40]!r}")
    return tls, authority, target, credentials


def _request_headers(
    method: str,
    scheme: bytes,
    authority: bytes,
    target: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes | None,
    credentials: bytes | None,
) -> list[tuple[bytes, bytes]]:
    """The header block: pseudo-fields first, lower-case names, no connection-specific
    field, `host` as `:authority`, `te` only as `te: trailers`."""
    fields: list[tuple[bytes, bytes]] = []
    nominated: set[bytes] = set()
    has_length = has_auth = False
    for name, value in headers:
        name = name.lower()
        if name[:1] == b":":
            raise httpx.LocalProtocolError("a header holds CR, LF or NUL, or a bad name")
        if name in _DROPPED:
            if name == b"host":
                authority = value
            elif name == b"te":
                if b"trailers" in value.lower():
                    fields.append((b"te", b"trailers"))
            elif name == b"connection":
                nominated.update(t.strip().lower() for t in value.split(b","))
            continue
        if name in _SENSITIVE:
            if name == b"authorization":
                has_auth = True
            fields.append(NeverIndexedHeaderTuple(name, value))
            continue
        if name == b"content-length":
            has_length = True
        fields.append((name, value))
    if nominated:
        fields = [field for field in fields if field[0] not in nominated]
    if credentials is not None and not has_auth:
        fields.append(NeverIndexedHeaderTuple(b"authorization", credentials))
    if body is not None and not has_length and (body or method not in _BODYLESS_METHODS):
        fields.append((b"content-length", str(len(body)).encode()))
    # One search over every value joined (a space between them is allowed), not
    # three per field: the largest cost of building the block.
    if _CONTROL.search(b" ".join([value for _, value in fields])) is not None:
        raise httpx.LocalProtocolError("a header holds CR, LF or NUL, or a bad name")
    try:
        path = target.encode("ascii")
    except UnicodeEncodeError:
        raise httpx.LocalProtocolError("the request target is not ASCII") from None
    return [
        (b":method", method.encode("ascii")),
        (b":scheme", scheme),
        (b":authority", authority),
        (b":path", path),
        *fields,
    ]


class _ResponseStream(httpx.AsyncByteStream):
    """An `H2Response` body as httpx's stream, for the `httpx.AsyncClient` path."""

    __slots__ = ("_answer",)

    def __init__(self, answer: H2Response) -> None:
        self._answer = answer

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._answer.body():
            yield chunk

    async def aclose(self) -> None:
        await self._answer.aclose()


class H2Transport(RawTransport):
    """HTTP/2 to every target of one upstream: `open` on the hot path,
    `handle_async_request` for its `httpx.AsyncClient` (health checks)."""

    def __init__(self, settings: TransportSettings) -> None:
        self._settings = settings
        self._pools: dict[tuple[bool, str], _Pool] = {}
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    def _pool(self, tls: bool, authority: str) -> _Pool:
        key = (tls, authority)
        pool = self._pools.get(key)
        if pool is None:
            host, port, header = host_port(authority, 443 if tls else 80)
            pool = _Pool(host, port, header, self._settings, self._tls_context() if tls else None)
            self._pools[key] = pool
        return pool

    def _tls_context(self) -> ssl.SSLContext:
        """The upstream's context (its ALPN offers h2 only: the factory builds it so),
        else the system defaults."""
        if self._tls is None:
            self._tls = self._settings.tls or default_tls_context(alpn=("h2",))
        return self._tls

    async def open(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] | None,
        *,
        trailers: RequestTrailers | None = None,
    ) -> H2Response:
        """Send one request; return as soon as the answer's head is in, while the rest
        of a streamed request body still goes out (full duplex: gRPC's bidirectional
        calls read answers between the messages they send).

        `body` as bytes that fit the upstream's window goes out before this waits for
        the head, with no task of its own; a streamed body (or bytes larger than the
        window) is sent by a task tied to the stream, flow control respected. Its
        failures (the source raising, a write timing out, the upstream resetting the
        stream) reset the stream and are raised by `open`, or by the answer's `body()`
        once the head is in, as httpx errors (a failing source's exception is the
        `__cause__` of an `httpx.WriteError`). Closing the answer stops that task.

        `trailers` are sent after the body, as a HEADERS frame with END_STREAM: either
        the fields themselves, or an async callable asked for them once the body source
        is exhausted (a proxy learns its client's trailers only at the end). It is
        called once, even when the request is sent again, and what it returned is
        cancelled if the request ends first. Send `te: trailers` in `headers` when the
        answer's trailers matter (gRPC)."""
        if self._closed:
            raise httpx.PoolTimeout("the transport was closed")
        tls, authority, target, credentials = _split(url)
        pool = self._pool(tls, authority)
        block = _request_headers(
            method,
            b"https" if tls else b"http",
            pool.authority,
            target,
            headers,
            body if isinstance(body, bytes) else None,
            credentials,
        )
        fields: list[tuple[bytes, bytes]] | None = None
        later: Callable[[], Awaitable[Fields]] | None = None
        if callable(trailers):
            later = trailers
        elif trailers:
            fields = _trailer_block(trailers) or None
        data = body if isinstance(body, bytes) else b""
        source = body if body is not None and not isinstance(body, bytes) else None
        end_with_headers = source is None and not data and fields is None and later is None
        sender: _Sender | None = None
        raced = False
        try:
            for _ in range(_MAX_TRIES):
                stream = await pool.stream(block, end_with_headers)
                reused = stream.conn.served > 1
                try:
                    if sender is not None:
                        sender.move(stream)
                    elif end_with_headers:
                        pass
                    elif source is not None or later is not None or len(data) > stream.window():
                        sender = _Sender(_Replay(source, data), fields, later, stream)
                    else:
                        # Bytes the window takes now: sent inline, no task (a unary call).
                        if data:
                            await stream.send(data, end=fields is None)
                        if fields is not None:
                            stream.send_trailers(fields)
                    await stream.wait_head()
                except _Refused:
                    stream.cancel()
                    if sender is not None and not sender.replay.replayable:
                        raise httpx.RemoteProtocolError(_NOT_REPLAYABLE) from None
                    continue
                except BaseException as exc:
                    stream.cancel()
                    if (
                        not raced
                        and reused
                        and method in _IDEMPOTENT
                        and not stream.head
                        and not stream.chunks
                        and stream.conn.closed
                        and isinstance(exc, httpx.ReadError | httpx.RemoteProtocolError)
                        and (sender is None or sender.replay.replayable)
                    ):
                        raced = True  # the keep-alive race: the upstream closed as we sent
                        continue
                    raise
                return H2Response(stream, sender)
            raise httpx.RemoteProtocolError(f"upstream refused the stream {_MAX_TRIES} times")
        except BaseException:
            if sender is not None:
                await sender.stop()
            raise

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body: bytes | AsyncIterator[bytes] | None
        if isinstance(request.stream, httpx.ByteStream):
            body = request.content
        else:
            body = aiter(request.stream)  # type: ignore[arg-type]
        url = request.url
        if url.userinfo:
            # httpx already made the URL's credentials an Authorization header.
            url = url.copy_with(username=None, password=None)
        answer = await self.open(request.method, str(url), request.headers.raw, body)
        return httpx.Response(
            status_code=answer.status,
            headers=answer.headers,
            stream=_ResponseStream(answer),
            request=request,
            extensions={"http_version": b"HTTP/2"},
        )

    def connections(self) -> int:
        """Upstream connections open or opening, over every target of this transport."""
        return sum(pool.connections() for pool in self._pools.values())

    async def aclose(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def __repr__(self) -> str:
        if self._closed:
            return "H2Transport(closed)"
        pools = ", ".join(repr(pool) for pool in self._pools.values())
        return f"H2Transport(connections={self.connections()}, [{pools}])"
