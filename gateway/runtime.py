"""Build the runtime from settings, once: the route table and one `Upstream` per upstream.

Nothing on the request path reads the settings models; every route's handler chain is
composed here (lura's `proxy/factory.go`), and a reload builds a new `Runtime` and swaps
one reference, so requests in flight keep the runtime they started with.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from gateway.pipeline import Handler, Policy
from gateway.policies.deadline import deadline
from gateway.routing import CompiledTemplate, Router
from gateway.settings import GatewaySettings, RouteSettings
from gateway.upstream import Upstream

__all__ = ["ProxyRoute", "Runtime", "build_route_handler", "build_runtime", "unsupported"]

log = logging.getLogger("gateway.runtime")


@dataclass(frozen=True, slots=True)
class ProxyRoute:
    """A compiled route: everything the request path needs, precomputed."""

    name: str
    upstream: str
    handler: Handler
    rewrite: CompiledTemplate | None
    timeout: float
    preserve_host: bool
    max_body_size: int
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def build_route_handler(route: RouteSettings, upstream: Upstream) -> Handler:
    """Compose the route's chain around one upstream try, outermost first:
    deadline, retry, breaker, bulkhead, upstream."""
    policies: list[Policy] = [deadline(upstream.name)]
    handler: Handler = upstream.send
    for policy in reversed(policies):
        handler = policy(handler)
    return handler


def unsupported(settings: GatewaySettings) -> list[str]:
    """Configured features this build does not enforce yet: refusing to start beats
    silently serving a route without the auth or limits its operator asked for."""
    problems = []
    if settings.auth is not None:
        problems.append("auth: authentication is not implemented in this version")
    if settings.cors is not None:
        problems.append("cors: CORS is not implemented in this version")
    if settings.rate_limit_store != "memory":
        problems.append("rate_limit_store: rate limiting is not implemented in this version")
    for i, route in enumerate(settings.routes):
        for key in ("rate_limit", "cors"):
            if getattr(route, key) is not None:
                problems.append(f"routes.{i}.{key}: not implemented in this version")
        if route.auth != "none":
            problems.append(f"routes.{i}.auth: not implemented in this version")
        if route.aggregate is not None:
            problems.append(f"routes.{i}.aggregate: not implemented in this version")
    return problems


class Runtime:
    def __init__(
        self,
        settings: GatewaySettings,
        router: Router[ProxyRoute],
        upstreams: dict[str, Upstream],
    ) -> None:
        self.settings = settings
        self.router = router
        self.upstreams = upstreams

    async def start(self) -> None:
        """Start background work (health checks) inside the running event loop."""

    async def aclose(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.aclose()

    def __repr__(self) -> str:
        return f"Runtime({len(self.router)} routes, upstreams={sorted(self.upstreams)})"


def build_runtime(settings: GatewaySettings) -> Runtime:
    upstreams = {name: Upstream(name, s) for name, s in settings.upstreams.items()}
    router: Router[ProxyRoute] = Router()
    server = settings.server
    for route in settings.routes:
        assert route.upstream is not None  # aggregate routes are refused by `unsupported`
        upstream = upstreams[route.upstream]
        compiled = ProxyRoute(
            name=route.name,
            upstream=upstream.name,
            handler=build_route_handler(route, upstream),
            rewrite=CompiledTemplate(route.rewrite) if route.rewrite else None,
            timeout=route.timeout,
            preserve_host=route.preserve_host,
            max_body_size=server.max_body_size,
            trusted_proxies=server.trusted_proxies,
        )
        methods = frozenset(route.methods) if route.methods else None
        router.add(compiled, route.path, methods, route.host)
    return Runtime(settings, router, upstreams)
