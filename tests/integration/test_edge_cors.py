"""CORS over the wire: preflights answered by the gateway without touching the upstream,
allowed origins echoed on real answers (the gateway's own 401 and 429 included),
disallowed origins given no Access-Control-Allow-* header, a route policy replacing
the global one."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.integration.edge_support import EchoApp
from tests.integration.harness import GatewayProcess, UpstreamServer

APP = "https://app.example"


def allow_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("access-control-allow-")}


def test_preflight_simple_requests_errors_and_route_overrides(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    app = EchoApp()
    gw = gateway(
        {
            "cors": {
                "allow_origins": [APP],
                "allow_methods": ["GET", "POST"],
                "allow_headers": ["Authorization", "X-API-Key"],
                "expose_headers": ["X-Request-ID"],
                "allow_credentials": True,
                "max_age": "10m",
            },
            "auth": {"api_keys": {"keys": ["k"]}},
            "upstreams": {"up": {"targets": [upstream(app).url]}},
            "routes": [
                {"name": "api", "path": "/api", "upstream": "up", "methods": ["GET", "POST"]},
                {
                    "name": "keyed",
                    "path": "/keyed",
                    "upstream": "up",
                    "auth": "api_key",
                    "rate_limit": {"rate": "1/m", "burst": 1},
                },
                {
                    "name": "partner",
                    "path": "/partner",
                    "upstream": "up",
                    "cors": {"allow_origins": ["https://partner.example"]},
                },
            ],
        }
    )
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        pre = client.options(
            "/api",
            headers={
                "origin": APP,
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            },
        )
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == APP
        assert pre.headers["access-control-allow-methods"] == "GET, POST"
        assert pre.headers["access-control-allow-credentials"] == "true"
        assert pre.headers["access-control-max-age"] == "600"
        assert "authorization" in pre.headers["access-control-allow-headers"]
        assert "Origin" in pre.headers["vary"]
        assert pre.headers["x-request-id"]

        # The keyed route asks for a key; a preflight never carries one and needs none.
        pre = client.options(
            "/keyed", headers={"origin": APP, "access-control-request-method": "GET"}
        )
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == APP

        refused = client.options(
            "/api",
            headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        )
        assert refused.status_code == 204
        assert allow_headers(refused) == {}
        assert app.requests == 0  # no preflight reached the upstream

        # A plain OPTIONS on a route that does not serve it is still the route's 405.
        assert client.options("/api").status_code == 405

        simple = client.get("/api", headers={"origin": APP})
        assert simple.status_code == 200
        assert simple.headers["access-control-allow-origin"] == APP
        assert simple.headers["access-control-allow-credentials"] == "true"
        assert simple.headers["access-control-expose-headers"] == "X-Request-ID"
        assert simple.headers["vary"] == "Origin"

        evil = client.get("/api", headers={"origin": "https://evil.example"})
        assert evil.status_code == 200
        assert allow_headers(evil) == {}
        assert "access-control-expose-headers" not in evil.headers

        # The gateway's own errors carry the CORS headers, so a browser can read them.
        unauthorized = client.get("/keyed", headers={"origin": APP})
        assert unauthorized.status_code == 401
        assert unauthorized.headers["access-control-allow-origin"] == APP
        assert client.get("/keyed", headers={"origin": APP, "x-api-key": "k"}).status_code == 200
        limited = client.get("/keyed", headers={"origin": APP, "x-api-key": "k"})
        assert limited.status_code == 429
        assert limited.headers["access-control-allow-origin"] == APP
        assert limited.headers["retry-after"] == "60"

        # The route's own policy replaces the global one.
        partner = client.get("/partner", headers={"origin": "https://partner.example"})
        assert partner.headers["access-control-allow-origin"] == "https://partner.example"
        assert "access-control-allow-credentials" not in partner.headers
        assert allow_headers(client.get("/partner", headers={"origin": APP})) == {}
    assert app.requests == 2 + 1 + 2
