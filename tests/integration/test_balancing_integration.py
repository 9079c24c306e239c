"""Balancing over two real targets: exact spreads for round robin (plain and weighted)
and for least_inflight at low load (ties broken by weight)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.integration.counting_app import HARNESS_FILE_LEAK, CountingApp, route_config
from tests.integration.harness import GatewayProcess, UpstreamServer

pytestmark = HARNESS_FILE_LEAK


@pytest.mark.parametrize(
    ("balancer", "weights", "requests", "expected"),
    [
        ("round_robin", (1, 1), 20, (10, 10)),
        ("round_robin", (1, 3), 40, (10, 30)),
        ("least_inflight", (1, 3), 40, (10, 30)),
    ],
)
def test_spread_over_two_targets(
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
    balancer: str,
    weights: tuple[int, int],
    requests: int,
    expected: tuple[int, int],
) -> None:
    a, b = CountingApp("a"), CountingApp("b")
    targets = [
        {"url": upstream(a).url, "weight": weights[0]},
        {"url": upstream(b).url, "weight": weights[1]},
    ]
    gw = gateway(route_config(targets, balancer=balancer))  # type: ignore[arg-type]
    with httpx.Client(timeout=5) as client:
        bodies = [client.get(gw.url + "/api/x").text for _ in range(requests)]
    assert (a.requests, b.requests) == expected
    assert bodies.count("a says 200") == expected[0]
