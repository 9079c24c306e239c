"""Bodies stream both ways through the real gateway process with bounded memory, and
a slow upstream's first bytes reach the client before the upstream has finished."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from tests.integration.harness import GatewayProcess, UpstreamServer

MiB = 1024 * 1024
CHUNK = bytes(range(256)) * 4096  # 1 MiB, reused: the upstream never holds a body
RSS_BUDGET = 100 * MiB


async def stream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    path = scope["path"]
    query = parse_qs(scope["query_string"].decode())
    if path == "/download":
        # `?size=` bytes, generated chunk by chunk, without Content-Length (chunked)
        size = int(query["size"][0])
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        sent = 0
        while sent < size:
            piece = CHUNK if size - sent >= len(CHUNK) else CHUNK[: size - sent]
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            sent += len(piece)
        await send({"type": "http.response.body", "body": b""})
    elif path == "/upload":
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            received += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = dict(scope["headers"])
        te = headers.get(b"transfer-encoding", b"-")
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"x-upstream-te", te)]}
        )
        await send({"type": "http.response.body", "body": str(received).encode()})
    elif path == "/slow-reader":
        # takes its time before reading the body: the gateway must not buffer meanwhile
        await asyncio.sleep(1.0)
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            received += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(received).encode()})
    elif path == "/dies":
        # `?length=1` announces a Content-Length; otherwise chunked. Dies after 1 MiB.
        await receive()
        framing = [(b"content-length", str(4 * MiB).encode())] if "length" in query else []
        await send({"type": "http.response.start", "status": 200, "headers": framing})
        await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await asyncio.sleep(0.1)
        raise RuntimeError("upstream crashed mid-body (expected by the test)")
    elif path == "/slow":
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first;", "more_body": True})
        await asyncio.sleep(1.0)
        await send({"type": "http.response.body", "body": b"second", "more_body": False})
    else:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    up = UpstreamServer(stream_app).start()
    config = {
        "server": {"max_body_size": "100MiB", "access_log": False},
        "upstreams": {"files": {"targets": [up.url], "read_timeout": "10s"}},
        "routes": [
            {"name": "files", "path": "/{rest:path}", "upstream": "files", "timeout": "30s"}
        ],
    }
    gateway = GatewayProcess(config, tmp_path_factory.mktemp("streaming")).start()
    try:
        yield gateway
    finally:
        gateway.stop()
        up.stop()
    assert "Traceback" not in gateway.stderr, gateway.stderr


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RssWatch:
    """Samples a process's RSS in a thread while a transfer runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = rss(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def pid_of(gw: GatewayProcess) -> int:
    assert gw.proc is not None
    return gw.proc.pid


def warm_up(client: httpx.Client) -> None:
    # Let pools, buffers and lazily imported code settle before the baseline is taken.
    for _ in range(2):
        assert len(client.get("/download", params={"size": 8 * MiB}).content) == 8 * MiB
        assert client.post("/upload", content=b"w" * MiB).text == str(MiB)


def test_large_download_streams_with_bounded_memory(gw: GatewayProcess) -> None:
    size = 300 * MiB
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        warm_up(client)
        received = 0
        first = b""
        with RssWatch(pid_of(gw)) as watch:
            with client.stream("GET", "/download", params={"size": size}) as response:
                assert response.status_code == 200
                assert "content-length" not in response.headers
                for chunk in response.iter_raw(256 * 1024):
                    if not first:
                        first = chunk[:256]
                    received += len(chunk)
        assert received == size
        assert first == bytes(range(256))[: len(first)]
        assert watch.growth < RSS_BUDGET, f"gateway RSS grew by {watch.growth / MiB:.1f} MiB"


def test_chunked_upload_streams_with_bounded_memory(gw: GatewayProcess) -> None:
    size = 50 * MiB
    piece = b"u" * (256 * 1024)

    def body() -> Iterator[bytes]:
        for _ in range(size // len(piece)):
            yield piece

    with httpx.Client(base_url=gw.url, timeout=30) as client:
        warm_up(client)
        with RssWatch(pid_of(gw)) as watch:
            response = client.post("/upload", content=body())
        assert response.status_code == 200
        assert response.text == str(size)
        assert response.headers["x-upstream-te"] == "chunked"  # streamed on, not buffered
        assert watch.growth < RSS_BUDGET, f"gateway RSS grew by {watch.growth / MiB:.1f} MiB"


def test_upload_with_content_length_streams_with_bounded_memory(gw: GatewayProcess) -> None:
    size = 50 * MiB

    class Sized:
        def __iter__(self) -> Iterator[bytes]:
            piece = b"s" * (256 * 1024)
            for _ in range(size // len(piece)):
                yield piece

    with httpx.Client(base_url=gw.url, timeout=30) as client:
        warm_up(client)
        with RssWatch(pid_of(gw)) as watch:
            response = client.post(
                "/upload", content=iter(Sized()), headers={"content-length": str(size)}
            )
        assert response.status_code == 200
        assert response.text == str(size)
        assert response.headers["x-upstream-te"] == "-"  # its Content-Length was kept
        assert watch.growth < RSS_BUDGET, f"gateway RSS grew by {watch.growth / MiB:.1f} MiB"


def test_first_bytes_of_a_slow_stream_arrive_before_the_upstream_finishes(
    gw: GatewayProcess,
) -> None:
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        start = time.monotonic()
        with client.stream("GET", "/slow") as response:
            assert response.status_code == 200
            chunks = response.iter_raw()
            first = next(chunks)
            first_at = time.monotonic() - start
            rest = b"".join(chunks)
        total = time.monotonic() - start
    assert first.startswith(b"first;")
    assert first + rest == b"first;second"
    assert first_at < 0.5, first_at
    assert total >= 0.9, total


def test_many_small_chunks_arrive_in_order(gw: GatewayProcess) -> None:
    size = 3 * MiB + 12345  # not a whole number of chunks
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        body = client.get("/download", params={"size": size}).content
    assert len(body) == size
    assert body[: 3 * MiB] == CHUNK * 3
    assert body[3 * MiB :] == CHUNK[:12345]


def test_a_slow_client_does_not_make_the_gateway_buffer(gw: GatewayProcess) -> None:
    size = 200 * MiB
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        warm_up(client)
        received = 0
        with RssWatch(pid_of(gw)) as watch:
            with client.stream("GET", "/download", params={"size": size}) as response:
                chunks = response.iter_raw(64 * 1024)
                received += len(next(chunks))
                time.sleep(1.5)  # the upstream could push everything in this time
                for chunk in chunks:
                    received += len(chunk)
        assert received == size
        assert watch.growth < RSS_BUDGET, f"gateway RSS grew by {watch.growth / MiB:.1f} MiB"


def test_a_slow_upstream_reader_does_not_make_the_gateway_buffer(gw: GatewayProcess) -> None:
    size = 50 * MiB
    piece = b"r" * (256 * 1024)

    def body() -> Iterator[bytes]:
        for _ in range(size // len(piece)):
            yield piece

    with httpx.Client(base_url=gw.url, timeout=30) as client:
        warm_up(client)
        with RssWatch(pid_of(gw)) as watch:
            response = client.post("/slow-reader", content=body())
        assert response.status_code == 200
        assert response.text == str(size)
        assert watch.growth < RSS_BUDGET, f"gateway RSS grew by {watch.growth / MiB:.1f} MiB"


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_an_upstream_dying_mid_body_is_not_a_silent_truncation(
    gw: GatewayProcess, framing: str
) -> None:
    params = {"length": "1"} if framing == "content-length" else {}
    received = 0
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            with client.stream("GET", "/dies", params=params) as response:
                assert response.status_code == 200
                for chunk in response.iter_raw():
                    received += len(chunk)
        assert received <= MiB
        # the gateway itself carries on
        assert len(client.get("/download", params={"size": 1000}).content) == 1000
