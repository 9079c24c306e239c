"""The phases every request goes through, plain HTTP and WebSocket alike (Pingora's
names): the request filter (edge policies, which may answer early), the deadline, and
error enrichment before an error is answered. The logging phase that ends them all is
`logphase.py`."""

from __future__ import annotations

from gateway.dataplane.grpc import grpc_timeout
from gateway.dataplane.headers import IncomingHeaders
from gateway.dataplane.routes import Route
from gateway.dataplane.state import Exchange
from gateway.edge import EarlyResponse, EdgeContext, run_filters
from gateway.edge.client_ip import real_client_ip
from gateway.errors import GatewayError
from gateway.types import Deadline, Scope

__all__ = ["deadline_for", "enrich", "request_filter"]


async def request_filter(
    route: Route, scope: Scope, method: str, incoming: IncomingHeaders, exchange: Exchange
) -> EarlyResponse | None:
    """Run the route's edge filters over the headers parsed already. An early answer
    (a CORS preflight) is returned for the caller to send its own way; a refusal
    raises the GatewayError the filter raised. The headers the filters add to the
    eventual answer land on `exchange.extra_headers`."""
    client = scope.get("client")
    peer = client[0] if client else ""
    ctx = EdgeContext(
        scope=scope,
        method=method,
        route=route.name,
        client_ip=real_client_ip(peer, incoming.forwarded_for, route.trusted_proxies),
        request_headers=scope["headers"],
        upstream_headers=incoming.upstream,
    )
    exchange.extra_headers = ctx.response_headers
    early = await run_filters(route.filters, ctx)
    exchange.caller = ctx.caller
    return early


def deadline_for(route_timeout: float, incoming: IncomingHeaders) -> Deadline:
    """The route's deadline, which an incoming X-Request-Timeout-Ms (and a gRPC call's
    grpc-timeout) can only shorten."""
    timeout = route_timeout
    if incoming.timeout_ms is not None:
        timeout = min(timeout, incoming.timeout_ms / 1000)
    if incoming.grpc_timeout is not None:
        client = grpc_timeout(incoming.grpc_timeout)
        if client is not None:
            timeout = min(timeout, client)
    return Deadline.after(timeout)


def enrich(error: GatewayError, exchange: Exchange) -> None:
    """An error about to be answered: name the route (and the upstream, for an upstream
    failure) it happened on, and record what the client is told."""
    if error.route is None:
        error.route = exchange.route
    if error.upstream is None and error.code.startswith("upstream"):
        error.upstream = exchange.upstream
    exchange.status = error.status
    exchange.detail = error.detail
