"""A compiled route: everything the request path needs of it, precomputed by the
factory (`gateway/build/factory.py`). Proxy and aggregate routes are the same record:
what differs is the handler (an upstream's policy chain, or the fan-out)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.dataplane.cache import RouteCache
from gateway.dataplane.compression import CompressionRules
from gateway.dataplane.idempotency import RouteIdempotency
from gateway.dataplane.routing import CompiledTemplate
from gateway.dataplane.transforms import HeaderTransform
from gateway.edge import RequestFilter
from gateway.types import Handler, IPNetwork

__all__ = ["Route"]


@dataclass(frozen=True, slots=True)
class Route:
    """One route of the table. `upstream` is None for an aggregate route, whose
    backends each name their own; such a route reads no request body (its backends
    are called with GET) and cannot be upgraded to a WebSocket."""

    name: str
    upstream: str | None
    handler: Handler
    rewrite: CompiledTemplate | None  # the upstream path template, if the route rewrites
    timeout: float  # seconds: the route deadline, which X-Request-Timeout-Ms can shorten
    preserve_host: bool  # send the client's Host upstream instead of the target's
    max_body_size: int  # bytes of request body accepted
    trusted_proxies: tuple[IPNetwork, ...]  # peers whose X-Forwarded-* are believed
    filters: tuple[RequestFilter, ...] = ()  # the request-filter phase, in order
    reads_body: bool = True  # False: the body is never read nor forwarded (aggregate)
    path: str = ""  # the path template it matches (`/users/{id}`): tracing's http.route
    # how answers are compressed; None: never (no `compression` block, or the route opts out)
    compression: CompressionRules | None = None
    grpc_web: bool = False  # translate gRPC-Web calls to gRPC (`dataplane/grpcweb.py`)
    # the response cache of a route with `cache:`; None: never consulted (`dataplane/cache.py`)
    cache: RouteCache | None = None
    # Idempotency-Key handling of a route with `idempotency:` (`dataplane/idempotency.py`)
    idempotency: RouteIdempotency | None = None
    # `headers.request` (proxied routes and WebSocket handshakes; an aggregate route's
    # backends carry their own) and `headers.response`; None: no transform, no cost
    request_transform: HeaderTransform | None = None
    response_transform: HeaderTransform | None = None
