"""A runtime's background work ends with it: a start cut short closes what it started,
and a shutdown ends a reload's retirements at once, closing what only they held."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.build.factory import build_runtime
from gateway.build.runtime import Retirements, Runtime
from gateway.config.models import GatewaySettings


def settings(read_timeout: str = "5s") -> GatewaySettings:
    dead = "http://127.0.0.1:9"  # nothing is ever sent: no request is made
    return GatewaySettings.model_validate(
        {
            "upstreams": {
                "changed": {
                    "targets": [dead],
                    "read_timeout": read_timeout,
                    "health_check": {"path": "/health", "interval": "1s"},
                },
                "kept": {"targets": [dead]},
            },
            "routes": [
                {"name": "a", "path": "/a", "upstream": "changed"},
                {"name": "b", "path": "/b", "upstream": "kept"},
            ],
        }
    )


async def pair() -> tuple[Runtime, Runtime]:
    old = build_runtime(settings())
    await old.start()
    new = build_runtime(settings(read_timeout="4s"), previous=old)
    assert new.upstreams["kept"] is old.upstreams["kept"]
    assert new.upstreams["changed"] is not old.upstreams["changed"]
    return old, new


async def test_a_start_cancelled_midway_closes_what_it_does_not_share() -> None:
    old, new = await pair()
    hung = asyncio.Event()

    async def hang() -> None:  # a JWKS fetch that never answers
        hung.set()
        await asyncio.Event().wait()

    assert new.edge is not None
    new.edge.start = hang  # type: ignore[method-assign]
    starting = asyncio.create_task(new.start(previous=old))
    await hung.wait()
    changed = new.upstreams["changed"]
    assert changed.health is not None and changed.health.running
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert not changed.health.running
    assert changed.client.is_closed
    assert not old.upstreams["kept"].client.is_closed  # still serving on the old runtime
    assert not old.upstreams["changed"].client.is_closed
    await old.aclose()


async def test_a_shutdown_ends_a_retirement_at_once_and_closes_what_only_it_held() -> None:
    old, new = await pair()
    await new.start(previous=old)
    old.active = 1  # a request still running on the old runtime
    retirements = Retirements()
    retirements.retire(old, new, grace=60)
    await asyncio.sleep(0.05)
    assert len(retirements) == 1  # waiting for that request
    assert not old.upstreams["changed"].client.is_closed
    started = time.monotonic()
    await retirements.aclose()
    assert time.monotonic() - started < 1  # not the 60 s grace
    assert len(retirements) == 0
    replaced = old.upstreams["changed"]
    assert replaced.client.is_closed
    assert replaced.health is not None and not replaced.health.running
    assert not new.upstreams["kept"].client.is_closed  # the new runtime's, not closed here
    await new.aclose()


async def test_a_retirement_finishes_by_itself_when_its_requests_do() -> None:
    old, new = await pair()
    await new.start(previous=old)
    old.active = 1
    retirements = Retirements()
    retirements.retire(old, new, grace=60)
    await asyncio.sleep(0.01)
    old.leave()
    for _ in range(50):
        if not retirements:
            break
        await asyncio.sleep(0.01)
    assert len(retirements) == 0
    assert old.upstreams["changed"].client.is_closed
    await retirements.aclose()
    await new.aclose()
