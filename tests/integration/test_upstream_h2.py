"""`upstreams.<name>.protocol: http2` (contract: "Protocols: TLS and HTTP/2", upstreams):
the real gateway in front of a real HTTP/2 server (hypercorn, in a thread of its own):
h2c by prior knowledge over http, h2 by ALPN over https with the certificate verified,
one connection multiplexing concurrent requests (a second one when the upstream's
SETTINGS_MAX_CONCURRENT_STREAMS is reached), bodies larger than the flow-control
windows both ways, a client that leaves resetting only its own stream, and health
checks over the same transport. GOAWAY handling is in tests/unit/test_h2_transport.py
(it needs a server that sends one on cue)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from hypercorn.asyncio import serve
from hypercorn.config import Config

from tests.integration.harness import GatewayProcess, free_port, read_body

Scope = dict[str, Any]


class Seen:
    """What the upstream observed, shared with the test thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.gone: dict[str, threading.Event] = {}

    def add(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.requests.append(record)

    def gone_event(self, key: str) -> threading.Event:
        with self.lock:
            return self.gone.setdefault(key, threading.Event())

    def ports(self, prefix: str = "/") -> set[int]:
        with self.lock:
            return {r["port"] for r in self.requests if r["path"].startswith(prefix)}


def make_app(seen: Seen) -> Any:
    """/sleep/S answers after S seconds; /echo answers the body's length and sha256;
    /big/N streams N bytes; /forever/KEY streams until the gateway resets the stream;
    /healthz answers ok. Each answer names the HTTP version, scheme and client port."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        path: str = scope["path"]
        record = {
            "path": path,
            "http_version": scope["http_version"],
            "scheme": scope["scheme"],
            "port": scope["client"][1],
            "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
        }
        seen.add(record)
        start = {"type": "http.response.start", "status": 200, "headers": []}
        if path.startswith("/forever/"):
            key = path.rsplit("/", 1)[1]
            await send(start)

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                seen.gone_event(key).set()

            watcher = asyncio.create_task(watch())
            try:
                while not watcher.done():
                    await send(
                        {"type": "http.response.body", "body": b"t" * 1024, "more_body": True}
                    )
                    await asyncio.sleep(0.02)
            finally:
                watcher.cancel()
            return
        body = await read_body(receive)
        if path.startswith("/big/"):
            size = int(path.rsplit("/", 1)[1])
            await send(start)
            chunk = b"b" * 65536
            while size > 0:
                await send(
                    {"type": "http.response.body", "body": chunk[:size], "more_body": size > 65536}
                )
                size -= 65536
            return
        if path.startswith("/sleep/"):
            await asyncio.sleep(float(path.rsplit("/", 1)[1]))
        answer = {k: record[k] for k in ("http_version", "scheme", "port")}
        if path == "/echo":
            answer["length"] = len(body)
            answer["sha256"] = hashlib.sha256(body).hexdigest()
        await send(start)
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    return app


class H2Upstream:
    """hypercorn serving `app` on 127.0.0.1 in a thread: h2c by prior knowledge on
    cleartext, h2 by ALPN with `certfile`/`keyfile`."""

    def __init__(self, app: Any, **options: Any) -> None:
        self.port = free_port()
        self.config = Config()
        self.config.bind = [f"127.0.0.1:{self.port}"]
        self.config.loglevel = "WARNING"
        self.config.graceful_timeout = 0.5
        for name, value in options.items():
            setattr(self.config, name, value)
        self.scheme = "https" if options.get("certfile") else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await serve(self.app, self.config, shutdown_trigger=self._stop.wait)

    def start(self) -> H2Upstream:
        self._thread.start()
        self._ready.wait(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.01)
        raise RuntimeError("hypercorn did not start")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=5)


@pytest.fixture
def h2_upstream() -> Iterator[Callable[..., H2Upstream]]:
    started: list[H2Upstream] = []

    def start(app: Any, **options: Any) -> H2Upstream:
        server = H2Upstream(app, **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def config(target: str, **upstream: Any) -> dict[str, Any]:
    return {
        "upstreams": {
            "up": {
                "targets": [target],
                "protocol": "http2",
                "retries": {"attempts": 0},
                "read_timeout": "5s",
                **upstream,
            }
        },
        "routes": [{"name": "r", "path": "/{rest:path}", "upstream": "up"}],
    }


async def _concurrently(url: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=10) as client:
        return await asyncio.gather(*(client.get(url) for _ in range(count)))


def test_an_h2c_upstream_multiplexes_concurrent_requests_on_one_connection(
    h2_upstream: Callable[..., H2Upstream], gateway: Callable[..., GatewayProcess]
) -> None:
    seen = Seen()
    up = h2_upstream(make_app(seen))
    gw = gateway(config(up.url))
    responses = asyncio.run(_concurrently(gw.url + "/sleep/0.3", 20))
    assert {r.status_code for r in responses} == {200}
    assert {r.json()["http_version"] for r in responses} == {"2"}
    assert {r.json()["scheme"] for r in responses} == {"http"}
    assert len(seen.ports("/sleep/")) == 1  # twenty streams, one connection


def test_the_upstreams_stream_limit_makes_a_second_connection(
    h2_upstream: Callable[..., H2Upstream], gateway: Callable[..., GatewayProcess]
) -> None:
    seen = Seen()
    up = h2_upstream(make_app(seen), h2_max_concurrent_streams=2)
    gw = gateway(config(up.url))
    responses = asyncio.run(_concurrently(gw.url + "/sleep/0.4", 4))
    assert {r.status_code for r in responses} == {200}
    assert len(seen.ports("/sleep/")) == 2


def https_upstream(
    tmp_path: Path, start: Callable[..., H2Upstream], seen: Seen
) -> tuple[H2Upstream, str]:
    """An h2 upstream over TLS whose certificate comes from a trustme CA; the CA's file."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "up.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "up.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    up = start(make_app(seen), certfile=str(tmp_path / "up.pem"), keyfile=str(tmp_path / "up.key"))
    return up, str(tmp_path / "ca.pem")


def test_h2_over_https_is_chosen_by_alpn_and_verified_against_ca_file(
    tmp_path: Path, h2_upstream: Callable[..., H2Upstream], gateway: Callable[..., GatewayProcess]
) -> None:
    seen = Seen()
    up, ca_file = https_upstream(tmp_path, h2_upstream, seen)
    gw = gateway(config(up.url, tls={"ca_file": ca_file}))
    r = httpx.get(gw.url + "/hello", timeout=10)
    assert r.status_code == 200
    assert r.json()["http_version"] == "2"
    assert r.json()["scheme"] == "https"


def test_an_h2_certificate_that_does_not_verify_is_a_502_that_says_so(
    tmp_path: Path, h2_upstream: Callable[..., H2Upstream], gateway: Callable[..., GatewayProcess]
) -> None:
    up, _ = https_upstream(tmp_path, h2_upstream, Seen())
    gw = gateway(config(up.url))  # the system trust store does not know trustme's CA
    r = httpx.get(gw.url + "/hello", timeout=10)
    assert r.status_code == 502
    problem = r.json()
    assert problem["code"] == "upstream_unavailable"
    assert "certificate" in problem["detail"] and "did not verify" in problem["detail"]
    assert "127.0.0.1" not in problem["detail"]


def test_bodies_larger_than_the_windows_stream_through_intact(
    h2_upstream: Callable[..., H2Upstream], gateway: Callable[..., GatewayProcess]
) -> None:
    seen = Seen()
    up = h2_upstream(make_app(seen))
    gw = gateway(config(up.url, read_timeout="5s"))
    data = bytes(range(256)) * (3 * 1024 * 4)  # 3 MiB

    def upload() -> Iterator[bytes]:
        for start in range(0, len(data), 100_000):
            yield data[start : start + 100_000]

    with httpx.Client(timeout=10) as client:
        r = client.post(gw.url + "/echo", content=upload())
        assert r.status_code == 200
        assert r.json()["length"] == len(data)
        assert r.json()["sha256"] == hashlib.sha256(data).hexdigest()
        r = client.get(gw.url + f"/big/{len(data)}")
        assert r.status_code == 200
        assert r.content == b"b" * len(data)
    assert len(seen.ports()) == 1


def test_a_client_that_leaves_resets_only_its_stream(
    h2_upstream: Callable[..., H2Upstream], gateway: Callable[..., GatewayProcess]
) -> None:
    seen = Seen()
    up = h2_upstream(make_app(seen))
    gw = gateway(config(up.url))

    async def scenario() -> tuple[httpx.Response, int]:
        async with httpx.AsyncClient(timeout=10) as client:
            slow = asyncio.create_task(client.get(gw.url + "/sleep/0.6"))
            async with client.stream("GET", gw.url + "/forever/a") as streaming:
                async for _ in streaming.aiter_raw():
                    break  # one chunk, then the client hangs up
            waited = await asyncio.to_thread(seen.gone_event("a").wait, 2)
            return await slow, int(waited)

    slow, gone = asyncio.run(scenario())
    assert gone, "the upstream never saw its stream reset"
    assert slow.status_code == 200
    # The same connection carried both and is still there for the next request.
    r = httpx.get(gw.url + "/sleep/0", timeout=10)
    assert r.status_code == 200
    assert len(seen.ports()) == 1


def test_health_checks_go_over_http2(
    h2_upstream: Callable[..., H2Upstream], gateway: Callable[..., GatewayProcess]
) -> None:
    seen = Seen()
    up = h2_upstream(make_app(seen))
    gateway(
        config(
            up.url,
            health_check={"path": "/healthz", "interval": "50ms", "timeout": "500ms"},
        )
    )
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        with seen.lock:
            probes = [r for r in seen.requests if r["path"] == "/healthz"]
        if len(probes) >= 2:
            break
        time.sleep(0.02)
    assert len(probes) >= 2
    assert {p["http_version"] for p in probes} == {"2"}
    assert probes[0]["headers"]["x-gateway-health-check"] == "1"
