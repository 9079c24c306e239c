"""What the status page shows: `GET /status.json` on the admin listener, and the page itself.

Three parts, so the request path pays for nothing but one call in its logging phase:

- `StatusBoard` (one per process, on `GatewayState`): `record` is called once per
  request by the data plane's `_finish`, in O(1): per route a ring of 60 one-second
  buckets (requests, 5xx, a latency histogram), and the last 50 responses the gateway
  made itself (its problem+json answers).
- `snapshot(state)`: this process's raw figures, JSON-able, in O(routes + targets):
  the board, plus the live state of the runtime's upstreams (bulkhead, breaker, retry
  budget, targets and their health checks) and the upstream outcome counters of the
  metrics registry.
- `render(settings, snapshots, process)`: the public document, from one snapshot or
  from several summed. With `--workers N` every worker writes its snapshot to a file
  once a second (`publish`) and the supervisor's admin listener merges them
  (`read_snapshots`), as `/metrics` sums the workers' metric files.

The document's field names are a contract (README, "Status page"): add fields, never
rename them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.settings import GatewaySettings, RouteSettings, UpstreamSettings

if TYPE_CHECKING:
    from gateway.app import Exchange, GatewayState
    from gateway.upstream import Upstream

__all__ = [
    "BOUNDS",
    "MAX_ROUTES",
    "RECENT_ERRORS",
    "WINDOW",
    "ErrorRecord",
    "ReloadRecord",
    "RouteWindow",
    "StatusBoard",
    "StatusPage",
    "local_status",
    "process_info",
    "publish",
    "quantile",
    "read_snapshots",
    "remove_snapshot",
    "render",
    "snapshot",
    "write_snapshot",
]

log = logging.getLogger("gateway.status")

WINDOW = 60  # seconds of per-route history: "the last minute"
RECENT_ERRORS = 50
MAX_ROUTES = 10_000  # route names are bounded by the config; this bounds a bug
# Latency histogram bounds: 0.1 ms to ~148 s in steps of √2, so a percentile read off
# it (interpolated inside its bucket) is within a factor √2 of the truth, at 43 counters
# a second per route with traffic.
BOUNDS = tuple(0.0001 * 2 ** (k / 2) for k in range(42))
_NBINS = len(BOUNDS) + 1
_SEVERITY = {"closed": 0, "half_open": 1, "open": 2}
_MAX_DETAIL = 500
_MAX_PATH = 200


class RouteWindow:
    """One route's last minute in one-second buckets (a ring indexed by the second),
    and its totals since the process started. Written by `StatusBoard.record`.

    A slot is one flat list, `[requests, 5xx, bin 0, bin 1, ...]`: one list to index
    per request rather than three keeps `record` at a few hundred nanoseconds."""

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

    def record(self, exchange: Exchange, route: str, status: int, elapsed: float) -> None:
        """One finished request (the data plane's `_finish`): O(1), no clock read.
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


# -- one process's raw figures ------------------------------------------------------------


def snapshot(state: GatewayState) -> dict[str, Any]:
    """This process's figures as plain JSON-able data (what a worker publishes)."""
    board = state.status
    now = time.monotonic()
    outcomes = _upstream_outcomes(state)
    upstreams: dict[str, Any] = {}
    runtime = state.runtime
    if runtime is not None:
        for name, upstream in runtime.upstreams.items():
            upstreams[name] = _upstream_live(upstream, outcomes.get(name, {}))
    connections = 0
    if board.connections is not None:
        with contextlib.suppress(Exception):  # a server not started yet has no state
            connections = board.connections()
    return {
        "pid": os.getpid(),
        "monotonic": now,
        "connections": connections,
        "draining": state.draining,
        "routes": {name: w.dump(int(now)) for name, w in board.routes.items()},
        "upstreams": upstreams,
        "errors": [
            [e.at, e.request_id, e.route, e.method, e.path, e.status, e.code, e.detail]
            for e in board.errors
        ],
    }


def _upstream_outcomes(state: GatewayState) -> dict[str, dict[str, int]]:
    """`gateway_upstream_requests_total` of this process, by upstream and outcome."""
    counts: dict[str, dict[str, int]] = {}
    for metric in state.metrics.upstream_requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                upstream = counts.setdefault(sample.labels["upstream"], {})
                outcome = sample.labels["outcome"]
                upstream[outcome] = upstream.get(outcome, 0) + int(sample.value)
    return counts


def _upstream_live(upstream: Upstream, outcomes: dict[str, int]) -> dict[str, Any]:
    bulkhead = upstream.bulkhead
    breaker = None
    if upstream.breaker is not None:
        state = upstream.breaker.state
        breaker = {
            "state": state,
            "next_trial_in_s": upstream.breaker.retry_after() if state == "open" else None,
        }
    budget = upstream.retry_budget
    checks = upstream.health.last_checks if upstream.health is not None else {}
    return {
        "inflight": bulkhead.inflight,
        "queued": bulkhead.queued,
        "max_concurrency": bulkhead.max_concurrency,
        "max_queue": bulkhead.max_queue,
        "outcomes": outcomes,
        "breaker": breaker,
        "retry_budget": {
            "retries": budget.retries,
            "allowed": budget.allowed(),
            "requests": budget.requests,
        },
        "targets": {
            t.url: {
                "healthy": t.healthy,
                "inflight": t.inflight,
                "last_check": list(checks[t.url]) if t.url in checks else None,
            }
            for t in upstream.targets
        },
    }


# -- the public document ------------------------------------------------------------------


def process_info(
    board: StatusBoard,
    *,
    workers: int,
    snapshots: list[dict[str, Any]],
    draining: bool,
) -> dict[str, Any]:
    last = board.last_reload
    return {
        "version": __version__,
        "pid": os.getpid(),
        "started_at": board.started_at,
        "uptime_s": round(board.uptime, 1),
        "workers": workers,
        "workers_reporting": len(snapshots),
        "connections": sum(int(s.get("connections", 0)) for s in snapshots),
        "config_file": board.config_path,
        "draining": draining or any(s.get("draining") for s in snapshots),
        "last_reload": None
        if last is None
        else {"at": last.at, "outcome": last.outcome, "errors": list(last.errors)},
    }


def render(
    settings: GatewaySettings | None,
    snapshots: list[dict[str, Any]],
    process: dict[str, Any],
) -> dict[str, Any]:
    """The `/status.json` document: the configured routes and upstreams, with the live
    figures of every snapshot summed."""
    now = int(time.monotonic())
    routes = settings.routes if settings is not None else ()
    upstreams = settings.upstreams if settings is not None else {}
    errors = [e for s in snapshots for e in s.get("errors", ())]
    errors.sort(key=lambda e: e[0], reverse=True)
    return {
        "generated_at": time.time(),
        "window_s": WINDOW,
        "process": process,
        "routes": [_route(r, snapshots, now) for r in routes],
        "upstreams": [_upstream(name, u, snapshots) for name, u in upstreams.items()],
        "recent_errors": [
            {
                "at": at,
                "request_id": rid,
                "route": route,
                "method": method,
                "path": path,
                "status": status,
                "code": code,
                "detail": detail,
            }
            for at, rid, route, method, path, status, code, detail in errors[:RECENT_ERRORS]
        ],
    }


def _route(route: RouteSettings, snapshots: list[dict[str, Any]], now: int) -> dict[str, Any]:
    oldest = now - WINDOW + 1
    requests = [0] * WINDOW
    errors = [0] * WINDOW
    bins: list[list[int] | None] = [None] * WINDOW
    total = errors_total = 0
    for snap in snapshots:
        window = snap.get("routes", {}).get(route.name)
        if window is None:
            continue
        total += window["total"]
        errors_total += window["errors_total"]
        for second, count, failed, used in window["buckets"]:
            if not oldest <= second <= now:
                continue
            i = second - oldest
            requests[i] += count
            errors[i] += failed
            hist = bins[i]
            if hist is None:
                hist = bins[i] = [0] * _NBINS
            for k, n in used:
                hist[k] += n
    minute = [0] * _NBINS
    for hist in bins:
        if hist is not None:
            for k, n in enumerate(hist):
                minute[k] += n
    count = sum(requests)
    aggregate = route.aggregate
    limit = route.rate_limit
    return {
        "name": route.name,
        "methods": list(route.methods) if route.methods is not None else None,
        "host": route.host,
        "path": route.path,
        "upstream": route.upstream,
        "backends": None
        if aggregate is None
        else [
            {"upstream": b.upstream, "path": b.path, "key": b.key, "required": b.required}
            for b in aggregate.backends
        ],
        "timeout_s": route.timeout,
        "rate_limit": None
        if limit is None
        else {"rate_per_s": limit.rate, "burst": limit.burst, "key": limit.key},
        "auth": route.auth,
        "requests": count,
        "errors": sum(errors),
        "rate_per_s": round(count / WINDOW, 3),
        "error_rate": round(sum(errors) / count, 4) if count else 0.0,
        "p50_ms": _ms(quantile(minute, 0.5)),
        "p99_ms": _ms(quantile(minute, 0.99)),
        "requests_total": total,
        "errors_total": errors_total,
        "series": {
            "requests": requests,
            "errors": errors,
            "p99_ms": [_ms(quantile(h, 0.99)) if h is not None else None for h in bins],
        },
    }


def _upstream(
    name: str, settings: UpstreamSettings, snapshots: list[dict[str, Any]]
) -> dict[str, Any]:
    live = [s["upstreams"][name] for s in snapshots if name in s.get("upstreams", {})]
    outcomes: dict[str, int] = {}
    for one in live:
        for outcome, n in one["outcomes"].items():
            outcomes[outcome] = outcomes.get(outcome, 0) + n
    processes = max(1, len(live))
    breaker: dict[str, Any] | None = None
    if settings.circuit_breaker is not None:
        states = [one["breaker"] for one in live if one["breaker"] is not None]
        worst = max(states, key=lambda b: _SEVERITY[b["state"]], default=None)
        trials = [b["next_trial_in_s"] for b in states if b["next_trial_in_s"] is not None]
        breaker = {
            "state": worst["state"] if worst is not None else "closed",
            "next_trial_in_s": min(trials) if trials else None,
        }
    health = settings.health_check
    return {
        "name": name,
        "balancer": settings.balancer,
        "inflight": sum(one["inflight"] for one in live),
        "max_concurrency": settings.max_concurrency * processes,
        "queued": sum(one["queued"] for one in live),
        "max_queue": settings.max_queue * processes,
        "shed": outcomes.get("saturated", 0),
        "timed_out": outcomes.get("timeout", 0),
        "outcomes": dict(sorted(outcomes.items())),
        "breaker": breaker,
        "retry_budget": {
            "ratio": settings.retries.budget,
            "retries": sum(one["retry_budget"]["retries"] for one in live),
            "allowed": sum(one["retry_budget"]["allowed"] for one in live),
            "requests": sum(one["retry_budget"]["requests"] for one in live),
        },
        "health_check": None
        if health is None
        else {"path": health.path, "interval_s": health.interval},
        "targets": [
            _target(
                t.url, t.weight, health is not None, [one["targets"].get(t.url) for one in live]
            )
            for t in settings.targets
        ],
    }


def _target(
    url: str, weight: int, checked: bool, live: list[dict[str, Any] | None]
) -> dict[str, Any]:
    seen = [one for one in live if one is not None]
    checks = [one["last_check"] for one in seen if one["last_check"] is not None]
    last = max(checks, key=lambda c: c[0], default=None)
    if not checked or last is None:
        health = "not_checked"
    else:
        health = "healthy" if all(one["healthy"] for one in seen) else "unhealthy"
    return {
        "url": url,
        "weight": weight,
        "health": health,
        "last_check": None if last is None else {"at": last[0], "ok": last[1], "detail": last[2]},
        "inflight": sum(one["inflight"] for one in seen),
    }


def quantile(bins: list[int], q: float) -> float | None:
    """The `q` quantile, in seconds, of a histogram over `BOUNDS` (interpolated inside
    its bucket, as Prometheus' `histogram_quantile` does); None when it is empty."""
    total = sum(bins)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for k, n in enumerate(bins):
        if n and seen + n >= rank:
            if k >= len(BOUNDS):
                return BOUNDS[-1]
            lower = BOUNDS[k - 1] if k > 0 else 0.0
            return lower + (BOUNDS[k] - lower) * (rank - seen) / n
        seen += n
    return BOUNDS[-1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def local_status(state: GatewayState) -> dict[str, Any]:
    """The document for a single process: its own runtime and board."""
    snap = snapshot(state)
    settings = state.runtime.settings if state.runtime is not None else None
    process = process_info(state.status, workers=1, snapshots=[snap], draining=state.draining)
    return render(settings, [snap], process)


# -- workers: one snapshot file each, merged by the supervisor ------------------------------


def write_snapshot(directory: str, snap: dict[str, Any]) -> None:
    path = os.path.join(directory, f"{snap['pid']}.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(snap, f, separators=(",", ":"))
    os.replace(tmp, path)  # readers never see half a file


def read_snapshots(directory: str, pids: Iterable[int]) -> list[dict[str, Any]]:
    """The latest snapshot of each of `pids` (live workers) that has written one."""
    snapshots = []
    for pid in pids:
        try:
            with open(os.path.join(directory, f"{pid}.json"), encoding="utf-8") as f:
                snapshots.append(json.load(f))
        except (OSError, ValueError):
            continue  # not written yet, or the worker is gone
    return snapshots


def remove_snapshot(directory: str, pid: int) -> None:
    with contextlib.suppress(OSError):
        os.remove(os.path.join(directory, f"{pid}.json"))


async def publish(state: GatewayState, directory: str, interval: float = 1.0) -> None:
    """A worker's background task: write this process's snapshot every `interval`."""
    while True:
        try:
            write_snapshot(directory, snapshot(state))
        except Exception:  # the page going stale must not take the worker down
            log.exception("could not publish the status snapshot")
        await asyncio.sleep(interval)


# -- the page -----------------------------------------------------------------------------


class StatusPage:
    """`gateway/static/status.html`, read once, with a Content-Security-Policy that lets
    only its own inline script and style run: even a markup-injection bug could not run
    a script."""

    def __init__(self) -> None:
        self.body = (resources.files("gateway") / "static" / "status.html").read_bytes()
        text = self.body.decode("utf-8")
        scripts = re.findall(r"<script>(.*?)</script>", text, re.DOTALL)
        styles = re.findall(r"<style>(.*?)</style>", text, re.DOTALL)
        self.headers = {
            "Content-Security-Policy": (
                "default-src 'none'; connect-src 'self'; img-src 'self' data:; "
                f"script-src {_hashes(scripts)}; style-src {_hashes(styles)}; "
                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            ),
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }

    def __repr__(self) -> str:
        return f"StatusPage({len(self.body)} bytes)"


def _hashes(blocks: list[str]) -> str:
    return (
        " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
            for b in blocks
        )
        or "'none'"
    )
