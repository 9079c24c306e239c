"""Scale-out, proven locally (issue 9): three gateway processes on different ports
share one Redis. Traffic sent round-robin across them is held to ONE rate-limit budget
exactly, and a replica stopped with SIGTERM loses none of its in-flight requests."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tests.integration.harness import GatewayProcess, UpstreamServer

REDIS = "redis://127.0.0.1:6379/0"


def backend() -> Starlette:
    async def fast(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def slow(request: Request) -> Response:
        await asyncio.sleep(1.0)
        return PlainTextResponse("slow-ok")

    return Starlette(routes=[Route("/fast", fast), Route("/slow", slow)])


def replica_config(up: UpstreamServer, prefix: str, burst: int) -> dict[str, Any]:
    return {
        "server": {"drain_timeout": "10s", "access_log": False},
        "rate_limit_store": {"redis": REDIS, "prefix": prefix},
        "upstreams": {"up": {"targets": [up.url]}},
        "routes": [
            {
                "name": "limited",
                "path": "/fast",
                "upstream": "up",
                # One token a minute: within the test, the budget is the burst alone.
                "rate_limit": {"rate": "1/m", "burst": burst, "key": "route"},
            },
            {"name": "slow", "path": "/slow", "upstream": "up", "timeout": "5s"},
        ],
    }


def test_three_replicas_share_one_budget_and_a_stopped_one_loses_nothing(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    up = upstream(backend())
    prefix = f"gateway:test:{uuid.uuid4().hex}:"
    burst = 25
    replicas = [gateway(replica_config(up, prefix, burst)) for _ in range(3)]

    # 90 requests round-robin over the three replicas: exactly `burst` get through.
    statuses: list[int] = []
    with httpx.Client(timeout=5) as client:
        for i in range(90):
            statuses.append(client.get(replicas[i % 3].url + "/fast").status_code)
    assert statuses.count(200) == burst
    assert statuses.count(429) == 90 - burst
    assert set(statuses) == {200, 429}
    # Every replica refused some once the shared budget was spent.
    for r in range(3):
        assert 429 in statuses[r::3]

    # In-flight requests on a replica that is told to stop all finish with 200.
    async def drain_one() -> tuple[list[int], int]:
        victim = replicas[1]
        async with httpx.AsyncClient(timeout=10) as client:
            pending = [asyncio.create_task(client.get(victim.url + "/slow")) for _ in range(5)]
            await asyncio.sleep(0.3)  # all five are now waiting on the upstream
            victim.signal(signal.SIGTERM)
            responses = await asyncio.gather(*pending)
        code = await asyncio.to_thread(victim.wait, 15)
        return [r.status_code for r in responses], code

    started = time.monotonic()
    codes, exit_code = asyncio.run(drain_one())
    assert codes == [200] * 5
    assert exit_code == 0
    assert time.monotonic() - started < 8

    # The survivors keep serving (and keep refusing past the shared budget).
    with httpx.Client(timeout=5) as client:
        for survivor in (replicas[0], replicas[2]):
            assert client.get(survivor.url + "/slow").status_code == 200
            assert client.get(survivor.url + "/fast").status_code == 429
