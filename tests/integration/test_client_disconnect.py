"""A client that goes away cancels its upstream request: the upstream sees its
connection close soon after, whether it was thinking, streaming a response, or still
receiving the request body."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.harness import GatewayProcess, UpstreamServer

NOTICE_WITHIN = 1.5  # seconds from the client's close to the upstream noticing


class Observed:
    """Per-key events the upstream sets: `started` on arrival, `gone` when it sees the
    gateway hang up, `finished` if it ran to the end instead."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[tuple[str, str], threading.Event] = {}
        self.gone_at: dict[str, float] = {}

    def event(self, key: str, kind: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault((key, kind), threading.Event())

    def mark_gone(self, key: str) -> None:
        self.gone_at.setdefault(key, time.monotonic())
        self.event(key, "gone").set()


def make_app(observed: Observed) -> Any:
    async def wait_for_disconnect(receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        _, kind, key = scope["path"].split("/", 2)
        observed.event(key, "started").set()
        if kind == "upload":
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    observed.mark_gone(key)
                    return
                if not message.get("more_body"):
                    break
            observed.event(key, "finished").set()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"all of it"})
            return
        await receive()  # the (empty) request body
        if kind == "hang":
            try:
                async with asyncio.timeout(5):
                    await wait_for_disconnect(receive)
                observed.mark_gone(key)
            except TimeoutError:
                observed.event(key, "finished").set()
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"too late"})
            return
        if kind == "endless":
            watcher = asyncio.create_task(wait_for_disconnect(receive))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            piece = b"e" * 65536
            try:
                deadline = time.monotonic() + 10
                while not watcher.done() and time.monotonic() < deadline:
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                    await asyncio.sleep(0.005)
            except Exception:  # uvicorn may refuse to send once the peer is gone
                pass
            if watcher.done() or not await _settle(watcher):
                observed.mark_gone(key)
            else:
                observed.event(key, "finished").set()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            return
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app


async def _settle(watcher: asyncio.Task[None]) -> bool:
    """True when the peer is still there a moment later."""
    await asyncio.sleep(0.2)
    return not watcher.done()


class Env:
    def __init__(self, gw: GatewayProcess, observed: Observed) -> None:
        self.gw = gw
        self.observed = observed


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    observed = Observed()
    up = UpstreamServer(make_app(observed)).start()
    config = {
        "server": {"access_log": False},
        "upstreams": {"up": {"targets": [up.url]}},
        "routes": [{"name": "all", "path": "/{rest:path}", "upstream": "up", "timeout": "20s"}],
    }
    gw = GatewayProcess(config, tmp_path_factory.mktemp("disconnect")).start()
    try:
        yield Env(gw, observed)
    finally:
        gw.stop()
        up.stop()
    assert "Traceback" not in gw.stderr, gw.stderr


def connect(env: Env) -> socket.socket:
    return connect_to(env.gw)


def connect_to(gw: GatewayProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=5)


def assert_upstream_noticed(env: Env, key: str, closed_at: float) -> None:
    gone = env.observed.event(key, "gone")
    assert gone.wait(NOTICE_WITHIN + 1), "the upstream never saw the client go away"
    took = env.observed.gone_at[key] - closed_at
    assert took < NOTICE_WITHIN, f"the upstream noticed only after {took:.2f}s"
    assert not env.observed.event(key, "finished").is_set()


def assert_gateway_still_serves(env: Env) -> None:
    with httpx.Client(base_url=env.gw.url, timeout=5) as client:
        response = client.post("/upload/after", content=b"x" * 10)
        assert response.status_code == 200
        assert response.text == "all of it"


def test_client_closing_while_upstream_thinks_cancels_it(env: Env) -> None:
    key = "thinking"
    sock = connect(env)
    try:
        sock.sendall(f"GET /hang/{key} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        assert env.observed.event(key, "started").wait(3)
        time.sleep(0.3)
    finally:
        sock.close()
    closed_at = time.monotonic()
    assert_upstream_noticed(env, key, closed_at)
    assert_gateway_still_serves(env)


def test_httpx_client_timeout_cancels_the_upstream_request(env: Env) -> None:
    key = "httpx-timeout"
    with httpx.Client(base_url=env.gw.url, timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.get(f"/hang/{key}")
    closed_at = time.monotonic()
    assert_upstream_noticed(env, key, closed_at)


def test_client_closing_mid_download_cancels_the_upstream_stream(env: Env) -> None:
    key = "downloading"
    sock = connect(env)
    try:
        sock.sendall(f"GET /endless/{key} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        received = 0
        while received < 512 * 1024:
            chunk = sock.recv(65536)
            assert chunk, "the gateway closed the stream"
            received += len(chunk)
    finally:
        sock.close()
    closed_at = time.monotonic()
    assert_upstream_noticed(env, key, closed_at)
    assert_gateway_still_serves(env)


def test_client_closing_mid_upload_cancels_the_upstream_request(env: Env) -> None:
    key = "uploading"
    sock = connect(env)
    try:
        head = f"POST /upload/{key} HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
        sock.sendall(head.encode())
        piece = b"u" * 65536
        for _ in range(4):
            sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        assert env.observed.event(key, "started").wait(3)
        time.sleep(0.3)
    finally:
        sock.close()
    closed_at = time.monotonic()
    assert_upstream_noticed(env, key, closed_at)
    assert_gateway_still_serves(env)


def test_client_closing_mid_small_body_is_a_quiet_499(
    tmp_path: Path, upstream: Callable[..., UpstreamServer]
) -> None:
    observed = Observed()
    up = upstream(make_app(observed))
    config = {
        "upstreams": {"up": {"targets": [up.url]}},
        "routes": [{"name": "all", "path": "/{rest:path}", "upstream": "up"}],
    }
    gw = GatewayProcess(config, tmp_path).start()
    try:
        with connect_to(gw) as sock:
            sock.sendall(
                b"POST /upload/small HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\nonly ten b"
            )
            time.sleep(0.3)
        time.sleep(0.3)
        with httpx.Client(base_url=gw.url, timeout=5) as client:
            assert client.post("/upload/after-small", content=b"x").status_code == 200
    finally:
        gw.stop()
    assert not observed.event("small", "started").is_set()
    assert "Traceback" not in gw.stderr, gw.stderr
    lines = [json.loads(line) for line in gw.stdout.splitlines() if '"/upload/small"' in line]
    assert len(lines) == 1, gw.stdout
    assert lines[0]["status"] == 499
    assert lines[0]["error"] == "client_disconnected"


def test_clients_aborting_uploads_do_not_trip_the_breaker(
    tmp_path: Path, upstream: Callable[..., UpstreamServer]
) -> None:
    observed = Observed()
    up = upstream(make_app(observed))
    config = {
        "upstreams": {
            "up": {
                "targets": [up.url],
                "circuit_breaker": {
                    "failure_ratio": 0.5,
                    "min_requests": 2,
                    "window": "10s",
                    "open_for": "10s",
                },
            }
        },
        "routes": [{"name": "all", "path": "/{rest:path}", "upstream": "up"}],
    }
    gw = GatewayProcess(config, tmp_path).start()
    try:
        for i in range(2):
            key = f"abort-{i}"
            with connect_to(gw) as sock:
                sock.sendall(
                    f"POST /upload/{key} HTTP/1.1\r\nHost: gw\r\n".encode()
                    + b"Transfer-Encoding: chunked\r\n\r\n"
                    + b"10000\r\n"
                    + b"a" * 0x10000
                    + b"\r\n"
                )
                assert observed.event(key, "started").wait(3)
                time.sleep(0.2)
            assert observed.event(key, "gone").wait(2)
        with httpx.Client(base_url=gw.url, timeout=5) as client:
            response = client.post("/upload/healthy", content=b"fine")
        assert response.status_code == 200, response.text
    finally:
        gw.stop()
    aborted = [json.loads(line) for line in gw.stdout.splitlines() if "/upload/abort-" in line]
    assert len(aborted) == 2, gw.stdout
    for record in aborted:
        assert record["status"] == 499, record
        assert record["error"] == "client_disconnected", record
