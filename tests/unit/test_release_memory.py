"""GatewayServer._release_memory: after a burst of client connections closes, the
garbage is collected and freed heap handed back; nothing happens without a burst."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from gateway.server import process as server


async def test_memory_is_released_after_a_burst_closes_and_not_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trims: list[int] = []
    collects: list[int] = []
    monkeypatch.setattr(server, "_malloc_trim", lambda: trims.append)
    monkeypatch.setattr(server.gc, "collect", lambda *a: collects.append(1) or 0)
    connections: set[int] = set(range(200))
    fake = SimpleNamespace(
        data=SimpleNamespace(server_state=SimpleNamespace(connections=connections))
    )
    task = asyncio.create_task(server.GatewayServer._release_memory(fake, every=0.01))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.05)
        connections.difference_update(range(150))  # small churn: below 1,000 closed
        await asyncio.sleep(0.05)
        assert (trims, collects) == ([], [])
        connections.update(range(5000))  # a burst...
        await asyncio.sleep(0.05)
        connections.difference_update(range(4000))  # ...that closes
        await asyncio.sleep(0.05)
        assert trims == [0] and collects == [1]
        await asyncio.sleep(0.05)
        assert trims == [0], "released once per burst"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_malloc_trim_is_found_on_glibc() -> None:
    trim = server._malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)


async def test_a_full_collection_runs_periodically_without_bursts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collects: list[int] = []
    monkeypatch.setattr(server, "FULL_COLLECTION_EVERY", 0.05)
    monkeypatch.setattr(server.gc, "collect", lambda *a: collects.append(1) or 0)
    fake = SimpleNamespace(data=SimpleNamespace(server_state=SimpleNamespace(connections=set())))
    task = asyncio.create_task(server.GatewayServer._release_memory(fake, every=0.01))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.3)
        assert 2 <= len(collects) <= 8
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
