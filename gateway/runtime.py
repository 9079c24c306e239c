"""Build the runtime from settings, once: the route table and one `Upstream` per upstream.

Nothing on the request path reads the settings models; every route's handler chain is
composed here (lura's `proxy/factory.go`), and a reload builds a new `Runtime` and swaps
one reference, so requests in flight keep the runtime they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from dataclasses import dataclass

from starlette.routing import PARAM_REGEX

from gateway.aggregate import AggregateRoute, Backend, BackendTemplate
from gateway.edge import RequestFilter
from gateway.edge.build import EdgeResources, build_filters, config_problems, router_methods
from gateway.metrics import Metrics
from gateway.pipeline import Handler, Policy
from gateway.policies.breaker import breaker
from gateway.policies.bulkhead import bulkhead
from gateway.policies.deadline import deadline
from gateway.policies.retry import retry
from gateway.policies.try_timeout import try_timeout
from gateway.routing import CompiledTemplate, Router
from gateway.settings import GatewaySettings, RouteSettings, ServerSettings
from gateway.upstream import Upstream

__all__ = [
    "ProxyRoute",
    "Retirements",
    "Runtime",
    "build_route_handler",
    "build_runtime",
    "unsupported",
]

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
    filters: tuple[RequestFilter, ...] = ()


def build_route_handler(
    route: RouteSettings, upstream: Upstream, *, own_deadline: bool = True
) -> Handler:
    """Compose the route's chain around one upstream try, outermost first:
    deadline, retry, breaker, bulkhead, try timeout, upstream. Each retry passes
    through the breaker and the bulkhead; the state of both (and the retry budget) lives
    on the `Upstream`, shared by every route that uses it. The try timeout sits inside
    the bulkhead so time spent queueing is not charged to `read_timeout`.

    `own_deadline=False` leaves the deadline timer out, for an aggregate backend: the
    fan-out bounds each call by the route deadline (or the backend's own timeout)
    itself, a second timer on the same instant would only cost."""
    settings = upstream.settings
    policies: list[Policy] = [deadline(upstream.name)] if own_deadline else []
    if settings.retries.attempts > 0:
        policies.append(
            retry(
                settings.retries,
                upstream.retry_budget,
                retry_non_idempotent=route.retry_non_idempotent,
                upstream=upstream.name,
            )
        )
    if upstream.breaker is not None:
        policies.append(breaker(upstream.breaker))
    policies.append(bulkhead(upstream.bulkhead))
    if settings.read_timeout < route.timeout:
        # Otherwise it could never fire first: a try never outlives the route deadline,
        # which X-Request-Timeout-Ms can only shorten.
        policies.append(try_timeout(settings.read_timeout, upstream.name))
    handler: Handler = upstream.send
    for policy in reversed(policies):
        handler = policy(handler)
    return handler


def unsupported(settings: GatewaySettings) -> list[str]:
    """Configured features this build cannot enforce as configured (a route asking for
    auth without the global block, an empty key variable, an unreadable JWKS file):
    refusing to start beats silently serving a route without the auth or limits its
    operator asked for."""
    return config_problems(settings)


class Runtime:
    """One compiled config. `active` counts the requests that started on it, so a
    reload can close what only this runtime used once its last request finishes."""

    def __init__(
        self,
        settings: GatewaySettings,
        router: Router[ProxyRoute | AggregateRoute],
        upstreams: dict[str, Upstream],
        edge: EdgeResources | None = None,
    ) -> None:
        self.settings = settings
        self.router = router
        self.upstreams = upstreams
        self.edge = edge
        self.access_log = settings.server.access_log
        self.active = 0
        self._idle: asyncio.Event | None = None  # set up only once a reload retires us
        self._hurried = False  # shutting down: stop waiting for requests in `retire`

    def leave(self) -> None:
        """A request that started on this runtime has finished."""
        self.active -= 1
        if self.active == 0 and self._idle is not None:
            self._idle.set()

    async def start(self, previous: Runtime | None = None) -> None:
        """Start background work (health checks) inside the running event loop. A start
        that fails or is cancelled (a shutdown during a reload) closes again what it
        does not share with `previous`, so no health check or pool outlives it."""
        try:
            for upstream in self.upstreams.values():
                await upstream.start()
            if self.edge is not None:
                await self.edge.start()
        except BaseException:
            await self._close_unshared(previous)
            raise

    async def aclose(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.aclose()
        if self.edge is not None:
            await self.edge.aclose()

    async def retire(self, successor: Runtime, grace: float) -> None:
        """After a reload: wait for this runtime's requests to finish (up to `grace`
        seconds, or until `hurry`), then close the upstreams the successor does not
        keep."""
        if self.active > 0 and not self._hurried:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._idle.wait()
        await self._close_unshared(successor)

    def hurry(self) -> None:
        """Shutting down: `retire` stops waiting for requests and closes at once."""
        self._hurried = True
        if self._idle is not None:
            self._idle.set()

    async def _close_unshared(self, other: Runtime | None) -> None:
        """Close the upstreams and edge resources `other` does not also hold."""
        kept = {id(u) for u in other.upstreams.values()} if other is not None else set()
        for upstream in self.upstreams.values():
            if id(upstream) not in kept:
                await upstream.aclose()
        if self.edge is not None:
            await self.edge.retire(other.edge if other is not None else None)

    def __repr__(self) -> str:
        return (
            f"Runtime({len(self.router)} routes, upstreams={sorted(self.upstreams)}, "
            f"active={self.active})"
        )


class Retirements:
    """The runtimes a reload replaced, each finishing its requests in a task of its own
    (`Runtime.retire`); owned here so that a shutdown can end them all cleanly.

    `aclose` does not cancel a retirement halfway through closing a pool: it tells each
    runtime to stop waiting (`hurry`) and awaits the close; only a close that hangs past
    `CLOSE_TIMEOUT` seconds is cancelled."""

    CLOSE_TIMEOUT = 5.0

    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task[None], Runtime] = {}
        self._closed = False

    def retire(self, old: Runtime, successor: Runtime, grace: float) -> None:
        if self._closed:
            old.hurry()  # a reload that raced the shutdown: nothing waits any more
        task = asyncio.create_task(old.retire(successor, grace), name=f"retire {old!r}")
        self._tasks[task] = old
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("closing a replaced runtime failed", exc_info=task.exception())

    async def aclose(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        if not tasks:
            return
        for runtime in self._tasks.values():
            runtime.hurry()
        _, late = await asyncio.wait(tasks, timeout=self.CLOSE_TIMEOUT)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._tasks)

    def __repr__(self) -> str:
        return f"Retirements(pending={len(self._tasks)}, closed={self._closed})"


def build_runtime(
    settings: GatewaySettings,
    previous: Runtime | None = None,
    metrics: Metrics | None = None,
) -> Runtime:
    """Compile `settings`. Upstreams whose settings did not change are taken over from
    `previous` as they are: their pools, breakers and health checks carry on."""
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
    router: Router[ProxyRoute | AggregateRoute] = Router()
    server = settings.server
    for route in settings.routes:
        methods = router_methods(route, settings)
        filters = build_filters(route, settings, edge.store, metrics, jwt=edge.jwt)
        compiled: ProxyRoute | AggregateRoute
        if route.aggregate is not None:
            compiled = build_aggregate_route(route, upstreams, server, filters)
        else:
            assert route.upstream is not None  # the settings model guarantees one
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
                filters=filters,
            )
        router.add(compiled, route.path, methods, route.host)
    return Runtime(settings, router, upstreams, edge)


def build_aggregate_route(
    route: RouteSettings,
    upstreams: dict[str, Upstream],
    server: ServerSettings,
    filters: tuple[RequestFilter, ...] = (),
) -> AggregateRoute:
    aggregate = route.aggregate
    assert aggregate is not None
    path_params = frozenset(
        name for name, kind in PARAM_REGEX.findall(route.path) if kind == ":path"
    )
    backends = [
        Backend(
            index=i,
            upstream=b.upstream,
            template=BackendTemplate(b.path, path_params),
            handler=build_route_handler(route, upstreams[b.upstream], own_deadline=False),
            key=b.key,
            required=b.required,
            timeout=b.timeout,
            fields=frozenset(b.fields) if b.fields is not None else None,
            rename=dict(b.rename),
        )
        for i, b in enumerate(aggregate.backends)
    ]
    return AggregateRoute(
        route.name,
        backends,
        partial=aggregate.partial,
        timeout=route.timeout,
        max_response_size=aggregate.max_response_size,
        forward_authorization=route.forward_authorization,
        max_body_size=server.max_body_size,
        trusted_proxies=server.trusted_proxies,
        filters=filters,
    )
