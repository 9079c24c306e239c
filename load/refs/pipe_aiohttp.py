"""The mature pipe: a pure ASGI callable on uvicorn + one aiohttp `ClientSession`.

No framework, no routing, no policies: each request goes to the upstream as it came
(hop-by-hop headers dropped, body streamed both ways, no decompression, no redirects).
It is what a bare Python proxy on aiohttp can do, the reference the gateway's own
aiohttp path is compared with.

    BENCH_UPSTREAM=http://127.0.0.1:8000 PYTHONPATH=load uvicorn refs.pipe_aiohttp:app --port 8002
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
from yarl import URL

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:8000")
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    }
)
HOP_BY_HOP_STR = frozenset(h.decode() for h in HOP_BY_HOP)
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


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


class Pipe:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=1024, keepalive_timeout=30),
                    auto_decompress=False,
                    skip_auto_headers=SKIP_AUTO_HEADERS,
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["type"] != "http" or self.session is None:
            return
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        target = scope.get("raw_path") or scope["path"].encode()
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        url = URL(self.upstream + target.decode("latin-1"), encoded=True)
        headers = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in raw if k not in HOP_BY_HOP
        ]
        data = request_body(receive) if has_body(raw) else None
        async with self.session.request(
            scope["method"], url, headers=headers, data=data, allow_redirects=False
        ) as response:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [
                        (k, v) for k, v in response.raw_headers if k.lower() not in HOP_BY_HOP
                    ],
                }
            )
            content = response.content
            while chunk := await content.readany():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


app = Pipe(UPSTREAM)
