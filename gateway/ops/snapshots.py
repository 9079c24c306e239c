"""One process's raw figures for the status page, and how workers exchange them.

`snapshot(state)`: this process's figures, JSON-able, in O(routes + targets): the
board, plus the live state of the runtime's upstreams (bulkhead, breaker, retry budget,
targets and their health checks), and the upstream outcome and cache result counters
of the metrics registry. With `--workers N` every worker writes its snapshot to a file once a second
(`publish`) and the supervisor's admin listener merges them (`read_snapshots`), as
`/metrics` sums the workers' metric files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from gateway.build.runtime import Runtime
from gateway.build.upstreams import Upstream
from gateway.dataplane.state import GatewayState

__all__ = ["publish", "read_snapshots", "remove_snapshot", "snapshot", "write_snapshot"]

log = logging.getLogger("gateway.status")


def snapshot(state: GatewayState[Runtime]) -> dict[str, Any]:
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
        "tls": board.tls() if board.tls is not None else None,
        "protocols": list(board.protocols),
        "tracing": board.tracing() if board.tracing is not None else None,
        "draining": state.draining,
        "routes": {name: w.dump(int(now)) for name, w in board.routes.items()},
        "upstreams": upstreams,
        "cache": _cache_results(state),
        "errors": [
            [e.at, e.request_id, e.route, e.method, e.path, e.status, e.code, e.detail]
            for e in board.errors
        ],
    }


def _upstream_outcomes(state: GatewayState[Runtime]) -> dict[str, dict[str, int]]:
    """`gateway_upstream_requests_total` of this process, by upstream and outcome."""
    counts: dict[str, dict[str, int]] = {}
    for metric in state.metrics.upstream_requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                upstream = counts.setdefault(sample.labels["upstream"], {})
                outcome = sample.labels["outcome"]
                upstream[outcome] = upstream.get(outcome, 0) + int(sample.value)
    return counts


def _cache_results(state: GatewayState[Runtime]) -> dict[str, dict[str, int]]:
    """`gateway_cache_requests_total` of this process, by route and result."""
    counts: dict[str, dict[str, int]] = {}
    for metric in state.metrics.cache_requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                route = counts.setdefault(sample.labels["route"], {})
                result = sample.labels["result"]
                route[result] = route.get(result, 0) + int(sample.value)
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


async def publish(state: GatewayState[Runtime], directory: str, interval: float = 1.0) -> None:
    """A worker's background task: write this process's snapshot every `interval`."""
    while True:
        try:
            write_snapshot(directory, snapshot(state))
        except Exception:  # the page going stale must not take the worker down
            log.exception("could not publish the status snapshot")
        await asyncio.sleep(interval)
