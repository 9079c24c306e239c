"""One upstream try (`Upstream.send`) against a respx-mocked transport."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import respx

from gateway.build.upstreams import Upstream
from gateway.config.models import UpstreamSettings
from gateway.errors import UpstreamTimeout, UpstreamUnavailable, UpstreamUnhealthy
from gateway.types import Deadline, GatewayRequest, GatewayResponse
from tests.integration.harness import UpstreamServer, free_port, read_body

TARGET = "http://127.0.0.1:9001"


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    # respx patches httpcore, so the upstream runs on httpx's own transport (the one
    # `GATEWAY_TRANSPORT=httpx` selects) and responses stream as they would for real.
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as mock:
        yield mock


def make_upstream(router: respx.MockRouter, *targets: str, **settings: Any) -> Upstream:
    del router  # the routes are what the test registered on it
    return Upstream(
        "users",
        UpstreamSettings(targets=targets or (TARGET,), **settings),
        transport=httpx.AsyncHTTPTransport(retries=0),
    )


def make_request(
    path: str = "/v1/users/42",
    query: bytes = b"",
    *,
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    timeout: float = 2.0,
    **kw: Any,
) -> GatewayRequest:
    return GatewayRequest(
        method=method,
        path=path,
        query=query,
        headers=headers or [(b"accept", b"application/json")],
        deadline=Deadline.after(timeout),
        request_id="rid-1",
        route="users",
        **kw,
    )


async def read_all(response: GatewayResponse) -> bytes:
    try:
        return b"".join([chunk async for chunk in response.body])
    finally:
        await response.close()


def last_request(router: respx.MockRouter) -> httpx.Request:
    request: httpx.Request = router.calls.last.request
    return request


async def test_calls_target_with_rewritten_path_and_verbatim_query(
    router: respx.MockRouter,
) -> None:
    router.route(host="127.0.0.1", port=9001).respond(200, text="ok")
    upstream = make_upstream(router)
    try:
        query = b"b=2&a=1&a=%2Fx%20y&empty=&flag"
        response = await upstream.send(make_request("/v1/users/42/profile", query))
        assert response.status == 200
        assert await read_all(response) == b"ok"
        sent = last_request(router)
        assert sent.method == "GET"
        assert str(sent.url).startswith(TARGET + "/v1/users/42/profile?")
        assert sent.url.raw_path == b"/v1/users/42/profile?" + query
        assert response.upstream == "users"
        assert response.target == TARGET
    finally:
        await upstream.aclose()


async def test_no_query_means_no_question_mark(router: respx.MockRouter) -> None:
    router.route().respond(204)
    upstream = make_upstream(router)
    try:
        await read_all(await upstream.send(make_request("/v1/a%20b")))
        assert last_request(router).url.raw_path == b"/v1/a%20b"
    finally:
        await upstream.aclose()


async def test_sends_the_remaining_deadline_as_x_request_timeout_ms(
    router: respx.MockRouter,
) -> None:
    router.route().respond(200)
    upstream = make_upstream(router)
    try:
        await read_all(await upstream.send(make_request(timeout=1.5)))
        values = last_request(router).headers.get_list("x-request-timeout-ms")
        assert len(values) == 1
        assert 1000 < int(values[0]) <= 1500
        # a deadline already spent still sends a positive budget, never 0 or negative
        await read_all(await upstream.send(make_request(timeout=-1)))
        assert last_request(router).headers["x-request-timeout-ms"] == "1"
    finally:
        await upstream.aclose()


async def test_forwards_the_prepared_headers_and_only_those(router: respx.MockRouter) -> None:
    router.route().respond(200)
    upstream = make_upstream(router)
    headers = [
        (b"accept", b"text/plain"),
        (b"x-forwarded-for", b"1.2.3.4, 127.0.0.1"),
        (b"x-request-id", b"rid-1"),
        (b"x-multi", b"a"),
        (b"x-multi", b"b"),
    ]
    try:
        await read_all(await upstream.send(make_request(headers=headers)))
        sent = last_request(router).headers
        assert sent["accept"] == "text/plain"
        assert sent["x-forwarded-for"] == "1.2.3.4, 127.0.0.1"
        assert sent["x-request-id"] == "rid-1"
        assert sent.get_list("x-multi") == ["a", "b"]
        assert "cookie" not in sent
    finally:
        await upstream.aclose()


async def test_default_host_is_the_targets(router: respx.MockRouter) -> None:
    router.route().respond(200)
    upstream = make_upstream(router)
    try:
        await read_all(await upstream.send(make_request()))
        assert last_request(router).headers.get_list("host") == ["127.0.0.1:9001"]
    finally:
        await upstream.aclose()


async def test_preserve_host_sends_the_incoming_host(router: respx.MockRouter) -> None:
    router.route().respond(200)
    upstream = make_upstream(router)
    try:
        await read_all(await upstream.send(make_request(host="api.example.com:8443")))
        assert last_request(router).headers.get_list("host") == ["api.example.com:8443"]
        assert last_request(router).url.host == "127.0.0.1"
    finally:
        await upstream.aclose()


async def test_request_body_bytes_and_stream_are_sent(router: respx.MockRouter) -> None:
    received: list[bytes] = []

    def record(request: httpx.Request) -> httpx.Response:
        received.append(request.read())
        return httpx.Response(201, json={"n": len(received[-1])})

    router.route(method="POST").mock(side_effect=record)
    upstream = make_upstream(router)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(10):
            yield bytes([65 + i]) * 1000

    try:
        response = await upstream.send(make_request(method="POST", body=b'{"a":1}'))
        assert response.status == 201
        await read_all(response)
        response = await upstream.send(make_request(method="POST", stream=chunks()))
        await read_all(response)
        assert received[0] == b'{"a":1}'
        assert received[1] == b"".join(bytes([65 + i]) * 1000 for i in range(10))
    finally:
        await upstream.aclose()


async def test_upstream_status_headers_and_body_pass_through(router: respx.MockRouter) -> None:
    router.route().respond(
        418,
        headers=[("content-type", "application/json"), ("x-upstream", "yes")],
        content=b'{"error":"teapot"}',
    )
    upstream = make_upstream(router)
    try:
        response = await upstream.send(make_request())
        assert response.status == 418
        headers = {n.lower(): v for n, v in response.headers}
        assert headers[b"content-type"] == b"application/json"
        assert headers[b"x-upstream"] == b"yes"
        assert await read_all(response) == b'{"error":"teapot"}'
    finally:
        await upstream.aclose()


async def test_redirects_are_not_followed(router: respx.MockRouter) -> None:
    router.route(path="/v1/users/42").respond(302, headers={"location": "/elsewhere"})
    router.route(path="/elsewhere").respond(200)
    upstream = make_upstream(router)
    try:
        response = await upstream.send(make_request())
        assert response.status == 302
        await read_all(response)
        assert len(router.calls) == 1
    finally:
        await upstream.aclose()


async def test_cookies_are_never_remembered_between_requests(router: respx.MockRouter) -> None:
    router.route().respond(200, headers={"set-cookie": "session=alice; Path=/"})
    upstream = make_upstream(router)
    try:
        await read_all(await upstream.send(make_request()))
        await read_all(await upstream.send(make_request()))
        assert "cookie" not in last_request(router).headers
    finally:
        await upstream.aclose()


@pytest.mark.parametrize(
    ("exc", "error", "status", "outcome"),
    [
        (httpx.ConnectError("refused"), UpstreamUnavailable, 502, "connect_error"),
        (httpx.ConnectTimeout("slow connect"), UpstreamUnavailable, 502, "connect_error"),
        (httpx.RemoteProtocolError("bad http"), UpstreamUnavailable, 502, "reset"),
        (httpx.ReadError("reset"), UpstreamUnavailable, 502, "reset"),
        (httpx.ReadTimeout("slow"), UpstreamTimeout, 504, "timeout"),
    ],
)
async def test_transport_errors_become_gateway_errors(
    router: respx.MockRouter,
    exc: Exception,
    error: type[Exception],
    status: int,
    outcome: str,
) -> None:
    router.route().mock(side_effect=exc)
    upstream = make_upstream(router)
    try:
        with pytest.raises(error) as info:
            await upstream.send(make_request())
        raised: Any = info.value
        assert raised.status == status
        assert raised.outcome == outcome
        assert raised.upstream == "users"
        assert raised.__cause__ is exc
        assert upstream.targets[0].inflight == 0
    finally:
        await upstream.aclose()


class _BrokenStream(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"first"
        raise httpx.ReadError("connection reset mid-body")


async def test_a_body_that_fails_midway_raises_a_gateway_error(router: respx.MockRouter) -> None:
    router.route().respond(200, stream=_BrokenStream())
    upstream = make_upstream(router)
    try:
        response = await upstream.send(make_request())
        seen: list[bytes] = []
        with pytest.raises(UpstreamUnavailable) as info:
            async for chunk in response.body:
                seen.append(chunk)
        await response.close()
        assert seen == [b"first"]
        assert info.value.status == 502
        assert upstream.targets[0].inflight == 0
    finally:
        await upstream.aclose()


async def test_inflight_counts_until_the_response_is_closed(router: respx.MockRouter) -> None:
    router.route().respond(200, text="body")
    upstream = make_upstream(router)
    target = upstream.targets[0]
    try:
        response = await upstream.send(make_request())
        assert target.inflight == 1
        await response.close()
        await response.close()  # idempotent
        assert target.inflight == 0
    finally:
        await upstream.aclose()


async def test_a_retry_prefers_a_target_not_yet_tried(router: respx.MockRouter) -> None:
    router.route().respond(200)
    upstream = make_upstream(router, "http://127.0.0.1:9001", "http://127.0.0.1:9002")
    try:
        request = make_request()
        first = await upstream.send(request)
        second = await upstream.send(request)
        await read_all(first)
        await read_all(second)
        assert {first.target, second.target} == {"http://127.0.0.1:9001", "http://127.0.0.1:9002"}
        ports = {call.request.url.port for call in router.calls}
        assert ports == {9001, 9002}
    finally:
        await upstream.aclose()


async def test_no_healthy_target_is_503_without_calling(router: respx.MockRouter) -> None:
    router.route().respond(200)
    upstream = make_upstream(router, "http://127.0.0.1:9001", "http://127.0.0.1:9002")
    for target in upstream.targets:
        target.healthy = False
    try:
        with pytest.raises(UpstreamUnhealthy) as info:
            await upstream.send(make_request())
        assert info.value.status == 503
        assert not router.calls
    finally:
        await upstream.aclose()


async def test_target_path_trailing_slash_is_not_doubled(router: respx.MockRouter) -> None:
    router.route().respond(200)
    upstream = make_upstream(router, "http://127.0.0.1:9001/")
    try:
        await read_all(await upstream.send(make_request("/v1/x")))
        assert last_request(router).url.raw_path == b"/v1/x"
    finally:
        await upstream.aclose()


def test_repr_shows_targets_and_state() -> None:
    upstream = Upstream("users", UpstreamSettings(targets=(TARGET,)))
    upstream.targets[0].inflight = 3
    text = repr(upstream)
    assert "users" in text and "127.0.0.1:9001" in text and "inflight=3" in text


# --- the hot path: the default aiohttp transport against a real loopback server ---------


async def _loopback_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = await read_body(receive)
    path = scope["path"]
    if path == "/slow":
        await asyncio.sleep(1.0)
    if path == "/truncated":
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]}
        )
        await send({"type": "http.response.body", "body": b"0123456789", "more_body": True})
        raise RuntimeError("upstream dies mid-body")  # uvicorn drops the connection
    doc = {
        "method": scope["method"],
        "raw_path": scope["raw_path"].decode("latin-1"),
        "query": scope["query_string"].decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        "body": body.decode("latin-1"),
    }
    await send(
        {
            "type": "http.response.start",
            "status": 207,
            "headers": [(b"content-type", b"application/json"), (b"x-from", b"loopback")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(doc).encode()})


@pytest.fixture(scope="module")
def loopback() -> Iterator[UpstreamServer]:
    with UpstreamServer(_loopback_app) as server:
        yield server


def hot_upstream(url: str, **settings: Any) -> Upstream:
    upstream = Upstream("users", UpstreamSettings(targets=(url,), **settings))
    assert isinstance(upstream.client, httpx.AsyncClient)
    return upstream


async def test_hot_path_calls_rewritten_path_and_query_verbatim(loopback: UpstreamServer) -> None:
    upstream = hot_upstream(loopback.url)
    query = b"b=2&a=1&a=%2Fx%20y&empty=&flag"
    try:
        response = await upstream.send(
            make_request("/v1/users/a%20b/42", query, method="POST", body=b"payload")
        )
        assert response.status == 207
        assert (b"x-from", b"loopback") in [(n.lower(), v) for n, v in response.headers]
        doc = json.loads(await read_all(response))
        assert doc["method"] == "POST"
        assert doc["raw_path"] == "/v1/users/a%20b/42"
        assert doc["query"] == query.decode()
        assert doc["body"] == "payload"
        headers = [(k, v) for k, v in doc["headers"]]
        names = [k for k, _ in headers]
        assert ("host", f"127.0.0.1:{loopback.port}") in headers
        assert names.count("host") == 1
        timeout_ms = [int(v) for k, v in headers if k == "x-request-timeout-ms"]
        assert len(timeout_ms) == 1 and 1000 < timeout_ms[0] <= 2000
        # a proxy adds nothing of its own
        for invented in ("user-agent", "accept-encoding", "cookie"):
            assert invented not in names, invented
        assert upstream.targets[0].inflight == 0
    finally:
        await upstream.aclose()


async def test_hot_path_preserve_host(loopback: UpstreamServer) -> None:
    upstream = hot_upstream(loopback.url)
    try:
        response = await upstream.send(make_request(host="api.example.com"))
        doc = json.loads(await read_all(response))
        assert [v for k, v in doc["headers"] if k == "host"] == ["api.example.com"]
    finally:
        await upstream.aclose()


async def test_hot_path_connection_refused_is_502() -> None:
    upstream = hot_upstream(f"http://127.0.0.1:{free_port()}", connect_timeout="1s")
    try:
        with pytest.raises(UpstreamUnavailable) as info:
            await upstream.send(make_request())
        assert info.value.status == 502
        assert info.value.outcome == "connect_error"
        assert upstream.targets[0].inflight == 0
    finally:
        await upstream.aclose()


async def test_hot_path_read_timeout_is_504(loopback: UpstreamServer) -> None:
    upstream = hot_upstream(loopback.url, read_timeout="200ms")
    try:
        with pytest.raises(UpstreamTimeout) as info:
            await upstream.send(make_request("/slow"))
        assert info.value.status == 504
        assert upstream.targets[0].inflight == 0
    finally:
        await upstream.aclose()


async def test_hot_path_truncated_body_is_an_upstream_error(loopback: UpstreamServer) -> None:
    upstream = hot_upstream(loopback.url)
    try:
        response = await upstream.send(make_request("/truncated"))
        assert response.status == 200
        received = b""
        with pytest.raises(UpstreamUnavailable):
            async for chunk in response.body:
                received += chunk
        await response.close()
        assert received == b"0123456789"
        assert upstream.targets[0].inflight == 0
    finally:
        await upstream.aclose()


async def test_hot_path_answer_complete_with_its_head_is_whole_and_released_at_once() -> None:
    handlers: list[asyncio.Task[Any]] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello")
                    await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = hot_upstream(f"http://127.0.0.1:{port}")
    try:
        response = await upstream.send(make_request())
        assert (response.status, response.whole) == (200, b"hello")
        assert (b"X-A", b"1") in response.headers
        # Nothing is left open: the connection is back in the pool before the body
        # is even read, and the body still reads as a stream for whoever asks.
        assert upstream.targets[0].inflight == 0
        assert await read_all(response) == b"hello"
        again = await upstream.send(make_request())
        assert again.whole == b"hello"
        assert upstream.client._transport.connections() == 1  # type: ignore[attr-defined]
    finally:
        await upstream.aclose()
        server.close()
        # Every server-side connection is closed before the test's loop goes away.
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()
