"""The fast pipe: a pure ASGI callable on granian (ASGI interface) + `pyreqwest`.

The same bare proxy as `pipe_aiohttp`, with the upstream pool in Rust (pyreqwest wraps
reqwest/hyper): the connection handling, parsing and pooling happen off the Python
thread, which is why it is the ceiling a Python gateway is held to (load/README.md).

    PYTHONPATH=load BENCH_UPSTREAM=http://127.0.0.1:8000 granian --interface asgi \\
        refs.pipe_pyreqwest:app --port 8003
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from pyreqwest.client import Client, ClientBuilder

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:8000")
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)


def has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return True
    return False


async def request_body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("client went away")
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def build_client() -> Client:
    return (
        ClientBuilder()
        .gzip(False)
        .brotli(False)
        .zstd(False)
        .deflate(False)
        .follow_redirects(False)
        .referer(False)
        .pool_max_idle_per_host(1024)
        .http1_lower_case_headers()
        .build()
    )


class Pipe:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.client: Client | None = None

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client = build_client()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["type"] != "http" or self.client is None:
            return
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        target = scope.get("raw_path") or scope["path"].encode()
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        builder = self.client.request(scope["method"], self.upstream + target.decode("latin-1"))
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]
        builder = builder.headers([(k, v) for k, v in headers if k not in HOP_BY_HOP])
        if has_body(raw):
            builder = builder.body_stream(request_body(receive))
        async with builder.build_streamed() as response:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [
                        (k.encode("latin-1"), v.encode("latin-1"))
                        for k, v in response.headers.items()
                        if k not in HOP_BY_HOP
                    ],
                }
            )
            reader = response.body_reader
            while (chunk := await reader.read_chunk()) is not None:
                await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


app = Pipe(UPSTREAM)
