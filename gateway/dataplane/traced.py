"""The data plane with tracing on (docs/tracing.md).

`TracedDataPlane` is a `DataPlane` that starts a trace for every request and WebSocket
session before serving it the usual way: the parent is read from the headers, the trace
headers the client sent are taken out of what goes upstream (each try sends its own,
`gateway/tracing/spans.py`'s `client_spans`), and the request's `RequestTrace` goes on
its `Exchange` (for the logging phase) and its `GatewayRequest` (for every try); a
WebSocket session's is put in `CURRENT` for the task serving it.
`TracedLoggingPhase` ends a sampled request's SERVER span once the logging phase has
recorded the request. The server makes these only when the `tracing` block is set:
with tracing off the request path is the untraced one.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.dataplane.app import DataPlane
from gateway.dataplane.headers import DROP_UP, parse_incoming
from gateway.dataplane.logphase import LoggingPhase
from gateway.dataplane.routes import Route
from gateway.dataplane.routing import Router
from gateway.dataplane.state import Exchange, GatewayState, TraceIds
from gateway.dataplane.view import RuntimeView
from gateway.edge.client_ip import real_client_ip
from gateway.tracing.propagation import HEADER_NAME, NO_TRACE_HEADER_IN, TRACE_HEADERS
from gateway.tracing.spans import CURRENT, RequestTrace, Tracer
from gateway.types import Receive, Scope, Send

__all__ = ["ServerFacts", "TracedDataPlane", "TracedLoggingPhase"]

_HTTP_SCHEME = {"ws": "http", "wss": "https"}  # a WebSocket's upgrade is an HTTP request


class TracedDataPlane(DataPlane):
    """A `DataPlane` whose requests are traced by `tracer`."""

    def __init__(
        self,
        state: GatewayState[RuntimeView],
        tracer: Tracer,
        *,
        body_timeout: float | None = None,
    ) -> None:
        super().__init__(state, body_timeout=body_timeout)
        self.tracer = tracer
        self.phase = TracedLoggingPhase(state)
        self._drop = DROP_UP | TRACE_HEADERS  # what `parse_incoming` never forwards

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # In place of `DataPlane.__call__`, not around it: no coroutine more per request.
        kind = scope["type"]
        if kind == "http":
            raw = scope["headers"]
            tracer = self.tracer
            # `Tracer.begin` less its tuple: this runs for every request. The client's
            # trace headers are never forwarded as they came, or the upstream's spans
            # would hang off the caller's instead of the gateway's: they are dropped
            # with the hop-by-hop ones.
            if NO_TRACE_HEADER_IN(map(HEADER_NAME, raw)):
                trace = tracer.root()
                # A request the gateway starts a trace for is known by its trace id: its
                # X-Request-ID when the client sent none (one random id drawn, not two).
                incoming = parse_incoming(raw, self._drop, trace.trace_id)
            else:
                trace = tracer.continued(raw)
                incoming = parse_incoming(raw, self._drop)
            if trace.sampled:
                trace.server = ServerFacts.of(scope)
            # The trace goes with the request's `Exchange` and `GatewayRequest`, which
            # every try gets (`client_spans`): no context variable to set.
            await self._http(scope, receive, send, incoming, trace)
        elif kind == "websocket":
            raw = scope["headers"]
            trace, found = self.tracer.begin(raw)
            if found:
                scope = {**scope, "headers": [h for h in raw if h[0] not in TRACE_HEADERS]}
            if trace.sampled:
                trace.server = ServerFacts.of(scope)
            # For the handshake's span (`handshake_span`). Never reset: each session is
            # served by a task of its own, in a context of its own, so the value ends
            # with the task; a reset would only cost.
            CURRENT.set(trace)
            await self._websocket(scope, receive, send, trace)
        else:
            await super().__call__(scope, receive, send)

    def __repr__(self) -> str:
        return f"TracedDataPlane({self.tracer!r})"


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs more
class ServerFacts:
    """What a sampled request's SERVER span needs of its scope, noted at the start."""

    scheme: str
    host: str | None
    forwarded_for: bytes | None
    user_agent: str | None

    @classmethod
    def of(cls, scope: Scope) -> ServerFacts:
        host = forwarded_for = user_agent = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"x-forwarded-for":
                forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
            elif name == b"user-agent":
                user_agent = value.decode("latin-1")
        scheme: str = scope.get("scheme") or "http"
        return cls(_HTTP_SCHEME.get(scheme, scheme), host, forwarded_for, user_agent)


class TracedLoggingPhase(LoggingPhase):
    """The logging phase, then the end of the request's SERVER span (sampled requests):
    named `{method} {route name}` (the method alone when no route took it), with the
    stable HTTP semantic-convention attributes; a gateway error sets the span's status
    and its code as `error.type`, as does a 5xx answer (its status as `error.type`)."""

    __slots__ = ("_router", "_routes")

    def __init__(self, state: GatewayState[RuntimeView]) -> None:
        super().__init__(state)
        self._router: Router[Route] | None = None
        self._routes: dict[str, Route] = {}

    def end_span(
        self,
        exchange: Exchange,
        client: tuple[str, int] | None,
        runtime: RuntimeView | None,
        trace: TraceIds,
    ) -> None:
        if not isinstance(trace, RequestTrace):  # a refusal's NO_TRACE is never sampled
            return
        route = self._route(runtime, exchange.route)
        method = exchange.method
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "url.path": exchange.path,
            "network.protocol.version": exchange.protocol.removeprefix("HTTP/"),
            "gateway.request_id": exchange.request_id,
        }
        facts = trace.server
        if isinstance(facts, ServerFacts):
            attributes["url.scheme"] = facts.scheme
            if facts.host:
                address, _, port = facts.host.rpartition(":")
                if address and port.isdigit():
                    attributes["server.address"] = address.strip("[]")
                    attributes["server.port"] = int(port)
                else:
                    attributes["server.address"] = facts.host.strip("[]")
            if facts.user_agent:
                attributes["user_agent.original"] = facts.user_agent
        if client:
            peer = client[0]
            attributes["network.peer.address"] = peer
            trusted = route.trusted_proxies if route is not None else ()
            forwarded = facts.forwarded_for if isinstance(facts, ServerFacts) else None
            attributes["client.address"] = real_client_ip(peer, forwarded, trusted)
        name = method
        if route is not None:
            name = f"{method} {route.name}"
            attributes["http.route"] = route.path
            if route.upstream is not None:
                attributes["gateway.upstream"] = route.upstream
        status = exchange.status
        if status:
            attributes["http.response.status_code"] = status
        error: str | None = None
        if exchange.error is not None:
            attributes["error.type"] = exchange.error
            error = exchange.detail or exchange.error
        elif status >= 500:
            attributes["error.type"] = str(status)
            error = f"the upstream answered {status}"
        trace.end(name, attributes, error)

    def _route(self, runtime: RuntimeView | None, name: str | None) -> Route | None:
        """The route named `name` in `runtime` (the one the request started on)."""
        if runtime is None or name is None:
            return None
        router = runtime.router
        if router is not self._router:
            self._routes = {route.name: route for route in router}
            self._router = router
        return self._routes.get(name)
