"""The Redis cache store through two real gateway processes sharing the Redis on
127.0.0.1:6379 (keys under a prefix of the test's own, deleted afterwards): a miss on
one is a hit on the other, a purge on one empties both, and a Redis that cannot be
reached is a miss, never an error, counted and logged."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.integration.edge_support import metric
from tests.integration.harness import GatewayProcess, UpstreamServer, free_port
from tests.integration.redis_keys import SHARED_REDIS, scratch_prefix


class Origin:
    """Answers every GET with `Cache-Control: max-age=60` and counts them per path."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.app = Starlette(routes=[Route("/{rest:path}", self.answer)])

    async def answer(self, request: Request) -> Response:
        self.hits[request.url.path] += 1
        n = self.hits[request.url.path]
        headers = {"cache-control": "max-age=60", "etag": f'"v{n}"'}
        return Response(f"n={n}", headers=headers, media_type="text/plain")


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own in the shared Redis, deleted afterwards."""
    with scratch_prefix("cache") as prefix:
        yield prefix


def config(up: UpstreamServer, store: dict[str, Any]) -> dict[str, Any]:
    return {
        "server": {"access_log": False},
        "upstreams": {"up": {"targets": [up.url], "retries": {"attempts": 0}}},
        "cache": {"store": store},
        "routes": [
            {"name": "cached", "path": "/c/{rest:path}", "upstream": "up", "cache": {}},
            {"name": "other", "path": "/o/{rest:path}", "upstream": "up", "cache": {}},
        ],
    }


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_two_gateways_share_entries_and_purges_through_redis(
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
    redis_prefix: str,
) -> None:
    origin = Origin()
    cfg = config(upstream(origin.app), {"redis": SHARED_REDIS, "prefix": redis_prefix})
    a, b = (gateway(copy.deepcopy(cfg)) for _ in range(2))
    path = "/c/shared?q=1"
    first = httpx.get(a.url + path, timeout=5)
    assert first.status_code == 200
    assert first.headers["cache-status"] == "gateway; fwd=miss; stored"
    # The write is a task of its own: wait until it is in Redis.
    client = redis.Redis.from_url(SHARED_REDIS, socket_timeout=2)
    try:
        wait_for(lambda: len(list(client.scan_iter(match=redis_prefix + "*"))) >= 2)
        second = httpx.get(b.url + path, timeout=5)
        assert second.status_code == 200
        assert second.text == "n=1"
        assert second.headers["cache-status"].startswith("gateway; hit; ttl=")
        assert "age" in second.headers
        assert origin.hits["/c/shared"] == 1
        # Keys are per route, under the prefix, and expire (TTL = freshness + margin).
        keys = [k.decode() for k in client.scan_iter(match=redis_prefix + "*")]
        assert all(k.startswith(redis_prefix + "cached:") for k in keys), keys
        assert all(client.pttl(k) > 0 for k in keys)

        other = "/o/kept"
        assert httpx.get(a.url + other, timeout=5).status_code == 200
        wait_for(lambda: len(list(client.scan_iter(match=redis_prefix + "other:*"))) >= 2)

        # A purge on A removes the entry for B too; the other route's stays.
        purged = httpx.post(a.admin_url + "/cache/purge", json={"route": "cached"}, timeout=5)
        assert purged.status_code == 200
        assert purged.json()["purged"] >= 1  # the answer waits for the removal
        assert not list(client.scan_iter(match=redis_prefix + "cached:*"))
        third = httpx.get(b.url + path, timeout=5)
        assert third.text == "n=2"
        assert third.headers["cache-status"].startswith("gateway; fwd=miss")
        assert origin.hits["/c/shared"] == 2
        assert (
            httpx.get(b.url + other, timeout=5).headers["cache-status"].startswith("gateway; hit")
        )
        assert origin.hits["/o/kept"] == 1
    finally:
        client.close()
    assert metric(a, "gateway_cache_store_errors_total", route="cached") == 0.0
    assert metric(b, "gateway_cache_store_errors_total", route="cached") == 0.0


class SlowOrigin(Origin):
    """Answers after `delay` seconds; `started` is set as soon as a request arrives."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.started = threading.Event()

    async def answer(self, request: Request) -> Response:
        self.started.set()
        await asyncio.sleep(self.delay)
        return await super().answer(request)


def test_two_gateways_coalesce_concurrent_misses_into_one_upstream_request(
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
    redis_prefix: str,
) -> None:
    origin = SlowOrigin(delay=3.0)
    cfg = config(upstream(origin.app), {"redis": SHARED_REDIS, "prefix": redis_prefix})
    a, b = (gateway(copy.deepcopy(cfg)) for _ in range(2))
    path = "/c/stampede"
    origin.delay = 0.0
    for g in (a, b):  # warm up: each gateway's upstream and Redis connections are open
        assert httpx.get(g.url + "/o/warm", timeout=10).status_code == 200
    origin.delay = 3.0
    origin.started.clear()

    def get(url: str) -> httpx.Response:
        return httpx.get(url + path, timeout=10)

    with ThreadPoolExecutor(max_workers=21) as pool:
        first = pool.submit(get, a.url)
        # A's fetch is under way (it holds the key's lock) when the others are sent.
        assert origin.started.wait(timeout=5), "the first request never reached upstream"
        rest = [pool.submit(get, g.url) for g in (b, a) for _ in range(10)]
        answers = [first.result(), *(f.result() for f in rest)]
    statuses = [r.headers["cache-status"] for r in answers]
    assert [r.status_code for r in answers] == [200] * 21
    assert {r.text for r in answers} == {"n=1"}, statuses
    assert origin.hits[path] == 1
    assert statuses[0] == "gateway; fwd=miss; stored"
    # B's requests waited for A's fetch (unless the machine was so slow that they
    # arrived after its answer was stored: then they are plain hits, still no fetch).
    assert all(s == "gateway; fwd=miss; collapsed" or "hit" in s for s in statuses[1:])
    assert statuses[1:11].count("gateway; fwd=miss; collapsed") >= 1, statuses
    # The fetch lock is gone once the answer is stored.
    client = redis.Redis.from_url(SHARED_REDIS, socket_timeout=2)
    try:
        lock = redis_prefix.rstrip(":") + "-fetching:*"
        wait_for(lambda: not list(client.scan_iter(match=lock)))
    finally:
        client.close()


def test_unreachable_redis_is_a_miss_never_an_error(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    origin = Origin()
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    gw = gateway(config(upstream(origin.app), {"redis": closed, "timeout": "100ms"}))
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        answers = [client.get("/c/down") for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert all(r.headers["cache-status"].startswith("gateway; fwd=miss") for r in answers)
    assert origin.hits["/c/down"] == 3
    assert metric(gw, "gateway_cache_store_errors_total", route="cached") >= 3.0
    wait_for(lambda: "cache store unreachable" in gw.stderr)
    assert gw.stderr.count("cache store unreachable") == 1  # once per minute, not per request
    assert "Traceback" not in gw.stderr


def test_status_page_shows_the_hit_ratio_per_route_summed_over_workers(
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
    redis_prefix: str,
) -> None:
    origin = Origin()
    cfg = config(upstream(origin.app), {"redis": SHARED_REDIS, "prefix": redis_prefix})
    cfg["routes"].append({"name": "plain", "path": "/p", "upstream": "up"})
    gw = gateway(cfg, args=["--workers", "2"])
    first = httpx.get(gw.url + "/c/ratio", timeout=5)
    assert first.headers["cache-status"].startswith("gateway; fwd=miss")
    client = redis.Redis.from_url(SHARED_REDIS, socket_timeout=2)
    try:
        wait_for(lambda: len(list(client.scan_iter(match=redis_prefix + "cached:*"))) >= 2)
    finally:
        client.close()
    for _ in range(9):  # a new connection each time, so both workers get a share
        r = httpx.get(gw.url + "/c/ratio", timeout=5)
        assert r.headers["cache-status"].startswith("gateway; hit")
    assert httpx.get(gw.url + "/p", timeout=5).status_code == 200
    assert origin.hits["/c/ratio"] == 1

    def document() -> dict[str, Any]:
        doc: dict[str, Any] = httpx.get(gw.admin_url + "/status.json", timeout=5).json()
        return doc

    deadline = time.monotonic() + 5
    while True:
        routes = {r["name"]: r for r in document()["routes"]}
        if routes["cached"]["cache"]["hits"] == 9 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert routes["cached"]["cache"] == {"hits": 9, "misses": 1, "stale": 0, "hit_ratio": 0.9}
    assert routes["other"]["cache"] == {"hits": 0, "misses": 0, "stale": 0, "hit_ratio": None}
    assert routes["plain"]["cache"] is None
