"""WebSocket proxying: an upgrade on a route becomes a second WebSocket to the upstream
(the `websockets` package as client), and messages are relayed both ways until either
side closes. Caddy keeps this in `streaming.go`; here it is one module with three phases:

1. handshake: route, the request-filter phase (auth, rate limits), the deadline (the
   route's, shortened by X-Request-Timeout-Ms), bulkhead slot, circuit breaker, then
   the upstream's opening handshake. Only when the upstream said 101 is the client accepted,
   with the subprotocol the upstream chose. Any refusal before that is an HTTP answer to
   the client (the ASGI `websocket.http.response` extension): the gateway's own errors as
   problem+json, the upstream's own 3xx/4xx/5xx as they came.
2. relay: one task per direction; text stays text, binary stays binary. Each side's
   keepalive pings are the library's business (uvicorn's towards the client, the
   `websockets` client's towards the upstream); pings are answered hop by hop.
3. close: relayed, not answered. Whichever side closed first, its code and reason are
   passed to the other, and the other's answer comes back as the answer to it, both
   mapped only where RFC 6455 forbids sending them (`client_close`, `upstream_close`).
   A close frame without a code stays one on the other hop: 1005 (`EMPTY_CLOSE`), which
   never goes on the wire, stands for it on the way, in both hops' `close`.
   Neither hop answers a close frame by itself (`answer_close_later`: the server side's
   protocol in `server/protocol.py`, `_UpstreamConnection` here). The bulkhead slot and
   the target's in-flight count are held until both ends are shut.

The phases it shares with plain requests (`phases.py`: filters, deadline, error
enrichment) and the logging phase that ends it are the data plane's own; only the
handshake and relay are WebSocket's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.messages import Assembler
from websockets.client import ClientProtocol
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
    ProtocolError,
)
from websockets.frames import EXTERNAL_CLOSE_CODES, Close, CloseCode, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import Event, Protocol, Side, State
from websockets.server import ServerProtocol
from websockets.typing import Data, Subprotocol

from gateway.dataplane.headers import (
    IncomingHeaders,
    add_forwarded,
    parse_incoming,
    response_headers,
)
from gateway.dataplane.phases import deadline_for, enrich, request_filter
from gateway.dataplane.routes import Route
from gateway.dataplane.routing import normalize_path
from gateway.dataplane.state import Exchange, GatewayState
from gateway.dataplane.view import RuntimeView, UpgradeUpstream
from gateway.errors import (
    BadRequest,
    GatewayError,
    InternalError,
    ShuttingDown,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnhealthy,
    problem_response,
)
from gateway.policies.breaker import FAILURE_OUTCOMES, CircuitBreaker, Ticket
from gateway.tracing.spans import handshake_span
from gateway.types import Deadline, Headers, Message, Receive, Scope, Send
from gateway.upstream.target import Target

__all__ = [
    "CLOSE_TIMEOUT",
    "EMPTY_CLOSE",
    "KEEPALIVE_INTERVAL",
    "MAX_MESSAGE_SIZE",
    "UpstreamRejected",
    "answer_close_later",
    "client_close",
    "map_websocket_errors",
    "proxy_websocket",
    "upstream_close",
]

log = logging.getLogger("gateway.websocket")

# The largest message accepted from the upstream: uvicorn's default `ws_max_size` on the
# client side, so one limit holds in both directions. A bigger message fails its side
# with 1009 (message too big).
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
# Keepalive pings to the upstream (and how long a pong may take): the same as uvicorn's
# towards the client, so a dead peer on either side is noticed within ~40 s.
KEEPALIVE_INTERVAL = 20.0
# How long a closing handshake with the upstream may take before the TCP connection
# is simply dropped.
CLOSE_TIMEOUT = 5.0

_HTTP_RESPONSE_EXTENSION = "websocket.http.response"
# Request headers the `websockets` client writes itself; the client's own values
# belong to the client's hop (its key, version, extensions) or are sent re-negotiated.
_HANDSHAKE_HEADERS = (b"sec-websocket-",)
# Upstream 101 headers the gateway's server side writes itself.
_ACCEPT_DROP = frozenset(
    {
        b"connection",
        b"upgrade",
        b"date",
        b"server",
        b"content-length",
        b"transfer-encoding",
        b"x-request-id",
    }
)
# "Send a close frame without a code": 1005 (No Status Received), which RFC 6455 never
# lets go on the wire, is how the relay asks either hop for an empty close frame (the
# ASGI `websocket.close` needs some code). `_UpstreamConnection.close` and the server
# side's protocol (`server/protocol.py`) turn it into one.
EMPTY_CLOSE = (int(CloseCode.NO_STATUS_RCVD), "")
_GOING_AWAY = (int(CloseCode.GOING_AWAY), "")
_ABNORMAL = (int(CloseCode.BAD_GATEWAY), "upstream closed the connection abnormally")


class UpstreamRejected(Exception):
    """The upstream answered the upgrade with its own HTTP error (or redirect); the
    client gets that answer as it came, as it would for a plain request."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"upstream answered {response.status_code}")
        self.response = response


def _sendable(code: int) -> bool:
    return code in EXTERNAL_CLOSE_CODES or 3000 <= code < 5000


def client_close(code: int, reason: str) -> tuple[int, str]:
    """The close the upstream gets for the client's `websocket.disconnect`. 1005 is a
    close frame without a code (the server side reports it so only when such a frame
    arrived) and stays one (`EMPTY_CLOSE`); 1006 (no close frame at all: the client
    dropped the connection, or never answered) and any other code that may not be sent
    become 1001 Going Away."""
    if code == CloseCode.NO_STATUS_RCVD:
        return EMPTY_CLOSE
    if _sendable(code):
        return code, reason
    return _GOING_AWAY


def upstream_close(received: Close | None) -> tuple[int, str]:
    """The close the client gets when the upstream ended the connection. A close frame
    without a code stays one (`EMPTY_CLOSE`); no close frame at all (the connection
    dropped, a keepalive timeout) is 1014 Bad Gateway."""
    if received is None:
        return _ABNORMAL
    if received.code == CloseCode.NO_STATUS_RCVD:
        return EMPTY_CLOSE
    if _sendable(received.code):
        return received.code, received.reason
    return _ABNORMAL


class _AnswerLater(Protocol):
    """websockets' sans-I/O protocol (either side) that leaves the peer's close frame for
    the relay to answer.

    websockets answers a close frame the moment it parses it, echoing its code
    (`Protocol.recv_frame`). A relay must answer with the other side's answer instead,
    which arrives later. Here a valid close frame is only recorded (`close_rcvd`; the
    state stays OPEN) and reported as an event, and the next `send_close` is its answer,
    with the code and reason given. Everything else is websockets' own: a close frame
    with a code RFC 6455 forbids or a reason that is not UTF-8 still fails the
    connection (1002, 1007) while it is parsed, and once answered, the connection ends
    as after websockets' own answer. Frames that follow the close are discarded until
    it is answered (RFC 6455, 1.4)."""

    def recv_frame(self, frame: Frame) -> None:
        if self.state is not State.OPEN:
            super().recv_frame(frame)
        elif self.close_rcvd is not None:
            pass  # after the peer's close, its answer pending: discarded
        elif frame.opcode is Opcode.CLOSE:
            self.close_rcvd = Close.parse(frame.data)  # raises on a bad code or reason
            if self.current_size is not None:
                raise ProtocolError("incomplete fragmented message")
            self.events.append(frame)
        else:
            super().recv_frame(frame)

    def send_close(self, code: CloseCode | int | None = None, reason: str = "") -> None:
        if self.close_rcvd is None or self.state is not State.OPEN:
            super().send_close(code, reason)
            return
        # The answer to the peer's close: what `recv_frame` would have done, with the
        # relay's code. Without a code (the peer sent none either) the frame is empty.
        if code is None:
            if reason:
                raise ProtocolError("cannot send a reason without a code")
            close, data = Close(CloseCode.NO_STATUS_RCVD, ""), b""
        else:
            close = Close(code, reason)
            data = close.serialize()  # raises on a code that may not be sent
        self.send_frame(Frame(Opcode.CLOSE, data))
        self.close_sent = close
        self.close_rcvd_then_sent = True
        self.state = State.CLOSING
        if self.side is Side.SERVER:
            self.send_eof()  # a server closes the TCP connection once both closes passed
        self.parser = self.discard()
        next(self.parser)


class _AnswerLaterServer(_AnswerLater, ServerProtocol):
    pass


class _AnswerLaterClient(_AnswerLater, ClientProtocol):
    pass


_ANSWER_LATER: dict[type[Protocol], type[Protocol]] = {
    ServerProtocol: _AnswerLaterServer,
    ClientProtocol: _AnswerLaterClient,
}


def answer_close_later(protocol: Protocol) -> None:
    """Make a new websockets protocol object leave the peer's close for the relay to
    answer (`_AnswerLater`). Its class is changed in place: uvicorn and the `websockets`
    client each build theirs deep in their own code. Anything but the two plain classes
    (a library upgrade that changed them) is refused rather than half-handled."""
    if type(protocol) not in _ANSWER_LATER:
        raise TypeError(f"cannot relay closes over {type(protocol).__qualname__}")
    protocol.__class__ = _ANSWER_LATER[type(protocol)]


@contextmanager
def map_websocket_errors(upstream: str, target: str) -> Iterator[None]:
    """Translate the `websockets` client's handshake failures into the gateway's errors
    (the counterpart of `map_httpx_errors`); details never name the target address."""
    try:
        yield
    except InvalidStatus as exc:
        status = exc.response.status_code
        log.debug("upstream refused the upgrade with %d", status, extra={"target": target})
        if status >= 300:
            raise UpstreamRejected(exc.response) from exc
        raise UpstreamUnavailable(
            f"upstream {upstream!r} did not accept the WebSocket upgrade (it answered {status})",
            upstream=upstream,
            outcome="reset",
        ) from exc
    except TimeoutError as exc:  # before OSError: TimeoutError is one
        raise UpstreamTimeout(
            f"upstream {upstream!r} did not complete the WebSocket handshake in time",
            upstream=upstream,
        ) from exc
    except OSError as exc:
        log.debug("upstream connect failed: %s", exc, extra={"target": target})
        raise UpstreamUnavailable(
            f"cannot connect to upstream {upstream!r}", upstream=upstream, outcome="connect_error"
        ) from exc
    except (InvalidHandshake, ConnectionClosed) as exc:
        log.debug("upstream handshake failed: %s", exc, extra={"target": target})
        raise UpstreamUnavailable(
            f"upstream {upstream!r} failed the WebSocket handshake",
            upstream=upstream,
            outcome="reset",
        ) from exc


class _Connect(connect):
    """`connect` that never follows a redirect: a proxy relays the upstream's 3xx to
    the client (as `UpstreamRejected`) rather than chasing it itself."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


class _UpstreamMessages(Assembler):
    """The upstream's messages. Once its close frame arrived (left for the relay to
    answer), `get` returns what came before it, then raises `closed_by` at once instead
    of the EOFError on which `recv` would wait for the TCP connection to end."""

    closed_by: ConnectionClosed | None = None

    async def get(self, decode: bool | None = None) -> Data:  # type: ignore[override]
        try:
            return await super().get(decode)
        except EOFError:
            if self.closed_by is not None:
                raise self.closed_by from None
            raise


class _UpstreamConnection(ClientConnection):
    """The upstream hop, where the upstream's close is answered with the client's answer
    to it, by the relay's `close(code, reason)`: `recv` raises ConnectionClosed when the
    upstream's close frame arrives, and the protocol waits for that `close`. Code 1005
    (`EMPTY_CLOSE`) sends a close frame without a code."""

    def __init__(self, protocol: ClientProtocol, **kwargs: Any) -> None:
        answer_close_later(protocol)
        super().__init__(protocol, **kwargs)

    async def close(
        self, code: CloseCode | int = CloseCode.NORMAL_CLOSURE, reason: str = ""
    ) -> None:
        if code == CloseCode.NO_STATUS_RCVD:
            # `close` hands its code to `send_close`, where None (websockets' own, or
            # `_AnswerLater`'s for an answer) is an empty close frame.
            await super().close(None)  # type: ignore[arg-type]
            return
        await super().close(code, reason)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.recv_messages.__class__ = _UpstreamMessages  # built here by the base class

    def process_event(self, event: Event) -> None:
        super().process_event(event)
        if (
            isinstance(event, Frame)
            and event.opcode is Opcode.CLOSE
            and self.protocol.state is State.OPEN
        ):
            messages = cast(_UpstreamMessages, self.recv_messages)
            messages.closed_by = ConnectionClosed(self.protocol.close_rcvd, None)
            messages.close()


@dataclass(slots=True)
class _Ends:
    """How the relay ended, as the two directions found out."""

    client_close: tuple[int, str] | None = None  # from the client's websocket.disconnect
    client_gone: bool = False  # sending to the client failed: it is not there any more
    upstream_closed: bool = False  # the upstream's close frame came, or its connection ended
    failed: bool = False  # the relay itself broke (a bug)
    bytes_down: int = 0


async def proxy_websocket(
    state: GatewayState[RuntimeView], scope: Scope, receive: Receive, send: Send, exchange: Exchange
) -> None:
    """Serve one `websocket` scope; `exchange` is filled for the logging phase."""
    incoming = parse_incoming(scope["headers"])
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else scope["path"]
    exchange.path = path
    exchange.request_id = incoming.request_id
    if (await receive())["type"] != "websocket.connect":
        return  # the client left before the handshake reached the application
    runtime = state.runtime
    try:
        if state.draining or runtime is None:
            raise ShuttingDown("the gateway is draining; retry on another instance")
        await _serve(runtime, path, scope, receive, send, incoming, exchange)
    except GatewayError as exc:
        await _refuse_with_problem(scope, send, exc, exchange)
    except UpstreamRejected as exc:
        await _relay_rejection(scope, send, exc.response, exchange)
    except Exception:  # a bug: log it whole, tell the client nothing about it
        log.exception("unexpected error serving WebSocket %s", exchange.path)
        if not exchange.response_started:
            error = InternalError("unexpected gateway error")
            await _refuse_with_problem(scope, send, error, exchange)


async def _serve(
    runtime: RuntimeView,
    path: str,
    scope: Scope,
    receive: Receive,
    send: Send,
    incoming: IncomingHeaders,
    exchange: Exchange,
) -> None:
    match = runtime.router.match(incoming.host, "GET", normalize_path(path))
    route = match.route
    exchange.route = route.name
    if route.upstream is None:
        raise BadRequest(f"aggregate route {route.name!r} cannot be upgraded to a WebSocket")
    exchange.upstream = route.upstream
    if route.filters:
        early = await request_filter(route, scope, "GET", incoming, exchange)
        if early is not None:  # answered by a filter instead of upgrading
            headers = [
                *early.headers,
                *(exchange.extra_headers or ()),
                (b"x-request-id", exchange.request_id.encode("ascii")),
            ]
            await _refuse(scope, send, early.status, headers, early.body, exchange)
            return
    if route.rewrite is not None:
        path = route.rewrite.fill(match.params)
    upstream = runtime.upstreams[route.upstream]
    # X-Forwarded-Proto names the HTTP scheme the upgrade came in on (as nginx's $scheme).
    forwarded_scope = {
        "client": scope.get("client"),
        "scheme": "https" if scope.get("scheme") == "wss" else "http",
        "extensions": scope.get("extensions"),  # under TLS: X-Forwarded-Client-Cert
    }
    add_forwarded(incoming, forwarded_scope, route.trusted_proxies)
    if route.request_transform is not None:
        route.request_transform.apply_upstream(incoming, scope, route.trusted_proxies)
    deadline = deadline_for(route.timeout, incoming)
    # The breaker before the bulkhead, as in a plain request's chain: an open circuit
    # refuses at once rather than after queueing for a slot.
    breaker = upstream.breaker
    ticket = breaker.admit(route.name) if breaker is not None else None
    try:
        await upstream.bulkhead.acquire(deadline, route.name)
    except UpstreamError as exc:
        _settle(breaker, ticket, True if exc.outcome in FAILURE_OUTCOMES else None)
        raise
    except BaseException:
        _settle(breaker, ticket, None)
        raise
    try:
        ws, target = await _open(upstream, route, path, scope, incoming, deadline, ticket)
        await _session(ws, target, receive, send, exchange)
    finally:
        upstream.bulkhead.release()


def _upstream_headers(incoming: IncomingHeaders) -> list[tuple[str, str]]:
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in incoming.upstream
        if not name.startswith(_HANDSHAKE_HEADERS)
    ]


async def _open(
    upstream: UpgradeUpstream,
    route: Route,
    path: str,
    scope: Scope,
    incoming: IncomingHeaders,
    deadline: Deadline,
    first: Ticket | None,
) -> tuple[ClientConnection, Target]:
    """The upstream's opening handshake. A target that refuses the TCP connection is
    tried on the next one (up to `retries.attempts` more, as for plain requests), since
    nothing was sent; every other failure is final. Each try passes the upstream's
    circuit breaker, as a plain request's does (the first was admitted by the caller,
    `first`), and counts in it the same way: a refused, reset or timed-out handshake
    and a 5xx answer as failures."""
    tries = upstream.connect_tries
    breaker = upstream.breaker
    tried: set[str] = set()
    headers = _upstream_headers(incoming)
    offered = scope.get("subprotocols") or None
    query = scope.get("query_string", b"")
    error: UpstreamError | None = None
    for attempt in range(tries):
        ticket = first if attempt == 0 else None
        try:
            target = upstream.pick(tried)
        except UpstreamUnhealthy:
            _settle(breaker, ticket, None)  # no target was tried: no verdict
            if error is None:
                raise
            break  # the rest went unhealthy meanwhile: report the connect error
        if target.url in tried:
            break  # every target has had its try (never on the first attempt)
        tried.add(target.url)
        if attempt > 0 and breaker is not None:
            ticket = breaker.admit(route.name)
        started = time.monotonic()
        try:
            with (
                # With tracing on, the handshake's CLIENT span and the headers naming it.
                handshake_span(upstream.name, target.base, path, query, attempt) as traced,
                map_websocket_errors(upstream.name, target.url),
            ):
                remaining = deadline.remaining()
                if remaining <= 0:
                    raise TimeoutError
                ws = await _connector(
                    target,
                    path,
                    query,
                    incoming.host if route.preserve_host else None,
                    headers + traced if traced else headers,
                    offered,
                    remaining,
                )
        except UpstreamRejected as exc:
            status = exc.response.status_code
            upstream.stats.record(_status_class(status), _since(started))
            _settle(breaker, ticket, status >= 500)
            raise
        except UpstreamError as exc:
            upstream.stats.record(exc.outcome, _since(started))
            _settle(breaker, ticket, True if exc.outcome in FAILURE_OUTCOMES else None)
            if exc.outcome != "connect_error" or deadline.expired():
                raise
            error = exc
            continue
        except BaseException:
            _settle(breaker, ticket, None)  # cancelled (the client left, a drain): no verdict
            raise
        upstream.stats.record("1xx", _since(started))
        _settle(breaker, ticket, False)
        return ws, target
    assert error is not None  # the first try either returned or raised or set it
    raise error


def _connector(
    target: Target,
    path: str,
    query: bytes,
    host: str | None,
    headers: list[tuple[str, str]],
    offered: list[str] | None,
    open_timeout: float,
) -> _Connect:
    """The `connect` call for one try. The TCP connection always goes to the target;
    the URI's authority (the Host header) is the client's when the route preserves it."""
    base = urlsplit(target.base)
    secure = base.scheme == "https"
    authority = host or base.netloc
    uri = f"{'wss' if secure else 'ws'}://{authority}{base.path}{path}"
    if query:
        uri += "?" + query.decode("latin-1")
    port = base.port or (443 if secure else 80)
    tls: dict[str, Any] = {"server_hostname": base.hostname} if secure else {}
    try:
        return _Connect(
            uri,
            subprotocols=cast("list[Subprotocol] | None", offered),
            compression=None,  # the client's hop negotiates its own; this one is internal
            additional_headers=headers,
            user_agent_header=None,  # the client's User-Agent is forwarded instead
            proxy=None,  # never through $HTTP_PROXY and friends
            open_timeout=open_timeout,
            ping_interval=KEEPALIVE_INTERVAL,
            ping_timeout=KEEPALIVE_INTERVAL,
            close_timeout=CLOSE_TIMEOUT,
            max_size=MAX_MESSAGE_SIZE,
            create_connection=_UpstreamConnection,
            host=base.hostname,
            port=port,
            **tls,
        )
    except InvalidURI as exc:
        raise BadRequest("the Host header cannot be forwarded to the upstream") from exc


async def _session(
    ws: ClientConnection,
    target: Target,
    receive: Receive,
    send: Send,
    exchange: Exchange,
) -> None:
    """From the upstream's 101 to both ends being shut. The connection counts in its
    target's in-flight figure (what `least_inflight` balances on) while it lives; not in
    the `gateway_upstream_inflight` gauge, which a reload may reset under it."""
    target.inflight += 1
    ends = _Ends()
    try:
        try:
            await send(
                {
                    "type": "websocket.accept",
                    "subprotocol": ws.subprotocol,
                    "headers": _accept_headers(ws, exchange),
                }
            )
        except OSError:  # uvicorn's ClientDisconnected: it left while we were connecting
            ends.client_gone = True
            exchange.error = "client_disconnected"
            return
        exchange.status = 101
        exchange.target = target.url
        exchange.response_started = True
        try:
            await _relay(ws, receive, send, ends)
        except Exception:  # a bug: log it whole, end both sides with 1011
            log.exception("unexpected error relaying WebSocket %s", exchange.path)
            exchange.error = "internal_error"
            ends.failed = True
    finally:
        exchange.bytes_out = ends.bytes_down
        try:
            await _shut(ws, receive, send, ends, exchange)
        finally:
            target.inflight -= 1


def _accept_headers(ws: ClientConnection, exchange: Exchange) -> Headers:
    """The upstream's 101 headers (cookies, its own fields), minus what the gateway's
    server side writes itself, plus the request ID and the filters' headers."""
    headers: Headers = [(b"x-request-id", exchange.request_id.encode("ascii"))]
    if ws.response is not None:
        for name, value in ws.response.headers.raw_items():
            key = name.lower().encode("latin-1")
            if key not in _ACCEPT_DROP and not key.startswith(_HANDSHAKE_HEADERS):
                headers.append((key, value.encode("latin-1")))
    if exchange.extra_headers:
        headers.extend(exchange.extra_headers)
    return headers


async def _relay(ws: ClientConnection, receive: Receive, send: Send, ends: _Ends) -> None:
    """Pump both directions until one of them ends, then stop the other."""
    pumps = (
        asyncio.create_task(_client_to_upstream(ws, receive, ends)),
        asyncio.create_task(_upstream_to_client(ws, send, ends)),
    )
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        outcomes = await asyncio.gather(*pumps, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome


async def _client_to_upstream(ws: ClientConnection, receive: Receive, ends: _Ends) -> None:
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.receive":
            text = message.get("text")
            try:
                await ws.send(text if text is not None else message.get("bytes") or b"")
            except ConnectionClosed:
                return  # the other pump reports how the upstream closed
        elif kind == "websocket.disconnect":
            ends.client_close = (message.get("code", 1005), message.get("reason") or "")
            return


async def _upstream_to_client(ws: ClientConnection, send: Send, ends: _Ends) -> None:
    while True:
        try:
            data = await ws.recv()
        except ConnectionClosed:
            ends.upstream_closed = True
            return
        out: Message
        if isinstance(data, str):
            out = {"type": "websocket.send", "text": data}
        else:
            out = {"type": "websocket.send", "bytes": data}
        try:
            await send(out)
        except OSError:  # uvicorn's ClientDisconnected
            ends.client_gone = True
            return
        ends.bytes_down += len(data)  # payload length (characters, for text)


async def _shut(
    ws: ClientConnection, receive: Receive, send: Send, ends: _Ends, exchange: Exchange
) -> None:
    """The closing handshake, relayed: the first close goes on to the other side, and
    that side's answer comes back as the answer to it. Neither hop has answered by
    itself (`answer_close_later`). Also runs when the task is cancelled (uvicorn giving
    up at the end of a drain): the upstream is then told 1001."""
    try:
        if ends.failed:
            await _close_client(send, (int(CloseCode.INTERNAL_ERROR), ""))
            await ws.close(CloseCode.INTERNAL_ERROR)
        elif ends.client_close is not None:
            # The client closed (or left, or its server side failed it): its close goes
            # upstream, and the upstream's answer (bounded by CLOSE_TIMEOUT) is the
            # client's, or 1014 when none came.
            await ws.close(*client_close(*ends.client_close))
            answer = ws.protocol.close_rcvd
            if answer is None:
                exchange.error = "upstream_unavailable"
            await _close_client(send, upstream_close(answer))
        elif ends.upstream_closed and not ends.client_gone:
            received = ws.protocol.close_rcvd
            if received is None:
                exchange.error = "upstream_unavailable"
            await _close_client(send, upstream_close(received))
            if ws.state is State.OPEN:  # its close awaits the client's answer
                await ws.close(*client_close(*await _client_answer(receive)))
        else:  # the client is gone, or we are being cancelled
            await ws.close(*_GOING_AWAY)  # bounded by CLOSE_TIMEOUT, then aborted
    except BaseException:
        ws.transport.abort()  # cancelled (again) mid-close: drop the connection now
        raise


async def _close_client(send: Send, close: tuple[int, str]) -> None:
    try:
        await send({"type": "websocket.close", "code": close[0], "reason": close[1]})
    except OSError:
        pass  # uvicorn's ClientDisconnected: the client is gone too


async def _client_answer(receive: Receive) -> tuple[int, str]:
    """The client's answer to the close just sent to it, as the server side reports it:
    the `websocket.disconnect` that follows (1005 for an answer without a code, 1006
    when the client just left).
    Messages that still arrive are dropped. Bounded by CLOSE_TIMEOUT, after which the
    client counts as gone (1006)."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return message.get("code", 1005), message.get("reason") or ""
    except TimeoutError:
        return int(CloseCode.ABNORMAL_CLOSURE), ""


async def _refuse(
    scope: Scope, send: Send, status: int, headers: Headers, body: bytes, exchange: Exchange
) -> None:
    """Refuse the handshake with an HTTP answer where the server can send one, else by
    closing before accepting (1008 for a refusal, 1011 for a failure; uvicorn turns
    either into a bare 403)."""
    exchange.status = status
    exchange.response_started = True
    exchange.bytes_out = len(body)
    try:
        if _HTTP_RESPONSE_EXTENSION in (scope.get("extensions") or {}):
            headers = [*headers, (b"content-length", str(len(body)).encode())]
            await send(
                {"type": "websocket.http.response.start", "status": status, "headers": headers}
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            code = CloseCode.POLICY_VIOLATION if status < 500 else CloseCode.INTERNAL_ERROR
            await send({"type": "websocket.close", "code": code})
    except OSError:
        exchange.error = exchange.error or "client_disconnected"


async def _refuse_with_problem(
    scope: Scope, send: Send, error: GatewayError, exchange: Exchange
) -> None:
    exchange.error = error.code
    enrich(error, exchange)
    headers, body = problem_response(
        error, exchange.request_id, exchange.extra_headers, length=False
    )
    await _refuse(scope, send, error.status, headers, body, exchange)


async def _relay_rejection(
    scope: Scope, send: Send, response: Response, exchange: Exchange
) -> None:
    raw = [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, value in response.headers.raw_items()
        if name.lower() != "content-length"
    ]
    headers = response_headers(raw, exchange.request_id.encode("ascii"))
    if exchange.extra_headers:
        headers.extend(exchange.extra_headers)
    await _refuse(scope, send, response.status_code, headers, bytes(response.body), exchange)


def _status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


def _since(started: float) -> float:
    return time.monotonic() - started


def _settle(breaker: CircuitBreaker | None, ticket: Ticket | None, failed: bool | None) -> None:
    if breaker is not None and ticket is not None:
        breaker.record(ticket, failed)
