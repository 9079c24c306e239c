"""An upstream's pool: its targets, balancer and pooled `httpx.AsyncClient`, and one try
against one target.

Per-target state (in-flight count, health) lives on the `Target` itself, as Caddy keeps it
on its hosts; the balancer (`balancers.py`) only reads it. Resilience policies
(`gateway/policies/`) wrap `UpstreamPool.send`, the single try; their state is handed
to each upstream by the factory (`gateway/build/upstreams.py`), never made here.
"""

from __future__ import annotations

import http.cookiejar
import time
from collections.abc import AsyncIterator, Callable

import httpx

from gateway.errors import UpstreamError, UpstreamUnhealthy
from gateway.ops.metrics import UpstreamStats
from gateway.types import GatewayRequest, GatewayResponse, Headers, WholeBody, closed
from gateway.upstream.balancers import Balancer, make_balancer
from gateway.upstream.health import HealthCheck, HealthChecker
from gateway.upstream.target import Target
from gateway.upstream.transports import RawTransport, TransportSettings, make_transport
from gateway.upstream.transports.base import map_httpx_errors

__all__ = ["Target", "UpstreamPool"]


def _no_cookies() -> httpx.Cookies:
    # A proxy must never remember one client's Set-Cookie and replay it for another.
    policy = http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
    return httpx.Cookies(http.cookiejar.CookieJar(policy=policy))


_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


def _raise_body_error(request: GatewayRequest, exc: BaseException) -> None:
    """A try that failed because the client's body stream failed (the client left, or
    sent too much) is the client's doing: report that, never an upstream failure."""
    source = request.source
    if source is not None and source.error is not None and exc is not source.error:
        raise source.error from None


class UpstreamPool:
    """Owns the pooled client for all of one upstream's targets; `send` is one try on
    one target. Built from plain values: `limits` for the transport it makes when none
    is given, `queue_timeout` as httpx's pool timeout (its own transport only)."""

    def __init__(
        self,
        name: str,
        targets: list[Target],
        *,
        limits: TransportSettings,
        stats: UpstreamStats,
        balancer: str = "round_robin",
        queue_timeout: float = 1.0,
        health: HealthCheck | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.targets = targets
        self.balancer: Balancer = make_balancer(balancer, self.targets)
        transport = transport or make_transport(limits)
        self.transport = transport
        # The hot path talks to the transport directly when it offers `open`; the
        # client (same pool) serves health checks and anything off the hot path.
        self._raw = transport if isinstance(transport, RawTransport) else None
        self.client = httpx.AsyncClient(
            transport=transport,
            cookies=_no_cookies(),
            follow_redirects=False,
            trust_env=False,
        )
        self.stats = stats
        self.health = (
            HealthChecker(name, self.targets, health, self.client) if health is not None else None
        )
        self._started = False
        self._closed = False
        # For httpx's own transport, which reads timeouts from the request.
        self._timeouts = {
            "connect": limits.connect_timeout,
            "read": limits.read_timeout,
            "write": limits.read_timeout,
            "pool": queue_timeout,
        }

    def pick(self, exclude: set[str]) -> Target:
        target = self.balancer.select(exclude)
        if target is None:
            raise UpstreamUnhealthy(
                f"upstream {self.name!r} has no healthy target", upstream=self.name
            )
        return target

    async def send(self, request: GatewayRequest) -> GatewayResponse:
        """One try: choose a target (another than those already tried when there is one),
        send, and return as soon as the response headers are in; the body streams."""
        target = self.pick(request.exclude_targets)
        request.exclude_targets.add(target.url)
        url = target.base + request.path
        if request.query:
            url += "?" + request.query.decode("latin-1")
        headers = request.headers.copy()
        if request.host is not None:
            headers.append((b"host", request.host.encode("latin-1")))
        remaining_ms = max(1, int(request.deadline.remaining() * 1000))
        headers.append((b"x-request-timeout-ms", str(remaining_ms).encode()))
        if request.grpc:  # gRPC's own deadline header: the whole milliseconds left
            headers.append((b"grpc-timeout", b"%dm" % min(remaining_ms, 99_999_999)))
        content = request.body if request.stream is None else request.stream

        stats = self.stats
        target.inflight += 1
        stats.inflight.inc()
        started = time.monotonic()
        whole: bytes | None = None
        trailers: Headers | None = None
        reset_code: Callable[[], int | None] | None = None
        try:
            with map_httpx_errors(self.name, target.url):
                if self._raw is not None:
                    # The hot path: straight to the transport, without the request and
                    # response objects and browser features (cookies, redirects) of send.
                    raw = await self._raw.open(request.method, url, headers, content)
                    status, response_headers = raw.status, raw.headers
                    trailers = raw.trailers  # an HTTP/2 answer's; None over HTTP/1.1
                    whole = raw.whole()
                    if whole is not None:
                        # The whole answer is in: its connection goes back to the pool
                        # now, and nothing is left to stream or to close.
                        await raw.aclose()
                    else:
                        chunks, aclose = raw.body(), raw.aclose
                        if trailers is not None:  # HTTP/2: it may reset the stream
                            reset_code = lambda: getattr(raw, "reset_code", None)  # noqa: E731
                else:
                    response = await self.client.send(
                        httpx.Request(
                            request.method,
                            url,
                            headers=headers,
                            content=content,
                            extensions={"timeout": self._timeouts},
                        ),
                        stream=True,
                    )
                    status, response_headers = response.status_code, response.headers.raw
                    chunks, aclose = response.aiter_raw(), response.aclose
        except BaseException as exc:
            target.inflight -= 1
            stats.inflight.dec()
            if isinstance(exc, UpstreamError):
                stats.record(exc.outcome, time.monotonic() - started)
            _raise_body_error(request, exc)
            raise
        stats.record(_STATUS_CLASS.get(status // 100, "other"), time.monotonic() - started)
        if whole is not None:
            target.inflight -= 1
            stats.inflight.dec()
            return GatewayResponse(
                status=status,
                headers=response_headers,
                body=WholeBody(whole),
                close=closed,
                upstream=self.name,
                target=target.url,
                whole=whole,
                trailers=trailers,
            )

        released = False

        async def close() -> None:
            nonlocal released
            if not released:
                released = True
                target.inflight -= 1
                stats.inflight.dec()
                await aclose()

        async def body() -> AsyncIterator[bytes]:
            with map_httpx_errors(self.name, target.url):
                async for chunk in chunks:
                    yield chunk

        return GatewayResponse(
            status=status,
            headers=response_headers,
            body=body(),
            close=close,
            upstream=self.name,
            target=target.url,
            trailers=trailers,
            reset_code=reset_code,
        )

    async def start(self) -> None:
        """Start this upstream's background work (health checks); idempotent."""
        if self._started:
            return
        self._started = True
        if self.health is not None:
            self.health.start()

    async def aclose(self) -> None:
        """Stop background work and close the pool; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.stats.retire()
        if self.health is not None:
            await self.health.aclose()
        await self.client.aclose()

    def __repr__(self) -> str:
        return f"UpstreamPool({self.name!r}, targets={self.targets!r}, {self.transport!r})"
