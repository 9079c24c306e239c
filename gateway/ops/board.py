"""The status page's board: what the data plane's logging phase records per request.

`StatusBoard` (one per process, on `GatewayState`): `record` is called once per request
in O(1): per route a ring of 60 one-second buckets (requests, 5xx, a latency
histogram), and the last 50 responses the gateway made itself (its problem+json
answers). `gateway/ops/snapshots.py` turns it into a worker's snapshot and
`gateway/ops/page.py` into the public document.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "BOUNDS",
    "MAX_ROUTES",
    "RECENT_ERRORS",
    "WINDOW",
    "ErrorRecord",
    "Finished",
    "ReloadRecord",
    "RouteWindow",
    "StatusBoard",
]

WINDOW = 60  # seconds of per-route history: "the last minute"
RECENT_ERRORS = 50
MAX_ROUTES = 10_000  # route names are bounded by the config; this bounds a bug
# Latency histogram bounds: 0.1 ms to ~148 s in steps of √2, so a percentile read off
# it (interpolated inside its bucket) is within a factor √2 of the truth, at 43 counters
# a second per route with traffic.
BOUNDS = tuple(0.0001 * 2 ** (k / 2) for k in range(42))
_NBINS = len(BOUNDS) + 1
_MAX_DETAIL = 500
_MAX_PATH = 200


class Finished(Protocol):
    """What the board reads of one finished request (the data plane's `Exchange`)."""

    started: float
    request_id: str
    route: str | None
    method: str
    path: str
    error: str | None
    detail: str | None


class RouteWindow:
    """One route's last minute in one-second buckets (a ring indexed by the second),
    and its totals since the process started. Written by `StatusBoard.record`.

    A slot is one flat list, `[requests, 5xx, bin 0, bin 1, ...]`: one list to index
    per request rather than three keeps `record` cheap on the hot path."""

    __slots__ = ("errors_total", "seconds", "slots", "total")

    def __init__(self) -> None:
        self.seconds = [-1] * WINDOW  # which second each slot holds; stale means empty
        self.slots: list[list[int]] = [[] for _ in range(WINDOW)]
        self.total = 0
        self.errors_total = 0

    def dump(self, now: int) -> dict[str, Any]:
        """The buckets of the last minute that saw traffic, as
        `[second, requests, errors, [[bin, count], ...]]` (sparse: few bins are used)."""
        oldest = now - WINDOW + 1
        buckets = [
            [s, slot[0], slot[1], [[k, n] for k, n in enumerate(slot[2:]) if n]]
            for s, slot in zip(self.seconds, self.slots, strict=True)
            if s >= oldest and slot and slot[0]
        ]
        return {"total": self.total, "errors_total": self.errors_total, "buckets": buckets}

    def __repr__(self) -> str:
        return f"RouteWindow(total={self.total}, errors_total={self.errors_total})"


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    """One response the gateway made itself (a problem+json answer)."""

    at: float  # Unix time
    request_id: str
    route: str | None
    method: str
    path: str
    status: int
    code: str
    detail: str


@dataclass(frozen=True, slots=True)
class ReloadRecord:
    at: float  # Unix time
    outcome: str  # "ok" or "error"
    errors: tuple[str, ...] = ()


class StatusBoard:
    """This process's figures for the status page; written by the data plane's logging
    phase and by reloads, read by `snapshot`."""

    def __init__(self, recent: int = RECENT_ERRORS) -> None:
        self.routes: dict[str, RouteWindow] = {}
        self.errors: deque[ErrorRecord] = deque(maxlen=recent)
        self.started_at = time.time()
        self._started = time.monotonic()
        self.config_path: str | None = None
        self.last_reload: ReloadRecord | None = None
        # Open client connections of the data listener, when a server is attached.
        self.connections: Callable[[], int] | None = None
        # The data listener's TLS (versions, certificates in use), when it has TLS.
        self.tls: Callable[[], dict[str, Any]] | None = None
        # What the data listener speaks, newest first.
        self.protocols: tuple[str, ...] = ("HTTP/1.1", "HTTP/1.0")
        # Where spans are exported and how many, when tracing is on.
        self.tracing: Callable[[], dict[str, Any]] | None = None

    def record(self, exchange: Finished, route: str, status: int, elapsed: float) -> None:
        """One finished request (the data plane's logging phase): O(1), no clock read.
        On the request path, so written flat (no further calls but one bisect)."""
        window = self.routes.get(route)
        if window is None:
            if len(self.routes) >= MAX_ROUTES:
                return
            window = self.routes[route] = RouteWindow()
        second = int(exchange.started + elapsed)
        i = second % WINDOW
        if window.seconds[i] != second:
            window.seconds[i] = second
            window.slots[i] = [0] * (_NBINS + 2)
        slot = window.slots[i]
        slot[0] += 1
        slot[2 + bisect_left(BOUNDS, elapsed)] += 1
        window.total += 1
        if status >= 500:
            slot[1] += 1
            window.errors_total += 1
        if exchange.detail is not None:
            self.errors.append(
                ErrorRecord(
                    at=time.time(),
                    request_id=exchange.request_id,
                    route=exchange.route,
                    method=exchange.method,
                    path=exchange.path[:_MAX_PATH],
                    status=status,
                    code=exchange.error or "",
                    detail=exchange.detail[:_MAX_DETAIL],
                )
            )

    def reloaded(self, errors: Iterable[str]) -> None:
        errors = tuple(errors)
        self.last_reload = ReloadRecord(time.time(), "error" if errors else "ok", errors)

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._started

    def __repr__(self) -> str:
        return f"StatusBoard({len(self.routes)} routes, {len(self.errors)} recent errors)"
