"""The IETF RateLimit fields over the wire, read off the socket byte for byte: every
answer of a rate-limited route (allowed, refused, an upstream failure) carries
`RateLimit-Policy` and `RateLimit` beside the `RateLimit-*` triple, the policy name an
sf-String, and a 429's `Retry-After` never above `t`; with the in-process store and
with the buckets in the real Redis on 127.0.0.1:6379."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.integration.edge_support import SHARED_REDIS, EchoApp, redis_prefix_of_its_own
from tests.integration.harness import GatewayProcess, UpstreamServer, free_port
from tests.unit.sfv import parse_ratelimit_field


class Answer:
    """One HTTP/1.1 answer's status and header lines exactly as they came off the wire."""

    def __init__(self, head: bytes) -> None:
        status_line, *lines = head.split(b"\r\n")
        self.status = int(status_line.split(b" ")[1])
        self.lines = [tuple(line.split(b":", 1)) for line in lines]

    def only(self, name: bytes) -> bytes:
        """The one value of `name`, as sent (a single space after the colon, no more)."""
        values = [v for k, v in self.lines if k.lower() == name]
        assert len(values) == 1, (name, self.lines)
        assert values[0].startswith(b" ") and not values[0].startswith(b"  "), values[0]
        return values[0][1:]

    def fields(self) -> tuple[str, dict[str, int], dict[str, int]]:
        """The policy name and both fields' parameters, after checking they agree with
        each other and with the `RateLimit-*` triple."""
        name, policy = parse_ratelimit_field(self.only(b"ratelimit-policy"))
        state_name, state = parse_ratelimit_field(self.only(b"ratelimit"))
        assert name == state_name
        assert policy["q"] == int(self.only(b"ratelimit-limit"))
        assert state["r"] == int(self.only(b"ratelimit-remaining"))
        assert state["t"] == int(self.only(b"ratelimit-reset"))
        return name, policy, state


def get(gw: GatewayProcess, path: str) -> Answer:
    """GET over a socket of our own, so nothing between the gateway and the assertion
    could tidy the header bytes up."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, _ = data.partition(b"\r\n\r\n")
    return Answer(head)


def config(up: UpstreamServer, routes: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    return {
        "upstreams": {
            "up": {"targets": [up.url]},
            "gone": {"targets": [f"http://127.0.0.1:{free_port()}"]},
        },
        "routes": [{"upstream": "up", **r} for r in routes],
        **top,
    }


ROUTES: list[dict[str, Any]] = [
    {"name": "hourly", "path": "/hourly", "rate_limit": {"rate": "1/h", "burst": 1}},
    {"name": "tenth", "path": "/tenth", "rate_limit": {"rate": "6/m", "burst": 3}},
    {
        "name": 'say "hi" \\ bye',
        "path": "/quoted",
        "rate_limit": {"rate": "1/m", "burst": 2, "key": "route"},
    },
    {"name": "café", "path": "/cafe", "rate_limit": {"rate": "1/m", "burst": 1}},
    {
        "name": "broken",
        "path": "/broken",
        "upstream": "gone",
        "rate_limit": {"rate": "1/m", "burst": 5},
    },
]


def check_walk(gw: GatewayProcess) -> None:
    # burst 1 at 1/h: the one token, then a bucket just emptied.
    first, refused = get(gw, "/hourly"), get(gw, "/hourly")
    assert first.status == 200
    assert first.fields() == ("hourly", {"q": 1, "w": 3600}, {"r": 0, "t": 3600})
    assert refused.status == 429
    assert refused.fields() == ("hourly", {"q": 1, "w": 3600}, {"r": 0, "t": 3600})
    assert refused.only(b"retry-after") == b"3600"

    # 6/m is a fractional 0.1 token/s: w = 3 / 0.1 = 30 (not the float's 30.000000000000004).
    tenth = [get(gw, "/tenth") for _ in range(4)]
    assert [a.status for a in tenth] == [200, 200, 200, 429]
    states = [a.fields()[2] for a in tenth]
    assert all(a.fields()[1] == {"q": 3, "w": 30} for a in tenth)
    assert states == [{"r": 2, "t": 10}, {"r": 1, "t": 20}, {"r": 0, "t": 30}, {"r": 0, "t": 30}]
    retry_after = int(tenth[3].only(b"retry-after"))
    assert retry_after == 10 and retry_after <= states[3]["t"]

    # Quote and backslash escaped in the name, and read back as the name itself.
    quoted = [get(gw, "/quoted") for _ in range(3)]
    assert [a.status for a in quoted] == [200, 200, 429]
    assert quoted[0].only(b"ratelimit-policy") == b'"say \\"hi\\" \\\\ bye";q=2;w=120'
    assert quoted[2].only(b"ratelimit") == b'"say \\"hi\\" \\\\ bye";r=0;t=120'
    assert quoted[2].fields()[0] == 'say "hi" \\ bye'
    assert int(quoted[2].only(b"retry-after")) == 60

    # A name an sf-string cannot hold: percent-encoded UTF-8, still a valid String.
    cafe = get(gw, "/cafe")
    assert cafe.fields() == ("caf%C3%A9", {"q": 1, "w": 60}, {"r": 0, "t": 60})

    # An answer the upstream never gave (502) carries the fields too.
    broken = get(gw, "/broken")
    assert broken.status == 502
    assert broken.fields() == ("broken", {"q": 5, "w": 300}, {"r": 4, "t": 60})


def test_memory_store_sends_both_fields_on_every_answer(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(EchoApp()), ROUTES))
    check_walk(gw)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own in the shared Redis, deleted afterwards."""
    yield from redis_prefix_of_its_own("gateway-test-rlfields")


def test_redis_store_sends_the_same_fields_from_the_shared_bucket(
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
    redis_prefix: str,
) -> None:
    gw = gateway(
        config(
            upstream(EchoApp()),
            ROUTES,
            rate_limit_store={"redis": SHARED_REDIS, "prefix": redis_prefix},
        )
    )
    check_walk(gw)
    # The buckets really were in Redis: one key per route bucket used.
    client = redis.Redis.from_url(SHARED_REDIS, socket_timeout=2)
    try:
        assert len(list(client.scan_iter(match=redis_prefix + "*"))) == len(ROUTES)
    finally:
        client.close()
