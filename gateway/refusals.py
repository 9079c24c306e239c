"""The logging phase for answers the HTTP protocol makes itself.

`gateway/protocol.py` refuses some requests before the data plane ever sees them: a
request llhttp cannot parse or finds ambiguous (uvicorn's plain `400`), a target over
`max_request_line` (`414`), a head or trailer section over `max_header_size` /
`max_header_count` (`431`), a head not finished within `header_timeout` (`408`), and
a connection beyond `max_client_connections` (`503`). `Refusals.record` writes each
one where the data plane's own logging phase (`DataPlane._finish`) writes a request:
`gateway_requests_total` / `gateway_request_duration_seconds` under the route label
the data plane uses for a request no route matched (`(none)`), one access-log line
with the same fields, and the status board's recent errors.

Only refusals pay for this; the protocol calls nothing here on a request it lets
through. What the protocol did not learn before refusing is recorded as unknown:
method `-` in the metric label and the board, `null` in the access log; a path is
never written longer than `MAX_PATH` characters and never with its query string.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import httptools

from gateway.app import Exchange

if TYPE_CHECKING:
    from gateway.app import GatewayState

__all__ = ["MAX_PATH", "NO_ROUTE", "UNKNOWN_METHOD", "Refusals", "target_path"]

NO_ROUTE = "(none)"  # the data plane's route label for a request no route took
UNKNOWN_METHOD = "-"
MAX_PATH = 256
_MAX_SERIES = 1_000  # methods are llhttp's fixed set; this bounds a bug, not traffic


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


class Refusals:
    """Where a protocol-level refusal is counted, logged and shown; one per server."""

    __slots__ = ("_series", "_state")

    def __init__(self, state: GatewayState) -> None:
        self._state = state
        self._series: dict[tuple[str, int], tuple[Any, Any]] = {}

    def record(
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
        state = self._state
        label = method or UNKNOWN_METHOD
        key = (label, status)
        series = self._series.get(key)
        if series is None:
            metrics = state.metrics
            series = (
                metrics.requests.labels(NO_ROUTE, label, str(status)),
                metrics.duration.labels(NO_ROUTE),
            )
            if len(self._series) < _MAX_SERIES:
                self._series[key] = series
        series[0].inc()
        series[1].observe(elapsed)
        exchange = Exchange(
            started=time.monotonic() - elapsed,
            method=label,
            path=path or "",
            request_id=request_id,
            status=status,
            bytes_out=bytes_out,
            error=code,
            detail=detail,
        )
        state.status.record(exchange, NO_ROUTE, status, elapsed)
        access_log = state.access_log
        runtime = state.runtime
        if access_log is not None and (runtime is None or runtime.access_log):
            access_log.write(
                {
                    "time": access_log.now(),
                    "request_id": request_id,
                    "client": client[0] if client else None,
                    "method": method,
                    "path": path,
                    "route": None,
                    "upstream": None,
                    "target": None,
                    "status": status,
                    "bytes_out": bytes_out,
                    "duration_ms": round(elapsed * 1000, 3),
                    "error": code,
                }
            )

    def __repr__(self) -> str:
        return f"Refusals(series={len(self._series)})"
