"""CORS: preflights answered by the gateway, allowed origins echoed, disallowed ones
given no Access-Control-Allow-* header, Vary: Origin throughout; and where the filter
sits in the route's chain."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.build.edge import build_filters, router_methods
from gateway.config.models import CorsSettings, GatewaySettings
from gateway.edge import EarlyResponse, EdgeContext
from gateway.edge.cors import cors
from gateway.edge.ratelimit import MemoryStore
from gateway.errors import MethodNotAllowed, Unauthorized

APP = b"https://app.example"


def ctx(method: str = "GET", *headers: tuple[bytes, bytes]) -> EdgeContext:
    raw = list(headers)
    return EdgeContext(
        scope={"type": "http"},
        method=method,
        route="r",
        client_ip="10.0.0.1",
        request_headers=raw,
        upstream_headers=list(raw),
    )


def policy(**kw: Any) -> CorsSettings:
    base: dict[str, Any] = {
        "allow_origins": ["https://app.example"],
        "allow_methods": ["GET", "POST"],
        "allow_headers": ["Authorization", "X-Trace"],
        "max_age": "10m",
    }
    base.update(kw)
    return CorsSettings.model_validate(base)


def preflight(
    origin: bytes = APP, method: bytes = b"POST", headers: bytes | None = None
) -> EdgeContext:
    raw = [(b"origin", origin), (b"access-control-request-method", method)]
    if headers is not None:
        raw.append((b"access-control-request-headers", headers))
    return ctx("OPTIONS", *raw)


def allow_headers(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    return {k: v for k, v in headers if k.startswith(b"access-control-allow-")}


async def test_an_allowed_preflight_is_answered_204_with_the_policy() -> None:
    answer = await cors(policy())(preflight(headers=b"authorization, content-type"))
    assert isinstance(answer, EarlyResponse)
    assert answer.status == 204
    headers = dict(answer.headers)
    assert headers[b"access-control-allow-origin"] == APP
    assert headers[b"access-control-allow-methods"] == b"GET, POST"
    assert headers[b"access-control-max-age"] == b"600"
    allowed = headers[b"access-control-allow-headers"].decode().split(", ")
    assert {"authorization", "x-trace", "content-type"} <= set(allowed)
    assert b"access-control-allow-credentials" not in headers
    assert headers[b"vary"].startswith(b"Origin")


@pytest.mark.parametrize(
    "request_ctx",
    [
        preflight(origin=b"https://evil.example"),
        preflight(method=b"DELETE"),
        preflight(headers=b"x-not-allowed"),
    ],
    ids=["origin", "method", "headers"],
)
async def test_a_refused_preflight_gets_no_allow_headers(request_ctx: EdgeContext) -> None:
    answer = await cors(policy())(request_ctx)
    assert isinstance(answer, EarlyResponse)
    assert answer.status == 204
    assert allow_headers(answer.headers) == {}
    assert dict(answer.headers)[b"vary"].startswith(b"Origin")


async def test_an_allowed_origin_is_echoed_on_the_answer_with_exposed_headers() -> None:
    c = ctx("GET", (b"origin", APP))
    assert await cors(policy(expose_headers=["X-Total"], allow_credentials=True))(c) is None
    assert dict(c.response_headers) == {
        b"vary": b"Origin",
        b"access-control-allow-origin": APP,
        b"access-control-allow-credentials": b"true",
        b"access-control-expose-headers": b"X-Total",
    }


async def test_a_disallowed_origin_gets_only_vary() -> None:
    c = ctx("GET", (b"origin", b"https://evil.example"))
    await cors(policy(allow_credentials=True, expose_headers=["X-Total"]))(c)
    assert c.response_headers == [(b"vary", b"Origin")]


async def test_a_request_without_origin_is_not_cors_but_still_varies() -> None:
    c = ctx("GET")
    await cors(policy())(c)
    assert c.response_headers == [(b"vary", b"Origin")]


async def test_any_origin_is_star_unless_credentials_then_echoed() -> None:
    c = ctx("GET", (b"origin", b"https://x.example"))
    await cors(policy(allow_origins=["*"]))(c)
    assert dict(c.response_headers)[b"access-control-allow-origin"] == b"*"
    c = ctx("GET", (b"origin", b"https://x.example"))
    await cors(policy(allow_origins=["*"], allow_credentials=True))(c)
    assert dict(c.response_headers)[b"access-control-allow-origin"] == b"https://x.example"
    c = ctx("GET", (b"origin", b"null"))  # sandboxed frames are not "any origin"
    await cors(policy(allow_origins=["*"], allow_credentials=True))(c)
    assert allow_headers(c.response_headers) == {}


async def test_origins_compare_without_case_or_trailing_slash() -> None:
    c = ctx("GET", (b"origin", b"https://App.Example"))
    await cors(policy(allow_origins=["https://app.example/"]))(c)
    assert dict(c.response_headers)[b"access-control-allow-origin"] == b"https://App.Example"


async def test_wildcard_headers_and_methods_mirror_the_request() -> None:
    answer = await cors(policy(allow_headers=["*"], allow_methods=["*"]))(
        preflight(method=b"PATCH", headers=b"X-Anything, X-Else")
    )
    assert isinstance(answer, EarlyResponse)
    headers = dict(answer.headers)
    assert headers[b"access-control-allow-headers"] == b"X-Anything, X-Else"
    assert b"PATCH" in headers[b"access-control-allow-methods"]


async def test_plain_options_on_a_route_that_does_not_serve_it_is_405() -> None:
    check = cors(policy(), frozenset({"GET"}))
    with pytest.raises(MethodNotAllowed) as info:
        await check(ctx("OPTIONS", (b"origin", APP)))
    assert dict(info.value.headers)[b"allow"] == b"GET, HEAD"
    assert isinstance(await check(preflight(method=b"GET")), EarlyResponse)
    assert await cors(policy(), None)(ctx("OPTIONS")) is None  # the route serves every method


def gateway_settings(route: dict[str, Any], **top: Any) -> GatewaySettings:
    return GatewaySettings.model_validate(
        {
            "upstreams": {"u": {"targets": ["http://127.0.0.1:1"]}},
            "routes": [{"name": "r", "path": "/r", "upstream": "u", **route}],
            **top,
        }
    )


async def test_a_route_policy_replaces_the_global_one() -> None:
    settings = gateway_settings(
        {"cors": {"allow_origins": ["https://route.example"]}},
        cors={"allow_origins": ["https://global.example"]},
    )
    (check,) = build_filters(settings.routes[0], settings, MemoryStore(), None)
    c = ctx("GET", (b"origin", b"https://global.example"))
    await check(c)
    assert allow_headers(c.response_headers) == {}
    c = ctx("GET", (b"origin", b"https://route.example"))
    await check(c)
    assert dict(c.response_headers)[b"access-control-allow-origin"] == b"https://route.example"


async def test_cors_runs_before_auth_so_preflights_need_no_credentials() -> None:
    settings = gateway_settings(
        {"auth": "api_key", "methods": ["GET"], "rate_limit": {"rate": "1/m", "burst": 1}},
        cors={"allow_origins": ["https://app.example"]},
        auth={"api_keys": {"keys": ["k"]}},
    )
    route = settings.routes[0]
    filters = build_filters(route, settings, MemoryStore(), None)
    assert len(filters) == 3
    assert router_methods(route, settings) == frozenset({"GET", "OPTIONS"})
    c = preflight(method=b"GET")
    answers = [await f(c) for f in filters[:1]]
    assert isinstance(answers[0], EarlyResponse)
    # A refused request still carries the CORS headers added before auth refused it.
    c = ctx("GET", (b"origin", APP))
    await filters[0](c)
    with pytest.raises(Unauthorized):
        await filters[1](c)
    assert dict(c.response_headers)[b"access-control-allow-origin"] == APP


def test_without_cors_the_router_keeps_the_route_methods() -> None:
    settings = gateway_settings({"methods": ["GET"]})
    assert router_methods(settings.routes[0], settings) == frozenset({"GET"})
    assert build_filters(settings.routes[0], settings, MemoryStore(), None) == ()
