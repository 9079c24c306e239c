"""Rate limits over the wire: the in-process store, two gateway processes sharing one
budget through the real Redis on 127.0.0.1:6379, and a Redis of the test's own that
goes away mid-test (fail-open by default, 503 on fail_closed routes)."""

from __future__ import annotations

import asyncio
import copy
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from tests.integration.edge_support import SHARED_REDIS, EchoApp, metric, redis_prefix_of_its_own
from tests.integration.harness import GatewayProcess, UpstreamServer, free_port


def config(up: UpstreamServer, routes: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    return {
        "upstreams": {"up": {"targets": [up.url]}},
        "routes": [{"upstream": "up", **r} for r in routes],
        **top,
    }


def test_a_spent_bucket_is_429_with_retry_after_and_ratelimit_headers(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    app = EchoApp()
    gw = gateway(
        config(
            upstream(app),
            [
                {"name": "ip", "path": "/ip", "rate_limit": {"rate": "1/m", "burst": 3}},
                {
                    "name": "tenant",
                    "path": "/tenant",
                    "rate_limit": {"rate": "1/m", "burst": 1, "key": "header:X-Tenant"},
                },
                {
                    "name": "whole",
                    "path": "/whole",
                    "rate_limit": {"rate": "1/m", "burst": 1, "key": "route"},
                },
            ],
        )
    )
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        allowed = [client.get("/ip") for _ in range(3)]
        assert [r.status_code for r in allowed] == [200, 200, 200]
        assert [r.headers["ratelimit-remaining"] for r in allowed] == ["2", "1", "0"]
        assert all(r.headers["ratelimit-limit"] == "3" for r in allowed)
        assert allowed[0].headers["ratelimit-reset"] == "60"  # one token to refill, at 1/min
        assert allowed[2].headers["ratelimit-reset"] == "180"
        refused = client.get("/ip")
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["code"] == "rate_limited"
        assert refused.json()["route"] == "ip"
        assert refused.headers["retry-after"] == "60"
        assert refused.headers["ratelimit-limit"] == "3"
        assert refused.headers["ratelimit-remaining"] == "0"
        assert refused.headers["ratelimit-reset"] == "180"  # until the bucket is full again
        # A reload whose store settings did not change keeps the buckets.
        assert httpx.post(gw.admin_url + "/reload", timeout=10).status_code == 200
        assert client.get("/ip").status_code == 429
        # client_ip is the real client: X-Forwarded-For from a trusted proxy (loopback).
        assert client.get("/ip", headers={"x-forwarded-for": "203.0.113.7"}).status_code == 200

        # header:X-Tenant: one bucket per value, and one shared by requests without it.
        assert client.get("/tenant", headers={"x-tenant": "a"}).status_code == 200
        assert client.get("/tenant", headers={"x-tenant": "b"}).status_code == 200
        assert client.get("/tenant", headers={"x-tenant": "a"}).status_code == 429
        assert client.get("/tenant").status_code == 200
        assert client.get("/tenant").status_code == 429

        # route: everyone shares one bucket.
        assert client.get("/whole").status_code == 200
        other = client.get("/whole", headers={"x-forwarded-for": "198.51.100.1"})
        assert other.status_code == 429
    assert app.requests == 3 + 1 + 3 + 1
    assert metric(gw, "gateway_rate_limited_total", route="ip") == 2.0
    assert metric(gw, "gateway_rate_limited_total", route="tenant") == 2.0


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own in the shared Redis, deleted afterwards."""
    yield from redis_prefix_of_its_own("gateway-test")


async def test_two_gateways_share_one_budget_through_redis_exactly(
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
    redis_prefix: str,
) -> None:
    app = EchoApp()
    up = upstream(app)
    burst = 7
    cfg = config(
        up,
        [{"name": "shared", "path": "/s", "rate_limit": {"rate": "1/h", "burst": burst}}],
        rate_limit_store={"redis": SHARED_REDIS, "prefix": redis_prefix},
    )
    gateways = [gateway(copy.deepcopy(cfg)) for _ in range(2)]
    async with httpx.AsyncClient(timeout=5) as client:
        # Concurrent, interleaved across both processes: the Lua check-and-take is atomic.
        responses = await asyncio.gather(
            *(client.get(gateways[i % 2].url + "/s") for i in range(24))
        )
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == burst, statuses
    assert statuses.count(429) == 24 - burst
    assert app.requests == burst
    remaining = sorted(int(r.headers["ratelimit-remaining"]) for r in responses)
    assert remaining[-burst:] == list(range(burst))  # every token handed out once
    per_gateway = [metric(gw, "gateway_rate_limited_total", route="shared") for gw in gateways]
    assert sum(per_gateway) == 24 - burst


class OwnRedis:
    """A redis-server of the test's own on a free port, which the test may kill."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OwnRedis:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is needed for this test"
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        self.proc = subprocess.Popen(
            [*argv, "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            deadline = time.monotonic() + 5
            while True:
                try:
                    if client.ping():
                        return self
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis().start()
    try:
        yield server
    finally:
        server.kill()


def test_redis_going_away_fails_open_or_closed_and_is_counted_and_logged_once(
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
    own_redis: OwnRedis,
) -> None:
    app = EchoApp()
    limit = {"rate": "100/s", "burst": 100}
    gw = gateway(
        config(
            upstream(app),
            [
                {"name": "open", "path": "/open", "rate_limit": limit},
                {"name": "closed", "path": "/closed", "rate_limit": {**limit, "fail_closed": True}},
            ],
            rate_limit_store={"redis": own_redis.url, "timeout": "150ms"},
        )
    )
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        up = client.get("/open")
        assert up.status_code == 200 and "ratelimit-remaining" in up.headers
        assert client.get("/closed").status_code == 200

        own_redis.kill()
        started = time.monotonic()
        opened = [client.get("/open") for _ in range(10)]
        closed = [client.get("/closed") for _ in range(5)]
        elapsed = time.monotonic() - started
        assert [r.status_code for r in opened] == [200] * 10
        assert not any("ratelimit-remaining" in r.headers for r in opened)
        assert [r.status_code for r in closed] == [503] * 5
        assert closed[0].json()["code"] == "rate_limit_unavailable"
        assert closed[0].headers["retry-after"] == "1"
        assert elapsed < 2.0  # a dead Redis never stalls requests

        assert metric(gw, "gateway_rate_limit_store_errors_total", route="open") == 10.0
        assert metric(gw, "gateway_rate_limit_store_errors_total", route="closed") == 5.0
        assert metric(gw, "gateway_rate_limited_total", route="closed") == 0.0

        # Back on the same port: used again once the back-off has passed.
        own_redis.start()
        deadline = time.monotonic() + 4
        while True:
            r = client.get("/closed")
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.status_code == 200 and "ratelimit-remaining" in r.headers
    logged = gw.stderr
    assert logged.count("rate-limit store unreachable") == 1, logged
    assert "reachable again" in logged
