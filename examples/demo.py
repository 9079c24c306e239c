"""`make run`: the gateway in front of small embedded demo services, no other setup.

Demo upstreams (users on 9001 and 9002, orders on 9003, recommendations on 9004) run
in a background thread; the gateway then serves `config/gateway.yaml` as usual.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = ["build_demo_app", "main"]

USERS = {
    "1": {"id": "1", "name": "Ada Lovelace", "email": "ada@example.com", "plan": "pro"},
    "2": {"id": "2", "name": "Alan Turing", "email": "alan@example.com", "plan": "free"},
}


def build_demo_app(port: int) -> Starlette:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def users(request: Request) -> Response:
        return JSONResponse({"users": list(USERS.values()), "served_by": port})

    async def user(request: Request) -> Response:
        found = USERS.get(request.path_params["user_id"])
        if found is None:
            return JSONResponse({"error": "no such user"}, status_code=404)
        return JSONResponse({**found, "served_by": port})

    async def orders(request: Request) -> Response:
        uid = request.query_params.get("user", "")
        return JSONResponse(
            {"user": uid, "orders": [{"id": f"o-{uid}-1", "total": 42.5}], "served_by": port}
        )

    async def recs(request: Request) -> Response:
        return JSONResponse({"items": ["book", "lamp"], "for": request.path_params["user_id"]})

    async def echo(request: Request) -> Response:
        body = await request.body()
        return JSONResponse(
            {
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "headers": dict(request.headers),
                "body_bytes": len(body),
                "served_by": port,
            }
        )

    async def slow(request: Request) -> Response:
        ms = min(int(request.query_params.get("ms", "1000")), 30_000)
        await asyncio.sleep(ms / 1000)
        return JSONResponse({"slept_ms": ms})

    async def stream(request: Request) -> Response:
        size = min(int(request.query_params.get("bytes", str(1 << 20))), 1 << 30)
        chunk = b"x" * 65536

        async def gen() -> AsyncIterator[bytes]:
            left = size
            while left > 0:
                yield chunk[: min(left, len(chunk))]
                left -= len(chunk)

        return StreamingResponse(gen(), media_type="application/octet-stream")

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/v1/users", users),
            Route("/v1/users/{user_id}", user),
            Route("/orders", orders),
            Route("/recs/{user_id}", recs),
            Route("/slow", slow),
            Route("/stream", stream),
            Route("/echo/{rest:path}", echo, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        ]
    )


class _Quiet(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def start_demo_upstreams(ports: list[int]) -> list[_Quiet]:
    servers = [
        _Quiet(
            uvicorn.Config(
                build_demo_app(p), host="127.0.0.1", port=p, log_level="warning", lifespan="off"
            )
        )
        for p in ports
    ]

    async def serve_all() -> None:
        await asyncio.gather(*(s.serve() for s in servers))

    threading.Thread(target=lambda: asyncio.run(serve_all()), daemon=True).start()
    deadline = time.monotonic() + 10
    while not all(s.started for s in servers):
        if time.monotonic() > deadline:
            raise SystemExit(f"demo upstreams could not start on ports {ports} (in use?)")
        time.sleep(0.05)
    return servers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the gateway with embedded demo upstreams.")
    parser.add_argument("--config", default="config/gateway.yaml")
    parser.add_argument("--ports", default="9001,9002,9003,9004")
    args = parser.parse_args(argv)
    ports = [int(p) for p in args.ports.split(",")]
    start_demo_upstreams(ports)
    print(
        json.dumps({"message": "demo upstreams started", "ports": ports}),
        flush=True,
    )
    from gateway.server import run

    return run(args.config)


if __name__ == "__main__":
    raise SystemExit(main())
