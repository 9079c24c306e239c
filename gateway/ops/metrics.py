"""Prometheus metrics (prometheus-client), one `Metrics` object per process.

With several workers, prometheus-client's multiprocess mode is used: every worker
writes its figures to files under `PROMETHEUS_MULTIPROC_DIR` and the admin listener
sums them. A worker that dies keeps its counters on disk (nothing is lost) and its
replacement writes new files under its own pid (nothing is counted twice); live
gauges of a dead worker are dropped with `mark_process_dead`.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)

__all__ = [
    "CONTENT_TYPE_LATEST",
    "FallbackStats",
    "Gauge",
    "HedgeStats",
    "LoopValue",
    "Metrics",
    "UpstreamStats",
    "multiprocess_dir",
    "render",
]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class LoopValue(values.MutexValue):
    """prometheus-client's single-process value, without the lock on `inc`.

    Every figure the gateway counts is counted on its one event-loop thread, and the
    exposition reads them on that same thread, so the lock taken on each `inc` guards
    against nothing here, and it is taken eight times per proxied request (two counters,
    two histograms, the in-flight gauge up and down; its cost is in docs/performance.md).
    `set` and `get` keep the lock."""

    def inc(self, amount: float) -> None:
        self._value += amount


def _count_without_locks() -> None:
    """Make `LoopValue` the value class of metrics created from now on, in
    single-process mode only (multiprocess mode keeps its file-backed values). If
    prometheus-client's internals are not as expected, nothing changes."""
    if getattr(values, "ValueClass", None) is values.MutexValue:
        values.ValueClass = LoopValue


class Metrics:
    """Every metric the gateway exposes (names in docs/operations.md, "Metrics"), in one
    registry per process; with workers, in prometheus-client's multiprocess files."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        _count_without_locks()
        # In multiprocess mode values live in files; a private registry keeps the
        # process-local objects from being exported twice.
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests_total",
            "Requests answered, by route, method and status.",
            ("route", "method", "status"),
            registry=r,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from request to the end of the response, by route.",
            ("route",),
            buckets=_BUCKETS,
            registry=r,
        )
        self.upstream_requests = Counter(
            "gateway_upstream_requests_total",
            "Upstream tries by outcome (2xx..5xx, connect_error, reset, timeout, "
            "saturated, unhealthy).",
            ("upstream", "outcome"),
            registry=r,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_request_duration_seconds",
            "Time from sending a try to its response headers, by upstream.",
            ("upstream",),
            buckets=_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "gateway_upstream_inflight",
            "Requests in flight to the upstream.",
            ("upstream",),
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queued = Gauge(
            "gateway_upstream_queued",
            "Requests waiting for a concurrency slot of the upstream.",
            ("upstream",),
            registry=r,
            multiprocess_mode="livesum",
        )
        self.circuit_open = Gauge(
            "gateway_circuit_open",
            "1 while the upstream's circuit breaker is open (or half-open), else 0.",
            ("upstream",),
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rate_limited = Counter(
            "gateway_rate_limited_total",
            "Requests refused by a rate limit, by route.",
            ("route",),
            registry=r,
        )
        self.rate_limit_store_errors = Counter(
            "gateway_rate_limit_store_errors_total",
            "Rate-limit checks decided without the shared store (unreachable or failing), "
            "by route.",
            ("route",),
            registry=r,
        )
        self.reloads = Counter(
            "gateway_config_reloads_total",
            "Config reloads by result (ok, error).",
            ("result",),
            registry=r,
        )
        self.grpc_requests = Counter(
            "gateway_grpc_requests_total",
            "gRPC calls by route and grpc-status (the HTTP status of every gRPC answer "
            "is 200; this is the call's outcome). A call that ended without a status "
            "(the client cancelled) is counted as 'none'.",
            ("route", "grpc_status"),
            registry=r,
        )
        self.spans_dropped = Counter(
            "gateway_spans_dropped_total",
            "Trace spans not exported: the export queue was full, or the collector did "
            "not take their batch in time (tracing on only).",
            registry=r,
        )
        self.fallback_requests = Counter(
            "gateway_fallback_requests_total",
            "Requests of routes with a fallback whose upstream could not answer, by route, "
            "fallback upstream, reason (the primary's outcome: connect_error, timeout, "
            "reset, saturated, unhealthy) and result (answered, failed, skipped).",
            ("route", "upstream", "reason", "result"),
            registry=r,
        )

        self.hedges = Counter(
            "gateway_hedges_total",
            "Hedged tries sent (a second try while the first had not answered), by "
            "route and upstream.",
            ("route", "upstream"),
            registry=r,
        )
        self.hedge_wins = Counter(
            "gateway_hedge_wins_total",
            "Hedged requests by the try whose answer was used: the first try, or a hedge.",
            ("route", "upstream", "winner"),
            registry=r,
        )

        self.cache_requests = Counter(
            "gateway_cache_requests_total",
            "Requests of caching routes by cache result (hit, miss, stale, collapsed, bypass).",
            ("route", "result"),
            registry=r,
        )
        self.cache_store_errors = Counter(
            "gateway_cache_store_errors_total",
            "Cache lookups, writes and purges the shared (Redis) store failed, by route; "
            "the request was served as a miss.",
            ("route",),
            registry=r,
        )
        self.cache_bytes = Gauge(
            "gateway_cache_bytes",
            "Bytes held by the response cache (this process's memory store).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.idempotency_requests = Counter(
            "gateway_idempotency_requests_total",
            "POST/PATCH requests of idempotency routes by result (stored, replayed, "
            "in_flight, reused, missing, invalid, not_stored, store_error).",
            ("route", "result"),
            registry=r,
        )

    def __repr__(self) -> str:
        return f"Metrics(multiprocess={multiprocess_dir() is not None})"


class UpstreamStats:
    """One upstream's series, bound once so a try costs no label lookups."""

    __slots__ = (
        "_counter",
        "_duration",
        "_name",
        "_outcomes",
        "circuit_open",
        "inflight",
        "queued",
    )

    def __init__(self, metrics: Metrics, name: str) -> None:
        self._name = name
        self._counter = metrics.upstream_requests
        self._duration = metrics.upstream_duration.labels(name)
        self._outcomes: dict[str, Any] = {}
        self.inflight = metrics.inflight.labels(name)
        self.queued = metrics.queued.labels(name)
        self.circuit_open = metrics.circuit_open.labels(name)
        self.circuit_open.set(0)

    def record(self, outcome: str, seconds: float) -> None:
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self._counter.labels(self._name, outcome)
        child.inc()
        self._duration.observe(seconds)

    def retire(self) -> None:
        """The upstream is gone: its live gauges read zero rather than their last value."""
        self.inflight.set(0)
        self.queued.set(0)
        self.circuit_open.set(0)

    def __repr__(self) -> str:
        return f"UpstreamStats({self._name!r})"


class FallbackStats:
    """One route's fallback series, bound on first use. `record` counts a decision of
    its fallback policy; when the fallback was tried after the primary refused the
    request itself (`saturated`, `unhealthy`), that refusal is also counted as the
    primary's outcome, as the logging phase counts the refusals that reach the client."""

    __slots__ = ("_counter", "_fallback", "_primary", "_route", "_series", "_shed")

    def __init__(self, metrics: Metrics, route: str, primary: str, fallback: str) -> None:
        self._counter = metrics.fallback_requests
        self._shed = metrics.upstream_requests
        self._route = route
        self._primary = primary
        self._fallback = fallback
        self._series: dict[tuple[str, str], Any] = {}

    def record(self, reason: str, result: str) -> None:
        key = (reason, result)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = self._counter.labels(
                self._route, self._fallback, reason, result
            )
        child.inc()
        if result != "skipped" and reason in ("saturated", "unhealthy"):
            self._shed.labels(self._primary, reason).inc()

    def __repr__(self) -> str:
        return f"FallbackStats({self._route!r}: {self._primary!r} -> {self._fallback!r})"


class HedgeStats:
    """One hedging route's series, bound once at build time."""

    __slots__ = ("_name", "first_won", "hedge_won", "sent")

    def __init__(self, metrics: Metrics, route: str, upstream: str) -> None:
        self._name = f"{route} -> {upstream}"
        self.sent = metrics.hedges.labels(route, upstream)
        self.first_won = metrics.hedge_wins.labels(route, upstream, "first")
        self.hedge_won = metrics.hedge_wins.labels(route, upstream, "hedge")

    def __repr__(self) -> str:
        return f"HedgeStats({self._name!r})"


def render(metrics: Metrics) -> bytes:
    """The text exposition: this process's registry, or every worker's files summed."""
    path = multiprocess_dir()
    if path is None:
        return generate_latest(metrics.registry)
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
