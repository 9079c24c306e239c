"""The token bucket (memory store, fake clock), the rate-limit filter's keys and headers,
and the Redis store's fail-fast behaviour when nothing answers."""

from __future__ import annotations

import logging
import time

import pytest
from prometheus_client import CollectorRegistry

from gateway.config.models import RateLimitSettings, RedisStore
from gateway.edge import EdgeContext
from gateway.edge.ratelimit import (
    Decision,
    MemoryStore,
    RedisBucketStore,
    StoreUnavailable,
    make_store,
    rate_limit,
)
from gateway.errors import RateLimited, RateLimitUnavailable
from gateway.ops.metrics import Metrics
from tests.integration.harness import free_port
from tests.unit.fakes import FakeClock


def ctx(
    client_ip: str = "10.0.0.1", headers: list[tuple[bytes, bytes]] | None = None
) -> EdgeContext:
    raw = headers or []
    return EdgeContext(
        scope={"type": "http"},
        method="GET",
        route="r",
        client_ip=client_ip,
        request_headers=raw,
        upstream_headers=list(raw),
    )


def settings(**kw: object) -> RateLimitSettings:
    return RateLimitSettings.model_validate({"rate": "2/s", "burst": 3, **kw})


async def test_a_full_bucket_allows_burst_requests_then_refuses() -> None:
    store = MemoryStore(clock=FakeClock())
    decisions = [await store.take("k", 2.0, 3) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    refused = decisions[-1]
    assert refused.retry_after == pytest.approx(0.5)  # one token at 2/s
    assert refused.reset == pytest.approx(1.5)  # three tokens to full


async def test_tokens_refill_at_the_rate_and_never_beyond_burst() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    for _ in range(3):
        await store.take("k", 2.0, 3)
    clock.advance(0.25)  # half a token
    assert not (await store.take("k", 2.0, 3)).allowed
    clock.advance(0.25)  # one token
    assert (await store.take("k", 2.0, 3)).allowed
    assert not (await store.take("k", 2.0, 3)).allowed
    clock.advance(3600)  # idle for long: full again, not 7200 tokens
    decisions = [await store.take("k", 2.0, 3) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]


async def test_a_clock_going_backwards_takes_no_tokens_and_adds_none() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    await store.take("k", 1.0, 2)
    clock.advance(-10)
    decision = await store.take("k", 1.0, 2)
    assert decision.allowed and decision.remaining == 0


async def test_buckets_are_independent_per_key() -> None:
    store = MemoryStore(clock=FakeClock())
    assert (await store.take("a", 1.0, 1)).allowed
    assert not (await store.take("a", 1.0, 1)).allowed
    assert (await store.take("b", 1.0, 1)).allowed


async def test_the_memory_store_is_bounded_and_drops_the_least_recently_used() -> None:
    store = MemoryStore(max_buckets=3, clock=FakeClock())
    for key in ("a", "b", "c"):
        await store.take(key, 1.0, 1)
    await store.take("a", 1.0, 1)  # a is now the most recent
    await store.take("d", 1.0, 1)  # evicts b
    assert len(store) == 3
    assert not (await store.take("a", 1.0, 1)).allowed  # kept, still empty
    assert (await store.take("b", 1.0, 1)).allowed  # dropped: a fresh bucket
    assert "buckets=3" in repr(store)


async def test_the_filter_adds_ratelimit_headers_to_allowed_answers() -> None:
    check = rate_limit(settings(), "r", MemoryStore(clock=FakeClock()), None)
    c = ctx()
    assert await check(c) is None
    assert dict(c.response_headers) == {
        b"ratelimit-limit": b"3",
        b"ratelimit-remaining": b"2",
        b"ratelimit-reset": b"1",
        b"ratelimit-policy": b'"r";q=3;w=2',
        b"ratelimit": b'"r";r=2;t=1',
    }


async def test_the_filter_refuses_with_429_retry_after_and_ratelimit_headers() -> None:
    check = rate_limit(settings(rate="1/m", burst=1), "r", MemoryStore(clock=FakeClock()), None)
    await check(ctx())
    c = ctx()
    with pytest.raises(RateLimited) as info:
        await check(c)
    headers = dict(info.value.headers)
    assert headers[b"retry-after"] == b"60"
    assert headers[b"ratelimit-limit"] == b"1"
    assert headers[b"ratelimit-remaining"] == b"0"
    assert headers[b"ratelimit-reset"] == b"60"
    assert headers[b"ratelimit-policy"] == b'"r";q=1;w=60'
    assert headers[b"ratelimit"] == b'"r";r=0;t=60'
    assert c.response_headers == []  # on the error only, not twice


async def test_retry_after_is_at_least_one_second() -> None:
    check = rate_limit(settings(rate="100/s", burst=1), "r", MemoryStore(clock=FakeClock()), None)
    await check(ctx())
    with pytest.raises(RateLimited) as info:
        await check(ctx())
    assert dict(info.value.headers)[b"retry-after"] == b"1"


async def test_client_ip_key_gives_each_client_its_own_bucket() -> None:
    check = rate_limit(settings(burst=1), "r", MemoryStore(clock=FakeClock()), None)
    await check(ctx("10.0.0.1"))
    await check(ctx("10.0.0.2"))
    with pytest.raises(RateLimited):
        await check(ctx("10.0.0.1"))


async def test_route_key_shares_one_bucket_between_clients() -> None:
    check = rate_limit(settings(burst=1, key="route"), "r", MemoryStore(clock=FakeClock()), None)
    await check(ctx("10.0.0.1"))
    with pytest.raises(RateLimited):
        await check(ctx("10.0.0.2"))


async def test_header_key_buckets_by_value_and_requests_without_it_share_one() -> None:
    check = rate_limit(
        settings(burst=1, key="header:X-Tenant"), "r", MemoryStore(clock=FakeClock()), None
    )
    await check(ctx("10.0.0.1", [(b"x-tenant", b"a")]))
    await check(ctx("10.0.0.1", [(b"x-tenant", b"b")]))
    await check(ctx("10.0.0.1", [(b"x-tenant", b"x" * 500)]))  # long values are hashed
    with pytest.raises(RateLimited):
        await check(ctx("10.0.0.9", [(b"x-tenant", b"a")]))
    await check(ctx("10.0.0.1"))  # no header: its own bucket
    with pytest.raises(RateLimited):
        await check(ctx("10.0.0.2"))  # another client without it: the same bucket


async def test_routes_never_share_buckets() -> None:
    store = MemoryStore(clock=FakeClock())
    a = rate_limit(settings(burst=1, key="route"), "a", store, None)
    b = rate_limit(settings(burst=1, key="route"), "b", store, None)
    await a(ctx())
    await b(ctx())


class DownStore:
    async def take(self, key: str, rate: float, burst: int) -> Decision:
        raise StoreUnavailable("down")

    async def aclose(self) -> None:
        pass

    def same_settings(self, settings: str | RedisStore) -> bool:
        return False


def store_errors(metrics: Metrics, route: str) -> float:
    value = metrics.registry.get_sample_value(
        "gateway_rate_limit_store_errors_total", {"route": route}
    )
    return value or 0.0


async def test_an_unreachable_store_fails_open_by_default_and_is_counted() -> None:
    metrics = Metrics(CollectorRegistry())
    check = rate_limit(settings(), "r", DownStore(), metrics)
    c = ctx()
    assert await check(c) is None
    assert c.response_headers == []
    assert store_errors(metrics, "r") == 1.0


async def test_an_unreachable_store_refuses_with_503_when_fail_closed() -> None:
    metrics = Metrics(CollectorRegistry())
    check = rate_limit(settings(fail_closed=True), "r", DownStore(), metrics)
    with pytest.raises(RateLimitUnavailable) as info:
        await check(ctx())
    assert info.value.status == 503
    assert info.value.code == "rate_limit_unavailable"
    assert dict(info.value.headers)[b"retry-after"] == b"1"
    assert store_errors(metrics, "r") == 1.0


async def test_a_dead_redis_fails_fast_backs_off_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = RedisBucketStore(RedisStore(redis=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        started = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="gateway.ratelimit"):
            for _ in range(20):
                with pytest.raises(StoreUnavailable):
                    await store.take("k", 1.0, 1)
        assert time.monotonic() - started < 1.0
        assert len([r for r in caplog.records if "unreachable" in r.message]) == 1
        assert "down" in repr(store)
    finally:
        await store.aclose()
        await store.aclose()  # idempotent: a runtime and its successor may both close it


async def test_a_reload_with_the_same_store_settings_keeps_the_store() -> None:
    memory = make_store("memory")
    assert make_store("memory", memory) is memory
    redis = make_store(RedisStore(redis="redis://127.0.0.1:6379/0"))
    try:
        assert make_store(RedisStore(redis="redis://127.0.0.1:6379/0"), redis) is redis
        other = make_store(RedisStore(redis="redis://127.0.0.1:6379/1"), redis)
        assert other is not redis
        await other.aclose()
        assert make_store("memory", redis) is not redis
    finally:
        await redis.aclose()
