"""Metrics on the admin listener after known traffic, against a real gateway process."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import GatewayProcess, UpstreamServer, free_port

Labels = tuple[tuple[str, str], ...]

FAMILIES = (
    "gateway_requests_total",
    "gateway_request_duration_seconds",
    "gateway_upstream_requests_total",
    "gateway_upstream_request_duration_seconds",
    "gateway_upstream_inflight",
    "gateway_upstream_queued",
    "gateway_circuit_open",
    "gateway_rate_limited_total",
)


async def backend(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """200 with a short body; `.../slow` answers after 1.5 s."""
    path = scope["path"]
    if path.endswith("/slow"):
        await asyncio.sleep(1.5)
    body = f"{scope['method']} {path}".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


def config(up: UpstreamServer) -> dict[str, Any]:
    return {
        "upstreams": {
            "up": {"targets": [up.url]},
            "dead": {"targets": [f"http://127.0.0.1:{free_port()}"]},  # nothing listens there
        },
        "routes": [
            {"name": "ok", "path": "/ok/{rest:path}", "upstream": "up"},
            {"name": "dead", "path": "/dead", "upstream": "dead"},
        ],
    }


def scrape(gw: GatewayProcess) -> str:
    r = httpx.get(gw.admin_url + "/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def samples(text: str) -> dict[tuple[str, Labels], float]:
    out: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def requests_total(values: dict[tuple[str, Labels], float]) -> dict[tuple[str, str, str], float]:
    """`gateway_requests_total` as {(route, method, status): value}."""
    out = {}
    for (name, labels), value in values.items():
        if name == "gateway_requests_total":
            d = dict(labels)
            out[(d["route"], d["method"], d["status"])] = value
    return out


def scrape_until(
    gw: GatewayProcess, done: Callable[[dict[tuple[str, Labels], float]], bool], timeout: float = 3
) -> tuple[str, dict[tuple[str, Labels], float]]:
    """The counters are bumped just after the response is sent: poll until `done`."""
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(gw)
        values = samples(text)
        if done(values) or time.monotonic() > deadline:
            return text, values
        time.sleep(0.05)


def send_known_traffic(gw: GatewayProcess) -> None:
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        for i in range(3):
            assert client.get(f"/ok/item/{i}").status_code == 200
        for path in ("/nowhere", "/also/nowhere"):
            r = client.get(path)
            assert r.status_code == 404
            assert r.json()["code"] == "route_not_found"
        r = client.get("/dead")
        assert r.status_code == 502
        assert r.json()["code"] == "upstream_unavailable"


def test_request_counters_and_histogram_after_known_traffic(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)))
    send_known_traffic(gw)

    _, values = scrape_until(gw, lambda v: sum(requests_total(v).values()) >= 6)
    assert requests_total(values) == {
        ("ok", "GET", "200"): 3.0,
        ("(none)", "GET", "404"): 2.0,
        ("dead", "GET", "502"): 1.0,
    }
    ok = (("route", "ok"),)
    assert values[("gateway_request_duration_seconds_count", ok)] == 3.0
    assert values[("gateway_request_duration_seconds_bucket", (("le", "+Inf"), *ok))] == 3.0
    assert 0 < values[("gateway_request_duration_seconds_sum", ok)] < 5
    assert values[("gateway_request_duration_seconds_count", (("route", "dead"),))] == 1.0
    assert values[("gateway_request_duration_seconds_count", (("route", "(none)"),))] == 2.0


def test_every_contract_metric_family_is_exported(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)))
    send_known_traffic(gw)
    text = scrape(gw)
    for name in FAMILIES:
        assert f"# HELP {name} " in text, f"{name} is not exported"
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["gateway_requests"] == "counter"
    assert types["gateway_request_duration_seconds"] == "histogram"
    assert types["gateway_upstream_requests"] == "counter"
    assert types["gateway_upstream_request_duration_seconds"] == "histogram"
    assert types["gateway_upstream_inflight"] == "gauge"
    assert types["gateway_upstream_queued"] == "gauge"
    assert types["gateway_circuit_open"] == "gauge"
    assert types["gateway_rate_limited"] == "counter"


def test_upstream_tries_are_counted_by_outcome(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)))
    send_known_traffic(gw)

    def upstream_count(values: dict[tuple[str, Labels], float], name: str, outcome: str) -> float:
        key = ("gateway_upstream_requests_total", (("outcome", outcome), ("upstream", name)))
        return values.get(key, 0.0)

    _, values = scrape_until(gw, lambda v: upstream_count(v, "up", "2xx") >= 3)
    assert upstream_count(values, "up", "2xx") == 3.0
    # Refused: one try plus at most the one default retry on connect_error.
    assert 1 <= upstream_count(values, "dead", "connect_error") <= 2
    up = (("upstream", "up"),)
    assert values[("gateway_upstream_request_duration_seconds_count", up)] == 3.0


def test_upstream_inflight_gauge_while_a_request_is_in_flight(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)))
    results: list[int] = []
    slow = threading.Thread(
        target=lambda: results.append(httpx.get(gw.url + "/ok/slow", timeout=10).status_code)
    )
    slow.start()
    try:
        key = ("gateway_upstream_inflight", (("upstream", "up"),))
        _, during = scrape_until(gw, lambda v: v.get(key, 0.0) >= 1, timeout=1.0)
        assert during.get(key) == 1.0
    finally:
        slow.join(timeout=10)
    assert results == [200]
    _, after = scrape_until(gw, lambda v: v.get(key) == 0.0, timeout=1.0)
    assert after.get(key) == 0.0


def test_data_port_never_serves_admin_paths(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)))
    for path in ("/metrics", "/healthz", "/readyz", "/config"):
        r = httpx.get(gw.url + path, timeout=5)
        assert r.status_code == 404, path
        assert r.headers["content-type"].startswith("application/problem+json")
        problem = r.json()
        assert problem["code"] == "route_not_found"
        assert problem["status"] == 404
        assert "gateway_requests_total" not in r.text
    r = httpx.post(gw.url + "/reload", timeout=5)
    assert r.status_code == 404
    assert r.json()["code"] == "route_not_found"
