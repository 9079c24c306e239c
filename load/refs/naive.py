"""The naive proxy: Starlette + one `httpx.AsyncClient` on its default transport.

What a first version of a Python gateway usually looks like, kept as the floor the
gateway is measured against: a catch-all route that reads the request body, sends it
with `client.request`, reads the whole answer and returns it; and `/profile/{id}`, the
naive fan-out, three `client.get` calls under `asyncio.gather` merged into one JSON.

    BENCH_UPSTREAM=http://127.0.0.1:8000 PYTHONPATH=load uvicorn refs.naive:app --port 8001
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:8000")
# Headers that describe one connection, not the message: never forwarded.
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
        "content-length",
        "content-encoding",
    }
)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with httpx.AsyncClient(base_url=UPSTREAM) as client:
        app.state.client = client
        yield


async def proxy(request: Request) -> Response:
    client: httpx.AsyncClient = request.app.state.client
    headers = [(k, v) for k, v in request.headers.items() if k not in HOP_BY_HOP]
    upstream = await client.request(
        request.method,
        request.url.path,
        params=request.url.query,
        headers=headers,
        content=await request.body(),
    )
    out = {k: v for k, v in upstream.headers.items() if k not in HOP_BY_HOP}
    return Response(upstream.content, status_code=upstream.status_code, headers=out)


async def profile(request: Request) -> Response:
    client: httpx.AsyncClient = request.app.state.client
    uid = request.path_params["user_id"]
    user, orders, recs = await asyncio.gather(
        client.get(f"/users/{uid}"),
        client.get("/orders", params={"user": uid}),
        client.get(f"/recs/{uid}"),
    )
    return JSONResponse({"user": user.json(), "orders": orders.json(), "recs": recs.json()})


app = Starlette(
    routes=[
        Route("/profile/{user_id}", profile),
        Route("/{path:path}", proxy, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]),
    ],
    lifespan=lifespan,
)
