"""WebSocket proxying over real sockets: a real uvicorn upstream speaking WebSocket, the
real gateway process, and a `websockets` client. Messages both ways, subprotocols,
close codes in both directions, each side going away, refusals, headers, limits, drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.integration.harness import GatewayProcess, UpstreamServer, free_port

NOTICE_WITHIN = 1.5  # seconds for one side to see the other's close


class Seen:
    """What the upstream saw, per connection key (the last path segment)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.handshakes: dict[str, dict[str, Any]] = {}
        self.closes: dict[str, tuple[int, str]] = {}
        self._closed: dict[str, threading.Event] = {}

    def _event(self, key: str) -> threading.Event:
        with self._lock:
            return self._closed.setdefault(key, threading.Event())

    def handshake(self, key: str, scope: dict[str, Any]) -> None:
        header_list = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        with self._lock:
            self.handshakes[key] = {
                "path": scope["raw_path"].decode("latin-1"),
                "query": scope["query_string"].decode("latin-1"),
                "subprotocols": list(scope.get("subprotocols") or []),
                "header_list": header_list,
            }

    def closed(self, key: str, code: int, reason: str) -> None:
        with self._lock:
            self.closes[key] = (code, reason)
        self._event(key).set()

    async def wait_closed(self, key: str, within: float = NOTICE_WITHIN) -> tuple[int, str]:
        if not await asyncio.to_thread(self._event(key).wait, within):
            raise AssertionError(f"the upstream did not see {key!r} close within {within}s")
        return self.closes[key]


def make_app(seen: Seen) -> Any:
    """`/ws/<mode>/<key>`: `echo` echoes (and obeys `!close CODE REASON` and `!drop`),
    `headers` first sends the request headers it got as JSON, `reject` answers 403."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        _, _, mode, key = scope["path"].split("/", 3)
        seen.handshake(key, scope)
        assert (await receive())["type"] == "websocket.connect"
        if mode == "reject":
            headers = [(b"content-type", b"text/plain"), (b"x-upstream", b"said no")]
            await send({"type": "websocket.http.response.start", "status": 403, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": b"not you"})
            return
        offered = scope.get("subprotocols") or []
        await send(
            {
                "type": "websocket.accept",
                "subprotocol": "chat.v2" if "chat.v2" in offered else None,
                "headers": [(b"set-cookie", b"session=abc")],
            }
        )
        if mode == "headers":
            await send({"type": "websocket.send", "text": json.dumps(seen.handshakes[key])})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                seen.closed(key, message.get("code", 1005), message.get("reason") or "")
                return
            text = message.get("text")
            if text == "!drop":
                return  # without a close frame: uvicorn just drops the TCP connection
            if text is not None and text.startswith("!close "):
                _, code, reason = text.split(" ", 2)
                await send({"type": "websocket.close", "code": int(code), "reason": reason})
            elif text is not None:
                await send({"type": "websocket.send", "text": text})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"]})

    return app


def config(target: str, **upstream: Any) -> dict[str, Any]:
    return {
        "upstreams": {"up": {"targets": [target], **upstream}},
        "routes": [
            {"name": "ws", "path": "/ws/{rest:path}", "upstream": "up", "timeout": "3s"},
            {
                "name": "rewritten",
                "path": "/old/{rest:path}",
                "upstream": "up",
                "rewrite": "/ws/{rest}",
            },
        ],
    }


Start = Callable[..., tuple[Seen, GatewayProcess]]


@pytest.fixture
def proxied(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> Iterator[Start]:
    """Start the echo upstream and a gateway in front of it. On the way out the gateway
    is stopped and must have logged no traceback (a relay task that broke, or was
    destroyed while pending)."""
    started: list[GatewayProcess] = []

    def start(**upstream_settings: Any) -> tuple[Seen, GatewayProcess]:
        seen = Seen()
        up = upstream(make_app(seen))
        gw = gateway(config(up.url, **upstream_settings))
        started.append(gw)
        return seen, gw

    yield start
    for gw in started:
        gw.stop()
        for bad in ("Traceback", "Task was destroyed", "ResourceWarning", "never awaited"):
            assert bad not in gw.stderr, gw.stderr


def ws_url(gw: GatewayProcess, path: str) -> str:
    return "ws" + gw.url.removeprefix("http") + path


@asynccontextmanager
async def open_ws(gw: GatewayProcess, path: str, **kw: Any) -> AsyncIterator[ClientConnection]:
    async with connect(ws_url(gw, path), proxy=None, open_timeout=5, max_size=None, **kw) as ws:
        yield ws


async def access_log_entry(gw: GatewayProcess, request_id: str) -> dict[str, Any]:
    """The access-log line of one request; it is written when the connection ends."""
    deadline = time.monotonic() + 2
    while True:
        for line in gw.stdout.splitlines():
            if request_id in line:
                entry: dict[str, Any] = json.loads(line)
                if entry.get("request_id") == request_id:
                    return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"no access-log line for {request_id}")
        await asyncio.sleep(0.05)


async def refused(gw: GatewayProcess, path: str, **kw: Any) -> tuple[int, Any, bytes]:
    """Open a handshake that must be refused; its status, headers and body."""
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(gw, path, **kw):
            pass
    response = info.value.response
    return response.status_code, response.headers, bytes(response.body)


async def test_echo_text_and_binary_both_ways(proxied: Start) -> None:
    _, gw = proxied()
    async with open_ws(gw, "/ws/echo/a") as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send(b"\x00\x01binary\xff")
        assert await ws.recv() == b"\x00\x01binary\xff"
        await ws.send("héllo ✓")
        assert await ws.recv() == "héllo ✓"


async def test_large_binary_message_both_ways(proxied: Start) -> None:
    _, gw = proxied()
    payload = os.urandom(1024 * 1024)
    async with open_ws(gw, "/ws/echo/big") as ws:
        await ws.send(payload)
        assert await asyncio.wait_for(ws.recv(), 5) == payload


async def test_message_over_the_limit_closes_both_sides_1009(proxied: Start) -> None:
    seen, gw = proxied()
    async with open_ws(gw, "/ws/echo/huge") as ws:
        await ws.send(b"x" * (16 * 1024 * 1024 + 1))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1009
    assert (await seen.wait_closed("huge"))[0] == 1009


async def test_client_pings_are_answered(proxied: Start) -> None:
    _, gw = proxied()
    async with open_ws(gw, "/ws/echo/ping") as ws:
        pong = await ws.ping(b"are you there")
        await asyncio.wait_for(pong, 2)
        await ws.send("still open")
        assert await ws.recv() == "still open"


async def test_subprotocol_negotiated_end_to_end(proxied: Start) -> None:
    seen, gw = proxied()
    async with open_ws(gw, "/ws/echo/sp", subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v2"
    assert seen.handshakes["sp"]["subprotocols"] == ["chat.v1", "chat.v2"]
    # The upstream picks none of these: the client is accepted without a subprotocol.
    async with open_ws(gw, "/ws/echo/sp1", subprotocols=["chat.v1"]) as ws:
        assert ws.subprotocol is None
    async with open_ws(gw, "/ws/echo/none") as ws:
        assert ws.subprotocol is None
    assert seen.handshakes["none"]["subprotocols"] == []


async def test_close_code_and_reason_from_upstream_reach_client(proxied: Start) -> None:
    _, gw = proxied()
    async with open_ws(gw, "/ws/echo/uc") as ws:
        await ws.send("!close 4001 going home")
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), NOTICE_WITHIN)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "going home")
    async with open_ws(gw, "/ws/echo/uc2") as ws:
        await ws.send("!close 1000 done")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), NOTICE_WITHIN)
        assert (ws.close_code, ws.close_reason) == (1000, "done")


async def test_close_code_and_reason_from_client_reach_upstream(proxied: Start) -> None:
    seen, gw = proxied()
    async with open_ws(gw, "/ws/echo/cc") as ws:
        await ws.send("x")
        assert await ws.recv() == "x"
        await ws.close(4002, "client says bye")
    assert await seen.wait_closed("cc") == (4002, "client says bye")


async def test_client_vanishing_closes_upstream(proxied: Start) -> None:
    seen, gw = proxied()
    async with open_ws(gw, "/ws/echo/gone") as ws:
        await ws.send("x")
        assert await ws.recv() == "x"
        ws.transport.abort()  # no close frame: the TCP connection just ends
        code, _ = await seen.wait_closed("gone")
    assert code == 1001  # Going Away: the client left without a code


async def test_upstream_dropping_the_connection_gives_client_1014(proxied: Start) -> None:
    _, gw = proxied()
    async with open_ws(gw, "/ws/echo/drop") as ws:
        await ws.send("!drop")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), NOTICE_WITHIN)
        assert ws.close_code == 1014  # Bad Gateway


async def test_headers_forwarded_and_returned(proxied: Start) -> None:
    _, gw = proxied()
    sent = {
        "X-Request-ID": "ws-rid-1",
        "Authorization": "Bearer token",
        "Cookie": "a=b",
        "Origin": "http://app.example",
        "User-Agent": "ws-test/1",
    }
    async with open_ws(gw, "/ws/headers/h?x=1", additional_headers=sent) as ws:
        got = json.loads(await ws.recv())
        assert ws.response is not None
        assert ws.response.headers["X-Request-ID"] == "ws-rid-1"
        assert ws.response.headers["Set-Cookie"] == "session=abc"
    names = [name for name, _ in got["header_list"]]
    headers = dict(got["header_list"])
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{gw.port}"
    assert headers["x-request-id"] == "ws-rid-1"
    assert headers["authorization"] == "Bearer token"
    assert headers["cookie"] == "a=b"
    assert headers["origin"] == "http://app.example"
    assert headers["user-agent"] == "ws-test/1"
    # The upstream hop's own handshake, each header once, none of the client's.
    for name in ("host", "sec-websocket-key", "sec-websocket-version", "user-agent", "upgrade"):
        assert names.count(name) == 1, name
    assert "sec-websocket-extensions" not in names  # no compression on the internal hop
    assert got["query"] == "x=1"

    # The access log counts the connection like a request, with status 101.
    entry = await access_log_entry(gw, "ws-rid-1")
    assert (entry["route"], entry["method"], entry["status"]) == ("ws", "GET", 101)


async def test_rewrite_applies_to_the_upgrade(proxied: Start) -> None:
    seen, gw = proxied()
    async with open_ws(gw, "/old/echo/rw?a=1&b=2") as ws:
        await ws.send("via rewrite")
        assert await ws.recv() == "via rewrite"
    assert seen.handshakes["rw"]["path"] == "/ws/echo/rw"
    assert seen.handshakes["rw"]["query"] == "a=1&b=2"


async def test_unknown_route_refused_404(proxied: Start) -> None:
    _, gw = proxied()
    status, headers, body = await refused(gw, "/nowhere")
    assert status == 404
    assert headers["Content-Type"] == "application/problem+json"
    assert json.loads(body)["code"] == "route_not_found"


async def test_upstream_down_refuses_handshake_502(
    gateway: Callable[..., GatewayProcess],
) -> None:
    gw = gateway(config(f"http://127.0.0.1:{free_port()}"))
    status, headers, body = await refused(gw, "/ws/echo/down")
    assert status == 502
    problem = json.loads(body)
    assert (problem["code"], problem["route"], problem["upstream"]) == (
        "upstream_unavailable",
        "ws",
        "up",
    )
    assert headers["X-Request-ID"] == problem["request_id"]


async def test_upstream_refusal_passes_through(proxied: Start) -> None:
    _, gw = proxied()
    status, headers, body = await refused(gw, "/ws/reject/no")
    assert (status, body) == (403, b"not you")
    assert headers["X-Upstream"] == "said no"
    assert "X-Request-ID" in headers


async def test_connection_holds_a_bulkhead_slot(proxied: Start) -> None:
    _, gw = proxied(max_concurrency=1, max_queue=0)
    async with open_ws(gw, "/ws/echo/first") as ws:
        status, _, body = await refused(gw, "/ws/echo/second")
        assert (status, json.loads(body)["code"]) == (503, "upstream_saturated")
        await ws.send("first still works")
        assert await ws.recv() == "first still works"
    # Closed: the slot comes back once the gateway has shut the upstream side too.
    deadline = time.monotonic() + 2
    while True:
        try:
            async with open_ws(gw, "/ws/echo/third") as ws:
                await ws.send("third")
                assert await ws.recv() == "third"
            break
        except InvalidStatus:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_drain_lets_websockets_run_until_drain_timeout_then_closes_them(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    seen = Seen()
    up = upstream(make_app(seen))
    cfg = config(up.url)
    cfg["server"] = {"drain_timeout": "1500ms"}
    gw = gateway(cfg)
    async with open_ws(gw, "/ws/echo/drain") as ws:
        await ws.send("x")
        assert await ws.recv() == "x"
        gw.signal(signal.SIGTERM)
        signalled = time.monotonic()
        await asyncio.sleep(0.5)
        # Draining: the WebSocket in flight keeps working, like any request in flight.
        await ws.send("still here")
        assert await ws.recv() == "still here"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1012  # Service Restart: reconnect elsewhere
        assert time.monotonic() - signalled >= 1.2  # not before drain_timeout
    assert (await seen.wait_closed("drain", 3))[0] == 1012
    assert await asyncio.to_thread(gw.wait, 10) == 0
    for bad in ("Traceback", "Task was destroyed", "ResourceWarning", "never awaited"):
        assert bad not in gw.stderr, gw.stderr


def edge_config(target: str) -> dict[str, Any]:
    return {
        "auth": {"api_keys": {"header": "X-API-Key", "keys": ["sesame"]}},
        "upstreams": {"up": {"targets": [target]}},
        "routes": [
            {"name": "keyed", "path": "/ws/{rest:path}", "upstream": "up", "auth": "api_key"},
            {
                "name": "limited",
                "path": "/limited/{rest:path}",
                "upstream": "up",
                "rewrite": "/ws/{rest}",
                "rate_limit": {"rate": "1/m", "burst": 1, "key": "route"},
            },
        ],
    }


async def test_api_key_checked_at_the_handshake(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    seen = Seen()
    gw = gateway(edge_config(upstream(make_app(seen)).url))
    status, headers, body = await refused(gw, "/ws/echo/nokey")
    assert (status, json.loads(body)["code"]) == (401, "unauthorized")
    assert "WWW-Authenticate" in headers
    status, _, _ = await refused(gw, "/ws/echo/badkey", additional_headers={"X-API-Key": "no"})
    assert status == 401
    assert "nokey" not in seen.handshakes and "badkey" not in seen.handshakes
    async with open_ws(gw, "/ws/headers/key", additional_headers={"X-API-Key": "sesame"}) as ws:
        got = json.loads(await ws.recv())
    # Accepted, and the key stays at the gateway (the route does not forward it).
    assert "x-api-key" not in dict(got["header_list"])


async def test_rate_limit_checked_at_the_handshake(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    seen = Seen()
    gw = gateway(edge_config(upstream(make_app(seen)).url))
    async with open_ws(gw, "/limited/echo/one") as ws:
        assert ws.response is not None
        assert ws.response.headers["RateLimit-Limit"]  # the filter's headers ride on the 101
        await ws.send("in")
        assert await ws.recv() == "in"
    status, headers, body = await refused(gw, "/limited/echo/two")
    assert (status, json.loads(body)["code"]) == (429, "rate_limited")
    assert int(headers["Retry-After"]) > 0
    assert "two" not in seen.handshakes
