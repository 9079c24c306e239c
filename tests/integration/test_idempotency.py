"""Idempotency-Key through the real gateway process and a real upstream that counts
what it is sent: the first request forwarded and stored, repeats replayed, 409 while it
is in flight, 422 for another body, 400 where the key is required, the gateway's own
errors and oversized answers not stored, keys scoped by caller, keyed POSTs retried,
and two gateways sharing one Redis store forwarding one request per key."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis

from tests.integration.edge_support import metric
from tests.integration.harness import GatewayProcess, UpstreamServer, read_body
from tests.integration.redis_keys import SHARED_REDIS, scratch_prefix

Scope = dict[str, Any]


class Orders:
    """Counts requests per path. Headers steer the answer, so that they stay out of the
    request's fingerprint: `x-delay` (seconds), `x-status`, `x-size` (a body of that
    many bytes), `x-chunks` (streamed in that many chunks), `x-fail-first` (503 to the
    first request of each path)."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        body = await read_body(receive)
        headers = dict(scope["headers"])
        path = scope["path"]
        with self._lock:
            self.hits[path] += 1
            n = self.hits[path]
        await asyncio.sleep(float(headers.get(b"x-delay", b"0")))
        status = int(headers.get(b"x-status", b"201"))
        if b"x-fail-first" in headers and n == 1:
            status = 503
        size = int(headers.get(b"x-size", b"0"))
        answer = b"x" * size if size else b"n=%d body=%s" % (n, body)
        chunks = int(headers.get(b"x-chunks", b"0"))
        head = [(b"content-type", b"text/plain"), (b"x-n", str(n).encode())]
        if not chunks:
            head.append((b"content-length", str(len(answer)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": head})
        if not chunks:
            await send({"type": "http.response.body", "body": answer})
            return
        step = max(1, len(answer) // chunks)
        for i in range(0, len(answer), step):
            await send(
                {"type": "http.response.body", "body": answer[i : i + step], "more_body": True}
            )
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})


def config(up: UpstreamServer, store: Any = "memory", **server: Any) -> dict[str, Any]:
    return {
        "server": {"access_log": False, **server},
        "upstreams": {
            "up": {"targets": [up.url], "retries": {"attempts": 0}},
            "flaky": {
                "targets": [up.url],
                "retries": {"attempts": 1, "backoff": "1ms", "on": [503]},
            },
        },
        "auth": {"api_keys": {"keys": ["key-a", "key-b"]}},
        "idempotency": {"store": store, "ttl": "1h", "max_response_size": "1KiB"},
        "routes": [
            {"name": "orders", "path": "/orders/{rest:path}", "upstream": "up",
             "idempotency": "optional", "timeout": "2s"},
            {"name": "pay", "path": "/pay/{rest:path}", "upstream": "up",
             "idempotency": "required"},
            {"name": "mine", "path": "/mine/{rest:path}", "upstream": "up",
             "idempotency": "optional", "auth": "api_key"},
            {"name": "retried", "path": "/retried/{rest:path}", "upstream": "flaky",
             "idempotency": "optional"},
            {"name": "plain", "path": "/plain/{rest:path}", "upstream": "up"},
        ],
    }  # fmt: skip


def post(
    gw: GatewayProcess, path: str, key: str | None, body: bytes = b"{}", **headers: str
) -> httpx.Response:
    timeout = float(headers.pop("timeout", "5"))
    sent = {k.replace("_", "-"): v for k, v in headers.items()}
    if key is not None:
        sent["idempotency-key"] = key
    return httpx.post(gw.url + path, content=body, headers=sent, timeout=timeout)


def results(gw: GatewayProcess, route: str, result: str) -> float:
    return metric(gw, "gateway_idempotency_requests_total", route=route, result=result)


def test_first_is_stored_repeats_are_replayed_or_refused(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    orders = Orders()
    gw = gateway(config(upstream(orders), access_log=True))
    first = post(gw, "/orders/a", '"k-1"', b'{"sku":1}', x_request_id="req-one")
    assert first.status_code == 201 and first.text == 'n=1 body={"sku":1}'
    assert "idempotent-replayed" not in first.headers
    again = post(gw, "/orders/a", "k-1", b'{"sku":1}', x_request_id="req-two")  # bare token
    assert again.status_code == 201 and again.text == first.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-n"] == "1" and again.headers["x-request-id"] == "req-two"
    assert orders.hits["/orders/a"] == 1

    reused = post(gw, "/orders/a", '"k-1"', b'{"sku":2}')
    assert reused.status_code == 422
    assert reused.headers["content-type"] == "application/problem+json"
    assert reused.json()["code"] == "idempotency_key_reused"
    assert post(gw, "/orders/b", '"k-1"', b'{"sku":1}').status_code == 422  # another target
    bad = post(gw, "/orders/a", '"unterminated')
    assert bad.status_code == 400 and bad.json()["code"] == "bad_request"
    assert orders.hits["/orders/a"] == 1 and orders.hits["/orders/b"] == 0

    # Other methods ignore the key; a route without idempotency forwards every time.
    for _ in range(2):
        assert (
            httpx.put(gw.url + "/orders/a", headers={"idempotency-key": '"k-1"'}).status_code == 201
        )
        assert post(gw, "/plain/a", '"k-1"').status_code == 201
    assert orders.hits["/orders/a"] == 3 and orders.hits["/plain/a"] == 2

    # A streamed answer is stored as it passes, and replayed whole.
    streamed = post(gw, "/orders/s", '"k-s"', b"s" * 40, x_chunks="4")
    assert streamed.status_code == 201 and "content-length" not in streamed.headers
    replay = post(gw, "/orders/s", '"k-s"', b"s" * 40)
    assert replay.text == streamed.text and replay.headers["idempotent-replayed"] == "true"
    assert orders.hits["/orders/s"] == 1

    assert results(gw, "orders", "stored") == 2
    assert results(gw, "orders", "replayed") == 2
    assert results(gw, "orders", "reused") == 2
    lines = [json.loads(line) for line in gw.stdout.splitlines() if line.startswith("{")]
    logged = {line["request_id"]: line.get("idempotency") for line in lines}
    assert logged["req-one"] == "stored" and logged["req-two"] == "replayed"


def test_in_flight_repeats_get_409_and_the_gateways_errors_are_not_stored(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    orders = Orders()
    gw = gateway(config(upstream(orders)))
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, gw, "/orders/slow", '"k-2"', b"{}", x_delay="0.6")
        time.sleep(0.25)
        busy = post(gw, "/orders/slow", '"k-2"')
        assert busy.status_code == 409 and busy.json()["code"] == "idempotency_in_flight"
        assert busy.headers["retry-after"] == "1"
        assert slow.result().status_code == 201
    assert post(gw, "/orders/slow", '"k-2"').headers["idempotent-replayed"] == "true"
    assert orders.hits["/orders/slow"] == 1

    # The route's 2s deadline passes: 504 from the gateway, not stored, key released.
    late = post(gw, "/orders/late", '"k-3"', x_delay="2.5")
    assert late.status_code == 504 and late.json()["code"] == "upstream_timeout"
    retry = post(gw, "/orders/late", '"k-3"')
    assert retry.status_code == 201 and "idempotent-replayed" not in retry.headers
    assert retry.text == "n=2 body={}"
    # An upstream's own error answer is its answer: stored and replayed.
    assert post(gw, "/orders/err", '"k-4"', x_status="500").status_code == 500
    assert post(gw, "/orders/err", '"k-4"').headers["idempotent-replayed"] == "true"
    assert orders.hits["/orders/err"] == 1

    # Over max_response_size (1KiB): passed through whole, not stored, forwarded again.
    for chunks in ("0", "3"):
        path = f"/orders/big{chunks}"
        for n in (1, 2):
            big = post(gw, path, '"k-5"', x_size="4096", x_chunks=chunks)
            assert big.status_code == 201 and len(big.content) == 4096
            assert "idempotent-replayed" not in big.headers
            assert orders.hits[path] == n
    # A client that goes away before the answer releases the key: the retry is forwarded.
    with pytest.raises(httpx.ReadTimeout):
        post(gw, "/orders/gone", '"k-6"', x_delay="1", timeout="0.3")
    deadline = time.monotonic() + 3
    while (again := post(gw, "/orders/gone", '"k-6"')).status_code == 409:
        assert time.monotonic() < deadline, "the key was never released"
        time.sleep(0.1)
    assert again.status_code == 201 and again.text == "n=2 body={}"
    assert results(gw, "orders", "not_stored") == 6
    assert results(gw, "orders", "in_flight") == 1


def test_required_keys_scoping_by_caller_and_retries(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    orders = Orders()
    gw = gateway(config(upstream(orders)))
    missing = post(gw, "/pay/1", None)
    assert missing.status_code == 400
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.json()["code"] == "idempotency_key_missing"
    assert httpx.get(gw.url + "/pay/1").status_code == 201  # only POST and PATCH need one
    assert httpx.patch(gw.url + "/pay/1", content=b"{}").status_code == 400
    assert post(gw, "/pay/1", '"p-1"').status_code == 201
    assert orders.hits["/pay/1"] == 2

    # Two API keys, one Idempotency-Key: two callers, two forwards; each replays its own.
    for api_key in ("key-a", "key-b", "key-a", "key-b"):
        answer = post(gw, "/mine/1", '"same"', x_api_key=api_key)
        assert answer.status_code == 201
    assert orders.hits["/mine/1"] == 2
    assert answer.headers["idempotent-replayed"] == "true" and answer.text == "n=2 body={}"

    # A keyed POST is retried like an idempotent request; an unkeyed one is not.
    assert post(gw, "/retried/k", '"r-1"', x_fail_first="1").status_code == 201
    assert orders.hits["/retried/k"] == 2
    assert post(gw, "/retried/u", None, x_fail_first="1").status_code == 503
    assert orders.hits["/retried/u"] == 1


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    with scratch_prefix("idem") as prefix:
        yield prefix


def test_two_gateways_sharing_redis_forward_one_request_per_key(
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
    redis_prefix: str,
) -> None:
    orders = Orders()
    cfg = config(upstream(orders), {"redis": SHARED_REDIS, "prefix": redis_prefix})
    a, b = (gateway(copy.deepcopy(cfg)) for _ in range(2))
    start = threading.Barrier(8)

    def one(i: int) -> int:
        gw = (a, b)[i % 2]
        start.wait()
        return post(gw, "/orders/shared", '"one-key"', b'{"n":1}', x_delay="0.5").status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(one, range(8)))
    assert statuses == [201] + [409] * 7
    assert orders.hits["/orders/shared"] == 1
    for gw in (a, b):
        replay = post(gw, "/orders/shared", '"one-key"', b'{"n":1}')
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.text == 'n=1 body={"n":1}'
    assert orders.hits["/orders/shared"] == 1
    client = redis.Redis.from_url(SHARED_REDIS, socket_timeout=2)
    try:
        keys = [k.decode() for k in client.scan_iter(match=redis_prefix + "*")]
        assert len(keys) == 1 and keys[0].startswith(redis_prefix + "orders:"), keys
        assert 3_000_000 < client.pttl(keys[0]) <= 3_600_000  # ttl: 1h
    finally:
        client.close()


def test_an_unreachable_store_refuses_keyed_requests(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    orders = Orders()
    dead = "redis://127.0.0.1:9/0"  # discard: nothing listens there
    gw = gateway(config(upstream(orders), {"redis": dead, "timeout": "50ms"}))
    refused = post(gw, "/orders/x", '"k"')
    assert refused.status_code == 503 and refused.json()["code"] == "idempotency_unavailable"
    assert refused.headers["retry-after"] == "1"
    assert post(gw, "/orders/x", None).status_code == 201  # unkeyed requests pass
    assert orders.hits["/orders/x"] == 1
    assert results(gw, "orders", "store_error") == 1
    assert "idempotency store unreachable" in gw.stderr
