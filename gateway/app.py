"""The data plane: one pure ASGI callable, built once, that proxies every request.

A request's life, in Pingora's phases: match the route, build the upstream request
(headers, body, deadline), run the route's handler chain, stream the response back,
and in every case end in one place that records what happened. Gateway errors become
problem+json in one place (`send_problem`); nothing else ever reaches the client.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from gateway.aggregate import AggregateRoute
from gateway.edge import edge_context, run_filters
from gateway.errors import (
    BadRequest,
    BodyTooLarge,
    ClientClosedRequest,
    GatewayError,
    InternalError,
    RequestTimeout,
    ShuttingDown,
)
from gateway.expiry import Expiry
from gateway.metrics import Metrics
from gateway.observability import AccessLog
from gateway.pipeline import Deadline, GatewayRequest, GatewayResponse, Headers
from gateway.proxy import (
    REPLAY_LIMIT,
    BodyReader,
    IncomingHeaders,
    add_forwarded,
    http_date,
    parse_incoming,
    send_problem,
    send_response,
)
from gateway.routing import normalize_path
from gateway.runtime import ProxyRoute, Runtime
from gateway.status import StatusBoard
from gateway.types import Receive, Scope, Send
from gateway.websocket import proxy_websocket

__all__ = ["DataPlane", "Exchange", "GatewayState"]

log = logging.getLogger("gateway.app")

# A host (reg-name, IPv4 or bracketed IPv6) with an optional port: RFC 3986's shape.
_SANE_HOST = re.compile(r"^(?:[A-Za-z0-9._~!$&'()*+,;=%-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")

# Requests the gateway refused on an upstream's behalf, counted as upstream outcomes.
_SHED = {"upstream_saturated": "saturated", "upstream_unhealthy": "unhealthy"}


class GatewayState:
    """The one mutable reference a reload swaps, plus the drain flag and what every
    request reports to (metrics, access log, the status page's board)."""

    def __init__(
        self,
        runtime: Runtime | None = None,
        metrics: Metrics | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.runtime = runtime
        self.draining = False
        self.metrics = metrics or Metrics()
        self.access_log = access_log
        self.status = StatusBoard()

    def __repr__(self) -> str:
        return f"GatewayState(runtime={self.runtime!r}, draining={self.draining})"


@dataclass(slots=True)
class Exchange:
    """What happened to one request; filled as it goes, read once at the end."""

    started: float
    method: str
    path: str
    request_id: str
    route: str | None = None
    upstream: str | None = None
    target: str | None = None
    status: int = 0
    bytes_out: int = 0
    error: str | None = None
    detail: str | None = None  # set when the gateway answered with its own problem+json
    response_started: bool = False
    extra_headers: Headers | None = None  # from edge filters, on every answer


class DataPlane:
    def __init__(self, state: GatewayState, *, body_timeout: float | None = None) -> None:
        self.state = state
        self.body_timeout = body_timeout  # the longest pause between request body chunks
        self._request_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "websocket":
            exchange = Exchange(time.monotonic(), "GET", scope["path"], "")
            try:
                await proxy_websocket(self.state, scope, receive, send, exchange)
            finally:
                self._finish(exchange, scope, self.state.runtime)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self.state.runtime
        incoming = parse_incoming(scope["headers"])
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else scope["path"]
        exchange = Exchange(time.monotonic(), scope["method"], path, incoming.request_id)
        if runtime is not None:
            runtime.active += 1
        try:
            await self._serve(runtime, path, scope, receive, send, incoming, exchange)
        finally:
            if runtime is not None:
                runtime.leave()
            self._finish(exchange, scope, runtime)

    async def _serve(
        self,
        runtime: Runtime | None,
        path: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        incoming: IncomingHeaders,
        exchange: Exchange,
    ) -> None:
        try:
            if self.state.draining or runtime is None:
                raise ShuttingDown("the gateway is draining; retry on another instance")
            if incoming.framing_error is not None:
                # Never forwarded: the body's framing (or the Host) is ambiguous, so the
                # connection cannot be trusted for another request either.
                raise BadRequest(incoming.framing_error, headers=[(b"connection", b"close")])
            version = scope.get("http_version")
            if version not in ("1.0", "1.1"):
                raise BadRequest(
                    f"HTTP/{version} is not served", headers=[(b"connection", b"close")]
                )
            if version == "1.1" and not _SANE_HOST.match(incoming.host):
                # RFC 9112 3.2: a request without exactly one valid Host is a 400.
                raise BadRequest(
                    "a missing or invalid Host header", headers=[(b"connection", b"close")]
                )
            if incoming.chunked and version == "1.0":
                raise BadRequest(
                    "Transfer-Encoding is not defined for HTTP/1.0",
                    headers=[(b"connection", b"close")],
                )
            path = normalize_path(path)
            match = runtime.router.match(incoming.host, scope["method"], path)
            route = match.route
            exchange.route = route.name
            exchange.upstream = route.upstream
            if route.filters and await self._filter(route, scope, send, incoming, exchange):
                return
            if isinstance(route, AggregateRoute):
                await self._aggregate(route, match.params, scope, receive, send, incoming, exchange)
                return
            if route.rewrite is not None:
                path = route.rewrite.fill(match.params)
            await self._proxy(route, path, scope, receive, send, incoming, exchange)
        except GatewayError as exc:
            await self._fail(send, exc, exchange)
        except Exception as exc:  # a bug: log it whole, tell the client nothing about it
            log.exception("unexpected error serving %s %s", exchange.method, exchange.path)
            await self._fail(send, InternalError("unexpected gateway error"), exchange)
            del exc

    async def _filter(
        self,
        route: ProxyRoute | AggregateRoute,
        scope: Scope,
        send: Send,
        incoming: IncomingHeaders,
        exchange: Exchange,
    ) -> bool:
        """The request-filter phase (edge policies). True when a filter answered."""
        ctx = edge_context(scope, scope["method"], route.name, route.trusted_proxies, incoming)
        exchange.extra_headers = ctx.response_headers
        early = await run_filters(route.filters, ctx)
        if early is not None:
            headers = [
                *early.headers,
                *ctx.response_headers,
                (b"content-length", str(len(early.body)).encode()),
                (b"x-request-id", exchange.request_id.encode("ascii")),
                (b"date", http_date()),
            ]
            exchange.status = early.status
            exchange.response_started = True
            exchange.bytes_out = len(early.body)
            await send({"type": "http.response.start", "status": early.status, "headers": headers})
            await send({"type": "http.response.body", "body": early.body})
            return True
        return False

    def _finish(self, exchange: Exchange, scope: Scope, runtime: Runtime | None) -> None:
        """The logging phase: metrics, the status board and the access log, whatever
        happened."""
        elapsed = time.monotonic() - exchange.started
        route = exchange.route or "(none)"
        status = exchange.status or 499  # nginx's code for a client that went away
        key = (route, exchange.method, status)
        series = self._request_series.get(key)
        metrics = self.state.metrics
        if series is None:
            series = (
                metrics.requests.labels(route, exchange.method, str(status)),
                metrics.duration.labels(route),
            )
            if len(self._request_series) < 10_000:
                self._request_series[key] = series
        series[0].inc()
        series[1].observe(elapsed)
        if exchange.error == "rate_limited":
            metrics.rate_limited.labels(route).inc()
        if exchange.error in _SHED and exchange.upstream:
            metrics.upstream_requests.labels(exchange.upstream, _SHED[exchange.error]).inc()
        self.state.status.record(exchange, route, status, elapsed)
        access_log = self.state.access_log
        if access_log is not None and (runtime is None or runtime.access_log):
            client = scope.get("client")
            access_log.write(
                {
                    "time": access_log.now(),
                    "request_id": exchange.request_id,
                    "client": client[0] if client else None,
                    "method": exchange.method,
                    "path": exchange.path,
                    "route": exchange.route,
                    "upstream": exchange.upstream,
                    "target": exchange.target,
                    "status": status,
                    "bytes_out": exchange.bytes_out,
                    "duration_ms": round(elapsed * 1000, 3),
                    "error": exchange.error,
                }
            )

    async def _fail(self, send: Send, error: GatewayError, exchange: Exchange) -> None:
        exchange.error = error.code
        if isinstance(error, ClientClosedRequest):
            exchange.status = exchange.status or error.status
            return  # nobody is listening
        if exchange.response_started:
            return  # too late for an error document: ending early aborts the connection
        if error.route is None:
            error.route = exchange.route
        if error.upstream is None and error.code.startswith("upstream"):
            error.upstream = exchange.upstream
        exchange.status = error.status
        exchange.detail = error.detail
        exchange.response_started = True
        exchange.bytes_out = await send_problem(
            send, error, exchange.request_id, exchange.extra_headers
        )

    async def _proxy(
        self,
        route: ProxyRoute,
        path: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        incoming: IncomingHeaders,
        exchange: Exchange,
    ) -> None:
        length = incoming.content_length
        if length is not None and length > route.max_body_size:
            raise BodyTooLarge(
                f"Content-Length {length} exceeds max_body_size ({route.max_body_size} bytes)"
            )
        deadline = _deadline(route.timeout, incoming)
        add_forwarded(incoming, scope, route.trusted_proxies)
        reader = BodyReader(receive, route.max_body_size, self.body_timeout)
        request = GatewayRequest(
            method=scope["method"],
            path=path,
            query=scope.get("query_string", b""),
            headers=incoming.upstream,
            deadline=deadline,
            request_id=incoming.request_id,
            route=route.name,
            host=incoming.host if route.preserve_host else None,
        )
        if (length or 0) > 0 or incoming.chunked:
            if length is not None and length <= REPLAY_LIMIT:
                try:
                    with Expiry(max(deadline.remaining(), 0)):
                        request.body = await reader.read_all()
                except TimeoutError:
                    raise RequestTimeout(
                        "the request body did not arrive within the deadline",
                        headers=[(b"connection", b"close")],
                    ) from None
            else:
                request.stream = reader.stream()
                request.source = reader
        else:
            reader.done = True

        response: GatewayResponse | None = None
        async with _CancelOnDisconnect(reader, exchange):
            try:
                try:
                    response = await route.handler(request)
                except GatewayError:
                    if reader.error is not None:
                        raise reader.error from None
                    raise
                exchange.target = response.target
                exchange.status = response.status
                exchange.response_started = True
                await self._stream(send, response, reader, exchange)
            finally:
                if response is not None:
                    await response.close()

    async def _stream(
        self, send: Send, response: GatewayResponse, reader: BodyReader, exchange: Exchange
    ) -> None:
        rid = exchange.request_id.encode("ascii")
        try:
            exchange.bytes_out = await send_response(
                send, response, rid, reader, exchange.extra_headers
            )
        except GatewayError as exc:
            # The upstream failed mid-body: the status line is gone, so the only honest
            # signal left is to end the connection without completing the response.
            exchange.error = exc.code
            log.warning(
                "upstream body failed after the response started: %s",
                exc.detail,
                extra={"request_id": exchange.request_id, "route": exchange.route},
            )

    async def _aggregate(
        self,
        route: AggregateRoute,
        params: dict[str, str],
        scope: Scope,
        receive: Receive,
        send: Send,
        incoming: IncomingHeaders,
        exchange: Exchange,
    ) -> None:
        deadline = _deadline(route.timeout, incoming)
        add_forwarded(incoming, scope, route.trusted_proxies)
        reader = BodyReader(receive, route.max_body_size)
        reader.done = True  # backends are called with GET; a request body is not forwarded
        async with _CancelOnDisconnect(reader, exchange):
            status, headers, body = await route.run(
                params, incoming.upstream, deadline, incoming.request_id
            )
        if exchange.error == "client_disconnected":
            return
        headers.append((b"x-request-id", incoming.request_id.encode("ascii")))
        headers.append((b"date", http_date()))
        if exchange.extra_headers:
            headers.extend(exchange.extra_headers)
        exchange.status = status
        exchange.response_started = True
        exchange.bytes_out = len(body)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _CancelOnDisconnect:
    """While the body runs, a watcher cancels this task if the client goes away; the
    resulting CancelledError is swallowed here so the request simply ends (the upstream
    request it cancelled has released its connection on the way out).

    The watcher task starts only once the exchange has lasted `WATCH_AFTER` seconds:
    most requests finish sooner, and a timer is far cheaper than a task per request."""

    WATCH_AFTER = 0.1

    __slots__ = ("_exchange", "_reader", "_task", "_timer", "_watcher")

    def __init__(self, reader: BodyReader, exchange: Exchange) -> None:
        self._reader = reader
        self._exchange = exchange
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        self._task = task
        self._timer = loop.call_later(self.WATCH_AFTER, self._watch)

    def _watch(self) -> None:
        self._watcher = asyncio.create_task(self._reader.watch_disconnect(self._task))

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        self._timer.cancel()
        watcher = self._watcher
        if watcher is None:
            return False
        watcher.cancel()
        if (
            exc_type is asyncio.CancelledError
            and watcher.done()
            and not watcher.cancelled()
            and self._task.cancelling()
        ):
            self._task.uncancel()
            self._exchange.error = "client_disconnected"
            return True
        return False


def _deadline(route_timeout: float, incoming: IncomingHeaders) -> Deadline:
    """The route's deadline, which an incoming X-Request-Timeout-Ms can only shorten."""
    if incoming.timeout_ms is not None:
        return Deadline.after(min(route_timeout, incoming.timeout_ms / 1000))
    return Deadline.after(route_timeout)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
