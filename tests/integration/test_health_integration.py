"""Active health checks against real targets: a target whose /healthz fails leaves the
rotation and comes back when it passes again; with no healthy target left the gateway
answers 503 upstream_unhealthy."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tests.integration.counting_app import HARNESS_FILE_LEAK, CountingApp, route_config
from tests.integration.harness import GatewayProcess, UpstreamServer

pytestmark = HARNESS_FILE_LEAK


def wait_for_probes(app: CountingApp, status: int, count: int, timeout: float = 3.0) -> None:
    """Until `app` has answered `count` probes in a row with `status` at the end. Probes
    of one target are sequential, so once the (threshold + 1)-th is served, the gateway
    has acted on the threshold-th."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tail = app.probes[-count:]
        if len(tail) == count and all(s == status for s in tail):
            return
        time.sleep(0.02)
    raise AssertionError(f"{app.name} did not see {count} probes answered {status}: {app.probes}")


def test_a_target_leaves_the_rotation_and_comes_back(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    a, b = CountingApp("a"), CountingApp("b")
    gw = gateway(
        route_config(
            [upstream(a).url, upstream(b).url],
            health_check={
                "path": "/healthz",
                "interval": "100ms",
                "timeout": "500ms",
                "unhealthy_threshold": 2,
                "healthy_threshold": 2,
            },
        )
    )
    url = gw.url + "/api/x"

    def spread(n: int) -> tuple[int, int]:
        before = (a.requests, b.requests)
        with httpx.Client(timeout=5) as client:
            for _ in range(n):
                assert client.get(url).status_code == 200
        return a.requests - before[0], b.requests - before[1]

    wait_for_probes(a, 200, 1)
    assert spread(10) == (5, 5)

    a.health_status = 500
    wait_for_probes(a, 500, 3)
    assert spread(10) == (0, 10)  # a is out of rotation

    b.health_status = 500  # now nothing is healthy
    wait_for_probes(b, 500, 3)
    response = httpx.get(url, timeout=5)
    assert response.status_code == 503
    assert response.json()["code"] == "upstream_unhealthy"
    assert "retry-after" in response.headers
    assert (a.requests, b.requests) == (5, 15)

    a.health_status = b.health_status = 200
    wait_for_probes(a, 200, 3)
    wait_for_probes(b, 200, 3)
    assert spread(10) == (5, 5)  # both back in rotation
