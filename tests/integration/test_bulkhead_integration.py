"""The bulkhead against a real upstream: the upstream never sees more than
`max_concurrency`, `max_queue` wait, the rest are shed at once; waits end at
`queue_timeout` (503) or the route deadline (504); every route of an upstream shares it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.integration.counting_app import HARNESS_FILE_LEAK, CountingApp, route_config
from tests.integration.harness import GatewayProcess, UpstreamServer

pytestmark = HARNESS_FILE_LEAK

Upstream = Callable[..., UpstreamServer]
Gateway = Callable[..., GatewayProcess]


async def timed_get(client: httpx.AsyncClient, url: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await client.get(url)
    return response, time.monotonic() - started


async def test_20_concurrent_against_4_slots_and_4_queued(
    upstream: Upstream, gateway: Gateway
) -> None:
    app = CountingApp(delay=0.5)
    gw = gateway(route_config(upstream(app), max_concurrency=4, max_queue=4, queue_timeout="3s"))
    limits = httpx.Limits(max_connections=40)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        results = await asyncio.gather(
            *(timed_get(client, gw.url + "/api/slow") for _ in range(20))
        )

    ok = [(r, t) for r, t in results if r.status_code == 200]
    shed = [(r, t) for r, t in results if r.status_code != 200]
    assert app.max_concurrent == 4  # the upstream never saw more than max_concurrency
    assert len(ok) == 8 and app.requests == 8  # 4 in flight + 4 queued
    assert len(shed) == 12
    for response, elapsed in shed:
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "upstream_saturated"
        assert response.json()["upstream"] == "svc"
        assert response.headers["retry-after"] == "1"
        assert elapsed < 0.3, f"shed after {elapsed:.3f}s: not at once"
    # the queued four waited for the first four to finish
    durations = sorted(t for _, t in ok)
    assert all(0.45 < t < 0.9 for t in durations[:4]), durations
    assert all(0.95 < t < 1.6 for t in durations[4:]), durations


async def test_queue_timeout_and_deadline_while_queued(
    upstream: Upstream, gateway: Gateway
) -> None:
    app = CountingApp(delay=1.5)
    config: dict[str, Any] = route_config(
        upstream(app), max_concurrency=1, max_queue=4, queue_timeout="500ms"
    )
    # a second route with a short deadline on the same upstream: one shared bulkhead
    config["routes"].append(
        {
            "name": "short",
            "path": "/short/{rest:path}",
            "rewrite": "/{rest}",
            "upstream": "svc",
            "timeout": "200ms",
        }
    )
    gw = gateway(config)
    async with httpx.AsyncClient(timeout=10) as client:
        holder = asyncio.create_task(client.get(gw.url + "/api/hold"))
        async with asyncio.timeout(5):
            while app.concurrent == 0:  # noqa: ASYNC110 - set from the upstream's thread
                await asyncio.sleep(0.01)

        deadline_bound, elapsed = await timed_get(client, gw.url + "/short/x")
        assert deadline_bound.status_code == 504
        assert deadline_bound.json()["code"] == "upstream_timeout"
        assert deadline_bound.json()["route"] == "short"
        assert 0.15 < elapsed < 0.45, elapsed

        queue_bound, elapsed = await timed_get(client, gw.url + "/api/y")
        assert queue_bound.status_code == 503
        assert queue_bound.json()["code"] == "upstream_saturated"
        assert queue_bound.headers["retry-after"] == "1"
        assert 0.45 < elapsed < 0.9, elapsed

        assert (await holder).status_code == 200
    assert app.requests == 1
    assert app.max_concurrent == 1
