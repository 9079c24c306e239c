"""The HTTP/2 upstream client (gateway/upstream/transports/h2.py) against a small
hand-written h2 server on 127.0.0.1 (the `h2` library on an asyncio server, for what a
real server cannot be made to do on cue: GOAWAY between two streams, REFUSED_STREAM,
trailers both ways, resets mid-stream, stalls) and against hypercorn (a real server:
multiplexing, its stream limit, TLS by ALPN, full duplex). The gRPC shapes (a
bidirectional echo, trailers with `-bin` metadata, trailers-only answers) are driven
by hand: the transport sees only HTTP/2."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest
import trustme
from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple
from hypercorn.asyncio import serve
from hypercorn.config import Config
from hyperframe.frame import GoAwayFrame

from gateway.errors import UpstreamUnavailable
from gateway.upstream.transports import make_transport
from gateway.upstream.transports.base import TransportSettings, map_httpx_errors
from gateway.upstream.transports.h2 import H2Transport, RequestTrailers
from tests.integration.harness import free_port, read_body

# --- a hand-written h2 server ---------------------------------------------------------


@dataclass
class Request:
    stream_id: int
    headers: dict[bytes, bytes]
    fields: list[tuple[bytes, bytes]]
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    # Each DATA frame's bytes as it arrives, None at END_STREAM or a reset (streaming).
    chunks: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    reset: int | None = None  # the client's RST_STREAM code


Handler = Callable[["ServerConn", Request], Coroutine[Any, Any, None]]


class ServerConn:
    """One connection of `RawServer`: requests are handed to the handler when their
    END_STREAM is in (or, `streaming`, as soon as their HEADERS are, the body then
    coming from `Request.chunks`); the handler answers with `respond` / `send_body` /
    `send`."""

    def __init__(
        self,
        server: RawServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        index: int,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.index = index
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        if server.max_streams is not None:
            self.h2.local_settings = h2.settings.Settings(
                client=False,
                initial_values={
                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: server.max_streams
                },
            )
        self.pending: dict[int, Request] = {}
        self.requests: list[Request] = []
        self.resets: list[tuple[int, int]] = []
        self.window = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    async def run(self) -> None:
        self.h2.initiate_connection()
        self.flush()
        try:
            while data := await self.reader.read(65536):
                for event in self.h2.receive_data(data):
                    self.on_event(event)
                self.flush()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.writer.close()

    def on_event(self, event: h2.events.Event) -> None:
        streaming = self.server.streaming
        if isinstance(event, h2.events.RequestReceived):
            headers = list(event.headers)
            request = Request(event.stream_id, {bytes(k): bytes(v) for k, v in headers}, headers)
            self.pending[event.stream_id] = request
            if streaming:
                self._start(request)
        elif isinstance(event, h2.events.DataReceived):
            request = self.pending[event.stream_id]
            request.body += event.data
            request.chunks.put_nowait(bytes(event.data))
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            self.pending[event.stream_id].trailers = [
                (bytes(k), bytes(v)) for k, v in event.headers
            ]
        elif isinstance(event, h2.events.StreamEnded):
            request = self.pending.pop(event.stream_id)
            request.chunks.put_nowait(None)
            if not streaming:
                self._start(request)
        elif isinstance(event, h2.events.StreamReset):
            self.resets.append((event.stream_id, event.error_code))
            self.server.resets.append((event.stream_id, event.error_code))
            self.server.reset_seen.set()
            pending = self.pending.pop(event.stream_id, None)
            if pending is not None:
                pending.reset = event.error_code
                pending.chunks.put_nowait(None)
        elif isinstance(event, h2.events.WindowUpdated):
            self.window.set()

    def _start(self, request: Request) -> None:
        self.requests.append(request)
        self.server.requests.append(request)
        self.tasks.append(asyncio.create_task(self.server.handler(self, request)))

    def send(
        self,
        stream_id: int,
        headers: list[tuple[bytes, bytes]] | None = None,
        data: bytes = b"",
        end: bool = False,
    ) -> None:
        """One HEADERS (or trailers) and/or one DATA frame, now."""
        if headers is not None:
            self.h2.send_headers(stream_id, headers, end_stream=end and not data)
        if data:
            self.h2.send_data(stream_id, data, end_stream=end)
        self.flush()

    def respond(
        self,
        stream_id: int,
        status: int = 200,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        trailers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.h2.send_headers(
            stream_id,
            [(b":status", str(status).encode()), *(headers or [])],
            end_stream=not body and not trailers,
        )
        if body:
            self.h2.send_data(stream_id, body, end_stream=not trailers)
        if trailers:
            self.h2.send_headers(stream_id, trailers, end_stream=True)
        self.flush()

    async def send_body(self, stream_id: int, data: bytes, end: bool = True) -> None:
        """Send `data` as the client's windows allow."""
        offset = 0
        while offset < len(data):
            window = min(
                self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
            )
            if window <= 0:
                self.window.clear()
                await self.window.wait()
                continue
            chunk = data[offset : offset + window]
            offset += len(chunk)
            self.h2.send_data(stream_id, chunk, end_stream=end and offset == len(data))
            self.server.sent += len(chunk)
            self.flush()
            await self.writer.drain()

    def goaway(self, last_stream_id: int) -> None:
        # Written past h2's state machine, which would refuse to answer stream 1 after.
        self.flush()
        self.writer.write(GoAwayFrame(0, last_stream_id=last_stream_id, error_code=0).serialize())


class RawServer:
    def __init__(
        self,
        handler: Handler,
        max_streams: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        streaming: bool = False,
    ) -> None:
        self.handler = handler
        self.max_streams = max_streams
        self.ssl_context = ssl_context
        self.streaming = streaming  # the handler starts at HEADERS, not END_STREAM
        self.conns: list[ServerConn] = []
        self.requests: list[Request] = []
        self.resets: list[tuple[int, int]] = []
        self.reset_seen = asyncio.Event()  # set at the first RST_STREAM from the client
        self.sent = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._runs: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.conns:
            for task in conn.tasks:
                task.cancel()
            conn.writer.close()
        # Closing each writer ends its connection's read loop (cancelling the serving
        # task instead makes asyncio log an error).
        await asyncio.wait_for(asyncio.gather(*self._runs, return_exceptions=True), 2)

    def url(self, path: str = "/x") -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ServerConn(self, reader, writer, len(self.conns) + 1)
        self.conns.append(conn)
        task = asyncio.current_task()
        assert task is not None
        self._runs.append(task)
        await conn.run()


async def answer_ok(conn: ServerConn, request: Request) -> None:
    conn.respond(request.stream_id, 200, b"ok from %d" % conn.index)


# --- hypercorn ------------------------------------------------------------------------


Scope = dict[str, Any]


async def app(scope: Scope, receive: Any, send: Any) -> None:
    """/sleep?s → answers after s seconds with the client port; /echo → the request
    body's length and sha256; /big?n → n bytes; /duplex → each body chunk sent back as
    it arrives, the head before any of them."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["path"] == "/duplex":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            if message.get("body"):
                await send(
                    {"type": "http.response.body", "body": message["body"], "more_body": True}
                )
            if not message.get("more_body"):
                break
        await send({"type": "http.response.body", "body": b""})
        return
    body = await read_body(receive)
    path, query = scope["path"], scope["query_string"].decode()
    payload = b""
    if path == "/sleep":
        await asyncio.sleep(float(query or 0))
    elif path == "/echo":
        payload = b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())
    elif path == "/big":
        payload = b"x" * int(query)
    headers = [
        (b"x-http-version", scope["http_version"].encode()),
        (b"x-client-port", str(scope["client"][1]).encode()),
        (b"x-scheme", scope["scheme"].encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


@contextlib.asynccontextmanager
async def hypercorn(**options: Any) -> AsyncIterator[int]:
    config = Config()
    port = free_port()
    config.bind = [f"127.0.0.1:{port}"]
    config.loglevel = "WARNING"
    config.graceful_timeout = 0.2
    for name, value in options.items():
        setattr(config, name, value)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        except OSError:
            await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        stop.set()
        await task


# --- helpers --------------------------------------------------------------------------


def transport(**overrides: Any) -> H2Transport:
    values: dict[str, Any] = {
        "max_connections": 16,
        "max_keepalive": 8,
        "keepalive_expiry": 30.0,
        "connect_timeout": 1.0,
        "read_timeout": 2.0,
        "protocol": "http2",
    }
    values.update(overrides)
    made = make_transport(TransportSettings(**values))
    assert isinstance(made, H2Transport)
    return made


async def fetch(
    t: H2Transport,
    url: str,
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes | AsyncIterator[bytes] | None = None,
    trailers: RequestTrailers | None = None,
) -> tuple[int, dict[bytes, bytes], bytes]:
    answer = await t.open(method, url, headers or [], body, trailers=trailers)
    try:
        data = answer.whole()
        if data is None:
            data = b"".join([chunk async for chunk in answer.body()])
    finally:
        await answer.aclose()
    return answer.status, dict(answer.headers), data


async def chunks(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await asyncio.sleep(0)


# --- against hypercorn ----------------------------------------------------------------


async def test_h2c_by_prior_knowledge_multiplexes_one_connection() -> None:
    async with hypercorn() as port:
        t = transport()
        results = await asyncio.gather(
            *(fetch(t, f"http://127.0.0.1:{port}/sleep?0.1") for _ in range(20))
        )
        assert {r[0] for r in results} == {200}
        assert {r[1][b"x-http-version"] for r in results} == {b"2"}
        assert len({r[1][b"x-client-port"] for r in results}) == 1
        assert t.connections() == 1
        assert "connections=1" in repr(t)
        await t.aclose()


async def test_the_upstreams_stream_limit_opens_another_connection() -> None:
    async with hypercorn(h2_max_concurrent_streams=2) as port:
        t = transport()
        results = await asyncio.gather(
            *(fetch(t, f"http://127.0.0.1:{port}/sleep?0.3") for _ in range(4))
        )
        assert {r[0] for r in results} == {200}
        assert len({r[1][b"x-client-port"] for r in results}) == 2
        assert t.connections() == 2
        await t.aclose()


async def test_max_connections_caps_them_and_the_rest_wait_for_a_stream() -> None:
    async with hypercorn(h2_max_concurrent_streams=1) as port:
        t = transport(max_connections=2)
        results = await asyncio.gather(
            *(fetch(t, f"http://127.0.0.1:{port}/sleep?0.1") for _ in range(6))
        )
        assert {r[0] for r in results} == {200}
        assert len({r[1][b"x-client-port"] for r in results}) == 2
        await t.aclose()


async def test_bodies_larger_than_the_windows_arrive_intact_both_ways() -> None:
    data = bytes(range(256)) * (3 * 1024 * 4)  # 3 MiB
    digest = hashlib.sha256(data).hexdigest().encode()
    async with hypercorn() as port:
        t = transport()
        _, _, got = await fetch(t, f"http://127.0.0.1:{port}/echo", "POST", body=data)
        assert got == b"%d %s" % (len(data), digest)
        _, _, got = await fetch(t, f"http://127.0.0.1:{port}/echo", "POST", body=chunks(data))
        assert got == b"%d %s" % (len(data), digest)
        _, _, got = await fetch(t, f"http://127.0.0.1:{port}/big?{len(data)}")
        assert got == b"x" * len(data)
        assert t.connections() == 1
        await t.aclose()


async def test_httpx_clients_go_through_it_too() -> None:
    async with hypercorn() as port:
        t = transport()
        async with httpx.AsyncClient(transport=t) as client:
            r = await client.get(f"http://user:pw@127.0.0.1:{port}/big?5", headers={"X-A": "1"})
            assert r.status_code == 200
            assert r.http_version == "HTTP/2"
            assert r.text == "xxxxx"
            assert r.headers["x-http-version"] == "2"
            r = await client.post(f"http://127.0.0.1:{port}/echo", content=b"abc")
            assert r.text.startswith("3 ")


async def test_idle_connections_close_after_keepalive_expiry() -> None:
    async with hypercorn() as port:
        t = transport(keepalive_expiry=0.1)
        await fetch(t, f"http://127.0.0.1:{port}/sleep")
        assert t.connections() == 1
        await asyncio.sleep(0.3)
        assert t.connections() == 0
        assert (await fetch(t, f"http://127.0.0.1:{port}/sleep"))[0] == 200
        await t.aclose()


async def test_max_keepalive_zero_closes_each_connection_once_idle() -> None:
    async with hypercorn() as port:
        t = transport(max_keepalive=0)
        await fetch(t, f"http://127.0.0.1:{port}/sleep")
        await asyncio.sleep(0.05)
        assert t.connections() == 0
        await t.aclose()


# --- TLS ------------------------------------------------------------------------------


def write_cert(tmp_path: Path, ca: trustme.CA, name: str) -> tuple[str, str]:
    cert = ca.issue_cert(name)
    cert_path, key_path = tmp_path / "up.pem", tmp_path / "up.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


def client_context(ca: trustme.CA, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(alpn)
    return context


async def test_h2_over_tls_is_chosen_by_alpn_and_verified(tmp_path: Path) -> None:
    ca = trustme.CA()
    certfile, keyfile = write_cert(tmp_path, ca, "127.0.0.1")
    async with hypercorn(certfile=certfile, keyfile=keyfile) as port:
        t = transport(tls=client_context(ca, ["h2"]))
        status, headers, _ = await fetch(t, f"https://127.0.0.1:{port}/sleep")
        assert status == 200
        assert headers[b"x-http-version"] == b"2"
        assert headers[b"x-scheme"] == b"https"
        await t.aclose()


async def test_a_certificate_that_does_not_verify_names_the_problem(tmp_path: Path) -> None:
    ca = trustme.CA()
    certfile, keyfile = write_cert(tmp_path, ca, "127.0.0.1")
    async with hypercorn(certfile=certfile, keyfile=keyfile) as port:
        t = transport()  # the system trust store does not know trustme's CA
        with pytest.raises(UpstreamUnavailable) as caught, map_httpx_errors("up", "t"):
            await fetch(t, f"https://127.0.0.1:{port}/sleep")
        assert "certificate" in str(caught.value)
        assert "did not verify" in str(caught.value)
        await t.aclose()


async def test_an_upstream_that_will_not_speak_h2_by_alpn_is_a_connect_error(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    certfile, keyfile = write_cert(tmp_path, ca, "127.0.0.1")
    async with hypercorn(certfile=certfile, keyfile=keyfile, alpn_protocols=["http/1.1"]) as port:
        # A context offering http/1.1 as well: the upstream picks it, and that is refused.
        t = transport(tls=client_context(ca, ["h2", "http/1.1"]))
        with pytest.raises(httpx.ConnectError, match="ALPN"):
            await fetch(t, f"https://127.0.0.1:{port}/sleep")
        assert t.connections() == 0
        await t.aclose()


# --- against the hand-written server --------------------------------------------------


async def test_request_headers_are_mapped_for_h2() -> None:
    async with RawServer(answer_ok) as server:
        t = transport()
        await fetch(
            t,
            server.url("/a?q=1"),
            headers=[
                (b"Host", b"example.test"),
                (b"Connection", b"keep-alive, x-hop"),
                (b"Keep-Alive", b"5"),
                (b"X-Hop", b"1"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Upgrade", b"h2c"),
                (b"Proxy-Connection", b"x"),
                (b"TE", b"trailers, deflate"),
                (b"X-Kept", b"yes"),
            ],
        )
        fields = server.requests[0].fields
        assert fields[:4] == [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"example.test"),
            (b":path", b"/a?q=1"),
        ]
        assert sorted(fields[4:]) == [(b"te", b"trailers"), (b"x-kept", b"yes")]
        await t.aclose()


async def test_credentials_are_never_put_in_the_shared_hpack_table() -> None:
    async with RawServer(answer_ok) as server:
        t = transport()
        url = server.url().replace("http://", "http://us%40er:pw@")
        await fetch(t, url, headers=[(b"cookie", b"a=1"), (b"x-other", b"1")])
        fields = {bytes(f[0]): f for f in server.requests[0].fields}
        assert fields[b"authorization"] == (b"authorization", b"Basic dXNAZXI6cHc=")
        for name in (b"authorization", b"cookie"):
            assert isinstance(fields[name], NeverIndexedHeaderTuple)
        assert not isinstance(fields[b"x-other"], NeverIndexedHeaderTuple)
        await t.aclose()


async def test_the_targets_authority_is_sent_without_a_host_header() -> None:
    async with RawServer(answer_ok) as server:
        t = transport()
        await fetch(t, server.url("/"), "POST", body=b"abc")
        request = server.requests[0]
        assert request.headers[b":authority"] == b"127.0.0.1:%d" % server.port
        assert request.headers[b"content-length"] == b"3"
        assert bytes(request.body) == b"abc"
        await t.aclose()


async def test_trailers_are_kept_on_the_answer() -> None:
    async def handler(conn: ServerConn, request: Request) -> None:
        conn.respond(request.stream_id, 200, b"body", trailers=[(b"grpc-status", b"0")])

    async with RawServer(handler) as server:
        t = transport()
        answer = await t.open("GET", server.url(), [], None)
        assert [chunk async for chunk in answer.body()] == [b"body"]
        assert answer.trailers == [(b"grpc-status", b"0")]
        await answer.aclose()
        await t.aclose()


async def test_a_head_answer_with_a_content_length_has_no_body() -> None:
    async def handler(conn: ServerConn, request: Request) -> None:
        conn.respond(request.stream_id, 200, headers=[(b"content-length", b"10")])

    async with RawServer(handler) as server:
        t = transport()
        status, headers, body = await fetch(t, server.url(), "HEAD")
        assert (status, headers[b"content-length"], body) == (200, b"10", b"")
        assert (await fetch(t, server.url(), "HEAD"))[0] == 200
        assert len(server.conns) == 1
        await t.aclose()


async def test_goaway_sends_the_unprocessed_stream_again_on_a_new_connection() -> None:
    async def handler(conn: ServerConn, request: Request) -> None:
        if conn.index > 1:
            conn.respond(request.stream_id, 200, b"second connection")
            return
        if len(conn.requests) < 2:
            return  # stream 1 waits for stream 3
        conn.goaway(last_stream_id=1)
        await asyncio.sleep(0.05)  # stream 1 still finishes after the GOAWAY
        conn.respond(1, 200, b"first connection")

    async with RawServer(handler) as server:
        t = transport()
        first = asyncio.create_task(fetch(t, server.url("/one"), "POST", body=b"1"))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(fetch(t, server.url("/two"), "POST", body=b"2"))
        one, two = await asyncio.gather(first, second)
        assert (one[0], one[2]) == (200, b"first connection")
        assert (two[0], two[2]) == (200, b"second connection")
        assert [r.headers[b":path"] for r in server.conns[1].requests] == [b"/two"]
        assert bytes(server.conns[1].requests[0].body) == b"2"
        await asyncio.sleep(0.05)
        assert t.connections() == 1  # the one that went away is closed
        await t.aclose()


async def test_goaway_replays_a_small_streamed_body() -> None:
    async def handler(conn: ServerConn, request: Request) -> None:
        if conn.index == 1:
            conn.goaway(last_stream_id=0)
        else:
            conn.respond(request.stream_id, 200, bytes(request.body))

    async with RawServer(handler) as server:
        t = transport()
        _, _, got = await fetch(t, server.url(), "POST", body=chunks(b"abcdef", 2))
        assert got == b"abcdef"
        await t.aclose()


async def test_a_refused_stream_is_sent_again() -> None:
    async def handler(conn: ServerConn, request: Request) -> None:
        if len(server.requests) == 1:
            conn.h2.reset_stream(request.stream_id, ErrorCodes.REFUSED_STREAM)
            conn.flush()
        else:
            conn.respond(request.stream_id, 200, b"again")

    async with RawServer(handler) as server:
        t = transport()
        assert (await fetch(t, server.url()))[2] == b"again"
        assert len(server.requests) == 2
        await t.aclose()


async def test_a_stream_reset_by_the_upstream_fails_alone() -> None:
    async def handler(conn: ServerConn, request: Request) -> None:
        if request.headers[b":path"] == b"/bad":
            conn.h2.reset_stream(request.stream_id, ErrorCodes.INTERNAL_ERROR)
            conn.flush()
        else:
            await asyncio.sleep(0.05)
            conn.respond(request.stream_id, 200, b"fine")

    async with RawServer(handler) as server:
        t = transport()
        good = asyncio.create_task(fetch(t, server.url("/good")))
        with pytest.raises(httpx.RemoteProtocolError, match="INTERNAL_ERROR"):
            await fetch(t, server.url("/bad"))
        assert (await good)[2] == b"fine"
        assert len(server.conns) == 1
        await t.aclose()


async def test_a_cancelled_request_resets_only_its_stream() -> None:
    async def handler(conn: ServerConn, request: Request) -> None:
        if request.headers[b":path"] == b"/never":
            return
        await asyncio.sleep(0.2)
        conn.respond(request.stream_id, 200, b"done")

    async with RawServer(handler) as server:
        t = transport()
        slow = asyncio.create_task(fetch(t, server.url("/slow")))
        await asyncio.sleep(0.01)
        cancelled = asyncio.create_task(t.open("GET", server.url("/never"), [], None))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert (await slow)[2] == b"done"
        assert server.resets == [(3, ErrorCodes.CANCEL)]
        assert len(server.conns) == 1
        await t.aclose()


async def test_an_answer_closed_early_resets_its_stream_and_frees_it() -> None:
    async def endless(conn: ServerConn, request: Request) -> None:
        if request.headers[b":path"] == b"/endless":
            conn.h2.send_headers(request.stream_id, [(b":status", b"200")])
            conn.h2.send_data(request.stream_id, b"part")
            conn.flush()
            return
        conn.respond(request.stream_id, 200, b"ok")

    async with RawServer(endless, max_streams=1) as server:
        t = transport(max_connections=1)
        answer = await t.open("GET", server.url("/endless"), [], None)
        assert await anext(answer.body()) == b"part"
        await answer.aclose()
        # The one stream the upstream allows is free again, on the same connection.
        assert (await fetch(t, server.url("/next")))[2] == b"ok"
        await asyncio.sleep(0.05)
        assert server.resets == [(1, ErrorCodes.CANCEL)]
        assert len(server.conns) == 1
        await t.aclose()


async def test_a_slow_consumer_holds_the_upstream_to_the_stream_window() -> None:
    size = 3 * 1024 * 1024
    done = asyncio.Event()

    async def handler(conn: ServerConn, request: Request) -> None:
        conn.h2.send_headers(request.stream_id, [(b":status", b"200")])
        await conn.send_body(request.stream_id, b"y" * size)
        done.set()

    async with RawServer(handler) as server:
        t = transport()
        answer = await t.open("GET", server.url(), [], None)
        await asyncio.sleep(0.1)
        # Nothing read yet: the upstream is stopped at the stream's window.
        assert server.sent <= 256 * 1024
        assert not done.is_set()
        received = 0
        async for chunk in answer.body():
            received += len(chunk)
        await answer.aclose()
        assert received == size
        assert done.is_set()
        await t.aclose()


async def test_read_timeout_fails_the_stream_alone() -> None:
    async def handler(conn: ServerConn, request: Request) -> None:
        if request.headers[b":path"] == b"/stall":
            return
        conn.respond(request.stream_id, 200, b"ok")

    async with RawServer(handler) as server:
        t = transport(read_timeout=0.1)
        with pytest.raises(httpx.ReadTimeout):
            await fetch(t, server.url("/stall"))
        assert (await fetch(t, server.url("/fine")))[2] == b"ok"
        await asyncio.sleep(0.05)
        assert server.resets == [(1, ErrorCodes.CANCEL)]
        assert len(server.conns) == 1
        await t.aclose()


async def test_a_connection_the_upstream_closed_is_dropped() -> None:
    async def handler(conn: ServerConn, request: Request) -> None:
        conn.respond(request.stream_id, 200, b"bye")
        await conn.writer.drain()
        conn.writer.close()

    async with RawServer(handler) as server:
        t = transport()
        assert (await fetch(t, server.url()))[2] == b"bye"
        await asyncio.sleep(0.05)
        assert t.connections() == 0
        assert (await fetch(t, server.url()))[2] == b"bye"
        assert len(server.conns) == 2
        await t.aclose()


async def test_the_upstream_dying_mid_answer_fails_its_streams() -> None:
    async def handler(conn: ServerConn, request: Request) -> None:
        conn.h2.send_headers(request.stream_id, [(b":status", b"200")])
        conn.h2.send_data(request.stream_id, b"half")
        conn.flush()
        await asyncio.sleep(0.05)
        conn.writer.transport.abort()

    async with RawServer(handler) as server:
        t = transport()
        answer = await t.open("GET", server.url(), [], None)
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            async for _ in answer.body():
                pass
        await answer.aclose()
        await t.aclose()


@contextlib.asynccontextmanager
async def plain_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A raw TCP server whose connections are all closed when the test is done."""
    writers: list[asyncio.StreamWriter] = []

    async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            await handle(reader, writer)

    server = await asyncio.start_server(serve_one, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        await asyncio.sleep(0)


async def test_a_server_that_does_not_speak_h2_is_a_connect_error() -> None:
    async def http11(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        writer.close()

    async with plain_server(http11) as port:
        t = transport()
        with pytest.raises(httpx.ConnectError):
            await fetch(t, f"http://127.0.0.1:{port}/")
        assert t.connections() == 0
        await t.aclose()


async def test_connect_timeout_covers_the_upstreams_settings() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        await asyncio.sleep(1)

    async with plain_server(silent) as port:
        t = transport(connect_timeout=0.1)
        with pytest.raises(httpx.ConnectTimeout):
            await fetch(t, f"http://127.0.0.1:{port}/")
        assert t.connections() == 0
        await t.aclose()


async def test_a_request_waiting_for_a_stream_can_be_cancelled() -> None:
    async def handler(conn: ServerConn, request: Request) -> None:
        await asyncio.sleep(0.2)
        conn.respond(request.stream_id, 200, b"ok")

    async with RawServer(handler, max_streams=1) as server:
        t = transport(max_connections=1)
        first = asyncio.create_task(fetch(t, server.url()))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(fetch(t, server.url()))
        await asyncio.sleep(0.02)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert (await first)[2] == b"ok"
        assert (await fetch(t, server.url()))[2] == b"ok"
        assert len(server.requests) == 2
        await t.aclose()


# --- full duplex and trailers (gRPC's shapes) -----------------------------------------


class Messages:
    """A request body the test feeds one message at a time (`end` finishes it); `closed`
    once the transport is done with it (exhausted, or cancelled)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self.closed = False

    def send(self, message: bytes) -> None:
        self.queue.put_nowait(message)

    def fail(self, error: BaseException) -> None:
        self.queue.put_nowait(error)

    def end(self) -> None:
        self.queue.put_nowait(None)

    async def source(self) -> AsyncIterator[bytes]:
        try:
            while (message := await self.queue.get()) is not None:
                if isinstance(message, BaseException):
                    raise message
                yield message
        finally:
            self.closed = True


GRPC_HEADERS = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


def senders() -> list[asyncio.Task[Any]]:
    """The transport's body senders still running (none may outlive their answer)."""
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") == "_Sender._run" and not task.done()
    ]


async def echo(conn: ServerConn, request: Request) -> None:
    """gRPC's bidirectional shape: the head at once, each message echoed as it comes,
    the status in trailers at the end."""
    conn.send(request.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    while (chunk := await request.chunks.get()) is not None:
        conn.send(request.stream_id, data=chunk)
    if request.reset is None:
        conn.send(request.stream_id, [(b"grpc-status", b"0")], end=True)


async def test_a_bidirectional_stream_reads_each_echo_before_sending_the_next() -> None:
    async with RawServer(echo, streaming=True) as server:
        t = transport()
        messages = Messages()
        async with asyncio.timeout(2):
            # The head comes before any of the body: `open` must not wait for the body.
            answer = await t.open("POST", server.url("/Echo/Chat"), GRPC_HEADERS, messages.source())
            assert answer.status == 200
            assert answer.whole() is None
            body = answer.body()
            for message in (b"one", b"two", b"three"):
                messages.send(message)
                assert await anext(body) == message
            messages.end()
            assert [chunk async for chunk in body] == []
            assert answer.trailers == [(b"grpc-status", b"0")]
            assert answer.reset_code is None
            await answer.aclose()
        request = server.requests[0]
        assert request.headers[b"te"] == b"trailers"
        assert bytes(request.body) == b"onetwothree"
        assert server.resets == []
        assert messages.closed and not senders()
        await t.aclose()


async def test_a_real_server_streams_its_answer_while_the_body_still_goes_out() -> None:
    async with hypercorn() as port:
        t = transport()
        messages = Messages()
        async with asyncio.timeout(2):
            answer = await t.open("POST", f"http://127.0.0.1:{port}/duplex", [], messages.source())
            body = answer.body()
            for message in (b"ping", b"pong" * 30_000):  # the second one beyond the window
                messages.send(message)
                received = b""
                while len(received) < len(message):
                    received += await anext(body)
                assert received == message
            messages.end()
            assert [chunk async for chunk in body] == []
            await answer.aclose()
        assert not senders()
        await t.aclose()


async def test_trailers_with_binary_metadata_come_once_the_body_is_read() -> None:
    binary = bytes(range(256))
    trailers = [
        (b"grpc-status", b"0"),
        (b"grpc-message", b"all%20good"),
        (b"x-trace-bin", base64.b64encode(binary)),  # padded
        (b"x-raw-bin", base64.b64encode(b"\x00\xff\x10").rstrip(b"=")),  # unpadded
    ]

    async def handler(conn: ServerConn, request: Request) -> None:
        conn.send(request.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        await asyncio.sleep(0.02)
        conn.send(request.stream_id, data=b"\x00\x00\x00\x00\x02hi")
        await asyncio.sleep(0.02)
        conn.send(request.stream_id, trailers, end=True)

    async with RawServer(handler) as server:
        t = transport()
        answer = await t.open("POST", server.url(), GRPC_HEADERS, b"\x00\x00\x00\x00\x00")
        assert answer.whole() is None
        assert answer.trailers == []  # not yet
        assert [chunk async for chunk in answer.body()] == [b"\x00\x00\x00\x00\x02hi"]
        assert answer.trailers == trailers
        assert base64.b64decode(dict(answer.trailers)[b"x-trace-bin"]) == binary
        await answer.aclose()
        # All in one go: `whole` has the body and the trailers are already there.
        server.handler = lambda conn, request: _respond_with(conn, request, trailers)
        answer = await t.open("POST", server.url(), GRPC_HEADERS, b"\x00\x00\x00\x00\x00")
        await asyncio.sleep(0.02)
        assert answer.whole() == b"\x00\x00\x00\x00\x02hi"
        assert answer.trailers == trailers
        await answer.aclose()
        await t.aclose()


async def _respond_with(
    conn: ServerConn, request: Request, trailers: list[tuple[bytes, bytes]]
) -> None:
    conn.respond(request.stream_id, 200, b"\x00\x00\x00\x00\x02hi", trailers=trailers)


async def test_a_trailers_only_answer_has_its_status_in_the_headers_and_no_body() -> None:
    async def unimplemented(conn: ServerConn, request: Request) -> None:
        conn.send(
            request.stream_id,
            [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", b"12"),
                (b"grpc-message", b"unknown%20method"),
            ],
            end=True,
        )

    async with RawServer(unimplemented, streaming=True) as server:
        t = transport()
        answer = await t.open("POST", server.url(), GRPC_HEADERS, b"\x00\x00\x00\x00\x00")
        assert (answer.status, dict(answer.headers)[b"grpc-status"]) == (200, b"12")
        assert answer.whole() == b""
        assert answer.trailers == []
        await answer.aclose()
        # Answered before the streamed body was sent (RFC 9113 8.1): the body stops.
        messages = Messages()
        messages.send(b"first")
        answer = await t.open("POST", server.url(), GRPC_HEADERS, messages.source())
        assert dict(answer.headers)[b"grpc-status"] == b"12"
        assert [chunk async for chunk in answer.body()] == []
        await answer.aclose()
        assert messages.closed and not senders()
        await t.aclose()


@pytest.mark.parametrize("body", ["bytes", "none", "streamed"])
@pytest.mark.parametrize("form", ["list", "callable"])
async def test_request_trailers_reach_the_upstream(body: str, form: str) -> None:
    calls = 0

    async def later() -> list[tuple[bytes, bytes]]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return [(b"X-Checksum", b"abc"), (b"connection", b"close")]  # lower-cased, dropped

    content: bytes | AsyncIterator[bytes] | None = (
        b"payload" if body == "bytes" else chunks(b"payload", 3) if body == "streamed" else None
    )
    trailers: RequestTrailers = later if form == "callable" else [(b"x-checksum", b"abc")]
    async with RawServer(answer_ok) as server:
        t = transport()
        status, _, _ = await fetch(t, server.url(), "POST", GRPC_HEADERS, content, trailers)
        assert status == 200
        request = server.requests[0]
        assert request.headers[b"te"] == b"trailers"
        assert bytes(request.body) == (b"" if body == "none" else b"payload")
        assert request.trailers == [(b"x-checksum", b"abc")]
        assert calls == (1 if form == "callable" else 0)
        assert not senders()
        await t.aclose()


async def test_a_small_bytes_body_goes_out_inline_without_a_sender() -> None:
    async with RawServer(answer_ok) as server:
        t = transport()
        answer = await t.open("POST", server.url(), [], b"x" * 1000, trailers=[(b"a", b"1")])
        assert "sender=None" in repr(answer)
        await answer.aclose()
        big = b"y" * 200_000  # beyond the 64 KiB window the server starts with
        answer = await t.open("POST", server.url(), [], big)
        assert "_Sender(" in repr(answer)
        assert answer.whole() == b"ok from 1"
        await answer.aclose()
        assert bytes(server.requests[1].body) == big
        await t.aclose()


async def test_a_pseudo_field_in_request_trailers_is_refused() -> None:
    async with RawServer(answer_ok) as server:
        t = transport()
        with pytest.raises(httpx.LocalProtocolError):
            await t.open("POST", server.url(), [], b"x", trailers=[(b":path", b"/")])
        await t.aclose()


async def test_an_upstream_reset_mid_stream_fails_the_reader_with_its_code() -> None:
    async def reset_after_one(conn: ServerConn, request: Request) -> None:
        conn.send(request.stream_id, [(b":status", b"200")])
        chunk = await request.chunks.get()
        assert chunk is not None
        conn.send(request.stream_id, data=chunk)
        await asyncio.sleep(0.02)
        conn.h2.reset_stream(request.stream_id, ErrorCodes.ENHANCE_YOUR_CALM)
        conn.flush()

    async with RawServer(reset_after_one, streaming=True) as server:
        t = transport()
        messages = Messages()
        async with asyncio.timeout(2):
            answer = await t.open("POST", server.url(), GRPC_HEADERS, messages.source())
            body = answer.body()
            messages.send(b"one")
            assert await anext(body) == b"one"
            with pytest.raises(httpx.RemoteProtocolError, match="ENHANCE_YOUR_CALM"):
                await anext(body)
            assert answer.reset_code == ErrorCodes.ENHANCE_YOUR_CALM
            await answer.aclose()
        assert messages.closed and not senders()
        assert server.resets == []  # nothing reset back: the stream was closed already
        # The connection goes on.
        server.handler = answer_ok
        server.streaming = False
        assert (await fetch(t, server.url()))[2] == b"ok from 1"
        await t.aclose()


async def test_closing_the_answer_mid_stream_resets_it_and_stops_the_body() -> None:
    async with RawServer(echo, streaming=True) as server:
        t = transport()
        messages = Messages()
        async with asyncio.timeout(2):
            answer = await t.open("POST", server.url(), GRPC_HEADERS, messages.source())
            messages.send(b"one")
            assert await anext(answer.body()) == b"one"
            await answer.aclose()  # the source waits for a message that never comes
            assert messages.closed and not senders()
            await server.reset_seen.wait()
        assert server.resets == [(1, ErrorCodes.CANCEL)]
        assert answer.reset_code is None  # our reset, not the upstream's
        await t.aclose()


async def test_cancelling_a_request_while_its_body_streams_resets_it() -> None:
    got = asyncio.Event()

    async def never_answers(conn: ServerConn, request: Request) -> None:
        await request.chunks.get()
        got.set()

    async with RawServer(never_answers, streaming=True) as server:
        t = transport()
        messages = Messages()
        opening = asyncio.create_task(t.open("POST", server.url(), [], messages.source()))
        messages.send(b"one")
        async with asyncio.timeout(2):
            await got.wait()  # the body is on its way: the sender is at work
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
            assert messages.closed and not senders()
            await server.reset_seen.wait()
        assert server.resets == [(1, ErrorCodes.CANCEL)]
        await t.aclose()


async def test_a_failing_body_source_resets_the_stream_and_fails_the_reader() -> None:
    async with RawServer(echo, streaming=True) as server:
        t = transport()
        messages = Messages()
        async with asyncio.timeout(2):
            answer = await t.open("POST", server.url(), GRPC_HEADERS, messages.source())
            messages.send(b"one")
            body = answer.body()
            assert await anext(body) == b"one"
            messages.fail(ValueError("client went away"))
            with pytest.raises(httpx.WriteError, match="client went away") as caught:
                await anext(body)
            assert isinstance(caught.value.__cause__, ValueError)
            await server.reset_seen.wait()
            await answer.aclose()
        assert server.resets == [(1, ErrorCodes.CANCEL)]
        assert not senders()
        await t.aclose()


async def test_a_body_source_failing_before_the_answer_fails_open() -> None:
    async def never_answers(conn: ServerConn, request: Request) -> None:
        await request.chunks.get()

    async with RawServer(never_answers, streaming=True) as server:
        t = transport()
        messages = Messages()
        messages.send(b"one")
        messages.fail(ValueError("client went away"))
        async with asyncio.timeout(2):
            with pytest.raises(httpx.WriteError) as caught:
                await t.open("POST", server.url(), [], messages.source())
            assert isinstance(caught.value.__cause__, ValueError)
            await server.reset_seen.wait()
        assert server.resets == [(1, ErrorCodes.CANCEL)]
        assert not senders()
        await t.aclose()


async def test_a_refused_stream_is_sent_again_while_the_client_waits_for_its_echo() -> None:
    async def refuse_first(conn: ServerConn, request: Request) -> None:
        if len(server.requests) == 1:
            await request.chunks.get()  # the first message is in: refuse it all the same
            conn.h2.reset_stream(request.stream_id, ErrorCodes.REFUSED_STREAM)
            conn.flush()
            return
        await echo(conn, request)

    async with RawServer(refuse_first, streaming=True) as server:
        t = transport()
        messages = Messages()
        messages.send(b"one")
        async with asyncio.timeout(2):
            # The client sends "two" only after reading the echo of "one": the resend
            # must not wait for the source, nor cancel the read of it in progress.
            answer = await t.open("POST", server.url(), GRPC_HEADERS, messages.source())
            body = answer.body()
            assert await anext(body) == b"one"
            messages.send(b"two")
            assert await anext(body) == b"two"
            messages.end()
            assert [chunk async for chunk in body] == []
            assert answer.trailers == [(b"grpc-status", b"0")]
            await answer.aclose()
        assert [r.stream_id for r in server.requests] == [1, 3]
        assert bytes(server.requests[1].body) == b"onetwo"
        assert not senders()
        await t.aclose()


async def test_read_timeout_counts_from_the_end_of_the_request_body() -> None:
    async def slowly() -> AsyncIterator[bytes]:
        for _ in range(6):
            await asyncio.sleep(0.06)
            yield b"part"

    async with RawServer(lambda conn, request: _respond_with(conn, request, [])) as server:
        t = transport(read_timeout=0.2)
        # 0.36 s of upload, each part in time: the answer's clock starts at its end.
        status, _, body = await fetch(t, server.url(), "POST", body=slowly())
        assert (status, body) == (200, b"\x00\x00\x00\x00\x02hi")
        assert bytes(server.requests[0].body) == b"part" * 6
        await t.aclose()


async def test_closing_the_answer_fails_a_reader_waiting_in_another_task() -> None:
    async with RawServer(echo, streaming=True) as server:
        t = transport()
        messages = Messages()
        async with asyncio.timeout(2):
            answer = await t.open("POST", server.url(), GRPC_HEADERS, messages.source())
            reading = asyncio.ensure_future(anext(answer.body()))
            await asyncio.sleep(0.02)
            await answer.aclose()
            with pytest.raises(httpx.ReadError, match="closed"):
                await reading
        assert messages.closed and not senders()
        await t.aclose()


# --- the hot path's economies ---------------------------------------------------------


async def test_requests_started_in_one_turn_leave_in_one_write() -> None:
    async with RawServer(answer_ok) as server:
        t = transport()
        await fetch(t, server.url(), "POST", body=b"warm")  # the connection is open
        conn = next(iter(t._pools.values())).conns[0]
        assert conn.transport is not None
        writes: list[bytes] = []
        write = conn.transport.write

        def counted(data: Any) -> None:
            writes.append(bytes(data))
            write(data)

        conn.transport.write = counted  # type: ignore[method-assign]
        results = await asyncio.gather(
            *(fetch(t, server.url(), "POST", body=b"m%d" % i) for i in range(20))
        )
        assert {r[0] for r in results} == {200}
        assert sorted(bytes(r.body) for r in server.requests[1:]) == sorted(
            b"m%d" % i for i in range(20)
        )
        # 20 HEADERS and 20 DATA frames (END_STREAM): one write, not 40.
        assert len(writes) == 1
        await t.aclose()


async def test_request_headers_leave_the_upstreams_hpack_table_empty() -> None:
    async with RawServer(answer_ok) as server:
        t = transport()
        for i in range(3):
            headers = [(b"x-request-id", b"id-%d" % i), (b"x-kept", b"same"), (b"accept", b"*/*")]
            await fetch(t, server.url(), headers=headers)
        decoder = server.conns[0].h2.decoder
        assert not decoder.header_table.dynamic_entries  # the static table alone
        assert decoder.header_table_size == 0  # signalled in the first block
        request = server.requests[2]
        assert (request.headers[b"x-request-id"], request.headers[b"x-kept"]) == (b"id-2", b"same")
        assert request.headers[b"accept"] == b"*/*"
        await t.aclose()


async def test_closed_streams_do_not_pile_up_in_h2() -> None:
    async with RawServer(answer_ok, max_streams=5) as server:
        t = transport()
        for _ in range(10):
            results = await asyncio.gather(*(fetch(t, server.url()) for _ in range(30)))
            assert {r[0] for r in results} == {200}
        conn = next(iter(t._pools.values())).conns[0]
        assert len(conn.h2.streams) <= 64 + 2 * 5  # swept as they pile up, not 300
        assert t.connections() <= 16
        await t.aclose()


async def _malformed_head(conn: ServerConn, request: Request) -> None:
    path = request.headers[b":path"]
    if path == b"/head":
        # The stream left open: the client resets it.
        conn.send(request.stream_id, [(b":status", b"200"), (b"Upper", b"1")], b"body")
    elif path == b"/value":
        conn.send(request.stream_id, [(b":status", b"200"), (b"x-a", b"1\r\nx-b: 2")], end=True)
    elif path == b"/status":
        conn.send(request.stream_id, [(b":status", b"2xx")], end=True)
    elif path == b"/trailers":
        conn.send(request.stream_id, [(b":status", b"200")], b"body")
        conn.send(request.stream_id, [(b"connection", b"close")], end=True)
    else:
        await asyncio.sleep(0.05)
        conn.respond(request.stream_id, 200, b"fine")


@pytest.mark.parametrize("path", ["/head", "/value", "/status", "/trailers"])
async def test_a_malformed_answer_fails_its_stream_alone(path: str) -> None:
    async with RawServer(_malformed_head) as server:
        server_config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        t = transport()
        await fetch(t, server.url("/good"))
        server.conns[0].h2.config = server_config
        good = asyncio.create_task(fetch(t, server.url("/good")))
        with pytest.raises(httpx.RemoteProtocolError, match="malformed"):
            await fetch(t, server.url(path))
        assert (await good)[2] == b"fine"
        assert len(server.conns) == 1  # the connection lives on
        if path == "/head":  # (the others ended the stream both ways: nothing to reset)
            await asyncio.wait_for(server.reset_seen.wait(), 1)
            assert server.resets[-1][1] == ErrorCodes.PROTOCOL_ERROR
        assert (await fetch(t, server.url("/good")))[2] == b"fine"
        await t.aclose()


@pytest.mark.parametrize(
    "field",
    [
        (b"x-a", b"1\r\nx-b: 2"),
        (b"x-a", b"line\n"),
        (b"x-a", b"nul\0"),
        (b":path", b"/elsewhere"),
    ],
)
async def test_a_request_field_with_cr_lf_nul_or_a_pseudo_name_is_refused(
    field: tuple[bytes, bytes],
) -> None:
    async with RawServer(answer_ok) as server:
        t = transport()
        with pytest.raises(httpx.LocalProtocolError):
            await fetch(t, server.url(), headers=[(b"x-ok", b"fine"), field])
        assert (await fetch(t, server.url(), headers=[(b"x-ok", b"fine")]))[0] == 200
        assert len(server.requests) == 1  # the refused one never went out
        await t.aclose()
