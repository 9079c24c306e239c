"""The hot path's HTTP/1.1 client: asyncio protocols and httptools' C parser, nothing else.

A proxy needs little of a general HTTP client: no cookies, redirects, URL objects,
decompression or default headers. aiohttp's client was the largest item in the profile
(see docs/performance.md, "Choosing the HTTP client"); this one writes the request head as one
`bytes`, parses the response with the same parser uvicorn uses for requests, and hands
body chunks over as they arrive. It owns its sockets, so what the gateway asks of a
pool is direct:

- cancelling the awaiting task (client gone, deadline, straggler) aborts the upstream
  connection at once: the upstream sees the disconnect;
- a connection is reused only after a complete response that allows keep-alive, with
  the request body fully sent; anything else (error, short body, parse error, early
  answer, cancelled exchange) closes it;
- a reused connection that dies before any answer byte is retried once on a fresh one
  when the request body is replayable (the keep-alive race every pool has);
- per-read timeouts, connect timeout, `max_connections` per target with FIFO waiters,
  `max_keepalive` idle connections kept for `keepalive_expiry`.

Errors are raised as httpx exceptions, like every transport of the gateway.
`H1Transport` is the default transport; `GATEWAY_TRANSPORT=aiohttp` selects the aiohttp
one, which this class also holds as its fallback for targets with credentials in the
URL and everything that goes through `httpx.AsyncClient` (health checks, tests).
`https://` targets are this client's too, over TLS with the upstream's context.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator

import httptools
import httpx

from gateway.upstream.transports.base import (
    RawAnswer,
    RawTransport,
    TransportSettings,
    connect,
    connect_failed,
    default_tls_context,
    host_port,
)

__all__ = ["H1Response", "H1Transport"]

_HIGH_WATER = 256 * 1024  # buffered body bytes at which reading from the upstream pauses
_OVER_KEEPALIVE_GRACE = 1.0  # seconds idle connections over max_keepalive are kept
_READ_SIZE = 256 * 1024  # one read's most: what one connection can have in flight is small
# Response head limits (aiohttp's per-field limit; a section and count cap on top).
_MAX_FIELD = 8190
_MAX_HEAD_BYTES = 64 * 1024
_MAX_HEADERS = 256
# Methods a pool may send again after the keep-alive race (RFC 9110, 9.2.2).
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
_EMPTY_BODY_HEADER = b"content-length: 0\r\n"


class _Conn(asyncio.BufferedProtocol):
    """One upstream connection and the exchange in flight on it."""

    __slots__ = (
        "_close_delimited",
        "_drain",
        "_interim",
        "_keep_alive",
        "_loop",
        "_parser",
        "_paused",
        "_pool",
        "_read_timeout",
        "_waiter",
        "buffered",
        "chunks",
        "closed",
        "done",
        "error",
        "got_bytes",
        "head_bytes",
        "head_done",
        "headers",
        "idle_since",
        "in_exchange",
        "retire",
        "status",
        "transport",
        "write_paused",
    )

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self._read_timeout = pool.read_timeout
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.in_exchange = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self.write_paused = False
        self._paused = False
        self.chunks: deque[bytes] = deque()  # one per connection, emptied per exchange
        self._reset()

    def _reset(self) -> None:
        self._resume_reading()  # a body that ended within the read that paused it
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.chunks.clear()
        self.buffered = 0
        self.head_done = False
        self.done = False
        self.error: Exception | None = None
        self.got_bytes = False
        self.retire = False  # this exchange went out of step: close after it
        self._interim = False
        self._keep_alive = False
        self._close_delimited = False

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        # Every connection of the pool reads into the pool's one buffer: a read is
        # parsed (and its body bytes copied out) before the loop makes the next one.
        return self._pool.read_view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._pool.read_view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if not self.in_exchange or self.done:
            # Bytes nobody asked for (after a complete answer, or on an idle
            # connection): the connection is out of step and must not be reused.
            self.abort()
            return
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("upstream switched protocols unasked"))
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"invalid HTTP from upstream: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.lost(self)
        if self.in_exchange and not self.done and self.error is None:
            if self.head_done and self._close_delimited and exc is None:
                self.done = True  # the body was delimited by the close itself
            elif exc is not None:
                self.error = httpx.ReadError(str(exc) or type(exc).__name__)
            elif self.head_done:
                self.error = httpx.RemoteProtocolError("upstream closed the connection mid-body")
            else:
                self.error = httpx.RemoteProtocolError(
                    "upstream closed the connection without answering"
                )
        self._wake()
        self._wake_drain()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    # --- httptools callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            # A second answer in the same read: the upstream is out of step. Nothing
            # of it may reach the finished response, and the connection is closed.
            raise httptools.HttpParserError("upstream sent more than one answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        self.head_bytes += size
        headers = self.headers
        headers.append((name, value))
        if size > _MAX_FIELD or self.head_bytes > _MAX_HEAD_BYTES or len(headers) > _MAX_HEADERS:
            raise httptools.HttpParserError("upstream response headers too large")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True  # 100 Continue and friends: wait for the real answer
            self.headers = []
            self.head_bytes = 0
            return
        self.status = status
        self.head_done = True
        framed = False
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length" or (
                lname == b"transfer-encoding" and value.lower().endswith(b"chunked")
            ):
                framed = True
        self._close_delimited = not framed and status not in (204, 304)
        # Asked now: llhttp forgets the answer once the message is complete.
        self._keep_alive = self._parser.should_keep_alive()
        self._wake()
        self._wake_drain()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.done = True
        self._wake()

    # --- the exchange -----------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drain(self) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.abort()
        self._wake()
        self._wake_drain()

    def _on_read_timeout(self) -> None:
        self._fail(httpx.ReadTimeout("upstream read timed out"))

    async def _wait(self) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        timer = self._loop.call_later(self._read_timeout, self._on_read_timeout)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def drain(self) -> None:
        while self.write_paused and not self.closed and not self.head_done:
            drain = self._loop.create_future()
            self._drain = drain
            timer = self._loop.call_later(self._read_timeout, self._on_read_timeout)
            try:
                await drain
            finally:
                timer.cancel()
                self._drain = None
        if self.error is not None:
            raise self.error

    async def head(self) -> None:
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait()

    async def read(self) -> bytes:
        """The next body bytes (everything buffered, joined), b"" at the end."""
        while True:
            if self.chunks:
                return self.take()
            if self.done:
                return b""
            if self.error is not None:
                raise self.error
            await self._wait()

    def take(self) -> bytes:
        """Everything buffered, joined (b"" when nothing is), and reading resumed."""
        chunks = self.chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        self._resume_reading()
        return data

    def _resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def reusable(self) -> bool:
        return (
            self.done
            and self.error is None
            and not self.closed
            and not self.retire
            and not self._close_delimited
            and self._keep_alive
        )


class H1Response:
    """What `open` returns: status and raw headers now, the body as it arrives."""

    __slots__ = ("_conn", "_pool", "headers", "status")

    trailers = None  # HTTP/1.1 answers' trailers are not kept (HTTP/2's are)

    def __init__(self, pool: _Pool, conn: _Conn) -> None:
        self._pool = pool
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers

    def whole(self) -> bytes | None:
        """The entire body if it arrived with the head (a small answer usually does),
        else None and it streams from `body`. Once taken, `body` yields nothing."""
        conn = self._conn
        if not conn.done or conn.error is not None:
            return None
        return conn.take()

    async def body(self) -> AsyncIterator[bytes]:
        read = self._conn.read
        while chunk := await read():
            yield chunk

    async def aclose(self) -> None:
        self._pool.release(self._conn)


class _Pool:
    """The connections to one target (host:port)."""

    def __init__(
        self,
        host: str,
        port: int,
        authority: bytes,
        settings: TransportSettings,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.host = host
        self.port = port
        self.authority = authority
        self.max_connections = settings.max_connections
        self.max_keepalive = settings.max_keepalive
        self.keepalive_expiry = settings.keepalive_expiry
        self.connect_timeout = settings.connect_timeout
        self.read_timeout = settings.read_timeout
        # https: the context and the name sent as SNI and verified (an IP literal is
        # verified against the certificate's IP names and sent no SNI, RFC 6066 3).
        self.tls = tls
        self.server_hostname = (settings.server_name or host) if tls is not None else None
        self.read_view = memoryview(bytearray(_READ_SIZE))
        self.idle: list[_Conn] = []
        self.total = 0  # connections open or opening
        self.waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self.busy: set[_Conn] = set()
        self.closed = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._trimmer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return (
            f"_Pool({self.host}:{self.port} total={self.total} idle={len(self.idle)} "
            f"busy={len(self.busy)} waiters={len(self.waiters)}"
            f"{' closed' if self.closed else ''})"
        )

    async def acquire(self) -> tuple[_Conn, bool]:
        """A connection for one exchange and whether it was reused."""
        idle = self.idle
        if idle:
            now = self.loop.time()
            while idle:
                conn = idle.pop()
                if conn.closed:
                    continue
                if now - conn.idle_since > self.keepalive_expiry:
                    conn.abort()
                    continue
                self._start(conn)
                return conn, True
        if self.max_connections and self.total >= self.max_connections:
            waiter: asyncio.Future[_Conn | None] = self.loop.create_future()
            self.waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    # Handed a connection or a slot in the same tick: pass it on.
                    given = waiter.result()
                    if given is not None:
                        self.busy.discard(given)
                        given.in_exchange = False
                        if given.closed or self.closed:
                            given.abort()
                        else:
                            self._give(given)
                    else:
                        self.total -= 1  # the slot counted for us, never used
                        self._free_slot()
                else:
                    self._drop_waiter(waiter)
                raise
            if handed is not None:
                return handed, True
        else:
            self.total += 1
        try:
            conn = await self._connect()
        except BaseException:
            self.total -= 1
            self._free_slot()
            raise
        self._start(conn)
        return conn, False

    def _drop_waiter(self, waiter: asyncio.Future[_Conn | None]) -> None:
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass

    def _start(self, conn: _Conn) -> None:
        conn._reset()
        conn.in_exchange = True
        self.busy.add(conn)

    async def _connect(self) -> _Conn:
        conn = _Conn(self)
        timeout = self.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                await connect(
                    self.loop, conn, self.host, self.port, self.tls, self.server_hostname, timeout
                )
        except (TimeoutError, OSError) as exc:
            failed = connect_failed(exc, self.host, self.port)
            assert failed is not None
            raise failed from (None if isinstance(exc, TimeoutError) else exc)
        return conn

    def release(self, conn: _Conn) -> None:
        if not conn.in_exchange:
            return
        conn.in_exchange = False
        self.busy.discard(conn)
        if self.closed or self.max_keepalive <= 0 or not conn.reusable():
            conn.abort()
            return
        self._give(conn)

    def _give(self, conn: _Conn) -> None:
        """An idle, healthy connection: to the first waiter, else to the idle stack."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                self._start(conn)
                waiter.set_result(conn)
                return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        if len(self.idle) > self.max_keepalive and self._trimmer is None:
            # A burst of answers: the requests queued behind them need connections
            # now, so the ones over `max_keepalive` are closed only if still idle a
            # moment later (closing them at once made a connect per request at 1,024
            # client connections).
            self._trimmer = self.loop.call_later(_OVER_KEEPALIVE_GRACE, self._trim)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.keepalive_expiry, self._sweep)

    def _trim(self) -> None:
        """Close the longest-idle connections over `max_keepalive`, but only those idle
        for the whole grace: under load, a connection that went idle a moment ago will
        be wanted again a moment later (closing it meant a connect per request at
        1,024 client connections). The idle stack is pushed and popped at its top, so
        its bottom is the longest idle."""
        self._trimmer = None
        idle = self.idle
        idle[:] = [conn for conn in idle if not conn.closed]
        excess = len(idle) - self.max_keepalive
        if excess <= 0:
            return
        now = self.loop.time()
        cutoff = now - _OVER_KEEPALIVE_GRACE
        stale = 0
        while stale < excess and idle[stale].idle_since <= cutoff:
            stale += 1
        for conn in idle[:stale]:
            conn.abort()
        del idle[:stale]
        if len(idle) > self.max_keepalive:
            # Over the limit with connections idle for less than the grace: look
            # again once the longest idle of them has been idle that long.
            wait = idle[0].idle_since + _OVER_KEEPALIVE_GRACE - now
            self._trimmer = self.loop.call_later(max(wait, 0.05), self._trim)

    def _sweep(self) -> None:
        """Close idle connections past `keepalive_expiry` (one timer per pool)."""
        self._sweeper = None
        deadline = self.loop.time() - self.keepalive_expiry
        keep = []
        for conn in self.idle:
            if conn.closed:
                continue
            if conn.idle_since <= deadline:
                conn.abort()
            else:
                keep.append(conn)
        self.idle[:] = keep
        if keep and not self.closed:
            delay = keep[0].idle_since + self.keepalive_expiry - self.loop.time()
            self._sweeper = self.loop.call_later(max(delay, 0.05), self._sweep)

    def lost(self, conn: _Conn) -> None:
        self.total -= 1
        self.busy.discard(conn)
        self._free_slot()

    def _free_slot(self) -> None:
        """A connection closed: the first waiter may open a new one."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                self.total += 1
                waiter.set_result(None)
                return

    def connections(self) -> int:
        return self.total

    def close(self) -> None:
        self.closed = True
        for timer in (self._sweeper, self._trimmer):
            if timer is not None:
                timer.cancel()
        self._sweeper = self._trimmer = None
        for conn in [*self.idle, *self.busy]:
            conn.abort()
        self.idle.clear()
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(httpx.PoolTimeout("the upstream pool was closed"))
        self.waiters.clear()


def _split(url: str) -> tuple[str, str] | None:
    """`http://authority/target` → (authority, target), and `https://...` the same
    with the authority as `https://authority`; None for what this client leaves to
    aiohttp (credentials in the URL)."""
    if url.startswith("http://"):
        start, scheme = 7, ""
    elif url.startswith("https://"):
        start, scheme = 8, "https://"
    else:
        return None
    end = url.find("/", start)
    if end < 0:
        end = len(url)
    authority = url[start:end]
    if "?" in authority or "#" in authority:  # no path, a query or fragment right away
        end = min(i for i in (authority.find("?"), authority.find("#")) if i >= 0) + start
        authority = url[start:end]
    target = url[end:]
    if not target.startswith("/"):
        target = "/" + target
    if "@" in authority or not authority:
        return None
    return scheme + authority, target


class H1Transport(RawTransport):
    """`open` on the native client for plain-http targets; the rest goes to the
    aiohttp transport it holds (`fallback`)."""

    def __init__(self, settings: TransportSettings) -> None:
        self._settings = settings
        self._fallback: RawTransport | None = None
        self._pools: dict[str, _Pool] = {}
        self._default_tls: ssl.SSLContext | None = None
        self._closed = False

    @property
    def fallback(self) -> RawTransport:
        """The aiohttp transport, made on first use: a gateway whose upstreams are all
        plain http never imports aiohttp (a quarter of a second at every start)."""
        if self._fallback is None:
            from gateway.upstream.transports.aiohttp import AiohttpTransport

            self._fallback = AiohttpTransport(self._settings)
        return self._fallback

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.fallback.handle_async_request(request)

    def _pool(self, authority: str) -> _Pool:
        pool = self._pools.get(authority)
        if pool is None:
            if authority.startswith("https://"):
                host, port, header = host_port(authority[8:], 443)
                pool = _Pool(host, port, header, self._settings, self._tls())
            else:
                host, port, header = host_port(authority, 80)
                pool = _Pool(host, port, header, self._settings)
            self._pools[authority] = pool
        return pool

    def _tls(self) -> ssl.SSLContext:
        """The context for https targets: the upstream's, else the system defaults
        (certificates verified against the system trust store)."""
        if self._default_tls is None:
            self._default_tls = self._settings.tls or default_tls_context()
        return self._default_tls

    async def open(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> RawAnswer:
        split = _split(url)
        if split is None or self._closed:
            return await self.fallback.open(method, url, headers, body)
        authority, target = split
        pool = self._pool(authority)
        head, stream, chunked = _request_head(method, target, headers, body, pool.authority)
        for attempt in (0, 1):
            conn, reused = await pool.acquire()
            try:
                transport = conn.transport
                assert transport is not None
                if stream is None:
                    transport.write(head if not body else head + body)  # type: ignore[operator]
                else:
                    transport.write(head)
                    await _send_stream(conn, transport, stream, chunked=chunked)
                await conn.head()
            except BaseException as exc:
                conn.retire = True  # whatever it got, a failed exchange is never reused
                pool.release(conn)  # ...so this closes it
                if (
                    attempt == 0
                    and reused
                    and method in _IDEMPOTENT
                    and stream is None
                    and not conn.got_bytes
                    and isinstance(exc, httpx.ReadError | httpx.RemoteProtocolError)
                ):
                    continue  # the keep-alive race: the upstream closed it as we sent
                raise
            if method == "HEAD" and not conn.done:
                # httptools cannot be told a HEAD answer has no body: end it here and
                # never reuse the connection (its parser would wait for that body).
                conn.done = True
                conn.retire = True
                conn.chunks.clear()
            return H1Response(pool, conn)
        raise AssertionError("unreachable")  # pragma: no cover

    def connections(self) -> int:
        """Upstream connections open or opening, over every target of this transport."""
        return sum(pool.connections() for pool in self._pools.values())

    async def aclose(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        if self._fallback is not None:
            await self._fallback.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._pools)} targets"
        connections = self.connections()
        return f"H1Transport({state}, connections={connections}, fallback={self._fallback!r})"


def _request_head(
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes | AsyncIterator[bytes] | None,
    authority: bytes,
) -> tuple[bytes, AsyncIterator[bytes] | None, bool]:
    """The request line and headers as one `bytes`, framed by the gateway: the given
    Content-Length, else Content-Length of a bytes body, else chunked for a stream."""
    lines = [k + b": " + v for k, v in headers]
    has_host = has_length = False
    for name, _ in headers:
        if name == b"host":
            has_host = True
        elif name == b"content-length":
            has_length = True
    block = b"\r\n".join(lines)
    separators = max(len(lines) - 1, 0)
    if block.count(b"\n") != separators or block.count(b"\r") != separators:
        raise httpx.LocalProtocolError("a header value holds CR or LF")
    try:
        start = f"{method} {target} HTTP/1.1\r\n".encode("latin-1")
    except UnicodeEncodeError:
        raise httpx.LocalProtocolError("the request target is not latin-1") from None
    parts = [start]
    if not has_host:
        parts.append(b"host: " + authority + b"\r\n")
    if lines:
        parts.append(block + b"\r\n")
    stream: AsyncIterator[bytes] | None = None
    chunked = False
    if isinstance(body, bytes):
        if not has_length and (body or method not in _BODYLESS_METHODS):
            parts.append(b"content-length: " + str(len(body)).encode() + b"\r\n")
    elif body is not None:
        stream = body
        if not has_length:
            chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
    elif not has_length and method not in _BODYLESS_METHODS:
        parts.append(_EMPTY_BODY_HEADER)
    parts.append(b"\r\n")
    return b"".join(parts), stream, chunked


async def _send_stream(
    conn: _Conn, transport: asyncio.Transport, stream: AsyncIterator[bytes], *, chunked: bool
) -> None:
    """Write a streamed body, stopping early if the upstream has already answered."""
    async for chunk in stream:
        if conn.head_done or conn.error is not None:
            break
        if not chunk:
            continue
        if chunked:
            transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            transport.write(chunk)
        if conn.write_paused:
            await conn.drain()
    else:
        if chunked:
            transport.write(b"0\r\n\r\n")
        return
    # Answered (or failed) before the body was all sent: the connection is out of step.
    conn.retire = True
