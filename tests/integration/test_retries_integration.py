"""Retries against real upstreams: idempotent requests get through a dead target, POSTs
are not retried, `attempts` bounds the tries on a retryable status and the last
upstream answer passes through, a zero budget means one try, and a slow try is cut at
`read_timeout` and retried."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tests.integration.counting_app import HARNESS_FILE_LEAK, CountingApp, route_config
from tests.integration.harness import GatewayProcess, UpstreamServer, free_port

pytestmark = HARNESS_FILE_LEAK

Upstream = Callable[..., UpstreamServer]
Gateway = Callable[..., GatewayProcess]


def test_gets_are_retried_past_a_dead_target_and_posts_are_not(
    upstream: Upstream, gateway: Gateway
) -> None:
    app = CountingApp()
    live = upstream(app)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    gw = gateway(
        route_config(
            [dead, live.url],
            retries={"attempts": 1, "on": ["connect_error"], "budget": "100%", "backoff": "1ms"},
        )
    )
    with httpx.Client(timeout=5) as client:
        gets = [client.get(gw.url + f"/api/g{i}").status_code for i in range(10)]
        assert gets == [200] * 10
        assert app.methods == ["GET"] * 10

        posts = [client.post(gw.url + f"/api/p{i}", content=b"{}") for i in range(10)]
    failed = [r for r in posts if r.status_code != 200]
    # round robin sends every other POST to the dead target, and none is retried
    assert len(failed) == 5
    for response in failed:
        assert response.status_code == 502
        assert response.json()["code"] == "upstream_unavailable"
    assert app.methods.count("POST") == 5


def test_a_route_can_opt_in_to_retrying_posts(upstream: Upstream, gateway: Gateway) -> None:
    app = CountingApp()
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway(
        route_config(
            [dead, upstream(app).url],
            retry_non_idempotent=True,
            retries={"attempts": 1, "on": ["connect_error"], "budget": "100%", "backoff": "1ms"},
        )
    )
    with httpx.Client(timeout=5) as client:
        codes = [client.post(gw.url + "/api/p", content=b"{}").status_code for _ in range(6)]
    assert codes == [200] * 6
    assert app.methods == ["POST"] * 6


def test_attempts_bound_the_tries_and_the_last_503_passes_through(
    upstream: Upstream, gateway: Gateway
) -> None:
    app = CountingApp(status=503)
    gw = gateway(
        route_config(upstream(app), retries={"attempts": 2, "on": [503], "backoff": "10ms"})
    )
    response = httpx.get(gw.url + "/api/x", timeout=5)
    assert app.requests == 3  # the first try and two retries
    assert response.status_code == 503
    assert response.text == "app says 503"  # the upstream's own answer, not a gateway error
    assert response.headers["x-upstream-own"] == "yes"
    assert response.headers["content-type"] == "text/plain"


def test_a_zero_budget_means_no_retries(upstream: Upstream, gateway: Gateway) -> None:
    app = CountingApp(status=503)
    gw = gateway(
        route_config(
            upstream(app), retries={"attempts": 2, "on": [503], "backoff": "10ms", "budget": "0%"}
        )
    )
    response = httpx.get(gw.url + "/api/x", timeout=5)
    assert response.status_code == 503
    assert response.text == "app says 503"
    assert app.requests == 1


def test_a_slow_try_is_cut_at_read_timeout_and_retried(
    upstream: Upstream, gateway: Gateway
) -> None:
    app = CountingApp()
    app.delays = [2.0]  # only the first request hangs
    gw = gateway(
        route_config(
            upstream(app),
            read_timeout="200ms",
            retries={"attempts": 1, "on": ["timeout"], "backoff": "1ms"},
        )
    )
    started = time.monotonic()
    response = httpx.get(gw.url + "/api/x", timeout=5)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert app.requests == 2
    assert 0.15 < elapsed < 1.0, elapsed


def test_retries_never_outlive_the_route_deadline(upstream: Upstream, gateway: Gateway) -> None:
    app = CountingApp(delay=0.3, status=503)
    gw = gateway(
        route_config(
            upstream(app),
            timeout="500ms",
            retries={"attempts": 5, "on": [503], "backoff": "10ms"},
        )
    )
    started = time.monotonic()
    response = httpx.get(gw.url + "/api/x", timeout=5)
    elapsed = time.monotonic() - started
    # try 1 answers 503 at ~0.3 s; try 2 is cut by the deadline at 0.5 s
    assert response.status_code == 504
    assert response.json()["code"] == "upstream_timeout"
    assert elapsed < 0.8, elapsed
    assert app.requests == 2
