"""An upstream as configured: its pool (`gateway/upstream/`) plus the policy state the
factory hands it, shared by every route that uses it (bulkhead, circuit breaker, retry
budget). A reload keeps an `Upstream` whose settings did not change, state included."""

from __future__ import annotations

import ssl
from typing import Literal

import httpx

from gateway.build.values import plain
from gateway.config.models import UpstreamSettings, UpstreamTlsSettings
from gateway.ops.metrics import Metrics, UpstreamStats
from gateway.policies.breaker import BreakerRules, CircuitBreaker
from gateway.policies.budget import RetryBudget
from gateway.policies.bulkhead import Bulkhead
from gateway.policies.latency import LatencyRecord
from gateway.upstream.health import HealthCheck
from gateway.upstream.pool import UpstreamPool
from gateway.upstream.target import Target
from gateway.upstream.transports import TransportSettings
from gateway.upstream.transports.base import default_tls_context

__all__ = ["Upstream", "tls_context"]


class Upstream(UpstreamPool):
    """One configured upstream: the pool for its targets, and its resilience state.
    `connect_tries` is how many targets a WebSocket upgrade may try when connecting is
    refused (the retry settings' attempts, when they retry `connect_error`)."""

    def __init__(
        self,
        name: str,
        settings: UpstreamSettings,
        transport: httpx.AsyncBaseTransport | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        stats = UpstreamStats(metrics or Metrics(), name)
        super().__init__(
            name,
            [Target(t.url, t.weight) for t in settings.targets],
            limits=TransportSettings(
                max_connections=settings.max_connections,
                max_keepalive=settings.max_keepalive,
                keepalive_expiry=settings.keepalive_expiry,
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.read_timeout,
                tls=tls_context(settings.tls, settings.protocol),
                server_name=settings.tls.server_name if settings.tls is not None else None,
                protocol=settings.protocol,
            ),
            stats=stats,
            balancer=settings.balancer,
            queue_timeout=settings.queue_timeout,
            health=plain(HealthCheck, settings.health_check)
            if settings.health_check is not None
            else None,
            transport=transport,
        )
        self.settings = settings
        self.bulkhead = Bulkhead(
            settings.max_concurrency,
            settings.max_queue,
            settings.queue_timeout,
            name=name,
            queued_gauge=stats.queued,
        )
        self.breaker = (
            CircuitBreaker.from_settings(
                plain(BreakerRules, settings.circuit_breaker),
                name=name,
                open_gauge=stats.circuit_open,
            )
            if settings.circuit_breaker is not None
            else None
        )
        self.retry_budget = RetryBudget(settings.retries.budget)
        # Recent time to response headers, fed and read by the routes that hedge on a
        # percentile of it (`hedge: {after: p95}`); untouched otherwise.
        self.latency = LatencyRecord()
        retries = settings.retries
        self.connect_tries = 1 + (retries.attempts if "connect_error" in retries.on else 0)

    def __repr__(self) -> str:
        return (
            f"Upstream({self.name!r}, targets={self.targets!r}, {self.bulkhead!r}, "
            f"{self.breaker!r})"
        )


def tls_context(
    settings: UpstreamTlsSettings | None, protocol: Literal["http1", "http2"] = "http1"
) -> ssl.SSLContext | None:
    """The context for an upstream's https targets, from its `tls` block (None without
    one: the transport then verifies against the system trust store). ALPN offers the
    upstream's protocol only: "h2" for `http2`, "http/1.1" otherwise."""
    if settings is None:
        return None
    context = default_tls_context(
        settings.ca_file, alpn=("h2",) if protocol == "http2" else ("http/1.1",)
    )
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.cert is not None:
        context.load_cert_chain(settings.cert, settings.key)
    return context
