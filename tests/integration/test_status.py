"""`GET /status.json` and `GET /status` on the admin listener, against a real gateway:
the documented fields after known traffic, the admin token, the page's self-containment,
reload outcomes, and the figures of several workers summed."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.integration.counting_app import CountingApp
from tests.integration.harness import GatewayProcess, UpstreamServer, free_port

# The documented field names (docs/operations.md, "Status page"): scripts rely on them.
TOP = {"generated_at", "window_s", "process", "routes", "upstreams", "recent_errors"}
PROCESS = {
    "version",
    "pid",
    "started_at",
    "uptime_s",
    "workers",
    "workers_reporting",
    "connections",
    "config_file",
    "draining",
    "last_reload",
    "listener",
    "tracing",
}
ROUTE = {
    "name",
    "methods",
    "host",
    "path",
    "upstream",
    "backends",
    "timeout_s",
    "rate_limit",
    "auth",
    "cache",
    "requests",
    "errors",
    "rate_per_s",
    "error_rate",
    "p50_ms",
    "p99_ms",
    "requests_total",
    "errors_total",
    "series",
}
SERIES = {"requests", "errors", "p99_ms"}
UPSTREAM = {
    "name",
    "balancer",
    "inflight",
    "max_concurrency",
    "queued",
    "max_queue",
    "shed",
    "timed_out",
    "outcomes",
    "breaker",
    "retry_budget",
    "health_check",
    "targets",
}
BREAKER = {"state", "next_trial_in_s"}
BUDGET = {"ratio", "retries", "allowed", "requests"}
TARGET = {"url", "weight", "health", "last_check", "inflight"}
CHECK = {"at", "ok", "detail"}
ERROR = {"at", "request_id", "route", "method", "path", "status", "code", "detail"}


def status(gw: GatewayProcess, **headers: str) -> dict[str, Any]:
    r = httpx.get(gw.admin_url + "/status.json", headers=headers, timeout=5)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    document: dict[str, Any] = r.json()
    return document


def wait_for(
    gw: GatewayProcess, ready: Callable[[dict[str, Any]], bool], limit: float = 5.0
) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while True:
        document = status(gw)
        if ready(document) or time.monotonic() > deadline:
            return document
        time.sleep(0.1)


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


def test_status_json_has_the_documented_fields_after_known_traffic(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    app = CountingApp("api")
    failing = CountingApp("failing", status=500)
    api, bad = upstream(app), upstream(failing)
    dead = free_port()  # nothing listens: every try is a connect error
    gw = gateway(
        {
            "server": {"access_log": False},
            "upstreams": {
                "api": {
                    "targets": [api.url],
                    "health_check": {"interval": "100ms", "unhealthy_threshold": 1},
                },
                "failing": {"targets": [bad.url], "retries": {"attempts": 0}},
                "gone": {
                    # Credentials in a target URL are never shown (as in /config).
                    "targets": [f"http://user:s3cret@127.0.0.1:{dead}"],
                    "retries": {"attempts": 0},
                    "circuit_breaker": {"min_requests": 2, "failure_ratio": 0.5, "open_for": "30s"},
                },
            },
            "routes": [
                {
                    "name": "ok",
                    "path": "/ok",
                    "methods": ["GET"],
                    "upstream": "api",
                    "timeout": "2s",
                    "rate_limit": {"rate": "100/s", "burst": 50},
                },
                {"name": "fail", "path": "/fail", "upstream": "failing"},
                {"name": "dead", "path": "/dead", "upstream": "gone", "host": "dead.example"},
                {
                    "name": "agg",
                    "path": "/agg/{id}",
                    "aggregate": {"backends": [{"upstream": "api", "path": "/u/{id}", "key": "u"}]},
                },
            ],
        }
    )
    made: list[tuple[int, str]] = []  # (status, request id) of the gateway's own answers
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        for _ in range(10):
            assert client.get("/ok").status_code == 200
        for _ in range(2):
            assert client.get("/fail").status_code == 500  # the upstream's, passed through
        for _ in range(3):
            r = client.get("/dead", headers={"host": "dead.example"})
            made.append((r.status_code, r.headers["x-request-id"]))
        r = client.get("/nowhere")
        made.append((r.status_code, r.headers["x-request-id"]))
    # 2 connect errors open the circuit (min_requests 2); the 3rd is refused without a try.
    assert [code for code, _ in made] == [502, 502, 503, 404]

    doc = wait_for(
        gw,
        lambda d: by_name(d["upstreams"])["api"]["targets"][0]["last_check"] is not None,
    )
    assert set(doc) == TOP
    assert doc["window_s"] == 60
    assert abs(doc["generated_at"] - time.time()) < 5

    process = doc["process"]
    assert set(process) == PROCESS
    assert process["version"] == "0.1.0"
    assert process["workers"] == 1
    assert process["workers_reporting"] == 1
    assert process["config_file"] == str(gw.config_path)
    assert process["last_reload"] is None
    assert process["draining"] is False
    assert process["listener"] == {"protocols": ["HTTP/2", "HTTP/1.1", "HTTP/1.0"], "tls": None}
    assert process["tracing"] is None  # off: tests/integration/test_tracing.py has it on
    assert process["uptime_s"] >= 0
    assert isinstance(process["connections"], int)

    routes = by_name(doc["routes"])
    assert list(routes) == ["ok", "fail", "dead", "agg"]  # config order
    for route in doc["routes"]:
        assert set(route) == ROUTE
        assert set(route["series"]) == SERIES
        assert all(len(values) == 60 for values in route["series"].values())
    ok = routes["ok"]
    assert ok["methods"] == ["GET"]
    assert ok["host"] is None
    assert ok["path"] == "/ok"
    assert ok["upstream"] == "api"
    assert ok["backends"] is None
    assert ok["timeout_s"] == 2.0
    assert ok["rate_limit"] == {"rate_per_s": 100.0, "burst": 50, "key": "client_ip"}
    assert ok["auth"] == "none"
    assert ok["cache"] is None  # not a caching route
    assert (ok["requests"], ok["errors"], ok["requests_total"]) == (10, 0, 10)
    assert ok["rate_per_s"] == round(10 / 60, 3)
    assert ok["error_rate"] == 0.0
    assert 0 < ok["p50_ms"] <= ok["p99_ms"] < 2000
    assert sum(ok["series"]["requests"]) == 10
    assert sum(ok["series"]["errors"]) == 0
    assert any(v is not None for v in ok["series"]["p99_ms"])
    fail = routes["fail"]
    assert (fail["requests"], fail["errors"], fail["error_rate"]) == (2, 2, 1.0)
    dead_route = routes["dead"]
    assert (dead_route["requests"], dead_route["errors"], dead_route["errors_total"]) == (3, 3, 3)
    assert dead_route["host"] == "dead.example"
    assert dead_route["methods"] is None
    agg = routes["agg"]
    assert agg["upstream"] is None
    assert agg["backends"] == [
        {"upstream": "api", "path": "/u/{id}", "key": "u", "required": False}
    ]
    assert (agg["requests"], agg["p50_ms"], agg["p99_ms"]) == (0, None, None)

    upstreams = by_name(doc["upstreams"])
    assert list(upstreams) == ["api", "failing", "gone"]
    for up in doc["upstreams"]:
        assert set(up) == UPSTREAM
        assert set(up["retry_budget"]) == BUDGET
        for target in up["targets"]:
            assert set(target) == TARGET
    api_up = upstreams["api"]
    assert (api_up["inflight"], api_up["max_concurrency"]) == (0, 1024)
    assert (api_up["queued"], api_up["max_queue"]) == (0, 1024)
    assert api_up["outcomes"] == {"2xx": 10}
    assert api_up["breaker"] is None
    assert api_up["retry_budget"]["requests"] == 10
    assert api_up["health_check"] == {
        "path": "/healthz",
        "interval_s": 0.1,
        "grpc": False,
        "service": None,
    }
    [target] = api_up["targets"]
    assert (target["url"], target["weight"], target["health"]) == (api.url, 1, "healthy")
    assert set(target["last_check"]) == CHECK
    assert target["last_check"]["ok"] is True
    assert abs(target["last_check"]["at"] - time.time()) < 5
    assert upstreams["failing"]["outcomes"] == {"5xx": 2}
    gone = upstreams["gone"]
    assert set(gone["breaker"]) == BREAKER
    assert gone["breaker"]["state"] == "open"
    assert 1 <= gone["breaker"]["next_trial_in_s"] <= 30
    assert gone["outcomes"] == {"connect_error": 2, "unhealthy": 1}
    assert (gone["shed"], gone["timed_out"]) == (0, 0)
    [gone_target] = gone["targets"]
    assert gone_target["url"] == f"http://user:***@127.0.0.1:{dead}"
    assert (gone_target["health"], gone_target["last_check"]) == ("not_checked", None)

    errors = doc["recent_errors"]
    for error in errors:
        assert set(error) == ERROR
    # Newest first; the upstream's own 500s are not the gateway's answers.
    assert [(e["status"], e["request_id"]) for e in errors] == list(reversed(made))
    assert [e["code"] for e in errors] == [
        "route_not_found",
        "upstream_unhealthy",
        "upstream_unavailable",
        "upstream_unavailable",
    ]
    assert errors[0]["route"] is None
    assert (errors[0]["method"], errors[0]["path"]) == ("GET", "/nowhere")
    assert errors[1]["route"] == "dead"
    assert "circuit breaker" in errors[1]["detail"]
    assert all(a["at"] >= b["at"] for a, b in itertools.pairwise(errors))

    text = httpx.get(gw.admin_url + "/status.json", timeout=5).text
    assert "s3cret" not in text


def test_a_health_check_result_shows_within_a_few_seconds(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    app = CountingApp("api")
    up = upstream(app)
    gw = gateway(
        {
            "upstreams": {
                "api": {
                    "targets": [up.url],
                    "health_check": {
                        "interval": "100ms",
                        "unhealthy_threshold": 2,
                        "healthy_threshold": 1,
                    },
                }
            },
            "routes": [{"name": "r", "path": "/r", "upstream": "api"}],
        }
    )

    def health(doc: dict[str, Any]) -> str:
        target: dict[str, Any] = doc["upstreams"][0]["targets"][0]
        return str(target["health"])

    assert health(wait_for(gw, lambda d: health(d) == "healthy")) == "healthy"
    app.health_status = 503
    doc = wait_for(gw, lambda d: health(d) == "unhealthy")
    assert health(doc) == "unhealthy"
    assert doc["upstreams"][0]["targets"][0]["last_check"]["detail"] == "answered 503"
    app.health_status = 200
    assert health(wait_for(gw, lambda d: health(d) == "healthy")) == "healthy"


def test_status_requires_the_admin_token_when_one_is_configured(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    up = upstream(CountingApp())
    gw = gateway(
        {
            "server": {"admin_token_env": "STATUS_TEST_TOKEN"},
            "upstreams": {"api": {"targets": [up.url]}},
            "routes": [{"name": "r", "path": "/r", "upstream": "api"}],
        },
        env={"STATUS_TEST_TOKEN": "t0k"},
    )
    with httpx.Client(base_url=gw.admin_url, timeout=5) as admin:
        for path in ("/status", "/status.json"):
            denied = admin.get(path)
            assert denied.status_code == 401, path
            assert denied.headers["www-authenticate"].startswith("Bearer")
            assert admin.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
            assert admin.get(path, headers={"Authorization": "Bearer t0k"}).status_code == 200


def test_status_page_is_one_self_contained_document(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    up = upstream(CountingApp())
    gw = gateway(
        {
            "upstreams": {"api": {"targets": [up.url]}},
            "routes": [{"name": "r", "path": "/r", "upstream": "api"}],
        }
    )
    r = httpx.get(gw.admin_url + "/status", timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    # Only the page's own inline script and style (by hash) may run: nothing from
    # elsewhere, and no script a markup injection might smuggle in.
    assert "default-src 'none'" in csp
    assert "connect-src 'self'" in csp
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+';", csp)
    html = r.text
    # Nothing fetched from outside: every src/href is relative or data:.
    for link in re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html):
        assert not re.match(r"^(?:[a-z]+:)?//", link, re.I), link
    assert "@import" not in html
    assert 'fetch("status.json"' in html
    # Data is only ever inserted as text.
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html
    assert "document.write" not in html


def test_reload_outcome_and_errors_are_shown(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    up = upstream(CountingApp())
    gw = gateway(
        {
            "upstreams": {"api": {"targets": [up.url]}},
            "routes": [{"name": "r", "path": "/r", "upstream": "api"}],
        }
    )
    good = gw.config_path.read_text()
    gw.config_path.write_text(good.replace("upstream: api", "upstream: nowhere"))
    assert httpx.post(gw.admin_url + "/reload", timeout=10).status_code == 400
    last = status(gw)["process"]["last_reload"]
    assert last["outcome"] == "error"
    assert any("nowhere" in e for e in last["errors"])
    assert abs(last["at"] - time.time()) < 5
    gw.config_path.write_text(good)
    assert httpx.post(gw.admin_url + "/reload", timeout=10).status_code == 200
    last = status(gw)["process"]["last_reload"]
    assert (last["outcome"], last["errors"]) == ("ok", [])


def test_with_several_workers_the_figures_are_summed(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    up = upstream(CountingApp())
    gw = gateway(
        {
            "upstreams": {"api": {"targets": [up.url], "max_concurrency": 10, "max_queue": 5}},
            "routes": [{"name": "r", "path": "/r", "upstream": "api"}],
        },
        args=["--workers", "2"],
    )
    for _ in range(30):
        # A new connection each time, so both workers get a share.
        assert httpx.get(gw.url + "/r", timeout=5).status_code == 200
    assert httpx.get(gw.url + "/missing", timeout=5).status_code == 404
    doc = wait_for(
        gw,
        lambda d: d["routes"][0]["requests_total"] == 30 and len(d["recent_errors"]) == 1,
    )
    process = doc["process"]
    assert (process["workers"], process["workers_reporting"]) == (2, 2)
    route = doc["routes"][0]
    assert (route["requests_total"], route["requests"]) == (30, 30)
    assert route["p50_ms"] is not None
    [api] = doc["upstreams"]
    # Each worker has its own bulkhead: the limits of the set are the sum.
    assert (api["max_concurrency"], api["max_queue"]) == (20, 10)
    assert api["outcomes"] == {"2xx": 30}
    assert doc["recent_errors"][0]["code"] == "route_not_found"
