"""Idempotency-Key handling: the key's syntax, the stores (memory, and Redis on
127.0.0.1:6379 under a prefix of the test's own) and the route logic around fake
handlers (ok, failing, streaming, oversized)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis

from gateway.build.factory import build_runtime, unsupported
from gateway.build.values import plain
from gateway.config.loader import ConfigError, load_config_text
from gateway.dataplane.idempotency import Idempotency, RouteIdempotency, parse_key
from gateway.dataplane.state import Exchange
from gateway.edge import EdgeContext
from gateway.edge.apikey import ApiKeys, api_key
from gateway.edge.idempotency import (
    ENTRY_COST,
    IdempotencyStore,
    MemoryStore,
    RedisStore,
    StoredAnswer,
    StoreUnavailable,
)
from gateway.edge.jwt import JwtRules, jwt_auth
from gateway.errors import (
    BadRequest,
    IdempotencyInFlight,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    IdempotencyUnavailable,
    UpstreamTimeout,
)
from gateway.ops.metrics import Metrics
from gateway.types import Deadline, GatewayRequest, GatewayResponse, WholeBody, closed
from tests.integration.harness import free_port
from tests.integration.redis_keys import SHARED_REDIS, scratch_prefix
from tests.unit.jwtkit import rsa_key, sign
from tests.unit.test_jwt import bearer, jwt_settings, verifier

FP_A, FP_B = "a" * 64, "b" * 64
ANSWER = StoredAnswer(201, ((b"content-type", b"text/plain"), (b"x-n", b"1")), b"made\n1")


# -- the key's syntax ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b'"abc-123"', "abc-123"),
        (b"abc-123", "abc-123"),  # a bare token is the same key
        (b"8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        (b'"a \\"quoted\\" \\\\ key"', 'a "quoted" \\ key'),
        (b'  "padded"  ', "padded"),
        (b'"' + b"k" * 255 + b'"', "k" * 255),
    ],
)
def test_keys_are_sf_strings_or_bare_tokens(raw: bytes, key: str) -> None:
    assert parse_key(raw) == key


@pytest.mark.parametrize(
    "raw",
    [b"", b'""', b'"open', b'"a"b', b'"bad\\n"', b"two words", b'"\xc3\xa9"', b"k" * 256],
)
def test_malformed_keys_are_bad_requests(raw: bytes) -> None:
    with pytest.raises(BadRequest) as info:
        parse_key(raw)
    assert info.value.code == "bad_request"
    assert "Idempotency-Key" in info.value.detail


# -- the stores --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    with scratch_prefix("idem-unit") as prefix:
        yield prefix


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[Any]:
    made: Any = (
        MemoryStore() if request.param == "memory" else RedisStore(SHARED_REDIS, redis_prefix)
    )
    yield made
    await made.aclose()


async def test_claim_then_in_flight_then_stored_answer(store: IdempotencyStore) -> None:
    first = await store.claim("r:k", FP_A, lease=5)
    assert first.state == "claimed" and len(first.owner) == 32
    second = await store.claim("r:k", FP_A, lease=5)
    assert (second.state, second.fingerprint) == ("in_flight", FP_A)
    assert await store.complete("r:k", first.owner, FP_A, ANSWER, ttl=60)
    third = await store.claim("r:k", FP_B, lease=5)
    assert (third.state, third.fingerprint, third.answer) == ("stored", FP_A, ANSWER)


async def test_only_the_owner_completes_or_releases(store: IdempotencyStore) -> None:
    first = await store.claim("r:k", FP_A, lease=5)
    assert not await store.complete("r:k", "f" * 32, FP_A, ANSWER, ttl=60)
    assert not await store.release("r:k", "f" * 32)
    assert (await store.claim("r:k", FP_A, lease=5)).state == "in_flight"
    assert await store.release("r:k", first.owner)
    again = await store.claim("r:k", FP_B, lease=5)
    assert again.state == "claimed" and again.owner != first.owner
    assert not await store.release("r:k", first.owner)  # the old owner's token is dead
    assert (await store.claim("r:k", FP_B, lease=5)).state == "in_flight"


async def test_keys_are_independent(store: IdempotencyStore) -> None:
    assert (await store.claim("r:one", FP_A, lease=5)).state == "claimed"
    assert (await store.claim("r:two", FP_A, lease=5)).state == "claimed"
    assert (await store.claim("other:one", FP_A, lease=5)).state == "claimed"


async def test_memory_leases_and_answers_expire() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    first = await store.claim("k", FP_A, lease=5)
    clock.now += 5.1  # the lease ran out: the key is free, the old owner cannot store
    second = await store.claim("k", FP_A, lease=5)
    assert second.state == "claimed"
    assert not await store.complete("k", first.owner, FP_A, ANSWER, ttl=60)
    assert await store.complete("k", second.owner, FP_A, ANSWER, ttl=60)
    headers = sum(len(n) + len(v) for n, v in ANSWER.headers)
    assert store.size == ENTRY_COST + len("k") + len(ANSWER.body) + headers
    clock.now += 59
    assert (await store.claim("k", FP_A, lease=5)).state == "stored"
    clock.now += 2
    await store.claim("other", FP_A, lease=5)  # sweeps the expired entry
    assert len(store) == 1 and store.size == ENTRY_COST + len("other")  # a claim's marker
    assert "keys=1" in repr(store)


async def test_memory_store_drops_the_oldest_answers_beyond_max_size(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Room for about three stored answers: a client sending a new key per request must
    # not grow the process without bound. Keys still in flight are never dropped.
    one = ENTRY_COST + 2 + len(ANSWER.body) + sum(len(n) + len(v) for n, v in ANSWER.headers)
    store = MemoryStore(max_size=3 * one + 10)
    pending = await store.claim("k0", FP_A, lease=60)  # in flight all along, the oldest
    for i in range(1, 6):
        claim = await store.claim(f"k{i}", FP_A, lease=60)
        assert await store.complete(f"k{i}", claim.owner, FP_A, ANSWER, ttl=3600)
        assert store.size <= store.max_size
    assert store.evicted == 3
    assert (await store.claim("k0", FP_A, lease=60)).state == "in_flight"
    assert [(await store.claim(f"k{i}", FP_A, lease=60)).state for i in (4, 5)] == [
        "stored",
        "stored",
    ]
    # An evicted key is free again (its retry is forwarded, as after the ttl).
    assert (await store.claim("k1", FP_A, lease=60)).state == "claimed"
    assert await store.complete("k0", pending.owner, FP_A, ANSWER, ttl=3600)
    assert store.size <= store.max_size
    assert "oldest answers dropped" in caplog.text


async def test_memory_store_keeps_the_answer_it_just_stored() -> None:
    # Twenty keys in flight and one answer bigger than the room left: the older answer
    # goes, the new one stays (complete says stored, and a repeat is replayed).
    store = MemoryStore(max_size=10_000)
    for i in range(20):
        await store.claim(f"busy{i}", FP_A, lease=60)
    old = await store.claim("old", FP_A, lease=60)
    assert await store.complete("old", old.owner, FP_A, ANSWER, ttl=3600)
    big = StoredAnswer(200, (), b"x" * 3_000)
    new = await store.claim("new", FP_A, lease=60)
    assert await store.complete("new", new.owner, FP_A, big, ttl=3600)
    assert (await store.claim("new", FP_A, lease=60)).state == "stored"
    assert store.evicted == 1 and store.size > store.max_size  # by one answer at most
    assert (await store.claim("old", FP_A, lease=60)).state == "claimed"  # dropped
    assert store.evicted == 2 and store.size <= store.max_size  # the next write: back in
    assert [(await store.claim(f"busy{i}", FP_A, lease=60)).state for i in (0, 19)] == [
        "in_flight",
        "in_flight",
    ]


def test_memory_store_max_size_holds_at_least_one_answer() -> None:
    with pytest.raises(ConfigError, match="max_size must be at least max_response_size"):
        load_config_text(
            "upstreams: {u: {targets: ['http://127.0.0.1:1']}}\n"
            "routes: [{name: r, path: /r, upstream: u, idempotency: optional}]\n"
            "idempotency: {max_size: 512KiB, max_response_size: 1MiB}\n",
            "gateway.yaml",
        )


async def test_redis_keys_carry_the_prefix_and_the_ttl(redis_prefix: str) -> None:
    store = RedisStore(SHARED_REDIS, redis_prefix)
    client = redis.Redis.from_url(SHARED_REDIS, socket_timeout=2)
    try:
        claim = await store.claim("r:k", FP_A, lease=5)
        assert 0 < client.pttl(redis_prefix + "r:k") <= 5000
        assert await store.complete("r:k", claim.owner, FP_A, ANSWER, ttl=3600)
        assert 3_500_000 < client.pttl(redis_prefix + "r:k") <= 3_600_000
        raw = client.get(redis_prefix + "r:k")
        assert isinstance(raw, bytes) and raw.startswith(b"S" + FP_A.encode())
    finally:
        client.close()
        await store.aclose()


async def test_a_dead_redis_is_store_unavailable() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.05)
    try:
        with pytest.raises(StoreUnavailable):
            await store.claim("k", FP_A, lease=5)
    finally:
        await store.aclose()


# -- the route logic ------------------------------------------------------------------


class Upstream:
    """A fake handler chain: counts calls and answers `status` with `body` (whole, or
    in `chunks` streamed), or raises `error`."""

    def __init__(self, body: bytes = b"made", *, chunks: int = 0) -> None:
        self.calls = 0
        self.body = body
        self.chunks = chunks
        self.error: Exception | None = None
        self.keyed: list[bool] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, request: GatewayRequest) -> GatewayResponse:
        self.calls += 1
        self.keyed.append(request.keyed)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        headers = [(b"content-type", b"text/plain"), (b"x-request-id", b"upstream-echo")]
        if not self.chunks:
            return GatewayResponse(201, headers, WholeBody(self.body), closed, whole=self.body)
        body, n = self.body, self.chunks

        async def stream() -> AsyncIterator[bytes]:
            size = len(body) // n
            for i in range(n):
                yield body[i * size : (i + 1) * size if i < n - 1 else None]

        return GatewayResponse(201, headers, stream(), closed)


def keyed_route(
    store: IdempotencyStore | None = None, *, required: bool = False, max_size: int = 1024
) -> tuple[RouteIdempotency, Metrics]:
    metrics = Metrics()
    shared = Idempotency(store or MemoryStore(), 60.0, max_size, metrics)
    return RouteIdempotency(shared, "orders", required=required, lease=10), metrics


def scope(key: bytes | None, *, client: str = "10.0.0.1") -> dict[str, Any]:
    headers = [(b"host", b"gw")]
    if key is not None:
        headers.append((b"idempotency-key", key))
    return {"headers": headers, "client": (client, 5555)}


def request(method: str = "POST", body: bytes = b'{"a":1}') -> GatewayRequest:
    return GatewayRequest(method, "/orders", b"", [], Deadline.after(5), "rid", "orders", body=body)


async def send(
    route: RouteIdempotency,
    handler: Upstream,
    *,
    key: bytes | None = b'"k1"',
    method: str = "POST",
    body: bytes = b'{"a":1}',
    caller: bytes | str | None = None,
) -> tuple[GatewayResponse, bytes, Exchange]:
    exchange = Exchange(0.0, method, "/orders", "rid", caller=caller)
    response = await route.fetch(request(method, body), scope(key), None, exchange, handler)
    try:
        data = b"".join([chunk async for chunk in response.body])
    finally:
        await response.close()
    return response, data, exchange


def results(metrics: Metrics) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in metrics.idempotency_requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out[sample.labels["result"]] = sample.value
    return out


async def test_first_is_forwarded_and_stored_then_replayed() -> None:
    route, metrics = keyed_route()
    up = Upstream()
    first, body, exchange = await send(route, up)
    assert (first.status, body, exchange.idempotency) == (201, b"made", "stored")
    assert up.keyed == [True]  # retried and hedged like an idempotent request
    again, body, exchange = await send(route, up)
    assert (again.status, body, exchange.idempotency) == (201, b"made", "replayed")
    assert (b"idempotent-replayed", b"true") in again.headers
    assert (b"content-type", b"text/plain") in again.headers
    assert not any(n == b"x-request-id" for n, _ in again.headers)  # set fresh on replay
    assert up.calls == 1
    assert results(metrics) == {"stored": 1, "replayed": 1}


async def test_another_body_or_target_with_the_same_key_is_422() -> None:
    route, _ = keyed_route()
    up = Upstream()
    await send(route, up)
    with pytest.raises(IdempotencyKeyReused) as info:
        await send(route, up, body=b'{"a":2}')
    assert (info.value.status, info.value.code) == (422, "idempotency_key_reused")
    with pytest.raises(IdempotencyKeyReused):
        await send(route, up, method="PATCH")
    assert up.calls == 1


async def test_a_repeat_while_the_first_is_in_flight_is_409() -> None:
    route, _ = keyed_route()
    up = Upstream()
    up.gate = asyncio.Event()
    first = asyncio.create_task(send(route, up))
    await asyncio.sleep(0.01)
    with pytest.raises(IdempotencyInFlight) as info:
        await send(route, up)
    assert (info.value.status, info.value.code) == (409, "idempotency_in_flight")
    up.gate.set()
    response, _, _ = await first
    assert response.status == 201 and up.calls == 1


async def test_missing_key_is_400_only_where_required_and_for_post_or_patch() -> None:
    required, metrics = keyed_route(required=True)
    up = Upstream()
    with pytest.raises(IdempotencyKeyMissing) as info:
        await send(required, up, key=None)
    assert (info.value.status, info.value.code) == (400, "idempotency_key_missing")
    _, _, exchange = await send(required, up, key=None, method="PUT")
    assert exchange.idempotency is None and up.keyed == [False]
    optional, _ = keyed_route()
    await send(optional, up, key=None)
    await send(optional, up, key=None)
    assert up.calls == 3 and results(metrics) == {"missing": 1}


async def test_other_methods_ignore_the_key() -> None:
    route, _ = keyed_route()
    up = Upstream()
    for _ in range(2):
        _, _, exchange = await send(route, up, method="PUT")
        assert exchange.idempotency is None
    assert up.calls == 2 and up.keyed == [False, False]


async def test_malformed_or_repeated_keys_are_400_bad_request() -> None:
    route, metrics = keyed_route()
    up = Upstream()
    with pytest.raises(BadRequest):
        await send(route, up, key=b'"unterminated')
    exchange = Exchange(0.0, "POST", "/orders", "rid")
    twice = scope(b'"a"')
    twice["headers"].append((b"idempotency-key", b'"b"'))
    with pytest.raises(BadRequest):
        await route.fetch(request(), twice, None, exchange, up)
    assert up.calls == 0 and results(metrics) == {"invalid": 2}


async def test_scoped_by_caller() -> None:
    route, _ = keyed_route()
    up = Upstream()
    for caller in (b"\1" * 32, b"\2" * 32, "alice", None):  # two API keys, a sub, an IP
        await send(route, up, caller=caller)
    _, _, exchange = await send(route, up, caller=b"\1" * 32)
    assert up.calls == 4 and exchange.idempotency == "replayed"


async def test_auth_filters_name_the_caller_by_a_hash_or_the_sub() -> None:
    check = api_key(ApiKeys(keys=("secret-key",)))
    ctx = EdgeContext({}, "POST", "r", "10.0.0.1", [(b"x-api-key", b"secret-key")], [])
    await check(ctx)
    assert ctx.caller == hashlib.sha256(b"secret-key").digest()
    settings = jwt_settings()
    jwt_check = jwt_auth(plain(JwtRules, settings), await verifier(settings))
    jwt_ctx = EdgeContext({}, "POST", "r", "10.0.0.1", [bearer(sign(rsa_key()))], [])
    await jwt_check(jwt_ctx)
    assert jwt_ctx.caller == "user-42"


async def test_gateway_errors_release_the_key_and_are_not_stored() -> None:
    route, metrics = keyed_route()
    up = Upstream()
    up.error = UpstreamTimeout("slow")
    with pytest.raises(UpstreamTimeout):
        await send(route, up)
    up.error = None
    _, _, exchange = await send(route, up)
    assert exchange.idempotency == "stored" and up.calls == 2
    assert results(metrics) == {"not_stored": 1, "stored": 1}


async def test_streamed_answers_are_stored_once_complete() -> None:
    route, _ = keyed_route()
    up = Upstream(b"0123456789" * 10, chunks=4)
    first, body, exchange = await send(route, up)
    assert first.whole is None and exchange.idempotency == "stored"
    _, replayed, _ = await send(route, up)
    assert replayed == body == b"0123456789" * 10 and up.calls == 1


async def test_oversized_answers_pass_through_and_release_the_key() -> None:
    for chunks in (0, 4):
        route, metrics = keyed_route(max_size=50)
        up = Upstream(b"x" * 100, chunks=chunks)
        _, body, exchange = await send(route, up)
        assert body == b"x" * 100 and exchange.idempotency == "not_stored"
        _, body, _ = await send(route, up)
        assert body == b"x" * 100 and up.calls == 2
        assert results(metrics) == {"not_stored": 2}


async def test_an_answer_closed_before_its_end_releases_the_key() -> None:
    route, _ = keyed_route()
    up = Upstream(b"y" * 100, chunks=4)
    exchange = Exchange(0.0, "POST", "/orders", "rid")
    response = await route.fetch(request(), scope(b"k"), None, exchange, up)
    await anext(aiter(response.body))
    await response.close()  # the client went away mid-body
    assert exchange.idempotency == "not_stored"
    _, _, again = await send(route, up, key=b"k")
    assert again.idempotency == "stored" and up.calls == 2


async def test_a_cancelled_first_request_releases_the_key() -> None:
    route, _ = keyed_route()
    up = Upstream()
    up.gate = asyncio.Event()
    first = asyncio.create_task(send(route, up))
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    up.gate.set()
    _, _, exchange = await send(route, up)
    assert exchange.idempotency == "stored" and up.calls == 2


async def test_a_streamed_request_body_is_read_whole_and_kept_for_retries() -> None:
    route, _ = keyed_route()
    up = Upstream()

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"a":'
        yield b"1}"

    req = request(body=b"")
    req.body, req.stream = None, chunks()
    exchange = Exchange(0.0, "POST", "/orders", "rid")
    response = await route.fetch(req, scope(b"k1"), None, exchange, up)
    await response.close()
    assert req.body == b'{"a":1}' and req.stream is None and req.replayable
    _, _, again = await send(route, up, key=b"k1")  # same fingerprint as the bytes body
    assert again.idempotency == "replayed"


async def test_store_down_refuses_keyed_requests_with_503() -> None:
    dead = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.05)
    route, metrics = keyed_route(dead)
    up = Upstream()
    try:
        with pytest.raises(IdempotencyUnavailable) as info:
            await send(route, up)
        assert (info.value.status, info.value.code) == (503, "idempotency_unavailable")
        assert (b"retry-after", b"1") in info.value.headers
        await send(route, up, key=None)  # unkeyed requests still pass
        assert up.calls == 1 and results(metrics) == {"store_error": 1}
    finally:
        await dead.aclose()


# -- the build --------------------------------------------------------------------------

CONFIG = """
upstreams: {up: {targets: ["http://127.0.0.1:1"]}}
idempotency: {ttl: 1h, max_response_size: 2KiB}
routes:
  - {name: a, path: /a, upstream: up, idempotency: optional, timeout: 3s}
  - {name: b, path: /b, upstream: up, idempotency: required}
  - {name: c, path: /c, upstream: up}
"""


async def test_one_store_for_every_route_kept_across_a_reload() -> None:
    settings = load_config_text(CONFIG, "x.yaml")
    runtime = build_runtime(settings)
    again = build_runtime(settings, runtime)
    changed = build_runtime(
        load_config_text(CONFIG.replace("ttl: 1h", "ttl: 2h"), "x.yaml"), runtime
    )
    try:
        routes = {r.name: r for r in runtime.router}
        a, b = routes["a"].idempotency, routes["b"].idempotency
        assert a is not None and b is not None and routes["c"].idempotency is None
        assert a.shared is b.shared is runtime.idempotency
        assert isinstance(a.shared.store, MemoryStore)
        assert (a.shared.ttl, a.shared.max_response_size) == (3600.0, 2048)
        assert (a.required, b.required, a.lease) == (False, True, 63.0)
        assert again.idempotency is runtime.idempotency  # same block: keys kept
        assert changed.idempotency is not runtime.idempotency
        unused = build_runtime(load_config_text(CONFIG.split("routes:")[0] + "routes: []", "x"))
        assert unused.idempotency is None
    finally:
        await changed.aclose()
        await runtime.aclose()


def test_an_aggregate_route_cannot_take_idempotency() -> None:
    settings = load_config_text(
        CONFIG
        + "  - {name: agg, path: /agg, idempotency: optional,"
        + " aggregate: {backends: [{upstream: up, path: /x, key: x}]}}\n",
        "x.yaml",
    )
    assert unsupported(settings) == ["routes.3.idempotency: does not apply to an aggregate route"]
