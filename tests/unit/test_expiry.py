"""`Expiry` behaves as `asyncio.timeout` does: each scenario runs against both."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from gateway.policies.expiry import Expiry


class AsyncExpiry:
    """`Expiry` behind the async context manager protocol, to share the scenarios."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def __aenter__(self) -> None:
        self.expiry = Expiry(self.delay)
        self.expiry.__enter__()

    async def __aexit__(self, *exc: Any) -> None:
        self.expiry.__exit__(*exc)


Scope = Callable[[float], Any]
SCOPES = pytest.mark.parametrize("scope", [asyncio.timeout, AsyncExpiry], ids=["asyncio", "expiry"])


@SCOPES
async def test_the_time_running_out_raises_timeout_error(scope: Scope) -> None:
    with pytest.raises(TimeoutError):
        async with scope(0.01):
            await asyncio.sleep(1)
    assert not asyncio.current_task().cancelling()  # type: ignore[union-attr]


@SCOPES
async def test_a_block_done_in_time_is_left_alone(scope: Scope) -> None:
    async with scope(0.02):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)  # the timer is gone: nothing cancels this task later
    assert not asyncio.current_task().cancelling()  # type: ignore[union-attr]


@SCOPES
async def test_zero_and_negative_delays_expire_at_the_next_step(scope: Scope) -> None:
    for delay in (0, -1):
        with pytest.raises(TimeoutError):
            async with scope(delay):
                await asyncio.sleep(0.5)


@SCOPES
async def test_the_inner_of_two_that_fires_raises_and_the_outer_carries_on(scope: Scope) -> None:
    async with scope(1):
        with pytest.raises(TimeoutError):
            async with scope(0.01):
                await asyncio.sleep(1)
        await asyncio.sleep(0)  # the outer one still runs normally


@SCOPES
async def test_when_the_outer_fires_the_inner_lets_it_through(scope: Scope) -> None:
    inner_saw: list[type[BaseException]] = []
    with pytest.raises(TimeoutError):
        async with scope(0.01):
            try:
                async with scope(1):
                    await asyncio.sleep(1)
            except BaseException as exc:
                inner_saw.append(type(exc))
                raise
    assert inner_saw == [asyncio.CancelledError]


@SCOPES
async def test_an_outside_cancellation_wins_over_the_time(scope: Scope) -> None:
    async def body() -> None:
        async with scope(0.05):
            await asyncio.sleep(1)

    task = asyncio.create_task(body())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@SCOPES
async def test_both_at_once_the_outside_cancellation_wins(scope: Scope) -> None:
    async def body() -> None:
        async with scope(0):
            asyncio.current_task().cancel()  # type: ignore[union-attr]
            await asyncio.sleep(1)

    task = asyncio.create_task(body())
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_fired_says_whether_the_time_was_up() -> None:
    with Expiry(1) as expiry:
        await asyncio.sleep(0)
    assert not expiry.fired
    with pytest.raises(TimeoutError), Expiry(0.01) as expiry:
        await asyncio.sleep(1)
    assert expiry.fired


async def test_outside_a_task_it_refuses() -> None:
    loop = asyncio.get_running_loop()
    refused: asyncio.Future[str] = loop.create_future()

    def callback() -> None:  # runs in the loop, but in no task
        try:
            Expiry(1)
        except RuntimeError as exc:
            refused.set_result(str(exc))

    loop.call_soon(callback)
    assert "inside a task" in await asyncio.wait_for(refused, 1)
