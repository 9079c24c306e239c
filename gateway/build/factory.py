"""Compile settings into a `Runtime`, once: the route table, every route's handler chain
and edge filters, and one `Upstream` per upstream (lura's `proxy/factory.go`).

This is the only reader of the settings models after the command line: nothing on the
request path reads them. Each policy, filter and upstream is handed plain values.
"""

from __future__ import annotations

import dataclasses

from starlette.routing import PARAM_REGEX

from gateway.build.edge import EdgeResources, build_filters, config_problems, router_methods
from gateway.build.runtime import Runtime
from gateway.build.upstreams import Upstream
from gateway.build.values import plain
from gateway.config.models import (
    CacheSettings,
    CompressionSettings,
    GatewaySettings,
    HeaderOps,
    IdempotencySettings,
    RouteSettings,
    ServerSettings,
)
from gateway.dataplane.aggregate import Aggregation, Backend, BackendTemplate
from gateway.dataplane.cache import REDIS_PREFIX, Cache, RedisStore, RouteCache
from gateway.dataplane.compression import CompressionRules
from gateway.dataplane.idempotency import LEASE_GRACE, Idempotency, RouteIdempotency
from gateway.dataplane.routes import Route
from gateway.dataplane.routing import CompiledTemplate, Router
from gateway.dataplane.transforms import HeaderTransform, refused_name
from gateway.edge import RequestFilter
from gateway.edge import idempotency as idem_store
from gateway.ops.metrics import FallbackStats, HedgeStats, Metrics
from gateway.policies.breaker import breaker
from gateway.policies.bulkhead import bulkhead
from gateway.policies.deadline import deadline
from gateway.policies.fallback import fallback as fallback_to
from gateway.policies.hedge import HedgeRules, hedge
from gateway.policies.retry import RetryRules, retry
from gateway.policies.try_timeout import try_timeout
from gateway.tracing.spans import client_spans
from gateway.types import Handler, Policy

__all__ = [
    "build_aggregate_route",
    "build_cache",
    "build_compression",
    "build_idempotency",
    "build_route_handler",
    "build_runtime",
    "build_transform",
    "identity_headers",
    "unsupported",
]


def build_route_handler(
    route: RouteSettings,
    upstream: Upstream,
    *,
    own_deadline: bool = True,
    traced: bool = False,
    fallback: Upstream | None = None,
    metrics: Metrics | None = None,
) -> Handler:
    """Compose the route's chain around one upstream try, outermost first:
    deadline, fallback, retry, hedge, breaker, bulkhead, try timeout, upstream. Each retry passes
    through the breaker and the bulkhead; the state of both (and the retry budget) lives
    on the `Upstream`, shared by every route that uses it. The try timeout sits inside
    the bulkhead so time spent queueing is not charged to `read_timeout`.

    `own_deadline=False` leaves the deadline timer out, for an aggregate backend: the
    fan-out bounds each call by the route deadline (or the backend's own timeout)
    itself, a second timer on the same instant would only cost.

    `traced=True` (tracing on) adds one CLIENT span per try, between the bulkhead and
    the try timeout: queueing for a slot is not in it, and a try the timeout cuts ends
    it as `upstream_timeout`. Off, the chain is exactly the untraced one.

    `fallback` (the route's `fallback` upstream) adds the fallback policy between the
    deadline and the retry: one try through that upstream's breaker, bulkhead and try
    timeout when this chain cannot answer. Its deadline error then names no upstream:
    the data plane names the one the request was last sent to.

    `hedge` (routes with a `hedge` block and a retry budget above 0%) sits inside retry
    and around the breaker: each hedge is a try of its own, through the breaker, with
    its own bulkhead slot and try timeout (docs/policies.md, "Hedged requests")."""
    settings = upstream.settings
    policies: list[Policy] = []
    if own_deadline:
        policies.append(deadline(upstream.name if fallback is None else None))
    if fallback is not None:
        policies.append(_fallback(route, upstream, fallback, traced, metrics))
    if settings.retries.attempts > 0:
        policies.append(
            retry(
                plain(RetryRules, settings.retries),
                upstream.retry_budget,
                retry_non_idempotent=route.retry_non_idempotent,
                upstream=upstream.name,
            )
        )
    if route.hedge is not None and settings.retries.budget > 0:
        policies.append(
            hedge(
                plain(HedgeRules, route.hedge),
                upstream.retry_budget,
                upstream.latency,
                HedgeStats(metrics or Metrics(), route.name, upstream.name),
                count_requests=settings.retries.attempts == 0,
            )
        )
    policies.extend(_try_policies(route, upstream, traced))
    return _compose(policies, upstream.send)


def _try_policies(route: RouteSettings, upstream: Upstream, traced: bool) -> list[Policy]:
    """What every try to `upstream` passes through: breaker, bulkhead, (the CLIENT
    span), try timeout."""
    settings = upstream.settings
    policies: list[Policy] = []
    if upstream.breaker is not None:
        policies.append(breaker(upstream.breaker))
    policies.append(bulkhead(upstream.bulkhead))
    if traced:
        protocol = "2" if settings.protocol == "http2" else "1.1"
        policies.append(client_spans(upstream.name, protocol))
    if settings.read_timeout < route.timeout:
        # Otherwise it could never fire first: a try never outlives the route deadline,
        # which X-Request-Timeout-Ms can only shorten.
        policies.append(try_timeout(settings.read_timeout, upstream.name))
    return policies


def _compose(policies: list[Policy], handler: Handler) -> Handler:
    for policy in reversed(policies):
        handler = policy(handler)
    return handler


def _fallback(
    route: RouteSettings,
    primary: Upstream,
    to: Upstream,
    traced: bool,
    metrics: Metrics | None,
) -> Policy:
    """The route's fallback policy: one try through `to`, never retried (no retry
    policy, whatever its `retries` say), no deadline of its own."""
    stats = None
    if metrics is not None:
        stats = FallbackStats(metrics, route.name, primary.name, to.name)
    return fallback_to(
        _compose(_try_policies(route, to, traced), to.send),
        to.name,
        retry_non_idempotent=route.retry_non_idempotent,
        record=stats.record if stats is not None else None,
    )


def unsupported(settings: GatewaySettings) -> list[str]:
    """Configured features this build cannot enforce as configured (a route asking for
    auth without the global block, an empty key variable, an unreadable JWKS file):
    refusing to start beats silently serving a route without the auth or limits its
    operator asked for. A `grpc_web` route needs gRPC behind it: an upstream with
    `protocol: http2` (gRPC is HTTP/2), and no aggregate. Nor does `idempotency` (an
    aggregate reads no request body)."""
    problems = config_problems(settings)
    problems.extend(_transform_problems(settings))
    for i, route in enumerate(settings.routes):
        if route.idempotency is not None and route.aggregate is not None:
            problems.append(f"routes.{i}.idempotency: does not apply to an aggregate route")
        if not route.grpc_web:
            continue
        if route.aggregate is not None:
            problems.append(f"routes.{i}.grpc_web: does not apply to an aggregate route")
        else:
            for name in (route.upstream, route.fallback):  # a fallback serves gRPC too
                upstream = settings.upstreams.get(name) if name is not None else None
                if upstream is not None and upstream.protocol != "http2":
                    problems.append(
                        f"routes.{i}.grpc_web: needs upstream {name} to have "
                        "protocol: http2 (gRPC is HTTP/2)"
                    )
    return problems


def build_runtime(
    settings: GatewaySettings,
    previous: Runtime | None = None,
    metrics: Metrics | None = None,
    *,
    traced: bool = False,
) -> Runtime:
    """Compile `settings`. Upstreams whose settings did not change are taken over from
    `previous` as they are: their pools, breakers and health checks carry on. `traced`:
    the process traces requests (its tracer, made at start), so every try gets a span."""
    upstreams: dict[str, Upstream] = {}
    for name, upstream_settings in settings.upstreams.items():
        old = previous.upstreams.get(name) if previous is not None else None
        if old is not None and old.settings == upstream_settings:
            upstreams[name] = old
        else:
            upstreams[name] = Upstream(name, upstream_settings, metrics=metrics)
    # One rate-limit store and one JWT verifier for every route; kept across a reload
    # whose settings for them did not change.
    edge = EdgeResources(settings, previous.edge if previous is not None else None)
    router: Router[Route] = Router()
    server = settings.server
    compression = build_compression(settings.compression)
    cache = build_cache(settings, previous, metrics)
    idempotency = build_idempotency(settings, previous, metrics)
    for route in settings.routes:
        methods = router_methods(route, settings)
        filters = build_filters(route, settings, edge.store, metrics, jwt=edge.jwt)
        compiled: Route
        if route.aggregate is not None:
            identity = identity_headers(route, settings)
            compiled = build_aggregate_route(
                route, upstreams, server, filters, traced=traced, identity=identity
            )
        else:
            assert route.upstream is not None  # the settings model guarantees one
            upstream = upstreams[route.upstream]
            compiled = Route(
                name=route.name,
                upstream=upstream.name,
                handler=build_route_handler(
                    route,
                    upstream,
                    traced=traced,
                    fallback=upstreams[route.fallback] if route.fallback else None,
                    metrics=metrics,
                ),
                rewrite=CompiledTemplate(route.rewrite) if route.rewrite else None,
                timeout=route.timeout,
                preserve_host=route.preserve_host,
                max_body_size=server.max_body_size,
                trusted_proxies=server.trusted_proxies,
                filters=filters,
                path=route.path,
                grpc_web=route.grpc_web,
            )
        if compression is not None and route.compression:
            compiled = dataclasses.replace(compiled, compression=compression)
        if route.headers is not None:  # an aggregate's backends have theirs already
            compiled = dataclasses.replace(
                compiled,
                request_transform=None
                if route.aggregate is not None
                else build_transform(route.headers.request, route.name, compiled.upstream),
                response_transform=build_transform(
                    route.headers.response, route.name, compiled.upstream
                ),
            )
        if cache is not None and route.cache is not None:
            route_cache = RouteCache(
                cache, route.name, route.cache.default_ttl, timeout=route.timeout
            )
            compiled = dataclasses.replace(compiled, cache=route_cache)
        if idempotency is not None and route.idempotency is not None and compiled.reads_body:
            keys = RouteIdempotency(
                idempotency,
                route.name,
                required=route.idempotency == "required",
                lease=route.timeout + LEASE_GRACE,
                trusted_proxies=server.trusted_proxies,
            )
            compiled = dataclasses.replace(compiled, idempotency=keys)
        router.add(compiled, route.path, methods, route.host)
    return Runtime(settings, router, upstreams, edge, cache, idempotency=idempotency)


def build_idempotency(
    settings: GatewaySettings, previous: Runtime | None, metrics: Metrics | None
) -> Idempotency | None:
    """The Idempotency-Key store every route with `idempotency:` shares, kept from
    `previous` (its keys too) while the `idempotency` block is unchanged. None: no
    route uses it. `store: {redis: URL}` shares the keys through Redis (under its
    `prefix` when set, `gateway:idem:` otherwise)."""
    if not any(route.idempotency is not None for route in settings.routes):
        return None
    block = settings.idempotency or IdempotencySettings()
    if (
        previous is not None
        and previous.idempotency is not None
        and (previous.settings.idempotency or IdempotencySettings()) == block
    ):
        return previous.idempotency
    store: idem_store.IdempotencyStore
    if isinstance(block.store, str):
        store = idem_store.MemoryStore(max_size=block.max_size)
    else:
        spec = block.store
        # The settings' prefix defaults to the rate limiter's; unset, keys get their own.
        prefix = spec.prefix if "prefix" in spec.model_fields_set else idem_store.REDIS_PREFIX
        store = idem_store.RedisStore(spec.redis, prefix=prefix, timeout=spec.timeout)
    return Idempotency(store, block.ttl, block.max_response_size, metrics)


def build_cache(
    settings: GatewaySettings, previous: Runtime | None, metrics: Metrics | None
) -> Cache | None:
    """The process's response cache, when a route caches; kept from `previous` (its
    entries too) while the `cache` block is unchanged. None: no route caches. A
    `store: {redis: URL}` block shares the entries through Redis (keys under its
    `prefix` when set, `gateway:cache:` otherwise)."""
    if not any(route.cache is not None for route in settings.routes):
        return None
    block = settings.cache or CacheSettings()
    if (
        previous is not None
        and previous.cache is not None
        and (previous.settings.cache or CacheSettings()) == block
    ):
        return previous.cache
    store = None
    if not isinstance(block.store, str):
        spec = block.store
        # The settings' prefix defaults to the rate limiter's; unset, the cache has its own.
        prefix = spec.prefix if "prefix" in spec.model_fields_set else REDIS_PREFIX
        store = RedisStore(spec.redis, prefix=prefix, timeout=spec.timeout)
    return Cache(block.max_size, block.max_object_size, metrics, store=store)


def build_compression(settings: CompressionSettings | None) -> CompressionRules | None:
    """The `compression` block as the data plane's rules, shared by every route that
    does not opt out; None (the block unset) leaves compression off."""
    if settings is None:
        return None
    return CompressionRules(
        algorithms=settings.algorithms, min_size=settings.min_size, types=settings.types
    )


def build_aggregate_route(
    route: RouteSettings,
    upstreams: dict[str, Upstream],
    server: ServerSettings,
    filters: tuple[RequestFilter, ...] = (),
    *,
    traced: bool = False,
    identity: frozenset[bytes] = frozenset(),
) -> Route:
    """An aggregate route: its fan-out `Aggregation` as the handler, each backend with
    its own upstream's chain and the route's request transform (`{upstream}` being the
    backend's). `identity`: the auth headers every backend gets (`identity_headers`)."""
    aggregate = route.aggregate
    assert aggregate is not None
    request_ops = route.headers.request if route.headers is not None else None
    path_params = frozenset(
        name for name, kind in PARAM_REGEX.findall(route.path) if kind == ":path"
    )
    backends = [
        Backend(
            index=i,
            upstream=b.upstream,
            template=BackendTemplate(b.path, path_params),
            handler=build_route_handler(
                route, upstreams[b.upstream], own_deadline=False, traced=traced
            ),
            key=b.key,
            required=b.required,
            timeout=b.timeout,
            fields=frozenset(b.fields) if b.fields is not None else None,
            rename=dict(b.rename),
            transform=build_transform(request_ops, route.name, b.upstream),
        )
        for i, b in enumerate(aggregate.backends)
    ]
    return Route(
        name=route.name,
        upstream=None,
        handler=Aggregation(
            route.name,
            backends,
            partial=aggregate.partial,
            timeout=route.timeout,
            max_response_size=aggregate.max_response_size,
            forward_authorization=route.forward_authorization,
            identity=identity,
            trusted_proxies=server.trusted_proxies,
        ),
        rewrite=None,
        timeout=route.timeout,
        preserve_host=False,
        max_body_size=server.max_body_size,
        trusted_proxies=server.trusted_proxies,
        filters=filters,
        reads_body=False,
        path=route.path,
    )


def build_transform(
    ops: HeaderOps | None, route: str, upstream: str | None
) -> HeaderTransform | None:
    """One direction of `routes[].headers`, compiled; None when it changes nothing.
    `{upstream}` is the configured upstream's name (empty on an aggregate's answer)."""
    if ops is None or not (ops.set or ops.add or ops.remove):
        return None
    return HeaderTransform(
        remove=ops.remove, set=ops.set, add=ops.add, route=route, upstream=upstream or ""
    )


def identity_headers(route: RouteSettings, settings: GatewaySettings) -> frozenset[bytes]:
    """The header names a proxied route's upstream gets from the gateway's auth, which
    an aggregate route passes to its backends too: the verified JWT claims
    (`claims_to_headers`, on a `jwt` route: the filter drops client-sent ones) and the
    API key header where the route sets `forward_api_key`."""
    auth = settings.auth
    names: set[bytes] = set()
    if route.auth == "jwt" and auth is not None and auth.jwt is not None:
        names.update(n.lower().encode() for n in auth.jwt.claims_to_headers.values())
    if route.forward_api_key:
        header = auth.api_keys.header if auth is not None and auth.api_keys else "X-API-Key"
        names.add(header.lower().encode("latin-1"))
    return frozenset(names)


def _transform_problems(settings: GatewaySettings) -> list[str]:
    """Transform entries naming a field the gateway frames the message with (Host,
    Content-Length) or a hop-by-hop one: refused, as the settings refuse X-Forwarded-*."""
    problems: list[str] = []
    for i, route in enumerate(settings.routes):
        for direction, ops in (
            ("request", route.headers.request if route.headers else None),
            ("response", route.headers.response if route.headers else None),
        ):
            if ops is None:
                continue
            for kind, names in (("set", ops.set), ("add", ops.add), ("remove", ops.remove)):
                problems.extend(
                    f"routes.{i}.headers.{direction}.{kind}: {name} is written by the "
                    "gateway (framing, Host, hop-by-hop): a transform cannot change it"
                    for name in names
                    if refused_name(name)
                )
    return problems
