"""HTTP/2 on the data listener (contract: "Protocols: TLS and HTTP/2"): h2 by ALPN under
TLS, h2c by prior knowledge on cleartext, the same data plane behind both, and the
limits a client meets. Real clients (httpx with http2, the h2 library for frames)
against the real gateway process."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trustme
from h2.errors import ErrorCodes
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.integration.harness import GatewayProcess, UpstreamServer
from tests.integration.test_access_log import wait_for_lines
from tests.integration.test_tls import pem_files


async def echo(request: Request) -> Response:
    body = await request.body()
    return JSONResponse(
        {
            "headers": [[k, v] for k, v in request.headers.items()],
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "http_version": request.scope["http_version"],
            "body_length": len(body),
        }
    )


async def slow(request: Request) -> Response:
    await asyncio.sleep(float(request.query_params.get("s", "0.5")))
    return Response(b"slow done")


async def big(request: Request) -> Response:
    size = int(request.query_params.get("n", "1000000"))

    async def chunks() -> Any:
        sent = 0
        while sent < size:
            part = min(65536, size - sent)
            yield b"x" * part
            sent += part

    return StreamingResponse(chunks(), media_type="application/octet-stream")


async def upload(request: Request) -> Response:
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
    return JSONResponse({"received": total})


APP = Starlette(
    routes=[
        Route("/slow", slow),
        Route("/big", big),
        Route("/upload", upload, methods=["POST", "PUT"]),
        Route("/{rest:path}", echo, methods=["GET", "POST", "HEAD", "DELETE"]),
    ]
)


def config(target: str, **server: Any) -> dict[str, Any]:
    return {
        "server": server,
        "upstreams": {"up": {"targets": [target]}},
        "routes": [
            {
                "name": "all",
                "path": "/{rest:path}",
                "upstream": "up",
                "methods": ["GET", "HEAD", "POST", "PUT", "DELETE"],
            }
        ],
    }


@pytest.fixture
def up(upstream: Callable[..., UpstreamServer]) -> UpstreamServer:
    return upstream(APP)


def h2c(gw: GatewayProcess) -> httpx.Client:
    return httpx.Client(http1=False, http2=True, timeout=5, base_url=f"http://127.0.0.1:{gw.port}")


_OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    """Every raw socket a test opened is closed, whatever the test's outcome."""
    yield
    while _OPEN:
        _OPEN.pop().close()


class RawH2:
    """A frame-level HTTP/2 client on a plain socket (h2c prior knowledge)."""

    def __init__(self, port: int, **settings: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        _OPEN.append(self.sock)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,  # so the tests can send malformed ones
                normalize_outbound_headers=False,
            )
        )
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        self.flush()
        self.events: list[h2.events.Event] = []

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(
        self, path: str, *, end: bool = True, extra: list[tuple[bytes, bytes]] | None = None
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"localhost"),
            (b":path", path.encode()),
            *(extra or []),
        ]
        self.conn.send_headers(stream_id, headers, end_stream=end)
        self.flush()
        return stream_id

    def read_until(self, done: Callable[[], bool], timeout: float = 5) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return False
            except OSError:
                return True
            if not data:
                return True
            try:
                self.feed(data)
            except h2.exceptions.ProtocolError:
                return True
            self.flush()
        return True

    def feed(self, data: bytes) -> None:
        events = self.conn.receive_data(data)
        self.events.extend(events)
        if any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
            # h2 as a client stops at any GOAWAY; a graceful one (drain, idle) still
            # lets the streams below its last stream id finish, so keep reading them.
            self.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN

    def closed(self, timeout: float = 5) -> bool:
        """True once the gateway closed the connection."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return False
            except OSError:
                return True
            if not data:
                return True
            try:
                self.feed(data)
            except h2.exceptions.ProtocolError:
                pass
        return False

    def of(self, kind: type, stream_id: int | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind) and (stream_id is None or e.stream_id == stream_id)
        ]

    def status(self, stream_id: int) -> int | None:
        for e in self.of(h2.events.ResponseReceived, stream_id):
            return int(dict(e.headers)[b":status"])
        return None

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        found = self.of(h2.events.ConnectionTerminated)
        return found[0] if found else None

    def close(self) -> None:
        self.sock.close()


def test_h2c_prior_knowledge_reaches_the_same_data_plane(
    up: UpstreamServer, gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(up.url))
    with h2c(gw) as client:
        r = client.get(
            "/hello/w%20rld?x=1",
            headers=[("cookie", "a=1"), ("cookie", "b=2"), ("te", "trailers")],
        )
        assert r.http_version == "HTTP/2"
        assert r.status_code == 200
        seen = r.json()
        headers = dict(seen["headers"])
        assert seen["http_version"] == "1.1"  # the upstream hop stays HTTP/1.1
        assert seen["path"] == "/hello/w rld" and seen["query"] == "x=1"
        assert headers["cookie"] == "a=1; b=2"  # crumbs joined with "; "
        assert "te" not in headers and "connection" not in headers
        assert headers["x-forwarded-host"] == f"127.0.0.1:{gw.port}"  # from :authority
        assert headers["x-forwarded-proto"] == "http"
        assert r.headers["x-request-id"]
        assert "connection" not in r.headers
        # The gateway's own errors are the contract's problem+json over h2 too.
        refused = client.request("TRACE", "/x")
        assert refused.status_code == 405
        assert refused.headers["content-type"] == "application/problem+json"
    lines = wait_for_lines(gw, 2)
    assert [line["protocol"] for line in lines] == ["HTTP/2", "HTTP/2"]
    assert [line["status"] for line in lines] == [200, 405]


def test_upgrade_h2c_is_ignored_and_served_over_http1(
    up: UpstreamServer, gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(up.url))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(
            b"GET /u HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        )
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
    assert data.startswith(b"HTTP/1.1 200 ")


def test_h2_by_alpn_under_tls_and_http1_when_the_client_chooses_it(
    tmp_path: Path, up: UpstreamServer, gateway: Callable[..., GatewayProcess]
) -> None:
    ca = trustme.CA()
    gw = gateway(config(up.url, tls={"certificates": [pem_files(tmp_path, ca, "a", "localhost")]}))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with httpx.Client(http2=True, verify=context, timeout=5) as client:
        r = client.get(f"https://localhost:{gw.port}/tls")
    assert r.http_version == "HTTP/2" and r.status_code == 200
    assert dict(r.json()["headers"])["x-forwarded-proto"] == "https"
    with httpx.Client(verify=context, timeout=5) as client:
        r = client.get(f"https://localhost:{gw.port}/tls")
    assert r.http_version == "HTTP/1.1" and r.status_code == 200


def test_h2_is_off_when_disabled(
    up: UpstreamServer, gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(up.url, http2={"enabled": False}))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 400 ")  # the preface is no HTTP/1.1 request


def test_bodies_stream_both_ways_past_the_windows(
    up: UpstreamServer, gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(up.url))
    with h2c(gw) as client:
        r = client.get("/big", params={"n": str(5 * 1024 * 1024)})
        assert r.status_code == 200 and len(r.content) == 5 * 1024 * 1024
        r = client.post("/upload", content=b"y" * (3 * 1024 * 1024 + 7))
        assert r.status_code == 200 and r.json() == {"received": 3 * 1024 * 1024 + 7}
        head = client.head("/hello")
        assert head.status_code == 200 and head.content == b""


def test_concurrent_streams_share_one_connection(
    up: UpstreamServer, gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(up.url))

    async def many() -> list[int]:
        async with httpx.AsyncClient(
            http1=False, http2=True, timeout=5, base_url=f"http://127.0.0.1:{gw.port}"
        ) as client:
            rs = await asyncio.gather(
                *(client.get("/slow", params={"s": "0.3"}) for _ in range(20))
            )
        return [r.status_code for r in rs]

    started = time.monotonic()
    assert asyncio.run(many()) == [200] * 20
    assert time.monotonic() - started < 3  # concurrent, not one after another


def test_streams_over_the_limit_are_refused_and_the_others_continue(
    up: UpstreamServer, gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(up.url, http2={"max_concurrent_streams": 2}))
    raw = RawH2(gw.port)
    ids = [raw.request("/slow?s=0.4") for _ in range(3)]  # before the SETTINGS are read
    assert raw.read_until(lambda: all(raw.of(h2.events.StreamEnded, i) for i in ids[:2]))
    settings = raw.of(h2.events.RemoteSettingsChanged)[0].changed_settings
    assert settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 2
    resets = raw.of(h2.events.StreamReset, ids[2])
    assert resets and resets[0].error_code == ErrorCodes.REFUSED_STREAM
    assert raw.status(ids[0]) == 200 and raw.status(ids[1]) == 200
    later = raw.request("/again")
    assert raw.read_until(lambda: bool(raw.of(h2.events.StreamEnded, later)))
    assert raw.status(later) == 200
    raw.close()


def test_a_header_list_over_the_limits_is_431_on_its_stream(
    up: UpstreamServer, gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(up.url, max_header_size="4KiB", max_header_count=20))
    raw = RawH2(gw.port)
    big = raw.request("/a", extra=[(b"x-big", b"v" * 5000)])
    many = raw.request("/b", extra=[(b"x-%d" % i, b"v") for i in range(30)])
    fine = raw.request("/c")
    assert raw.read_until(lambda: all(raw.of(h2.events.StreamEnded, i) for i in (big, many, fine)))
    assert raw.status(big) == 431 and raw.status(many) == 431 and raw.status(fine) == 200
    body = b"".join(e.data for e in raw.of(h2.events.DataReceived, big))
    assert json.loads(body)["code"] == "headers_too_large"
    raw.close()


MALFORMED = [
    [(b"X-Upper", b"v")],
    [(b"x-crlf", b"a\r\nx-smuggled: 1")],
    [(b"connection", b"keep-alive")],
    [(b"te", b"gzip")],
    [(b":protocol", b"websocket")],
]


def test_a_malformed_request_is_400_on_its_stream_and_the_connection_goes_on(
    up: UpstreamServer, gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(up.url))
    raw = RawH2(gw.port)
    for extra in MALFORMED:
        bad = raw.request("/bad", extra=extra)
        assert raw.read_until(lambda b=bad: bool(raw.of(h2.events.StreamEnded, b))), extra
        assert raw.status(bad) == 400, extra
        body = b"".join(e.data for e in raw.of(h2.events.DataReceived, bad))
        assert json.loads(body)["code"] == "bad_request"
    good = raw.request("/good")
    assert raw.read_until(lambda: bool(raw.of(h2.events.StreamEnded, good)))
    assert raw.status(good) == 200
    raw.close()


def test_a_header_block_past_the_hard_cap_closes_with_goaway(
    up: UpstreamServer, gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(up.url, max_header_size="4KiB"))
    raw = RawH2(gw.port)
    raw.request("/a", extra=[(b"x-%d" % i, b"v" * 4000) for i in range(40)])
    assert raw.closed()
    goaway = raw.goaway()
    assert goaway is not None and goaway.error_code != ErrorCodes.NO_ERROR
    raw.close()


def test_a_continuation_flood_closes_with_goaway(
    up: UpstreamServer, gateway: Callable[..., GatewayProcess]
) -> None:
    from hyperframe.frame import ContinuationFrame, HeadersFrame

    gw = gateway(config(up.url))
    raw = RawH2(gw.port)
    first = HeadersFrame(1)
    first.data = raw.conn.encoder.encode(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]
    )
    frames = [first.serialize()]
    for _ in range(100):
        c = ContinuationFrame(1)
        c.data = b""
        frames.append(c.serialize())
    try:
        raw.sock.sendall(b"".join(frames))
    except OSError:
        pass
    assert raw.closed()
    raw.close()


def test_rapid_reset_closes_the_connection_and_spares_the_upstream(
    up: UpstreamServer, gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(up.url))
    raw = RawH2(gw.port)
    closed = False
    try:
        for _ in range(1000):
            sid = raw.request("/slow?s=2")
            raw.conn.reset_stream(sid, ErrorCodes.CANCEL)
            raw.flush()
    except OSError:
        closed = True
    assert closed or raw.closed()
    goaway = raw.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    raw.close()
    # The gateway still serves others.
    with h2c(gw) as client:
        assert client.get("/ok").status_code == 200


def test_a_ping_flood_from_a_client_that_never_reads_is_closed(
    up: UpstreamServer, gateway: Callable[..., GatewayProcess]
) -> None:
    from hyperframe.frame import PingFrame

    gw = gateway(config(up.url))
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    _OPEN.append(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    ping = PingFrame(0)
    ping.opaque_data = b"12345678"
    burst = ping.serialize() * 10_000
    closed = False
    started = time.monotonic()
    sock.settimeout(2)
    try:
        while time.monotonic() - started < 10:
            sock.sendall(burst)
    except OSError:
        closed = True
    sock.close()
    assert closed
    with h2c(gw) as client:
        assert client.get("/ok").status_code == 200


def test_an_idle_connection_gets_goaway_after_the_keepalive_timeout(
    up: UpstreamServer, gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(up.url, keepalive_timeout="0.5s", header_timeout="0.5s"))
    silent = RawH2(gw.port)  # a preface and nothing else: header_timeout
    raw = RawH2(gw.port)
    sid = raw.request("/x")
    assert raw.read_until(lambda: bool(raw.of(h2.events.StreamEnded, sid)))
    assert raw.closed(timeout=3)
    assert raw.goaway() is not None and raw.goaway().error_code == ErrorCodes.NO_ERROR
    assert silent.closed(timeout=3)
    raw.close()
    silent.close()


def test_a_stream_that_never_sends_its_body_times_out_alone(
    up: UpstreamServer, gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(up.url, body_timeout="0.5s"))
    raw = RawH2(gw.port)
    stuck = raw.request("/upload", end=False, extra=[(b"content-length", b"10")])
    ok = raw.request("/fine")
    assert raw.read_until(lambda: all(raw.of(h2.events.StreamEnded, i) for i in (stuck, ok)))
    assert raw.status(ok) == 200
    assert raw.status(stuck) == 408
    raw.close()


def test_drain_sends_goaway_and_lets_streams_in_flight_finish(
    up: UpstreamServer, gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(up.url, drain_timeout="5s"))
    raw = RawH2(gw.port)
    sid = raw.request("/slow?s=1")
    time.sleep(0.3)
    gw.signal(signal.SIGTERM)
    assert raw.read_until(lambda: bool(raw.of(h2.events.StreamEnded, sid)), timeout=5)
    assert raw.status(sid) == 200, (raw.events, gw.stderr)
    goaway = raw.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.NO_ERROR
    assert goaway.last_stream_id == sid
    raw.close()


async def trailing(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app answering with the `http.response.trailers` extension, gRPC style."""
    assert "http.response.trailers" in scope["extensions"]
    if scope["path"] == "/only":  # a trailers-only answer: one HEADERS frame
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/grpc"), (b"grpc-status", b"14")],
            }
        )
        await send({"type": "http.response.body", "body": b""})
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/grpc")],
            "trailers": True,
        }
    )
    await send({"type": "http.response.body", "body": b"\x00\x00\x00\x00\x01x", "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    await send(
        {
            "type": "http.response.trailers",
            "headers": [(b"grpc-status", b"0"), (b"Trace-Bin", b"AAEC")],
            "more_trailers": False,
        }
    )


def test_the_h2_protocol_sends_asgi_trailers_and_trailers_only_answers(
    upstream: Callable[..., UpstreamServer],
) -> None:
    from gateway.server.h2 import H2Options
    from gateway.server.protocol import ClientLimits, protocol_class

    server = upstream(trailing, http=protocol_class(ClientLimits(), None, H2Options()))
    raw = RawH2(server.port)
    full = raw.request("/full")
    only = raw.request("/only")
    assert raw.read_until(lambda: all(raw.of(h2.events.StreamEnded, i) for i in (full, only)))
    assert (
        b"".join(e.data for e in raw.of(h2.events.DataReceived, full)) == b"\x00\x00\x00\x00\x01x"
    )
    trailers = raw.of(h2.events.TrailersReceived, full)
    assert trailers and trailers[0].headers == [(b"grpc-status", b"0"), (b"trace-bin", b"AAEC")]
    heads = raw.of(h2.events.ResponseReceived, only)
    assert dict(heads[0].headers)[b"grpc-status"] == b"14"
    assert heads[0].stream_ended is not None  # one HEADERS frame, END_STREAM set
    assert not raw.of(h2.events.DataReceived, only)
