"""The data plane: one pure ASGI callable, built once, that proxies every request.

A request's life, in Pingora's phases: match the route, build the upstream request
(headers, body, deadline), run the route's handler chain, stream the response back,
and in every case end in one place that records what happened (`logphase.py`). Gateway
errors become problem+json in one renderer (`errors.problem_response`); nothing else
ever reaches the client.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from gateway.dataplane.bodies import REPLAY_LIMIT, BodyReader, send_problem, send_response
from gateway.dataplane.compression import CompressionRules, accept_encoding
from gateway.dataplane.grpc import RESET, grpc_status_of, send_grpc_error
from gateway.dataplane.grpcweb import grpc_web
from gateway.dataplane.headers import IncomingHeaders, add_forwarded, http_date, parse_incoming
from gateway.dataplane.idempotency import KEYED_METHODS
from gateway.dataplane.logphase import LoggingPhase
from gateway.dataplane.phases import deadline_for, enrich, request_filter
from gateway.dataplane.routes import Route
from gateway.dataplane.routing import normalize_path
from gateway.dataplane.state import Exchange, GatewayState, TraceIds
from gateway.dataplane.view import RuntimeView
from gateway.dataplane.websocket import proxy_websocket
from gateway.errors import (
    BadRequest,
    BodyTooLarge,
    ClientClosedRequest,
    GatewayError,
    InternalError,
    RequestTimeout,
    ShuttingDown,
)
from gateway.policies.expiry import Expiry
from gateway.types import GatewayRequest, GatewayResponse, Receive, Scope, Send

__all__ = ["DataPlane"]

log = logging.getLogger("gateway.app")

# A host (reg-name, IPv4 or bracketed IPv6) with an optional port: RFC 3986's shape.
_SANE_HOST = re.compile(r"^(?:[A-Za-z0-9._~!$&'()*+,;=%-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")


class DataPlane:
    """The ASGI callable of the data listener: `http` and `websocket` scopes, one
    request path for proxy and aggregate routes alike, one logging phase."""

    def __init__(
        self, state: GatewayState[RuntimeView], *, body_timeout: float | None = None
    ) -> None:
        self.state = state
        self.body_timeout = body_timeout  # the longest pause between request body chunks
        self.phase = LoggingPhase(state)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send, parse_incoming(scope["headers"]))
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)

    async def _websocket(
        self, scope: Scope, receive: Receive, send: Send, trace: TraceIds | None = None
    ) -> None:
        exchange = Exchange(time.monotonic(), "GET", scope["path"], "", trace)
        extensions = scope.get("extensions")
        if extensions is not None and "tls" in extensions:
            exchange.tls = extensions["tls"].get("version")
        runtime = self.state.runtime
        try:
            await proxy_websocket(self.state, scope, receive, send, exchange)
        finally:
            self.phase.finish(exchange, scope.get("client"), runtime)

    async def _http(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        incoming: IncomingHeaders,
        trace: TraceIds | None = None,
    ) -> None:
        """One HTTP request, its headers read (`incoming`); `trace`: its trace, with
        tracing on (`traced.py`), for the logging phase."""
        runtime = self.state.runtime
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else scope["path"]
        exchange = Exchange(time.monotonic(), scope["method"], path, incoming.request_id, trace)
        if incoming.grpc:
            exchange.grpc = True  # its errors, from here on, are gRPC answers
        if runtime is not None:
            runtime.active += 1
        try:
            await self._serve(runtime, path, scope, receive, send, incoming, exchange)
        finally:
            if runtime is not None:
                runtime.leave()
            self.phase.finish(exchange, scope.get("client"), runtime)

    async def _serve(
        self,
        runtime: RuntimeView | None,
        path: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        incoming: IncomingHeaders,
        exchange: Exchange,
    ) -> None:
        compression: CompressionRules | None = None  # the route's, for its problem answers
        try:
            if self.state.draining or runtime is None:
                raise ShuttingDown("the gateway is draining; retry on another instance")
            if incoming.framing_error is not None:
                # Never forwarded: the body's framing (or the Host) is ambiguous, so the
                # connection cannot be trusted for another request either.
                raise BadRequest(incoming.framing_error, headers=[(b"connection", b"close")])
            version = scope.get("http_version")
            if version != "1.1":
                if version == "2":
                    exchange.protocol = "HTTP/2"
                elif version == "1.0":
                    exchange.protocol = "HTTP/1.0"
                else:
                    raise BadRequest(
                        f"HTTP/{version} is not served", headers=[(b"connection", b"close")]
                    )
            extensions = scope.get("extensions")
            if extensions is not None and "tls" in extensions:  # the ASGI tls extension
                exchange.tls = extensions["tls"].get("version")
            if version != "1.0" and not _SANE_HOST.match(incoming.host):
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
            compression = route.compression
            if route.response_transform is not None:  # every answer from here on
                send = route.response_transform.wrap_send(
                    send, scope, incoming, route.trusted_proxies, exchange
                )
            if route.grpc_web and incoming.grpc:
                web = grpc_web(scope, receive, send, incoming)
                if web is not None:  # a gRPC-Web call: served as gRPC from here on
                    scope, receive, send = web.scope, web.receive, web.send
            if route.filters and await self._filter(route, scope, send, incoming, exchange):
                return
            if route.rewrite is not None:
                path = route.rewrite.fill(match.params)
            await self._proxy(route, path, match.params, scope, receive, send, incoming, exchange)
        except GatewayError as exc:
            await self._fail(send, exc, exchange, compression, incoming)
        except Exception as exc:  # a bug: log it whole, tell the client nothing about it
            log.exception("unexpected error serving %s %s", exchange.method, exchange.path)
            error = InternalError("unexpected gateway error")
            await self._fail(send, error, exchange, compression, incoming)
            del exc

    async def _filter(
        self,
        route: Route,
        scope: Scope,
        send: Send,
        incoming: IncomingHeaders,
        exchange: Exchange,
    ) -> bool:
        """The request-filter phase. True when a filter answered the request itself."""
        early = await request_filter(route, scope, scope["method"], incoming, exchange)
        if early is None:
            return False
        headers = [
            *early.headers,
            *(exchange.extra_headers or ()),
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

    async def _fail(
        self,
        send: Send,
        error: GatewayError,
        exchange: Exchange,
        compression: CompressionRules | None = None,
        incoming: IncomingHeaders | None = None,
    ) -> None:
        exchange.error = error.code
        if isinstance(error, ClientClosedRequest):
            exchange.status = exchange.status or error.status
            return  # nobody is listening
        if exchange.response_started:
            return  # too late for an error document: ending early aborts the connection
        enrich(error, exchange)
        exchange.response_started = True
        if exchange.grpc:
            exchange.status = 200  # what went on the wire; the error is in grpc_status
            exchange.grpc_status = await send_grpc_error(
                send, error, exchange.request_id, exchange.extra_headers
            )
            return
        accept = None
        if compression is not None and incoming is not None:
            accept = accept_encoding(incoming.upstream)
        exchange.bytes_out = await send_problem(
            send, error, exchange.request_id, exchange.extra_headers, compression, accept
        )

    async def _proxy(
        self,
        route: Route,
        path: str,
        params: dict[str, str],
        scope: Scope,
        receive: Receive,
        send: Send,
        incoming: IncomingHeaders,
        exchange: Exchange,
    ) -> None:
        length = incoming.content_length
        reads_body = route.reads_body
        if length is not None and length > route.max_body_size and reads_body:
            raise BodyTooLarge(
                f"Content-Length {length} exceeds max_body_size ({route.max_body_size} bytes)"
            )
        deadline = deadline_for(route.timeout, incoming)
        add_forwarded(incoming, scope, route.trusted_proxies)
        if route.request_transform is not None:
            route.request_transform.apply_upstream(incoming, scope, route.trusted_proxies)
        reader = BodyReader(receive, route.max_body_size, self.body_timeout)
        request = GatewayRequest(  # by position: cheaper than by keyword, per request
            scope["method"],
            path,
            scope.get("query_string", b""),
            incoming.upstream,
            deadline,
            incoming.request_id,
            route.name,
            exchange.trace,
            host=incoming.host if route.preserve_host else None,
            params=params,
        )
        if incoming.grpc:
            request.grpc = True
            incoming.upstream.append((b"te", b"trailers"))  # gRPC servers insist on it
        if reads_body and ((length or 0) > 0 or incoming.chunked):
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
                    if route.idempotency is not None and request.method in KEYED_METHODS:
                        # POST and PATCH, which the cache never stores (off: one check)
                        response = await route.idempotency.fetch(
                            request, scope, incoming.forwarded_for, exchange, route.handler
                        )
                    elif route.cache is None:  # off: this one check per request
                        response = await route.handler(request)
                    else:  # the key is the target as the client sent it
                        target = exchange.path + _query(request.query)
                        response = await route.cache.fetch(request, target, route.handler)
                except GatewayError:
                    if reader.error is not None:
                        raise reader.error from None
                    if request.fallback is not None:
                        exchange.upstream, exchange.fallback = request.fallback, True
                    if request.hedges:
                        exchange.hedges = request.hedges
                    raise
                if request.fallback is not None:  # routes without one: this one check
                    exchange.upstream, exchange.fallback = request.fallback, True
                if request.hedges:  # and this one
                    exchange.hedges, exchange.hedge_won = request.hedges, request.hedge_won
                exchange.target = response.target
                exchange.status = response.status
                exchange.response_started = True
                if route.compression is not None:  # off: this one check per request
                    head = scope["method"] == "HEAD"
                    route.compression.apply(response, accept_encoding(incoming.upstream), head)
                await self._stream(send, response, reader, exchange, scope)
            finally:
                if response is not None:
                    await response.close()

    async def _stream(
        self,
        send: Send,
        response: GatewayResponse,
        reader: BodyReader,
        exchange: Exchange,
        scope: Scope,
    ) -> None:
        rid = exchange.request_id.encode("ascii")
        try:
            exchange.bytes_out = await send_response(
                send, response, rid, reader, exchange.extra_headers, scope
            )
            if exchange.grpc:
                exchange.grpc_status = grpc_status_of(response)
        except GatewayError as exc:
            # The upstream failed mid-body: the status line is gone, so the only honest
            # signal left is to end the connection without completing the response.
            # Over HTTP/2, only the stream is reset: with the upstream's own code when it
            # reset its stream (the `gateway.http.reset` extension of server/h2.py).
            exchange.error = exc.code
            code = response.reset_code() if response.reset_code is not None else None
            extensions = scope.get("extensions")
            if code is not None and extensions is not None and RESET in extensions:
                await send({"type": RESET, "code": code})
            log.warning(
                "upstream body failed after the response started: %s",
                exc.detail,
                extra={"request_id": exchange.request_id, "route": exchange.route},
            )


def _query(query: bytes) -> str:
    return "?" + query.decode("latin-1") if query else ""


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


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
