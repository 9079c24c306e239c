"""Errors the gateway makes itself, over the wire: 404, 405, 413, 502, 504, as
problem+json; and the deadline an incoming X-Request-Timeout-Ms can only shorten."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from tests.integration.harness import GatewayProcess, UpstreamServer, free_port


async def _drain(receive: Any) -> int:
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client went away mid-body")
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            return size


async def slow_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers after `?sleep=` seconds (or stops early if the gateway hangs up) with
    the X-Request-Timeout-Ms it was sent."""
    await _drain(receive)
    query = parse_qs(scope["query_string"].decode())
    delay = float(query.get("sleep", ["0"])[0])
    try:
        async with asyncio.timeout(delay):
            while (await receive())["type"] != "http.disconnect":
                pass
        return
    except TimeoutError:
        pass
    headers = dict(scope["headers"])
    body = json.dumps(
        {"timeout_ms": headers.get(b"x-request-timeout-ms", b"").decode() or None}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.completed: list[int] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        with self.lock:
            self.calls += 1
        try:
            size = await _drain(receive)
        except ConnectionError:
            return
        with self.lock:
            self.completed.append(size)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})


class Env:
    def __init__(self, gw: GatewayProcess, counter: Counter) -> None:
        self.gw = gw
        self.counter = counter


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    counter = Counter()
    slow = UpstreamServer(slow_app).start()
    count = UpstreamServer(counter).start()
    config = {
        "server": {"max_body_size": "1KiB", "access_log": False},
        "upstreams": {
            "slow": {"targets": [slow.url]},
            "dead": {"targets": [f"http://127.0.0.1:{free_port()}"], "connect_timeout": "1s"},
            "counter": {"targets": [count.url]},
        },
        "routes": [
            {"name": "short", "path": "/short", "upstream": "slow", "timeout": "300ms"},
            {"name": "long", "path": "/long", "upstream": "slow", "timeout": "5s"},
            {"name": "dead", "path": "/dead", "upstream": "dead"},
            {"name": "only-get", "path": "/only-get", "methods": ["GET"], "upstream": "counter"},
            {"name": "upload", "path": "/upload", "upstream": "counter"},
        ],
    }
    gw = GatewayProcess(config, tmp_path_factory.mktemp("errors")).start()
    try:
        yield Env(gw, counter)
    finally:
        gw.stop()
        count.stop()
        slow.stop()
    assert "Traceback" not in gw.stderr, gw.stderr


@pytest.fixture
def client(env: Env) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=env.gw.url, timeout=10) as c:
        yield c


def assert_problem(
    response: httpx.Response,
    status: int,
    code: str,
    *,
    route: str | None = None,
    upstream: str | None = None,
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    doc: dict[str, Any] = response.json()
    for key in ("type", "title", "detail"):
        assert isinstance(doc[key], str) and doc[key], key
    assert doc["status"] == status
    assert doc["code"] == code
    assert doc["type"].endswith(code)
    assert doc["request_id"] == response.headers["x-request-id"]
    if route is not None:
        assert doc["route"] == route
    if upstream is not None:
        assert doc["upstream"] == upstream
    text = response.text
    for leak in ("Traceback", 'File "', "Exception", "aiohttp", "httpx."):
        assert leak not in text, text
    assert int(response.headers["content-length"]) == len(response.content)
    return doc


def test_no_route_is_404(client: httpx.Client) -> None:
    doc = assert_problem(client.get("/no/such/route"), 404, "route_not_found")
    assert "upstream" not in doc


def test_wrong_method_is_405_with_allow(env: Env, client: httpx.Client) -> None:
    before = env.counter.calls
    response = client.post("/only-get", content=b"x")
    assert_problem(response, 405, "method_not_allowed")
    assert [m.strip() for m in response.headers["allow"].split(",")] == ["GET", "HEAD"]
    assert env.counter.calls == before


def test_closed_port_is_502(client: httpx.Client) -> None:
    start = time.monotonic()
    response = client.get("/dead")
    assert time.monotonic() - start < 2
    assert_problem(response, 502, "upstream_unavailable", route="dead", upstream="dead")


def test_slow_upstream_is_504_at_the_route_deadline(client: httpx.Client) -> None:
    start = time.monotonic()
    response = client.get("/short", params={"sleep": 3})
    elapsed = time.monotonic() - start
    assert_problem(response, 504, "upstream_timeout", route="short", upstream="slow")
    assert 0.25 <= elapsed < 1.5, elapsed


def test_client_request_id_is_kept_on_errors(client: httpx.Client) -> None:
    response = client.get("/dead", headers={"x-request-id": "err-trace-1"})
    doc = assert_problem(response, 502, "upstream_unavailable")
    assert doc["request_id"] == "err-trace-1"


# --- the deadline and X-Request-Timeout-Ms -------------------------------------------


def test_incoming_timeout_header_shortens_the_deadline(client: httpx.Client) -> None:
    start = time.monotonic()
    response = client.get("/long", params={"sleep": 3}, headers={"x-request-timeout-ms": "200"})
    elapsed = time.monotonic() - start
    assert_problem(response, 504, "upstream_timeout", route="long")
    assert 0.15 <= elapsed < 1.0, elapsed


def test_incoming_timeout_header_cannot_lengthen_the_deadline(client: httpx.Client) -> None:
    start = time.monotonic()
    response = client.get("/short", params={"sleep": 3}, headers={"x-request-timeout-ms": "60000"})
    elapsed = time.monotonic() - start
    assert_problem(response, 504, "upstream_timeout", route="short")
    assert elapsed < 1.5, elapsed


@pytest.mark.parametrize(
    ("sent", "low", "high"),
    [(None, 4000, 5000), ("60000", 4000, 5000), ("200", 1, 200), ("garbage", 4000, 5000)],
)
def test_upstream_is_told_the_time_left(
    client: httpx.Client, sent: str | None, low: int, high: int
) -> None:
    headers = {"x-request-timeout-ms": sent} if sent is not None else {}
    response = client.get("/long", headers=headers)
    assert response.status_code == 200, response.text
    told = int(response.json()["timeout_ms"])
    assert low <= told <= high, told


# --- max_body_size: 1KiB ---------------------------------------------------------------


def test_content_length_over_the_limit_is_413_without_calling_upstream(
    env: Env, client: httpx.Client
) -> None:
    before = env.counter.calls
    response = client.post("/upload", content=b"x" * 2048)
    assert_problem(response, 413, "body_too_large", route="upload")
    assert env.counter.calls == before


def test_body_at_the_limit_is_forwarded(client: httpx.Client) -> None:
    response = client.post("/upload", content=b"x" * 1024)
    assert response.status_code == 200
    assert response.text == "1024"


def test_chunked_body_at_the_limit_is_forwarded(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(4):
            yield b"y" * 256

    response = client.post("/upload", content=chunks())
    assert response.status_code == 200
    assert response.text == "1024"


def test_chunked_body_over_the_limit_is_413(env: Env, client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield b"z" * 512

    response = client.post("/upload", content=chunks())
    assert_problem(response, 413, "body_too_large", route="upload")
    assert all(size <= 1024 for size in env.counter.completed)
    # and the gateway is fine afterwards
    assert client.post("/upload", content=b"ok").text == "2"


def test_expect_100_continue_over_the_limit_is_413_before_the_body(env: Env) -> None:
    before = env.counter.calls
    with socket.create_connection(("127.0.0.1", env.gw.port), timeout=5) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5000\r\nConnection: close\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    assert b"100 Continue" not in answer
    assert b'"code":"body_too_large"' in answer
    assert env.counter.calls == before
