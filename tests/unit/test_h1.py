"""The hot path's HTTP/1.1 client (gateway/upstream/transports/h1.py) against small raw
asyncio servers on 127.0.0.1: pooling, framing both ways, cancellation, limits and the
errors it raises."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from gateway.upstream.transports import h1
from gateway.upstream.transports.base import TransportSettings
from gateway.upstream.transports.h1 import H1Transport

Handler = Callable[["Conn", bytes], Awaitable[None]]


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    index: int
    requests: int = 0

    def send(self, data: bytes) -> None:
        self.writer.write(data)


@dataclass
class Server:
    """Reads request heads (and bodies framed by Content-Length or chunked) and lets the
    test's handler answer; records what arrived and when each connection ended."""

    handler: Handler
    port: int = 0
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    closed: list[float] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    def url(self, path: str = "/x") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = Conn(reader, writer, self.connections)
        loop = asyncio.get_running_loop()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                conn.requests += 1
                self.heads.append(head)
                lower = head.lower()
                body = b""
                if b"transfer-encoding: chunked" in lower:
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                        chunk = await reader.readexactly(size + 2)
                        if size == 0:
                            break
                        body += chunk[:-2]
                elif b"content-length:" in lower:
                    length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                    body = await reader.readexactly(length)
                self.bodies.append(body)
                await self.handler(conn, head)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.append(loop.time())
            writer.close()


def ok(body: bytes = b"ok", *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body)
    return head + b"".join(h + b"\r\n" for h in extra) + b"\r\n" + body


async def answer_ok(conn: Conn, head: bytes) -> None:
    conn.send(ok())


def answer_and_close(data: bytes) -> Handler:
    """A handler that sends `data` and closes the connection."""

    async def handler(conn: Conn, head: bytes) -> None:
        conn.send(data)
        await conn.writer.drain()
        conn.writer.close()

    return handler


def transport(**overrides: float) -> H1Transport:
    values: dict[str, float] = {
        "max_connections": 16,
        "max_keepalive": 8,
        "keepalive_expiry": 30.0,
        "connect_timeout": 1.0,
        "read_timeout": 2.0,
    }
    values.update(overrides)
    return H1Transport(
        TransportSettings(
            max_connections=int(values["max_connections"]),
            max_keepalive=int(values["max_keepalive"]),
            keepalive_expiry=values["keepalive_expiry"],
            connect_timeout=values["connect_timeout"],
            read_timeout=values["read_timeout"],
        )
    )


async def fetch(
    t: H1Transport,
    url: str,
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes | AsyncIterator[bytes] | None = None,
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    response = await t.open(method, url, headers or [], body)
    try:
        data = b"".join([chunk async for chunk in response.body()])
    finally:
        await response.aclose()
    return response.status, response.headers, data


async def test_keep_alive_connections_are_reused() -> None:
    async with Server(answer_ok) as server:
        t = transport()
        for _ in range(5):
            status, _, data = await fetch(t, server.url())
            assert (status, data) == (200, b"ok")
        assert server.connections == 1
        assert t.connections() == 1
        await t.aclose()


async def test_head_carries_host_and_headers_as_given_and_no_defaults() -> None:
    async with Server(answer_ok) as server:
        t = transport()
        await fetch(t, server.url("/a%2Fb?q=1"), headers=[(b"X-Thing", b"1"), (b"x-a", b"2")])
        head = server.heads[0]
        assert head.startswith(b"GET /a%2Fb?q=1 HTTP/1.1\r\n")
        assert b"\r\nX-Thing: 1\r\nx-a: 2\r\n" in head
        assert b"host: 127.0.0.1:%d\r\n" % server.port in head
        for invented in (b"user-agent", b"accept", b"content-length", b"transfer-encoding"):
            assert invented not in head.lower()
        await t.aclose()


async def test_a_given_host_header_is_kept() -> None:
    async with Server(answer_ok) as server:
        t = transport()
        await fetch(t, server.url(), headers=[(b"host", b"example.test")])
        assert server.heads[0].lower().count(b"host:") == 1
        assert b"host: example.test\r\n" in server.heads[0]
        await t.aclose()


async def test_connection_close_and_http10_answers_are_not_reused() -> None:
    answers = [ok(b"a", b"Connection: close"), b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb"]

    async def handler(conn: Conn, head: bytes) -> None:
        conn.send(answers[(conn.index - 1) % 2])

    async with Server(handler) as server:
        t = transport()
        assert (await fetch(t, server.url()))[2] == b"a"
        assert (await fetch(t, server.url()))[2] == b"b"
        assert server.connections == 2
        await asyncio.sleep(0.05)
        assert t.connections() == 0
        await t.aclose()


async def test_a_close_delimited_body_is_read_to_the_end_and_not_reused() -> None:
    async with Server(answer_and_close(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")) as server:
        t = transport()
        status, _, data = await fetch(t, server.url())
        assert (status, data) == (200, b"until the end")
        await fetch(t, server.url())
        assert server.connections == 2
        await t.aclose()


async def test_a_body_shorter_than_its_content_length_fails_the_read() -> None:
    short = answer_and_close(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
    async with Server(short) as server:
        t = transport()
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(t, server.url())
        await t.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 10_000 + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk",
    ],
    ids=["not-http", "cr-in-value", "huge-header", "two-lengths"],
)
async def test_bad_answers_raise_protocol_errors(answer: bytes) -> None:
    async def handler(conn: Conn, head: bytes) -> None:
        conn.send(answer)

    async with Server(handler) as server:
        t = transport()
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(t, server.url())
        await t.aclose()


async def test_cancelling_the_wait_aborts_the_upstream_connection() -> None:
    async def never(conn: Conn, head: bytes) -> None:
        await conn.reader.read()  # never answers; returns when the client hangs up

    async with Server(never) as server:
        t = transport()
        task = asyncio.create_task(fetch(t, server.url()))
        await asyncio.sleep(0.2)
        cancelled_at = asyncio.get_running_loop().time()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(50):
            if server.closed:
                break
            await asyncio.sleep(0.01)
        assert server.closed and server.closed[0] - cancelled_at < 0.5
        await t.aclose()


async def test_abandoning_a_body_mid_stream_closes_the_connection() -> None:
    async def endless(conn: Conn, head: bytes) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 1000)

    async with Server(endless) as server:
        t = transport()
        response = await t.open("GET", server.url(), [], None)
        first = await response.body().__anext__()
        assert first.startswith(b"x")
        await response.aclose()
        for _ in range(50):
            if server.closed:
                break
            await asyncio.sleep(0.01)
        assert server.closed
        await t.aclose()


async def test_read_timeout() -> None:
    async def slow(conn: Conn, head: bytes) -> None:
        await conn.reader.read()

    async with Server(slow) as server:
        t = transport(read_timeout=0.2)
        with pytest.raises(httpx.ReadTimeout):
            await fetch(t, server.url())
        await t.aclose()


async def test_connect_error() -> None:
    async with Server(answer_ok) as server:
        port = server.port
    t = transport()
    with pytest.raises(httpx.ConnectError):
        await fetch(t, f"http://127.0.0.1:{port}/")
    assert t.connections() == 0
    await t.aclose()


async def test_max_connections_queues_requests_fifo() -> None:
    release = asyncio.Event()

    async def gated(conn: Conn, head: bytes) -> None:
        await release.wait()
        conn.send(ok())

    async with Server(gated) as server:
        t = transport(max_connections=1)
        tasks = [asyncio.create_task(fetch(t, server.url())) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert server.connections == 1 and len(server.heads) == 1
        release.set()
        results = await asyncio.gather(*tasks)
        assert [r[2] for r in results] == [b"ok"] * 3
        assert server.connections == 1
        await t.aclose()


async def test_a_reused_connection_closed_by_the_upstream_is_retried_once() -> None:
    async def second_request_drops(conn: Conn, head: bytes) -> None:
        if conn.requests == 2:
            conn.writer.transport.abort()  # the keep-alive race
            return
        conn.send(ok())

    async with Server(second_request_drops) as server:
        t = transport()
        assert (await fetch(t, server.url()))[2] == b"ok"
        assert (await fetch(t, server.url()))[2] == b"ok"
        assert server.connections == 2
        await t.aclose()


async def test_bodies_are_framed_by_the_transport() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"ab", b"", b"cde"):
            yield part

    async def sized() -> AsyncIterator[bytes]:
        yield b"12"
        yield b"345"

    async with Server(answer_ok) as server:
        t = transport()
        await fetch(t, server.url(), "POST", body=b"hello")
        await fetch(t, server.url(), "POST", body=chunks())
        await fetch(t, server.url(), "PUT", headers=[(b"content-length", b"5")], body=sized())
        await fetch(t, server.url(), "POST")
        assert server.bodies == [b"hello", b"abcde", b"12345", b""]
        heads = [h.lower() for h in server.heads]
        assert b"content-length: 5\r\n" in heads[0]
        assert b"transfer-encoding: chunked\r\n" in heads[1]
        assert b"transfer-encoding" not in heads[2] and heads[2].count(b"content-length") == 1
        assert b"content-length: 0\r\n" in heads[3]
        assert server.connections == 1
        await t.aclose()


async def test_head_answers_end_at_the_headers() -> None:
    async def handler(conn: Conn, head: bytes) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")

    async with Server(handler) as server:
        t = transport()
        status, headers, data = await fetch(t, server.url(), "HEAD")
        assert (status, data) == (200, b"")
        assert (b"Content-Length", b"1234") in headers
        await t.aclose()


async def test_interim_answers_are_skipped() -> None:
    async def handler(conn: Conn, head: bytes) -> None:
        conn.send(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final"))

    async with Server(handler) as server:
        t = transport()
        assert (await fetch(t, server.url()))[::2] == (200, b"final")
        await t.aclose()


async def test_cr_or_lf_in_a_header_value_is_refused_before_sending() -> None:
    async with Server(answer_ok) as server:
        t = transport()
        with pytest.raises(httpx.LocalProtocolError):
            await fetch(t, server.url(), headers=[(b"x-a", b"1\r\nx-injected: 1")])
        assert server.heads == []
        await t.aclose()


async def test_idle_connections_expire() -> None:
    async with Server(answer_ok) as server:
        t = transport(keepalive_expiry=0.1)
        await fetch(t, server.url())
        assert t.connections() == 1
        await asyncio.sleep(0.4)
        assert t.connections() == 0
        await t.aclose()


async def test_large_bodies_stream_with_flow_control() -> None:
    blob = bytes(range(256)) * 16384  # 4 MiB

    async def big(conn: Conn, head: bytes) -> None:
        conn.send(ok(blob))

    async with Server(big) as server:
        t = transport()
        response = await t.open("GET", server.url(), [], None)
        received = bytearray()
        async for chunk in response.body():
            received += chunk
            await asyncio.sleep(0)
        await response.aclose()
        assert bytes(received) == blob
        await t.aclose()


class Burst:
    """A server whose first answers wait for `burst`: that many requests at once open
    that many connections, all idle together when the answers come."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def handler(self, conn: Conn, head: bytes) -> None:
        await self.release.wait()
        conn.send(ok())

    async def burst(self, t: H1Transport, server: Server, count: int = 3) -> None:
        tasks = [asyncio.create_task(fetch(t, server.url())) for _ in range(count)]
        await asyncio.sleep(0.05)
        self.release.set()
        await asyncio.gather(*tasks)


async def test_idle_connections_over_max_keepalive_are_closed_after_a_moment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(h1, "_OVER_KEEPALIVE_GRACE", 0.1)
    gate = Burst()
    async with Server(gate.handler) as server:
        t = transport(max_keepalive=1)
        await gate.burst(t, server)
        assert t.connections() == 3  # a burst: kept for the requests right behind it
        await asyncio.sleep(0.3)
        assert t.connections() == 1
        await t.aclose()


async def test_a_slot_handed_to_a_waiter_cancelled_in_the_same_tick_is_not_lost() -> None:
    t = transport(max_connections=1)
    pool = t._pool("127.0.0.1:9")
    pool.total = 1  # one connection open: the next acquire waits
    task = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    assert len(pool.waiters) == 1
    pool.total -= 1  # that connection closed (what lost() does)...
    pool._free_slot()  # ...and its slot went to the waiter
    task.cancel()  # whose request is cancelled in the same tick
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.total == 0
    await t.aclose()


async def test_a_second_answer_in_the_same_read_never_joins_the_first() -> None:
    async def two_answers(conn: Conn, head: bytes) -> None:
        conn.send(ok(b"hi") + ok(b"evil!"))

    async with Server(two_answers) as server:
        t = transport()
        assert (await fetch(t, server.url()))[2] == b"hi"
        assert (await fetch(t, server.url()))[2] == b"hi"
        assert server.connections == 2  # the out-of-step connection was not reused
        await t.aclose()


async def test_a_connection_paused_for_a_large_body_reads_again_when_reused() -> None:
    async with Server(answer_ok) as server:
        t = transport(read_timeout=1.0)
        await fetch(t, server.url())
        conn = t._pool(f"127.0.0.1:{server.port}").idle[-1]
        conn._paused = True  # as after a body that crossed the high-water mark and ended
        assert conn.transport is not None
        conn.transport.pause_reading()
        assert (await fetch(t, server.url()))[2] == b"ok"
        assert server.connections == 1
        await t.aclose()


async def test_the_keep_alive_race_is_retried_for_idempotent_methods_only() -> None:
    async def second_request_drops(conn: Conn, head: bytes) -> None:
        if conn.requests == 2:
            conn.writer.transport.abort()
            return
        conn.send(ok())

    async with Server(second_request_drops) as server:
        t = transport()
        await fetch(t, server.url(), "POST", body=b"x")
        with pytest.raises(httpx.HTTPError):
            await fetch(t, server.url(), "POST", body=b"x")
        await t.aclose()


def test_targets_split_at_the_first_slash_question_mark_or_hash() -> None:
    assert h1._split("http://h:1/a?b") == ("h:1", "/a?b")
    assert h1._split("http://h:1?q=1") == ("h:1", "/?q=1")
    assert h1._split("http://h:1") == ("h:1", "/")
    assert h1._split("https://h/") == ("https://h", "/")  # https: this client too, over TLS
    assert h1._split("http://u:p@h/") is None


async def test_an_answer_complete_with_its_head_is_taken_whole() -> None:
    async with Server(answer_ok) as server:
        t = transport()
        response = await t.open("GET", server.url(), [], None)
        assert response.whole() == b"ok"
        assert [chunk async for chunk in response.body()] == []  # taken once
        await response.aclose()
        status, _, data = await fetch(t, server.url())  # the connection was reused
        assert (status, data, server.connections) == (200, b"ok", 1)
        await t.aclose()


async def test_an_answer_still_streaming_is_not_whole() -> None:
    release = asyncio.Event()

    async def slow(conn: Conn, head: bytes) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
        await conn.writer.drain()
        await release.wait()
        conn.send(b"-rest")

    async with Server(slow) as server:
        t = transport()
        response = await t.open("GET", server.url(), [], None)
        assert response.whole() is None
        release.set()
        assert b"".join([chunk async for chunk in response.body()]) == b"first-rest"
        await response.aclose()
        await t.aclose()


async def test_a_failed_answer_is_never_whole() -> None:
    short = answer_and_close(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    async with Server(short) as server:
        t = transport()
        response = await t.open("GET", server.url(), [], None)
        await asyncio.sleep(0.05)  # the close has arrived: the body is cut short
        assert response.whole() is None
        with pytest.raises(httpx.RemoteProtocolError):
            async for _ in response.body():
                pass
        await response.aclose()
        await t.aclose()


async def test_connections_over_max_keepalive_in_use_within_the_grace_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(h1, "_OVER_KEEPALIVE_GRACE", 0.2)
    gate = Burst()
    async with Server(gate.handler) as server:
        t = transport(max_keepalive=1)
        await gate.burst(t, server)
        # Steady traffic on two connections at once, a little past the grace: each
        # goes idle again and again but never for the whole grace, so neither is
        # closed (no connect per request under load); the third was never needed.
        # The trim that runs while both are out finds one idle connection, within
        # max_keepalive, and waits for the next release: on a slow machine that can
        # fall past the 0.35 s, so the traffic goes on until the third is gone.
        loop = asyncio.get_running_loop()
        until = loop.time() + 0.35
        while loop.time() < until or t.connections() > 2:
            assert loop.time() < until + 2.0, "the connection nobody needed was kept"
            await asyncio.gather(fetch(t, server.url()), fetch(t, server.url()))
            await asyncio.sleep(0.02)
        assert t.connections() == 2
        assert server.connections == 3
        await asyncio.sleep(0.35)  # now idle for longer than the grace: down to one
        assert t.connections() == 1
        await t.aclose()
