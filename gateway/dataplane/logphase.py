"""The logging phase: where every request ends, whatever happened to it.

`LoggingPhase.finish` writes one finished `Exchange` to the three places a request is
reported: `gateway_requests_total` / `gateway_request_duration_seconds` (and the
rate-limit and shed counters), the status board (per-route last minute, the recent
problem answers), and one access-log line. Plain HTTP requests, WebSocket sessions and
the answers the HTTP protocol makes itself all come through here, so the access log's
schema is written once.

`LoggingPhase.refusal` is that phase for an answer the protocol makes before the data
plane sees the request (`gateway/server/protocol.py`): a request llhttp cannot parse or
finds ambiguous (400), a target over `max_request_line` (414), a head or trailer
section over `max_header_size` / `max_header_count` (431), a head not finished within
`header_timeout` (408), a connection beyond `max_client_connections` (503). It is
recorded under the route label of a request no route matched (`(none)`). What the
protocol did not learn before refusing is unknown: method `-` in the metric label and
the board, `null` in the access log; a path is never written longer than `MAX_PATH`
characters and never with its query string. Only refusals pay for that part.
"""

from __future__ import annotations

import time
from typing import Any

import httptools

from gateway.dataplane.state import NO_TRACE, Exchange, GatewayState, TraceIds
from gateway.dataplane.view import RuntimeView

__all__ = ["MAX_PATH", "NO_ROUTE", "UNKNOWN_METHOD", "LoggingPhase", "target_path"]

NO_ROUTE = "(none)"  # the route label of a request no route took
UNKNOWN_METHOD = "-"
MAX_PATH = 256
CLIENT_CLOSED = 499  # nginx's code for a client that went away before an answer
# Requests the gateway refused on an upstream's behalf, counted as upstream outcomes.
_SHED = {"upstream_saturated": "saturated", "upstream_unhealthy": "unhealthy"}
_MAX_SERIES = 10_000  # (route, method, status) label sets remembered; bounds a bug


def target_path(target: bytes) -> str | None:
    """The path of a request target as the data plane logs it (latin-1, no query),
    cut to `MAX_PATH`; None when it cannot be told (an unfinished absolute form)."""
    path: bytes | None
    try:
        path = httptools.parse_url(target).path
    except httptools.HttpParserInvalidURLError:
        # Cut short (a 414) or not a URL. Only an origin form is surely a path; anything
        # else may hold a scheme, a host or userinfo.
        path = target.split(b"?", 1)[0].split(b"#", 1)[0] if target[:1] == b"/" else None
    if path is None:
        return None
    text = path[: MAX_PATH + 1].decode("latin-1")
    return text if len(text) <= MAX_PATH else text[:MAX_PATH] + "..."


class LoggingPhase:
    """Metrics, the status board and the access log for finished requests; one per
    data plane and one per server's protocol (each keeps its own label cache)."""

    __slots__ = ("_series", "_state")

    def __init__(self, state: GatewayState[RuntimeView]) -> None:
        self._state = state
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def finish(
        self,
        exchange: Exchange,
        client: tuple[str, int] | None,
        runtime: RuntimeView | None,
        elapsed: float | None = None,
    ) -> None:
        """Record one finished request. `runtime` is the one it started on (its
        `access_log` setting applies); `elapsed` defaults to the time since it began."""
        if elapsed is None:
            elapsed = time.monotonic() - exchange.started
        state = self._state
        route = exchange.route or NO_ROUTE
        status = exchange.status or CLIENT_CLOSED
        key = (route, exchange.method, status)
        series = self._series.get(key)
        metrics = state.metrics
        if series is None:
            series = (
                metrics.requests.labels(route, exchange.method, str(status)),
                metrics.duration.labels(route),
            )
            if len(self._series) < _MAX_SERIES:
                self._series[key] = series
        series[0].inc()
        series[1].observe(elapsed)
        if exchange.grpc:
            grpc_status = exchange.grpc_status
            metrics.grpc_requests.labels(
                route, "none" if grpc_status is None else str(grpc_status)
            ).inc()
        error = exchange.error
        if error is not None:
            if error == "rate_limited":
                metrics.rate_limited.labels(route).inc()
            elif error in _SHED and exchange.upstream:
                metrics.upstream_requests.labels(exchange.upstream, _SHED[error]).inc()
        state.status.record(exchange, route, status, elapsed)
        trace = exchange.trace
        access_log = state.access_log
        if access_log is not None and (runtime is None or runtime.access_log):
            method = exchange.method
            record: dict[str, object] = {
                "time": access_log.now(),
                "request_id": exchange.request_id,
                "client": client[0] if client else None,
                "method": None if method == UNKNOWN_METHOD else method,
                "path": exchange.path or None,
                "route": exchange.route,
                "upstream": exchange.upstream,
                "target": exchange.target,
                "status": status,
                "bytes_out": exchange.bytes_out,
                "duration_ms": round(elapsed * 1000, 3),
                "error": error,
                "protocol": exchange.protocol,
                "tls": exchange.tls,
            }
            if exchange.grpc:  # a gRPC call's status (the HTTP one is 200 either way)
                record["grpc_status"] = exchange.grpc_status
            if exchange.idempotency is not None:  # an Idempotency-Key route's result
                record["idempotency"] = exchange.idempotency
            if exchange.fallback:  # sent to the route's fallback (`upstream` names it)
                record["fallback"] = True
            if exchange.hedges:  # hedges sent, and whether one of them answered
                record["hedges"] = exchange.hedges
                record["hedge_won"] = exchange.hedge_won
            if trace is not None:  # tracing on: the ids of the request's SERVER span
                record["trace_id"] = trace.trace_id
                record["span_id"] = trace.span_id
            access_log.write(record)
        if trace is not None and trace.sampled:
            self.end_span(exchange, client, runtime, trace)

    def end_span(
        self,
        exchange: Exchange,
        client: tuple[str, int] | None,
        runtime: RuntimeView | None,
        trace: TraceIds,
    ) -> None:
        """End a sampled request's SERVER span: the traced data plane's phase does
        (`traced.py`); no request carries a trace to this one."""

    def refusal(
        self,
        *,
        status: int,
        code: str,
        detail: str,
        request_id: str,
        method: str | None,
        path: str | None,
        client: tuple[str, int] | None,
        bytes_out: int = 0,
        elapsed: float = 0.0,
    ) -> None:
        """Record an answer the protocol made before the data plane saw the request."""
        exchange = Exchange(
            started=time.monotonic() - elapsed,
            method=method or UNKNOWN_METHOD,
            path=path or "",
            request_id=request_id,
            status=status,
            bytes_out=bytes_out,
            error=code,
            detail=detail,
        )
        access_log = self._state.access_log
        if access_log is not None and access_log.traced:
            exchange.trace = NO_TRACE  # tracing on: the line says it has no trace
        self.finish(exchange, client, self._state.runtime, elapsed)

    def __repr__(self) -> str:
        return f"LoggingPhase(series={len(self._series)})"
