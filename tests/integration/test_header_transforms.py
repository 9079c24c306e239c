"""Header transforms and aggregate identity headers over real sockets: real uvicorn
upstreams that echo the headers they got (and answer some of their own), the real
gateway process, requests over HTTP/1.1 and a WebSocket handshake."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.integration.edge_support import EchoApp
from tests.integration.harness import GatewayProcess, UpstreamServer, free_port
from tests.unit.jwtkit import AUDIENCE, ISSUER, SECRET, sign

SECRET_ENV = "HEADER_TRANSFORMS_TEST_SECRET"


class LoudEcho(EchoApp):
    """EchoApp whose answers also carry `Server`, `X-Powered-By` and `X-Env: dev`."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def loud(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message["headers"],
                    (b"server", b"upstream/1.0"),
                    (b"x-powered-by", b"php"),
                    (b"x-env", b"dev"),
                ]
            await send(message)

        await super().__call__(scope, receive, loud)


async def ws_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Accepts, sends the handshake's headers as JSON, closes."""
    assert scope["type"] == "websocket"
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    await send({"type": "websocket.send", "text": json.dumps(headers)})
    await send({"type": "websocket.close", "code": 1000})


def config(up: UpstreamServer, other: UpstreamServer, ws: UpstreamServer) -> dict[str, Any]:
    identity_transform = {"request": {"set": {"X-Up": "{upstream}"}}}
    return {
        "auth": {
            "api_keys": {"header": "X-API-Key", "keys": ["key-1"]},
            "jwt": {
                "issuer": ISSUER,
                "audience": AUDIENCE,
                "algorithms": ["HS256"],
                "secret_env": SECRET_ENV,
                "claims_to_headers": {"sub": "X-User-Id", "tenant": "X-Tenant"},
            },
        },
        "upstreams": {
            "up": {"targets": [up.url]},
            "other": {"targets": [other.url]},
            "ws": {"targets": [ws.url]},
            # nothing listens there: every request is the gateway's own 502
            "gone": {"targets": [f"http://127.0.0.1:{free_port()}"], "retries": {"attempts": 0}},
        },
        "routes": [
            {
                "name": "tx",
                "path": "/tx",
                "upstream": "up",
                "headers": {
                    "request": {
                        "remove": ["X-Debug"],
                        "set": {
                            "X-Env": "prod",
                            "X-Where": "{route}@{upstream}",
                            "X-Client": "{client_ip}",
                            "X-Rid": "{request_id}",
                        },
                        "add": {"X-Tag": "gateway"},
                    },
                    "response": {
                        "remove": ["Server", "X-Powered-By"],
                        "set": {"X-Env": "prod", "X-Rid": "{request_id}"},
                        "add": {"X-Frame-Options": "DENY"},
                    },
                },
            },
            {"name": "plain", "path": "/plain", "upstream": "up"},
            {
                "name": "broken",
                "path": "/broken",
                "upstream": "gone",
                "headers": {
                    "response": {
                        "set": {"Content-Type": "text/plain"},
                        "add": {"X-Frame-Options": "DENY"},
                    }
                },
            },
            {
                "name": "agg-jwt",
                "path": "/agg-jwt",
                "auth": "jwt",
                "aggregate": {
                    "backends": [
                        {"upstream": "up", "path": "/a", "key": "a"},
                        {"upstream": "other", "path": "/b", "key": "b"},
                    ]
                },
                "headers": {**identity_transform, "response": {"add": {"X-Via": "{route}"}}},
            },
            {"name": "jwt", "path": "/jwt", "auth": "jwt", "upstream": "up"},
            {
                "name": "agg-key",
                "path": "/agg-key",
                "auth": "api_key",
                "forward_api_key": True,
                "aggregate": {"backends": [{"upstream": "up", "path": "/a", "key": "a"}]},
            },
            {
                "name": "agg-key-kept",
                "path": "/agg-key-kept",
                "auth": "api_key",
                "aggregate": {"backends": [{"upstream": "up", "path": "/a", "key": "a"}]},
            },
            {"name": "ws", "path": "/ws", "upstream": "ws", **{"headers": identity_transform}},
        ],
    }


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway (and its upstreams) for every test here: starting the process is
    the slow part, and the routes do not share state."""
    with (
        UpstreamServer(LoudEcho()) as up,
        UpstreamServer(EchoApp()) as other,
        UpstreamServer(ws_app) as ws,
    ):
        proc = GatewayProcess(
            config(up, other, ws), tmp_path_factory.mktemp("gw"), env={SECRET_ENV: SECRET}
        )
        proc.start(timeout=45)  # under load, imports alone can take 15 s
        try:
            yield proc
        finally:
            proc.stop()


def test_request_and_response_transforms_on_a_proxied_route(
    gw: GatewayProcess,
) -> None:
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        r = client.get(
            "/tx",
            headers={
                "x-debug": "1",
                "x-env": "dev",
                "x-tag": "client",
                "x-request-id": "rid-123",
            },
        )
        assert r.status_code == 200, r.text
        seen = r.json()["headers"]
        assert "x-debug" not in seen
        assert seen["x-env"] == "prod"  # set: the client's value replaced
        assert seen["x-tag"] == "client, gateway"  # add: appended to the client's
        assert seen["x-where"] == "tx@up"
        assert seen["x-client"] == "127.0.0.1"
        assert seen["x-rid"] == "rid-123"
        assert seen["x-forwarded-for"] == "127.0.0.1"  # the gateway's own, untouched
        # the response: after the gateway's own headers
        assert "server" not in r.headers and "x-powered-by" not in r.headers
        assert r.headers.get_list("x-env") == ["prod"]  # set overrides the upstream
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-rid"] == "rid-123" == r.headers["x-request-id"]
        assert r.headers["date"]  # the gateway's Date stays

        # A route without `headers` is untouched.
        plain = client.get("/plain", headers={"x-debug": "1"})
        assert plain.json()["headers"]["x-debug"] == "1"
        assert "upstream/1.0" in plain.headers["server"]


def test_response_transform_applies_to_errors_but_never_to_their_content_type(
    gw: GatewayProcess,
) -> None:
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        r = client.get("/broken")
        assert r.status_code == 502
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "upstream_unavailable"
        assert r.headers["x-frame-options"] == "DENY"
        # A filter's refusal, on an aggregate route, is transformed the same way.
        refused = client.get("/agg-jwt")
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["x-via"] == "agg-jwt"


def test_aggregate_backends_get_identity_headers_and_the_request_transform(
    gw: GatewayProcess,
) -> None:
    token = sign(SECRET, "HS256", kid=None, sub="user-7", tenant="acme")
    auth = {"authorization": f"Bearer {token}", "x-user-id": "admin"}  # a spoofed copy
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        proxied = client.get("/jwt", headers=auth).json()["headers"]
        r = client.get("/agg-jwt", headers=auth)
        assert r.status_code == 200, r.text
        assert r.headers["x-gateway-completed"] == "true"
        assert r.headers["x-via"] == "agg-jwt"
        body = r.json()
        for key, upstream_name in (("a", "up"), ("b", "other")):
            seen = body[key]["headers"]
            assert seen["x-user-id"] == "user-7" == proxied["x-user-id"]
            assert seen["x-tenant"] == "acme" == proxied["x-tenant"]
            assert seen["x-up"] == upstream_name  # {upstream}: the backend's

        keyed = client.get("/agg-key", headers={"x-api-key": "key-1"})
        assert keyed.status_code == 200, keyed.text
        assert keyed.json()["a"]["headers"]["x-api-key"] == "key-1"
        kept = client.get("/agg-key-kept", headers={"x-api-key": "key-1"})
        assert kept.status_code == 200, kept.text
        assert "x-api-key" not in kept.json()["a"]["headers"]


async def test_request_transform_applies_to_a_websocket_handshake(
    gw: GatewayProcess,
) -> None:
    url = gw.url.replace("http://", "ws://") + "/ws"
    async with connect(url, additional_headers={"x-up": "spoofed"}, open_timeout=5) as ws:
        seen = json.loads(await ws.recv())
    assert seen["x-up"] == "ws"
