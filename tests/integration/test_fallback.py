"""`routes[].fallback` against real upstreams: a primary that refuses connections, is
slow, has its circuit open or is saturated sends the request to the fallback once
(`X-Gateway-Fallback: true`); its own 5xx answers pass through; a fallback that fails
too gives its gateway error; a spent deadline never reaches the fallback. Counted in
`gateway_fallback_requests_total` and the access log."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.integration.counting_app import HARNESS_FILE_LEAK, CountingApp
from tests.integration.harness import GatewayProcess, UpstreamServer, free_port

pytestmark = HARNESS_FILE_LEAK

FLAG = "x-gateway-fallback"


def dead() -> str:
    """A loopback URL nothing listens on: connecting is refused."""
    return f"http://127.0.0.1:{free_port()}"


def route(name: str, prefix: str, timeout: str = "3s", **extra: Any) -> dict[str, Any]:
    """A route `prefix/{rest}` -> `/{rest}` on `svc`, with `fallback: spare`."""
    return {
        "name": name,
        "path": prefix + "/{rest:path}",
        "rewrite": "/{rest}",
        "upstream": "svc",
        "fallback": "spare",
        "timeout": timeout,
        **extra,
    }


def config(
    primary: str,
    spare: str,
    *,
    routes: list[dict[str, Any]] | None = None,
    access_log: bool = False,
    **svc: Any,
) -> dict[str, Any]:
    """Upstream `svc` (the primary) and `spare`; route `api` (`/api/{rest}`) on `svc`
    with `fallback: spare`, plus `routes`."""
    return {
        "server": {"access_log": access_log, "log_level": "warning"},
        "upstreams": {
            "svc": {"targets": [primary], **svc},
            "spare": {"targets": [spare], "retries": {"attempts": 2}},
        },
        "routes": [route("api", "/api"), *(routes or [])],
    }


def test_a_refused_primary_falls_back_for_get_and_post(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    spare = CountingApp("spare")
    spare_url = upstream(spare).url
    gw = gateway(config(dead(), spare_url, access_log=True))
    with httpx.Client(timeout=5) as client:
        got = client.get(gw.url + "/api/a", headers={"x-request-id": "fb-get"})
        posted = client.post(gw.url + "/api/b", content=b"{}", headers={"x-request-id": "fb-post"})
        metrics = httpx.get(gw.admin_url + "/metrics", timeout=5).text
    for response, method in ((got, "GET"), (posted, "POST")):
        assert (response.status_code, response.text) == (200, "spare says 200"), method
        assert response.headers[FLAG] == "true"
        assert response.headers["x-upstream-own"] == "yes"
    assert spare.methods == ["GET", "POST"]  # once each
    assert (
        'gateway_fallback_requests_total{reason="connect_error",result="answered",'
        'route="api",upstream="spare"} 2.0' in metrics
    )
    lines = _log_lines(gw, {"fb-get", "fb-post"})
    for rid in ("fb-get", "fb-post"):
        assert lines[rid]["fallback"] is True
        assert lines[rid]["upstream"] == "spare"
        assert lines[rid]["target"] == spare_url
        assert lines[rid]["status"] == 200 and lines[rid]["error"] is None


def _log_lines(gw: GatewayProcess, ids: set[str], within: float = 3.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        lines = {}
        for raw in gw.stdout.splitlines():
            if raw.strip():
                line = json.loads(raw)
                lines[line["request_id"]] = line
        if ids <= set(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_a_slow_primary_falls_back_only_for_retryable_requests(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    slow, spare = CountingApp("slow", delay=2.0), CountingApp("spare")
    opted_in = route("opted-in", "/opt", retry_non_idempotent=True)
    gw = gateway(
        config(
            upstream(slow).url,
            upstream(spare).url,
            routes=[opted_in],
            read_timeout="200ms",
            retries={"attempts": 0},
        )
    )
    with httpx.Client(timeout=5) as client:
        got = client.get(gw.url + "/api/x")
        assert (got.status_code, got.text, got.headers[FLAG]) == (200, "spare says 200", "true")
        assert spare.methods == ["GET"]

        posted = client.post(gw.url + "/api/x", content=b"{}")
        assert posted.status_code == 504
        assert posted.json()["code"] == "upstream_timeout"
        assert posted.json()["upstream"] == "svc"
        assert FLAG not in posted.headers
        assert spare.methods == ["GET"]  # the POST may have been acted on: no fallback

        opted = client.post(gw.url + "/opt/x", content=b"{}")
        assert (opted.status_code, opted.headers[FLAG]) == (200, "true")
        assert spare.methods == ["GET", "POST"]
    assert slow.methods == ["GET", "POST", "POST"]


def test_an_open_circuit_falls_back_and_the_primarys_500s_pass_through(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    failing, spare = CountingApp("primary", status=500), CountingApp("spare")
    gw = gateway(
        config(
            upstream(failing).url,
            upstream(spare).url,
            retries={"attempts": 0},
            circuit_breaker={
                "failure_ratio": 0.5,
                "min_requests": 2,
                "window": "10s",
                "open_for": "10s",
            },
        )
    )
    with httpx.Client(timeout=5) as client:
        for _ in range(2):  # the primary's own answers: passed through, no fallback
            response = client.get(gw.url + "/api/x")
            assert (response.status_code, response.text) == (500, "primary says 500")
            assert FLAG not in response.headers
        assert spare.requests == 0
        # the circuit is open now: the primary is not called, the fallback answers
        for method in ("GET", "DELETE"):
            response = client.request(method, gw.url + "/api/x")
            assert (response.status_code, response.text) == (200, "spare says 200")
            assert response.headers[FLAG] == "true"
        metrics = httpx.get(gw.admin_url + "/metrics", timeout=5).text
    assert failing.requests == 2 and spare.requests == 2
    assert (
        'gateway_fallback_requests_total{reason="unhealthy",result="answered",'
        'route="api",upstream="spare"} 2.0' in metrics
    )
    # the primary's refusals are still counted as its outcome
    assert 'gateway_upstream_requests_total{outcome="unhealthy",upstream="svc"} 2.0' in metrics


def test_a_saturated_primary_falls_back(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    busy, spare = CountingApp("primary", delay=1.0), CountingApp("spare")
    gw = gateway(config(upstream(busy).url, upstream(spare).url, max_concurrency=1, max_queue=0))
    first: list[httpx.Response] = []

    def hold_the_slot() -> None:
        first.append(httpx.post(gw.url + "/api/slow", content=b"1", timeout=5))

    holder = threading.Thread(target=hold_the_slot)
    holder.start()
    try:
        deadline = time.monotonic() + 3
        while busy.concurrent == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert busy.concurrent == 1
        response = httpx.post(gw.url + "/api/x", content=b"2", timeout=5)
        assert (response.status_code, response.text) == (200, "spare says 200")
        assert response.headers[FLAG] == "true"
    finally:
        holder.join(timeout=5)
    assert first[0].status_code == 200 and FLAG not in first[0].headers
    assert (busy.requests, spare.requests) == (1, 1)


def test_when_the_fallback_fails_too_the_client_gets_its_error(
    gateway: Callable[..., GatewayProcess],
) -> None:
    gw = gateway(config(dead(), dead(), access_log=True))
    response = httpx.get(gw.url + "/api/x", headers={"x-request-id": "both-down"}, timeout=5)
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert (problem["code"], problem["upstream"], problem["route"]) == (
        "upstream_unavailable",
        "spare",
        "api",
    )
    assert response.headers[FLAG] == "true"
    line = _log_lines(gw, {"both-down"})["both-down"]
    assert (line["fallback"], line["upstream"], line["error"]) == (
        True,
        "spare",
        "upstream_unavailable",
    )
    metrics = httpx.get(gw.admin_url + "/metrics", timeout=5).text
    assert (
        'gateway_fallback_requests_total{reason="connect_error",result="failed",'
        'route="api",upstream="spare"} 1.0' in metrics
    )


def test_a_spent_deadline_never_reaches_the_fallback(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    slow, spare = CountingApp("slow", delay=2.0), CountingApp("spare")
    # a deadline under read_timeout: the deadline itself ends the only try
    short = route("short", "/short", timeout="300ms")
    gw = gateway(
        config(
            upstream(slow).url,
            upstream(spare).url,
            routes=[short],
            read_timeout="400ms",
            retries={"attempts": 0},
            access_log=True,
        )
    )
    with httpx.Client(timeout=5) as client:
        response = client.get(gw.url + "/short/x", headers={"x-request-id": "spent"})
        assert response.status_code == 504
        assert response.json()["code"] == "upstream_timeout"
        assert response.json()["upstream"] == "svc"
        assert FLAG not in response.headers
        # the client's X-Request-Timeout-Ms shortens the deadline below read_timeout
        response = client.get(gw.url + "/api/x", headers={"x-request-timeout-ms": "250"})
        assert response.status_code == 504
        assert FLAG not in response.headers
        assert spare.requests == 0
        # with the route's own deadline, read_timeout ends the try in time to fall back
        response = client.get(gw.url + "/api/x")
        assert (response.status_code, response.headers[FLAG]) == (200, "true")
    assert spare.requests == 1
    line = _log_lines(gw, {"spent"})["spent"]
    assert "fallback" not in line and line["upstream"] == "svc"
