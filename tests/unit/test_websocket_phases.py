"""WebSocket upgrades go through the phases plain requests do: the deadline from
X-Request-Timeout-Ms, the upstream's circuit breaker, error enrichment and the one
logging phase (the status board and the access log)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from gateway.build.factory import build_runtime
from gateway.build.runtime import Runtime
from gateway.config.models import GatewaySettings
from gateway.dataplane.app import DataPlane
from gateway.dataplane.state import GatewayState
from gateway.ops.logs import AccessLog
from tests.integration.harness import free_port
from tests.unit.test_websocket import FakeClient


def settings(target: str, **upstream: Any) -> GatewaySettings:
    return GatewaySettings.model_validate(
        {
            "upstreams": {"up": {"targets": [target], "retries": {"attempts": 0}, **upstream}},
            "routes": [
                {"name": "ws", "path": "/ws/{rest:path}", "upstream": "up", "timeout": "5s"}
            ],
        }
    )


@asynccontextmanager
async def plane(config: GatewaySettings) -> AsyncIterator[tuple[DataPlane, GatewayState[Runtime]]]:
    runtime = build_runtime(config)
    state: GatewayState[Runtime] = GatewayState(
        runtime=runtime, access_log=AccessLog(io.StringIO())
    )
    try:
        yield DataPlane(state), state
    finally:
        await runtime.aclose()


async def upgrade(app: DataPlane, client: FakeClient, within: float = 3.0) -> dict[str, Any]:
    await asyncio.wait_for(app(client.scope, client.receive, client.send), within)
    start = client.sent[0]
    assert start["type"] == "websocket.http.response.start"
    return start


@asynccontextmanager
async def silent_upstream() -> AsyncIterator[str]:
    """Accepts TCP connections and never answers the opening handshake."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_failed_handshakes_open_the_circuit_and_later_upgrades_are_refused() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    breaker = {"failure_ratio": 1.0, "min_requests": 2, "open_for": "30s"}
    async with plane(settings(dead, circuit_breaker=breaker)) as (app, state):
        for _ in range(2):
            assert (await upgrade(app, FakeClient()))["status"] == 502
        client = FakeClient()
        start = await upgrade(app, client)
        upstream = state.runtime.upstreams["up"] if state.runtime else None
        assert upstream is not None and upstream.breaker is not None
        assert upstream.breaker.state == "open"
    assert start["status"] == 503
    headers = dict(start["headers"])
    assert int(headers[b"retry-after"]) >= 1
    problem = json.loads(client.sent[1]["body"])
    assert (problem["code"], problem["route"], problem["upstream"]) == (
        "upstream_unhealthy",
        "ws",
        "up",
    )


async def test_x_request_timeout_ms_shortens_the_handshake_deadline() -> None:
    async with silent_upstream() as url, plane(settings(url)) as (app, _):
        client = FakeClient()
        client.scope["headers"].append((b"x-request-timeout-ms", b"200"))
        started = time.monotonic()
        start = await upgrade(app, client)
        took = time.monotonic() - started
    assert start["status"] == 504
    assert took < 2.0, f"the route's 5 s deadline was used ({took:.2f}s)"
    assert json.loads(client.sent[1]["body"])["code"] == "upstream_timeout"


async def test_a_refused_upgrade_is_recorded_by_the_logging_phase() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with plane(settings(dead)) as (app, state):
        client = FakeClient()
        assert (await upgrade(app, client))["status"] == 502
        assert state.access_log is not None
        stream = state.access_log._stream
        state.access_log.flush()
    (line,) = stream.getvalue().splitlines()  # type: ignore[attr-defined]
    record = json.loads(line)
    assert (record["route"], record["upstream"], record["status"], record["error"]) == (
        "ws",
        "up",
        502,
        "upstream_unavailable",
    )
    assert record["method"] == "GET" and record["path"] == "/ws/chat"
    (error,) = state.status.errors  # the board's recent problem answers
    assert (error.route, error.status, error.code) == ("ws", 502, "upstream_unavailable")
    window = state.status.routes["ws"]
    assert window.total == 1 and window.errors_total == 1
