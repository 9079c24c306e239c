"""A WebSocket close is relayed, not answered: the real gateway between a raw upstream
and a client, where each end chooses its own answer to the other's close (the
`websockets` library always echoes, which would hide who answered). The answer a side
gets must be the other side's, never one the gateway made up; an invalid close frame
fails the connection exactly as a direct server does."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.utils import accept_key

from gateway.dataplane.websocket import answer_close_later
from tests.integration.harness import GatewayProcess, UpstreamServer
from tests.integration.test_websocket import Seen, make_app

WITHIN = 2.0  # seconds for any one step; each test takes well under 3 s

# Raw frames, as either end writes and reads them.


def frame(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    head = bytes([0x80 | opcode])
    size = len(payload)
    bit = 0x80 if masked else 0
    if size < 126:
        head += bytes([bit | size])
    elif size < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: str = "") -> bytes:
    """A close frame's payload, any code at all (even one that may not be sent)."""
    return struct.pack("!H", code) + reason.encode()


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await reader.readexactly(2)
    size = second & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", await reader.readexactly(2))
    elif size == 127:
        (size,) = struct.unpack("!Q", await reader.readexactly(8))
    mask = await reader.readexactly(4) if second & 0x80 else b""
    data = await reader.readexactly(size)
    if mask:
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    return first & 0x0F, data


async def read_close(reader: asyncio.StreamReader) -> tuple[int, str]:
    """The next close frame's code and reason (1005 for an empty one); data frames
    before it are skipped."""
    while True:
        opcode, data = await asyncio.wait_for(read_frame(reader), WITHIN)
        if opcode == Opcode.CLOSE:
            close = Close.parse(data)
            return close.code, close.reason


async def at_eof(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), WITHIN) == b""
    except (ConnectionError, TimeoutError):
        return False


# A raw upstream: per path, what it does with closes, and what it saw.


class RawUpstream:
    """`/answer/<key>`: answers the gateway's close with 4002 "ok" after 200 ms.
    `/answer-empty/<key>`: answers the gateway's close with a close frame without a code.
    `/first/<key>`: sends "last words", closes with 4003 "gone", waits for the answer.
    `/first-empty/<key>`: closes with a close frame without a code, waits for the answer.
    `/bad/<key>`: closes with code 1005 (which may not be sent), waits for the answer.
    What it received is recorded as `read_close` reads it: (1005, "") is an empty close
    frame (a 1005 on the wire would not parse). It runs on an event loop of its own, in
    a thread, for the whole module."""

    def __init__(self) -> None:
        self.closes: dict[str, tuple[int, str]] = {}  # what it received, per key
        self._seen: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        start = asyncio.start_server(self._serve, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(WITHIN)
        self.port: int = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WITHIN)
        self._loop.close()

    def event(self, key: str) -> threading.Event:
        with self._lock:
            return self._seen.setdefault(key, threading.Event())

    async def received(self, key: str) -> tuple[int, str]:
        if not await asyncio.to_thread(self.event(key).wait, WITHIN):
            raise AssertionError(f"the upstream saw no close on {key!r}")
        return self.closes[key]

    def _saw(self, key: str, close: tuple[int, str]) -> None:
        self.closes[key] = close
        self.event(key).set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            path = head.split(" ", 2)[1]
            headers = dict(
                (name.strip().lower(), value.strip())
                for name, _, value in (line.partition(":") for line in head.split("\r\n")[1:])
            )
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                + accept_key(headers["sec-websocket-key"]).encode()
                + b"\r\n\r\n"
            )
            _, mode, key = path.split("/", 2)
            if mode == "first":
                writer.write(frame(Opcode.TEXT, b"last words", masked=False))
                writer.write(frame(Opcode.CLOSE, close_payload(4003, "gone"), masked=False))
                self._saw(key, await read_close(reader))
            elif mode == "first-empty":
                writer.write(frame(Opcode.CLOSE, b"", masked=False))
                self._saw(key, await read_close(reader))
            elif mode == "answer-empty":
                self._saw(key, await read_close(reader))
                writer.write(frame(Opcode.CLOSE, b"", masked=False))
            elif mode == "bad":
                writer.write(frame(Opcode.CLOSE, close_payload(1005), masked=False))
                self._saw(key, await read_close(reader))
            else:
                self._saw(key, await read_close(reader))
                await asyncio.sleep(0.2)  # the client must wait for this answer
                writer.write(frame(Opcode.CLOSE, close_payload(4002, "ok"), masked=False))
        finally:
            writer.close()


def config(target: str) -> dict[str, Any]:
    return {
        "upstreams": {"up": {"targets": [target]}},
        "routes": [{"name": "ws", "path": "/{rest:path}", "upstream": "up", "timeout": "3s"}],
    }


@pytest.fixture(scope="module")
def relayed(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RawUpstream, GatewayProcess]]:
    """One raw upstream and one gateway in front of it for the module (each test uses
    keys of its own). On the way out the gateway must have logged no traceback."""
    upstream = RawUpstream()
    gw = GatewayProcess(config(f"http://127.0.0.1:{upstream.port}"), tmp_path_factory.mktemp("gw"))
    try:
        gw.start()
        yield upstream, gw
        gw.stop()
        for bad in ("Traceback", "Task was destroyed", "ResourceWarning", "never awaited"):
            assert bad not in gw.stderr, gw.stderr
    finally:
        gw.stop()
        upstream.stop()


def ws_url(gw: GatewayProcess, path: str) -> str:
    return "ws" + gw.url.removeprefix("http") + path


@asynccontextmanager
async def raw_client(
    port: int, path: str
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client that writes its own frames, the bad ones included."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
    assert head.startswith(b"HTTP/1.1 101"), head
    try:
        yield reader, writer
    finally:
        writer.close()


# The client closes first.


async def test_client_close_goes_upstream_and_the_upstream_answer_comes_back(
    relayed: tuple[RawUpstream, GatewayProcess],
) -> None:
    upstream, gw = relayed
    async with connect(ws_url(gw, "/answer/a"), proxy=None, open_timeout=WITHIN) as ws:
        await ws.close(4001, "bye")
        # The answer is the upstream's, not the client's own close echoed back.
        assert (ws.close_code, ws.close_reason) == (4002, "ok")
    assert await upstream.received("a") == (4001, "bye")


async def test_the_client_close_is_answered_only_after_the_upstream_answered(
    relayed: tuple[RawUpstream, GatewayProcess],
) -> None:
    upstream, gw = relayed
    async with raw_client(gw.port, "/answer/b") as (reader, writer):
        writer.write(frame(Opcode.CLOSE, close_payload(4001, "bye"), masked=True))
        answer = asyncio.ensure_future(read_close(reader))
        assert await upstream.received("b") == (4001, "bye")
        assert not answer.done()  # the upstream takes 200 ms to answer
        assert await answer == (4002, "ok")
        assert await at_eof(reader)  # and then the gateway closes the TCP connection


EMPTY = (1005, "")  # how `read_close` reads a close frame without a code


async def test_a_client_close_without_a_code_reaches_the_upstream_without_one(
    relayed: tuple[RawUpstream, GatewayProcess],
) -> None:
    upstream, gw = relayed
    async with raw_client(gw.port, "/answer/c") as (reader, writer):
        writer.write(frame(Opcode.CLOSE, b"", masked=True))
        assert await read_close(reader) == (4002, "ok")
    assert await upstream.received("c") == EMPTY


async def test_a_close_without_a_code_is_answered_without_one_as_a_direct_server_does(
    relayed: tuple[RawUpstream, GatewayProcess],
    upstream: Callable[..., UpstreamServer],
) -> None:
    """Autobahn 7.3.1: an empty close frame is answered with an empty close frame. Through
    the gateway, that answer is the upstream's own, relayed as it came."""
    raw, gw = relayed
    direct = upstream(make_app(Seen()))
    for port, path in ((direct.port, "/ws/echo/x"), (gw.port, "/answer-empty/h")):
        async with raw_client(port, path) as (reader, writer):
            writer.write(frame(Opcode.CLOSE, b"", masked=True))
            assert await asyncio.wait_for(read_frame(reader), WITHIN) == (Opcode.CLOSE, b"")
            assert await at_eof(reader)
    assert await raw.received("h") == EMPTY


async def test_an_upstream_answer_without_a_code_reaches_the_client_without_one(
    relayed: tuple[RawUpstream, GatewayProcess],
) -> None:
    upstream, gw = relayed
    async with raw_client(gw.port, "/answer-empty/i") as (reader, writer):
        writer.write(frame(Opcode.CLOSE, close_payload(4001, "bye"), masked=True))
        assert await asyncio.wait_for(read_frame(reader), WITHIN) == (Opcode.CLOSE, b"")
        assert await at_eof(reader)
    assert await upstream.received("i") == (4001, "bye")


@pytest.mark.parametrize("abort", [False, True], ids=["fin", "reset"])
async def test_a_client_that_drops_the_connection_reaches_the_upstream_as_going_away(
    relayed: tuple[RawUpstream, GatewayProcess], abort: bool
) -> None:
    upstream, gw = relayed
    key = f"j-{abort}"
    async with raw_client(gw.port, f"/answer/{key}") as (_, writer):
        writer.write(frame(Opcode.TEXT, b"hello", masked=True))
        await writer.drain()
        if abort:
            writer.transport.abort()
    # No close frame at all: 1001, never a close frame without a code.
    assert await upstream.received(key) == (1001, "")


# The upstream closes first.


async def test_upstream_close_reaches_the_client_and_the_client_answer_goes_back(
    relayed: tuple[RawUpstream, GatewayProcess],
) -> None:
    upstream, gw = relayed
    async with raw_client(gw.port, "/first/d") as (reader, writer):
        assert await read_close(reader) == (4003, "gone")
        await asyncio.sleep(0.1)
        assert not upstream.event("d").is_set()  # the upstream waits for the client
        writer.write(frame(Opcode.CLOSE, close_payload(4004, "later"), masked=True))
        assert await at_eof(reader)
    assert await upstream.received("d") == (4004, "later")


@pytest.mark.parametrize(
    "answer, expected",
    [(b"", EMPTY), (close_payload(4004, "later"), (4004, "later"))],
    ids=["empty answer", "answer with a code"],
)
async def test_an_upstream_close_without_a_code_reaches_the_client_without_one(
    relayed: tuple[RawUpstream, GatewayProcess], answer: bytes, expected: tuple[int, str]
) -> None:
    upstream, gw = relayed
    key = f"k-{answer.hex()}"
    async with raw_client(gw.port, f"/first-empty/{key}") as (reader, writer):
        assert await asyncio.wait_for(read_frame(reader), WITHIN) == (Opcode.CLOSE, b"")
        writer.write(frame(Opcode.CLOSE, answer, masked=True))
        assert await at_eof(reader)
    assert await upstream.received(key) == expected


async def test_a_client_answer_without_a_code_reaches_the_upstream_without_one(
    relayed: tuple[RawUpstream, GatewayProcess],
) -> None:
    upstream, gw = relayed
    async with raw_client(gw.port, "/first/l") as (reader, writer):
        assert await read_close(reader) == (4003, "gone")
        writer.write(frame(Opcode.CLOSE, b"", masked=True))
        assert await at_eof(reader)
    assert await upstream.received("l") == EMPTY


async def test_a_client_that_drops_instead_of_answering_reaches_the_upstream_as_going_away(
    relayed: tuple[RawUpstream, GatewayProcess],
) -> None:
    upstream, gw = relayed
    async with raw_client(gw.port, "/first/m") as (reader, _):
        assert await read_close(reader) == (4003, "gone")
    assert await upstream.received("m") == (1001, "")


async def test_upstream_close_with_a_library_client_that_echoes(
    relayed: tuple[RawUpstream, GatewayProcess],
) -> None:
    upstream, gw = relayed
    async with connect(ws_url(gw, "/first/e"), proxy=None, open_timeout=WITHIN) as ws:
        assert await asyncio.wait_for(ws.recv(), WITHIN) == "last words"  # before the close
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), WITHIN)
        assert (ws.close_code, ws.close_reason) == (4003, "gone")
    assert await upstream.received("e") == (4003, "gone")


# Invalid close frames from the client fail the connection as a direct server does.

BAD_CLOSES = {
    "code 1005 on the wire": (close_payload(1005), 1002),
    "code 999": (close_payload(999), 1002),
    "code 1015 on the wire": (close_payload(1015), 1002),
    "a one-byte payload": (b"\x03", 1002),
    "a reason that is not UTF-8": (close_payload(1000) + b"\xff\xfe", 1007),
}


@pytest.mark.parametrize("payload, expected", BAD_CLOSES.values(), ids=BAD_CLOSES.keys())
async def test_an_invalid_close_frame_fails_the_connection_as_a_direct_server_does(
    relayed: tuple[RawUpstream, GatewayProcess],
    upstream: Callable[..., UpstreamServer],
    payload: bytes,
    expected: int,
) -> None:
    raw, gw = relayed
    direct = upstream(make_app(Seen()))
    key = f"f{expected}-{payload.hex()}"
    answers = []
    for port, path in ((direct.port, "/ws/echo/x"), (gw.port, f"/answer/{key}")):
        async with raw_client(port, path) as (reader, writer):
            writer.write(frame(Opcode.CLOSE, payload, masked=True))
            answers.append((await read_close(reader))[0])
            assert await at_eof(reader)
    assert answers == [expected, expected]
    assert (await raw.received(key))[0] == expected  # and the upstream is told


async def test_an_invalid_close_frame_from_the_upstream_fails_its_connection(
    relayed: tuple[RawUpstream, GatewayProcess],
) -> None:
    upstream, gw = relayed
    async with connect(ws_url(gw, "/bad/g"), proxy=None, open_timeout=WITHIN) as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), WITHIN)
        assert ws.close_code == 1014  # Bad Gateway
    assert (await upstream.received("g"))[0] == 1002


# The sans-I/O piece both hops use, on its own.


def _open_server() -> ServerProtocol:
    protocol = ServerProtocol(state=State.OPEN)
    answer_close_later(protocol)
    return protocol


def state(protocol: ServerProtocol) -> State:
    return protocol.state  # (read afresh: each step changes it)


def test_a_close_frame_is_reported_and_left_unanswered() -> None:
    protocol = _open_server()
    protocol.receive_data(frame(Opcode.CLOSE, close_payload(4001, "bye"), masked=True))
    events = protocol.events_received()
    assert [e.opcode for e in events if isinstance(e, Frame)] == [Opcode.CLOSE]
    assert protocol.close_rcvd == Close(4001, "bye")
    assert protocol.data_to_send() == []  # no echo
    assert state(protocol) is State.OPEN
    protocol.receive_data(frame(Opcode.TEXT, b"late", masked=True))
    assert protocol.events_received() == []  # discarded after the close
    protocol.send_close(4002, "ok")
    sent = protocol.data_to_send()
    assert sent[0] == frame(Opcode.CLOSE, close_payload(4002, "ok"), masked=False)
    assert sent[1:] == [b""]  # and EOF: the server closes the TCP connection
    assert state(protocol) is State.CLOSING
    assert protocol.close_sent == Close(4002, "ok")
    assert protocol.close_rcvd_then_sent is True
    protocol.receive_eof()
    assert state(protocol) is State.CLOSED
    assert protocol.close_code == 4001


def test_a_close_without_a_code_can_be_answered_without_one() -> None:
    protocol = _open_server()
    protocol.receive_data(frame(Opcode.CLOSE, b"", masked=True))
    protocol.send_close(None)
    assert protocol.data_to_send()[0] == frame(Opcode.CLOSE, b"", masked=False)


def test_an_invalid_close_frame_still_fails_the_connection() -> None:
    protocol = _open_server()
    protocol.receive_data(frame(Opcode.CLOSE, close_payload(1005), masked=True))
    assert protocol.data_to_send()[0][2:4] == struct.pack("!H", 1002)
    assert protocol.state is State.CLOSING


def test_only_the_plain_protocol_classes_are_converted() -> None:
    protocol = _open_server()
    with pytest.raises(TypeError):
        answer_close_later(protocol)  # already converted: a subclass, refused
