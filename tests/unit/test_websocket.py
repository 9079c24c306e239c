"""The WebSocket proxy without a gateway process: close-code mapping, handshake error
mapping, and the request-filter hook at the handshake, driven through fake ASGI
`receive`/`send` against an in-process `websockets` upstream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers as WsHeaders
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import Close
from websockets.http11 import Response
from websockets.typing import Subprotocol

from gateway.build.runtime import Runtime
from gateway.build.upstreams import Upstream
from gateway.config.models import GatewaySettings
from gateway.dataplane.routes import Route as ProxyRoute
from gateway.dataplane.routing import Router
from gateway.dataplane.state import Exchange, GatewayState
from gateway.dataplane.websocket import (
    UpstreamRejected,
    client_close,
    map_websocket_errors,
    proxy_websocket,
    upstream_close,
)
from gateway.edge import EarlyResponse, EdgeContext, RequestFilter
from gateway.errors import (
    RateLimited,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.types import GatewayRequest, GatewayResponse
from tests.integration.harness import free_port

# -- close codes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (1000, "done", (1000, "done")),
        (4002, "custom", (4002, "custom")),
        (1012, "", (1012, "")),
        (1005, "", (1005, "")),  # an empty close frame stays empty
        (1006, "", (1001, "")),  # a dropped connection: going away
        (1015, "tls", (1001, "")),
    ],
)
def test_client_close_passed_to_upstream(code: int, reason: str, expected: tuple[int, str]) -> None:
    assert client_close(code, reason) == expected


@pytest.mark.parametrize(
    ("received", "expected"),
    [
        (Close(1000, "bye"), (1000, "bye")),
        (Close(4001, "app"), (4001, "app")),
        (Close(1011, "oops"), (1011, "oops")),
        (Close(1005, ""), (1005, "")),  # a close frame without a code stays without one
    ],
)
def test_upstream_close_passed_to_client(received: Close, expected: tuple[int, str]) -> None:
    assert upstream_close(received) == expected


def test_upstream_without_close_frame_is_bad_gateway() -> None:
    assert upstream_close(None)[0] == 1014
    assert upstream_close(Close(1006, ""))[0] == 1014


# -- handshake errors ------------------------------------------------------------------


def _raise(exc: Exception) -> Callable[[], None]:
    def go() -> None:
        with map_websocket_errors("up", "http://10.0.0.1:1"):
            raise exc

    return go


@pytest.mark.parametrize(
    ("exc", "kind", "outcome"),
    [
        (ConnectionRefusedError(), UpstreamUnavailable, "connect_error"),
        (OSError("unreachable"), UpstreamUnavailable, "connect_error"),
        (TimeoutError(), UpstreamTimeout, "timeout"),
        (InvalidHandshake("bad upgrade"), UpstreamUnavailable, "reset"),
        (InvalidStatus(Response(200, "OK", WsHeaders())), UpstreamUnavailable, "reset"),
    ],
)
def test_handshake_failures_map_to_gateway_errors(
    exc: Exception, kind: type[UpstreamError], outcome: str
) -> None:
    with pytest.raises(kind) as info:
        _raise(exc)()
    assert info.value.outcome == outcome
    assert info.value.upstream == "up"
    assert "10.0.0.1" not in info.value.detail  # never the internal address


@pytest.mark.parametrize("status", [301, 403, 404, 500, 503])
def test_upstream_http_answers_are_relayed(status: int) -> None:
    response = Response(status, "x", WsHeaders(), b"body")
    with pytest.raises(UpstreamRejected) as info:
        _raise(InvalidStatus(response))()
    assert info.value.response is response


# -- the filter hook at the handshake --------------------------------------------------


class FakeClient:
    """The ASGI side of one client: scripted `receive`, recorded `send`."""

    def __init__(self, *, extension: bool = True, subprotocols: list[str] | None = None) -> None:
        self.scope: dict[str, Any] = {
            "type": "websocket",
            "scheme": "ws",
            "path": "/ws/chat",
            "raw_path": b"/ws/chat",
            "query_string": b"room=1",
            "client": ("10.1.2.3", 5555),
            "headers": [
                (b"host", b"gw.example"),
                (b"authorization", b"Bearer t"),
                (b"x-secret", b"drop me"),
                (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
                (b"sec-websocket-version", b"13"),
                (b"connection", b"Upgrade"),
                (b"upgrade", b"websocket"),
            ],
            "subprotocols": subprotocols or [],
            "extensions": {"websocket.http.response": {}} if extension else {},
        }
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.inbox.put_nowait({"type": "websocket.connect"})
        self.sent: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.get()

    async def send(self, message: Any) -> None:
        self.sent.append(dict(message))
        self.changed.set()

    async def wait_for(self, kind: str, within: float = 2.0) -> dict[str, Any]:
        async with asyncio.timeout(within):
            while True:
                for message in self.sent:
                    if message["type"] == kind:
                        return message
                self.changed.clear()
                await self.changed.wait()


async def _unused_handler(request: GatewayRequest) -> GatewayResponse:
    raise AssertionError("the HTTP handler chain is not used for WebSockets")


@asynccontextmanager
async def gateway_state(
    target: str, filters: tuple[RequestFilter, ...], *more_targets: str
) -> AsyncIterator[GatewayState]:
    targets = [target, *more_targets]
    settings = GatewaySettings.model_validate(
        {
            "upstreams": {"up": {"targets": targets}},
            "routes": [{"name": "ws", "path": "/ws/{rest:path}", "upstream": "up"}],
        }
    )
    upstream = Upstream("up", settings.upstreams["up"], transport=httpx.AsyncHTTPTransport())
    router: Router[Any] = Router()
    route = ProxyRoute(
        name="ws",
        upstream="up",
        handler=_unused_handler,
        rewrite=None,
        timeout=2.0,
        preserve_host=False,
        max_body_size=1024,
        trusted_proxies=(),
        filters=filters,
    )
    router.add(route, "/ws/{rest:path}", None, None)
    try:
        yield GatewayState(runtime=Runtime(settings, router, {"up": upstream}))
    finally:
        await upstream.aclose()


class EchoUpstream:
    """An in-process `websockets` server that records each handshake and close."""

    def __init__(self) -> None:
        self.requests: list[WsHeaders] = []
        self.paths: list[str] = []
        self.closes: list[tuple[int | None, str | None]] = []
        self.closed = asyncio.Event()

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.requests.append(ws.request.headers)
        self.paths.append(ws.request.path)
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass
        self.closes.append((ws.close_code, ws.close_reason))
        self.closed.set()


@asynccontextmanager
async def echo_upstream() -> AsyncIterator[tuple[EchoUpstream, str]]:
    echo = EchoUpstream()

    def choose(ws: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        return Subprotocol("v2") if "v2" in offered else None

    async with serve(
        echo.handler, "127.0.0.1", 0, select_subprotocol=choose, compression=None
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield echo, f"http://127.0.0.1:{port}"


def refuse_with(error: Exception) -> RequestFilter:
    async def check(ctx: EdgeContext) -> None:
        raise error

    return check


async def run(state: GatewayState, client: FakeClient) -> Exchange:
    exchange = Exchange(time.monotonic(), "GET", client.scope["path"], "")
    await proxy_websocket(state, client.scope, client.receive, client.send, exchange)
    return exchange


async def test_filter_refusal_is_an_http_answer_to_the_handshake() -> None:
    challenge = [(b"www-authenticate", b'ApiKey realm="gateway"')]
    async with (
        echo_upstream() as (echo, url),
        gateway_state(url, (refuse_with(Unauthorized("no key", headers=challenge)),)) as state,
    ):
        client = FakeClient()
        exchange = await run(state, client)
    start, body = client.sent
    assert start["type"] == "websocket.http.response.start"
    assert start["status"] == 401
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/problem+json"
    assert headers[b"www-authenticate"] == b'ApiKey realm="gateway"'
    problem = json.loads(body["body"])
    assert (problem["code"], problem["route"]) == ("unauthorized", "ws")
    assert headers[b"x-request-id"] == problem["request_id"].encode()
    assert echo.requests == []  # the upstream never heard of it
    assert (exchange.status, exchange.error) == (401, "unauthorized")


async def test_filter_refusal_without_the_extension_closes_1008() -> None:
    async with (
        echo_upstream() as (echo, url),
        gateway_state(url, (refuse_with(RateLimited("slow down")),)) as state,
    ):
        client = FakeClient(extension=False)
        exchange = await run(state, client)
    assert client.sent == [{"type": "websocket.close", "code": 1008}]
    assert echo.requests == []
    assert exchange.error == "rate_limited"


async def test_filter_early_answer_is_sent_instead_of_upgrading() -> None:
    async def answer(ctx: EdgeContext) -> EarlyResponse:
        return EarlyResponse(204, [(b"x-early", b"yes")])

    async with echo_upstream() as (echo, url), gateway_state(url, (answer,)) as state:
        client = FakeClient()
        await run(state, client)
    assert client.sent[0]["status"] == 204
    assert (b"x-early", b"yes") in client.sent[0]["headers"]
    assert echo.requests == []


async def test_passing_filters_shape_the_upstream_handshake_and_the_101() -> None:
    async def edit(ctx: EdgeContext) -> None:
        assert (ctx.method, ctx.route, ctx.client_ip) == ("GET", "ws", "10.1.2.3")
        ctx.upstream_headers[:] = [h for h in ctx.upstream_headers if h[0] != b"x-secret"]
        ctx.upstream_headers.append((b"x-user", b"alice"))
        ctx.response_headers.append((b"ratelimit-remaining", b"9"))

    async with echo_upstream() as (echo, url), gateway_state(url, (edit,)) as state:
        client = FakeClient(subprotocols=["v1", "v2"])
        task = asyncio.create_task(run(state, client))
        accept = await client.wait_for("websocket.accept")
        assert accept["subprotocol"] == "v2"  # the upstream's choice among the client's offer
        assert (b"ratelimit-remaining", b"9") in accept["headers"]
        client.inbox.put_nowait({"type": "websocket.receive", "text": "hi"})
        assert (await client.wait_for("websocket.send"))["text"] == "hi"
        client.inbox.put_nowait({"type": "websocket.disconnect", "code": 4000, "reason": "bye"})
        exchange = await asyncio.wait_for(task, 2)
        await asyncio.wait_for(echo.closed.wait(), 2)
    sent = echo.requests[0]
    assert "X-Secret" not in sent
    assert sent["X-User"] == "alice"
    assert sent["Authorization"] == "Bearer t"
    assert sent["X-Forwarded-For"] == "10.1.2.3"
    assert sent["X-Forwarded-Proto"] == "http"
    assert sent["X-Forwarded-Host"] == "gw.example"
    assert sent.get_all("Sec-WebSocket-Key") != ["dGhlIHNhbXBsZSBub25jZQ=="]  # its own hop
    assert echo.paths == ["/ws/chat?room=1"]
    assert echo.closes == [(4000, "bye")]
    assert (exchange.status, exchange.bytes_out, exchange.error) == (101, 2, None)


async def test_cancelled_relay_closes_the_upstream_going_away() -> None:
    async with echo_upstream() as (echo, url), gateway_state(url, ()) as state:
        client = FakeClient()
        task = asyncio.create_task(run(state, client))
        await client.wait_for("websocket.accept")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(echo.closed.wait(), 2)
        assert echo.closes == [(1001, "")]
        upstream = state.runtime.upstreams["up"] if state.runtime else None
        assert upstream is not None
        assert upstream.bulkhead.inflight == 0
        assert all(t.inflight == 0 for t in upstream.targets)


async def test_a_refused_target_is_not_tried_twice() -> None:
    # The other target is unhealthy, so the balancer can only offer the one that just
    # refused: the handshake is refused at once instead of hammering it until the deadline.
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    async with gateway_state(dead[0], (), dead[1]) as state:
        assert state.runtime is not None
        state.runtime.upstreams["up"].targets[1].healthy = False
        client = FakeClient()
        exchange = await asyncio.wait_for(run(state, client), 1)
    assert client.sent[0]["status"] == 502
    assert exchange.error == "upstream_unavailable"


async def test_a_refused_target_is_retried_on_the_next() -> None:
    async with echo_upstream() as (echo, url):
        dead = f"http://127.0.0.1:{free_port()}"
        async with gateway_state(dead, (), url) as state:
            for _ in range(4):  # round robin: half of them meet the dead target first
                client = FakeClient()
                task = asyncio.create_task(run(state, client))
                await client.wait_for("websocket.accept")
                client.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
                await asyncio.wait_for(task, 2)
    assert len(echo.requests) == 4
