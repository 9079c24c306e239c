"""Small upstream apps for the hardening tests; each records what reached it."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.harness import GatewayProcess, UpstreamServer

__all__ = ["RecordingApp", "RecordingEnv", "recording_gateway"]


class RecordingApp:
    """Answers 200 with a JSON echo of what it received (method, path, query, headers,
    body length), and records each request. `/stream?n=BYTES` streams a long body;
    `/slow?s=SECONDS` waits first."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.seen)

    def paths(self) -> list[str]:
        with self._lock:
            return [r["path"] for r in self.seen]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        record = {
            "method": scope["method"],
            "path": scope["raw_path"].decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "body_length": len(body),
            "body": body[:256].decode("latin-1"),
        }
        with self._lock:
            self.seen.append(record)
        query = dict(p.split("=", 1) for p in record["query"].split("&") if "=" in p)
        if scope["path"] == "/slow":
            await asyncio.sleep(float(query.get("s", "1")))
        if scope["path"] == "/stream":
            total = int(query.get("n", str(1 << 20)))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            piece = b"x" * 16384
            sent = 0
            while sent < total:
                part = piece[: total - sent]
                sent += len(part)
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        payload = json.dumps(record).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


@dataclass
class RecordingEnv:
    gw: GatewayProcess
    app: RecordingApp


@contextmanager
def recording_gateway(folder: Path, methods: list[str] | None = None) -> Iterator[RecordingEnv]:
    """A gateway whose one route sends every path (for `methods`, default all) to a
    `RecordingApp`."""
    app = RecordingApp()
    route: dict[str, Any] = {"name": "all", "path": "/{rest:path}", "upstream": "app"}
    if methods is not None:
        route["methods"] = methods
    with UpstreamServer(app) as up:
        config = {"upstreams": {"app": {"targets": [up.url]}}, "routes": [route]}
        with GatewayProcess(config, folder) as gw:
            yield RecordingEnv(gw, app)
