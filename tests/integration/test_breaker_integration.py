"""The circuit breaker against a real upstream: it opens on failures (passed through),
refuses without calling the upstream while open, lets one trial through after
`open_for`, re-opens on a failed trial and closes on a good one."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tests.integration.counting_app import HARNESS_FILE_LEAK, CountingApp, route_config
from tests.integration.harness import GatewayProcess, UpstreamServer

pytestmark = HARNESS_FILE_LEAK


def test_open_half_open_close(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    app = CountingApp(status=500)
    gw = gateway(
        route_config(
            upstream(app),
            retries={"attempts": 0},
            circuit_breaker={
                "failure_ratio": 0.5,
                "min_requests": 4,
                "window": "1s",
                "open_for": "500ms",
            },
        )
    )
    url = gw.url + "/api/x"
    with httpx.Client(timeout=5) as client:
        # closed: the upstream's own 500s pass through, and count as failures
        for _ in range(4):
            response = client.get(url)
            assert (response.status_code, response.text) == (500, "app says 500")
        assert app.requests == 4

        # open: refused at once, the upstream is not called
        opened = time.monotonic()
        for _ in range(3):
            response = client.get(url)
            assert response.status_code == 503
            assert response.json()["code"] == "upstream_unhealthy"
            assert response.json()["upstream"] == "svc"
            assert response.headers["retry-after"] == "1"
        assert app.requests == 4

        # half-open after open_for: one trial reaches the upstream, fails, re-opens
        time.sleep(max(0.0, opened + 0.6 - time.monotonic()))
        assert client.get(url).status_code == 500
        assert app.requests == 5
        assert client.get(url).json()["code"] == "upstream_unhealthy"
        assert app.requests == 5

        # the upstream recovers: the next trial succeeds and closes the circuit
        app.status = 200
        time.sleep(0.6)
        assert client.get(url).status_code == 200
        assert [client.get(url).status_code for _ in range(5)] == [200] * 5
        assert app.requests == 11
