"""Drain on SIGTERM/SIGINT: readiness drops at once, in-flight requests finish, new ones
are turned away, exit 0; a second signal exits at once."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.integration.harness import GatewayProcess, UpstreamServer


async def backend(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """`/sleep/<seconds>/<id>`: answers `done <id>` after that long."""
    parts = scope["path"].strip("/").split("/")
    if parts[0] == "sleep":
        await asyncio.sleep(float(parts[1]))
    body = f"done {parts[-1]}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def config(up: UpstreamServer, **server: Any) -> dict[str, Any]:
    return {
        "server": server,
        "upstreams": {"up": {"targets": [up.url], "read_timeout": "60s"}},
        "routes": [{"name": "r", "path": "/{rest:path}", "upstream": "up", "timeout": "60s"}],
    }


async def fresh_get(url: str) -> httpx.Response | None:
    """GET over a new connection; None when the connection is refused or dropped."""
    async with httpx.AsyncClient(timeout=3) as client:
        try:
            return await client.get(url)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            return None


def assert_turned_away(response: httpx.Response | None) -> None:
    """A new request during drain: refused, or 503 shutting_down with Connection: close."""
    if response is None:
        return
    assert response.status_code == 503
    assert response.json()["code"] == "shutting_down"
    assert response.headers["connection"].lower() == "close"


async def wait_exit(gw: GatewayProcess, within: float) -> tuple[int, float]:
    start = time.monotonic()
    code = await asyncio.to_thread(gw.wait, within)
    return code, time.monotonic() - start


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_drains_in_flight_requests_and_exits_zero(
    sig: signal.Signals,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    gw = gateway(config(upstream(backend)))
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        in_flight = [asyncio.create_task(client.get(f"/sleep/1.5/{i}")) for i in range(5)]
        await asyncio.sleep(0.3)
        gw.signal(sig)
        signalled = time.monotonic()
        await asyncio.sleep(0.05)

        # Readiness drops at once; the first check after the signal already says so.
        first = await fresh_get(gw.admin_url + "/readyz")
        assert first is not None, "the admin listener stopped before the drain ended"
        assert first.status_code == 503
        assert first.json() == {"status": "draining"}
        assert time.monotonic() - signalled < 0.5
        # Liveness is not readiness: the process is still alive while it drains.
        alive = await fresh_get(gw.admin_url + "/healthz")
        assert alive is not None
        assert alive.status_code == 200

        # New connections are turned away, right after the signal and a little later.
        assert_turned_away(await fresh_get(gw.url + "/fast/new-1"))
        await asyncio.sleep(0.3)
        assert_turned_away(await fresh_get(gw.url + "/fast/new-2"))
        still = await fresh_get(gw.admin_url + "/readyz")
        assert still is not None
        assert still.status_code == 503

        responses = await asyncio.gather(*in_flight)
    assert [r.status_code for r in responses] == [200] * 5
    assert sorted(r.text for r in responses) == [f"done {i}" for i in range(5)]
    # Answered during the drain: the client is told not to reuse the connection.
    assert [r.headers.get("connection") for r in responses] == ["close"] * 5

    code, took = await wait_exit(gw, 10)
    assert code == 0, gw.stderr
    assert took < 3
    # Readiness after the drain: the listener is gone.
    assert await fresh_get(gw.admin_url + "/readyz") is None
    # The access log was flushed on the way out: each drained request is in it.
    logged = [json.loads(line) for line in gw.stdout.splitlines() if line.strip()]
    done = sorted(line["path"] for line in logged if line["status"] == 200)
    assert done == [f"/sleep/1.5/{i}" for i in range(5)]


async def test_drain_with_nothing_in_flight_exits_promptly(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)))
    async with httpx.AsyncClient(base_url=gw.url, timeout=5) as client:
        assert (await client.get("/fast/1")).status_code == 200  # leaves an idle keep-alive
        gw.signal(signal.SIGTERM)
        code, took = await wait_exit(gw, 10)
    assert code == 0, gw.stderr
    assert took < 1.5


async def test_second_signal_during_drain_exits_at_once(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend), drain_timeout="30s"))
    async with httpx.AsyncClient(base_url=gw.url, timeout=15) as client:
        stuck = asyncio.create_task(client.get("/sleep/10/stuck"))
        await asyncio.sleep(0.3)
        gw.signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert gw.proc is not None
        assert gw.proc.poll() is None, "exited before the in-flight request finished"
        gw.signal(signal.SIGTERM)
        code, took = await wait_exit(gw, 10)
        assert took < 2, f"took {took:.1f}s to exit after the second signal"
        # The request that was cut off fails; it is not answered 200.
        try:
            response = await stuck
        except httpx.HTTPError:
            pass
        else:
            assert response.status_code != 200
    assert code is not None


async def test_drain_timeout_bounds_the_drain(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend), drain_timeout="1s"))
    async with httpx.AsyncClient(base_url=gw.url, timeout=15) as client:
        stuck = asyncio.create_task(client.get("/sleep/10/stuck"))
        await asyncio.sleep(0.3)
        gw.signal(signal.SIGTERM)
        code, took = await wait_exit(gw, 10)
        assert took < 1 + 1.5, f"took {took:.1f}s to exit with drain_timeout 1s"
        try:
            response = await stuck
        except httpx.HTTPError:
            pass
        else:
            assert response.status_code != 200
    assert code is not None
