"""A tiny OTLP/HTTP trace collector for the bench: accepts exports, counts spans.

    python load/collector.py --port 4318

`POST {prefix}/v1/traces` (any prefix: each gateway under test gets its own, so its
spans are counted apart) reads the body, counts the spans in it and answers 200 with
an empty `ExportTraceServiceResponse` (an empty protobuf body is a valid one).
`GET /stats` answers `{prefix: {exports, spans, bytes}}` as JSON. Plain asyncio
protocols on uvloop when installed, HTTP/1.1 keep-alive, bodies by Content-Length or
chunked, gzip or deflate as the exporter may send them. Counting decodes the request
with opentelemetry-proto's generated classes (upb, in C) when they are installed (the
dev extras); without them `spans` stays null and only exports and bytes are counted.
Everything stays in memory: a few counters, no span is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import zlib
from collections.abc import Callable
from typing import Any

try:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
except ImportError:  # no dev extras: count exports and bytes only
    ExportTraceServiceRequest = None

__all__ = ["Stats", "count_spans", "main"]

TRACES = "/v1/traces"
MAX_HEAD = 64 * 1024
MAX_BODY = 64 << 20


def count_spans(body: bytes) -> int | None:
    """The spans in one `ExportTraceServiceRequest`; None when it cannot be decoded."""
    if ExportTraceServiceRequest is None:
        return None
    try:
        request = ExportTraceServiceRequest.FromString(body)
    except Exception:  # a body that is not the message: not counted
        return None
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


class Stats:
    """Counters per path prefix: exports, spans (None when not decodable) and bytes."""

    def __init__(self) -> None:
        self.by_prefix: dict[str, dict[str, Any]] = {}

    def add(self, prefix: str, body: bytes) -> None:
        entry = self.by_prefix.setdefault(prefix, {"exports": 0, "spans": 0, "bytes": 0})
        entry["exports"] += 1
        entry["bytes"] += len(body)
        spans = count_spans(body)
        if spans is None or entry["spans"] is None:
            entry["spans"] = None
        else:
            entry["spans"] += spans

    def as_json(self) -> bytes:
        return json.dumps(self.by_prefix).encode()


def _decode(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return zlib.decompress(body, 16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: requests one after the other, answered in order."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and self._one():
            pass

    def _one(self) -> bool:
        """Handle the first complete request in the buffer; False when there is none."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._answer(431, b"", close=True)
            return False
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ", 2)
        except ValueError:
            self._answer(400, b"", close=True)
            return False
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body, used = self._chunked(start)
            if body is None:
                return False
        else:
            length = int(headers.get("content-length") or 0)
            if length > MAX_BODY:
                self._answer(413, b"", close=True)
                return False
            if len(self.buffer) < start + length:
                return False
            body, used = bytes(self.buffer[start : start + length]), start + length
        del self.buffer[:used]
        close = headers.get("connection", "").lower() == "close"
        path = target.split("?", 1)[0]
        if method == "POST" and path.endswith(TRACES):
            try:
                payload = _decode(body, headers.get("content-encoding", "").lower())
            except zlib.error:
                self._answer(400, b"", close=close)
                return True
            self.stats.add(path.removesuffix(TRACES) or "/", payload)
            self._answer(200, b"", close=close, kind=b"application/x-protobuf")
        elif method == "GET" and path == "/stats":
            self._answer(200, self.stats.as_json(), close=close, kind=b"application/json")
        else:
            self._answer(404, b"", close=close)
        return True

    def _chunked(self, start: int) -> tuple[bytes | None, int]:
        """(body, bytes used) of a complete chunked body from `start`, or (None, 0)."""
        body = bytearray()
        at = start
        while True:
            eol = self.buffer.find(b"\r\n", at)
            if eol < 0:
                return None, 0
            size = int(bytes(self.buffer[at:eol]).split(b";", 1)[0], 16)
            at = eol + 2
            if size == 0:
                trailer_end = self.buffer.find(b"\r\n\r\n", at - 2)
                return (None, 0) if trailer_end < 0 else (bytes(body), trailer_end + 4)
            if len(self.buffer) < at + size + 2:
                return None, 0
            body += self.buffer[at : at + size]
            at += size + 2

    def _answer(self, status: int, body: bytes, *, close: bool, kind: bytes = b"") -> None:
        assert self.transport is not None
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"Error")
        head = b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n" % (status, reason, len(body))
        if kind:
            head += b"Content-Type: " + kind + b"\r\n"
        if close:
            head += b"Connection: close\r\n"
        self.transport.write(head + b"\r\n" + body)
        if close:
            self.transport.close()
            self.transport = None


async def serve(host: str, port: int, ready: Callable[[], None] | None = None) -> None:
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(stats), host, port, backlog=1024)
    if ready is not None:
        ready()
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args(argv)
    run: Callable[[Any], None] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        run = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
