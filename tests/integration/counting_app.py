"""A scriptable upstream for resilience tests: it counts what it sees (requests,
concurrency, health probes) and answers what the test sets, from its own thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from tests.integration.harness import UpstreamServer

__all__ = ["HARNESS_FILE_LEAK", "CountingApp", "route_config"]

# harness.py opens the gateway's stdout/stderr files for Popen and never closes them
# (reported to the lead); ignore exactly that ResourceWarning until it is fixed there.
HARNESS_FILE_LEAK = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <_io.FileIO name='[^']*/gateway-[0-9]+[.](out|err)'"
    ":pytest.PytestUnraisableExceptionWarning"
)

Scope = dict[str, Any]


class CountingApp:
    """ASGI app: `/healthz` answers `health_status`; any other path waits `delay` seconds
    (or `delays[i]` for the i-th request when given) and answers `status` with a body
    naming this app. Counters are read by the test thread; a lock keeps them exact."""

    def __init__(self, name: str = "app", status: int = 200, delay: float = 0.0) -> None:
        self.name = name
        self.status = status
        self.delay = delay
        self.delays: list[float] = []
        self.health_status = 200
        self.requests = 0
        self.methods: list[str] = []
        self.concurrent = 0
        self.max_concurrent = 0
        self.probes: list[int] = []  # the status each health probe was answered with
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        while True:  # drain the request body
            message = await receive()
            if not message.get("more_body"):
                break
        if scope["path"] == "/healthz":
            status = self.health_status
            with self._lock:
                self.probes.append(status)
            await self._answer(send, status, b"health")
            return
        with self._lock:
            index = self.requests
            self.requests += 1
            self.methods.append(scope["method"])
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
            delay = self.delays[index] if index < len(self.delays) else self.delay
            status = self.status
        try:
            if delay:
                await asyncio.sleep(delay)
        finally:
            with self._lock:
                self.concurrent -= 1
        await self._answer(send, status, f"{self.name} says {status}".encode())

    @staticmethod
    async def _answer(send: Any, status: int, body: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-upstream-own", b"yes"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def route_config(
    targets: list[str | dict[str, Any]] | UpstreamServer,
    *,
    timeout: str = "5s",
    retry_non_idempotent: bool = False,
    **upstream: Any,
) -> dict[str, Any]:
    """One upstream `svc` and one route `/api/{rest}` -> `/{rest}` on it."""
    if isinstance(targets, UpstreamServer):
        targets = [targets.url]
    route: dict[str, Any] = {
        "name": "api",
        "path": "/api/{rest:path}",
        "rewrite": "/{rest}",
        "upstream": "svc",
        "timeout": timeout,
    }
    if retry_non_idempotent:
        route["retry_non_idempotent"] = True
    return {
        "server": {"access_log": False, "log_level": "warning"},
        "upstreams": {"svc": {"targets": targets, **upstream}},
        "routes": [route],
    }
