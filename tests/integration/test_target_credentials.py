"""A target URL may carry credentials (`http://user:pw@host`): both the data path and
the health checks send them as HTTP basic auth, and the target stays in rotation."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tests.integration.harness import GatewayProcess, UpstreamServer

BASIC = "Basic " + base64.b64encode(b"user:pw").decode()


def test_credentials_in_a_target_url_reach_the_upstream_and_health_checks_pass(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    seen: dict[str, list[str]] = {"health": [], "data": []}

    async def health(request: Request) -> Response:
        seen["health"].append(request.headers.get("authorization", ""))
        return PlainTextResponse("ok")

    async def data(request: Request) -> Response:
        seen["data"].append(request.headers.get("authorization", ""))
        return PlainTextResponse("data")

    up = upstream(Starlette(routes=[Route("/healthz", health), Route("/data", data)]))
    target = up.url.replace("http://", "http://user:pw@")
    gw = gateway(
        {
            "upstreams": {
                "u": {
                    "targets": [target],
                    "health_check": {
                        "path": "/healthz",
                        "interval": "100ms",
                        "timeout": "500ms",
                        "unhealthy_threshold": 1,
                        "healthy_threshold": 1,
                    },
                }
            },
            "routes": [{"name": "data", "path": "/data", "upstream": "u"}],
        }
    )
    deadline = time.monotonic() + 3
    while len(seen["health"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(seen["health"]) >= 3
    assert set(seen["health"]) == {BASIC}
    response = httpx.get(gw.url + "/data", timeout=5)
    assert response.status_code == 200, response.text
    assert seen["data"] == [BASIC]
