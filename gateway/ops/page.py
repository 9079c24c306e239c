"""The status page: `GET /status` (the page) and `GET /status.json` (the document).

`render(settings, snapshots, process)` builds the public document from one snapshot or
from several summed (a supervisor's workers'). The document's field names are a
contract (docs/operations.md, "Status page"): add fields, never rename them.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from importlib import resources
from typing import Any

from gateway import __version__
from gateway.build.runtime import Runtime
from gateway.config.models import GatewaySettings, RouteSettings, UpstreamSettings
from gateway.dataplane.state import GatewayState
from gateway.ops.board import BOUNDS, RECENT_ERRORS, WINDOW, StatusBoard
from gateway.ops.snapshots import snapshot

__all__ = ["StatusPage", "local_status", "process_info", "quantile", "render"]

_NBINS = len(BOUNDS) + 1
_SEVERITY = {"closed": 0, "half_open": 1, "open": 2}


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
        # The data listener: its protocols (HTTP/2 first when on), and TLS with its
        # certificates in use, or null for cleartext.
        "listener": _listener(snapshots),
        # Tracing: where spans go and how many went or were dropped, or null when off.
        "tracing": _tracing(snapshots),
        "config_file": board.config_path,
        "draining": draining or any(s.get("draining") for s in snapshots),
        "last_reload": None
        if last is None
        else {"at": last.at, "outcome": last.outcome, "errors": list(last.errors)},
    }


def _listener(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    tls = next((s["tls"] for s in snapshots if s.get("tls")), None)
    protocols = next((s["protocols"] for s in snapshots if s.get("protocols")), None)
    return {"protocols": protocols or ["HTTP/1.1", "HTTP/1.0"], "tls": tls}


def _tracing(snapshots: list[dict[str, Any]]) -> dict[str, Any] | None:
    live = [s["tracing"] for s in snapshots if s.get("tracing")]
    if not live:
        return None
    counts = ("spans_exported", "spans_dropped", "spans_queued")
    return {
        **{k: v for k, v in live[0].items() if k not in counts},
        **{k: sum(int(one.get(k, 0)) for one in live) for k in counts},
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
        "cache": None if route.cache is None else _cache(route.name, snapshots),
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


def _cache(name: str, snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """A caching route's results since the processes started, summed: hits (served
    from the store, collapsed misses included), misses, stale (served stale or
    revalidated) and the hit ratio among them (None before any); bypasses (methods
    other than GET and HEAD) left out."""
    results: dict[str, int] = {}
    for snap in snapshots:
        for result, n in (snap.get("cache") or {}).get(name, {}).items():
            results[result] = results.get(result, 0) + n
    hits = results.get("hit", 0) + results.get("collapsed", 0)
    misses = results.get("miss", 0)
    stale = results.get("stale", 0)
    looked = hits + misses + stale
    return {
        "hits": hits,
        "misses": misses,
        "stale": stale,
        "hit_ratio": round(hits / looked, 4) if looked else None,
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
        else {
            "path": "/grpc.health.v1.Health/Check" if health.grpc else health.path,
            "interval_s": health.interval,
            "grpc": health.grpc,
            "service": health.service if health.grpc else None,
        },
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


def local_status(state: GatewayState[Runtime]) -> dict[str, Any]:
    """The document for a single process: its own runtime and board."""
    snap = snapshot(state)
    settings = state.runtime.settings if state.runtime is not None else None
    process = process_info(state.status, workers=1, snapshots=[snap], draining=state.draining)
    return render(settings, [snap], process)


class StatusPage:
    """`gateway/ops/static/status.html`, read once, with a Content-Security-Policy that lets
    only its own inline script and style run: even a markup-injection bug could not run
    a script."""

    def __init__(self) -> None:
        self.body = (resources.files("gateway.ops") / "static" / "status.html").read_bytes()
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
