from __future__ import annotations

import asyncio
import time

import pytest

from gateway.errors import UpstreamSaturated, UpstreamTimeout, UpstreamUnavailable
from gateway.policies.bulkhead import Bulkhead, bulkhead
from gateway.types import GatewayRequest, GatewayResponse
from tests.unit.fakes import Recorder, connect_error, make_request, make_response


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_slots_up_to_the_limit_are_free_then_requests_queue() -> None:
    b = Bulkhead(2, 5, 1.0, name="u")
    await b.acquire()
    await b.acquire()
    assert (b.inflight, b.queued) == (2, 0)
    waiter = asyncio.create_task(b.acquire())
    await settle()
    assert (b.inflight, b.queued) == (2, 1)
    assert not waiter.done()
    assert repr(b) == "Bulkhead('u' inflight=2/2 queued=1/5 queue_timeout=1s)"
    b.release()
    await waiter
    assert (b.inflight, b.queued) == (2, 0)
    b.release()
    b.release()
    assert (b.inflight, b.queued) == (0, 0)


async def test_waiters_get_slots_in_arrival_order() -> None:
    b = Bulkhead(1, 10, 5.0)
    await b.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        await b.acquire()
        order.append(i)

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(wait(i)))
        await settle()
    assert b.queued == 5
    for _ in range(5):
        b.release()
        await settle()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert b.inflight == 1


async def test_a_newcomer_never_overtakes_a_waiter() -> None:
    b = Bulkhead(1, 10, 5.0)
    await b.acquire()
    first = asyncio.create_task(b.acquire())
    await settle()
    b.release()  # hands the slot to `first`, which has not run yet
    assert not b.try_acquire()
    await first
    assert b.inflight == 1


async def test_full_queue_sheds_at_once_with_retry_after() -> None:
    b = Bulkhead(1, 1, 5.0, name="u")
    await b.acquire()
    queued = asyncio.create_task(b.acquire())
    await settle()
    started = time.monotonic()
    with pytest.raises(UpstreamSaturated) as info:
        await b.acquire(route="r")
    assert time.monotonic() - started < 0.05
    error = info.value
    assert (error.status, error.code, error.upstream, error.route) == (
        503,
        "upstream_saturated",
        "u",
        "r",
    )
    assert (b"retry-after", b"1") in error.headers
    assert b.queued == 1
    queued.cancel()


async def test_zero_queue_sheds_as_soon_as_slots_are_taken() -> None:
    b = Bulkhead(1, 0, 5.0)
    await b.acquire()
    with pytest.raises(UpstreamSaturated):
        await b.acquire()


async def test_queue_timeout_gives_503_and_leaves_the_queue() -> None:
    b = Bulkhead(1, 5, 0.05)
    await b.acquire()
    started = time.monotonic()
    with pytest.raises(UpstreamSaturated) as info:
        await b.acquire(make_request(timeout=5).deadline)
    waited = time.monotonic() - started
    assert 0.04 < waited < 0.5
    assert "queue_timeout" in info.value.detail
    assert (b.inflight, b.queued) == (1, 0)
    b.release()
    assert b.inflight == 0


async def test_a_deadline_shorter_than_queue_timeout_gives_504() -> None:
    b = Bulkhead(1, 5, 5.0)
    await b.acquire()
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as info:
        await b.acquire(make_request(timeout=0.05).deadline)
    assert time.monotonic() - started < 0.5
    assert info.value.status == 504
    assert info.value.outcome == "saturated"  # never reached the upstream: not a breaker failure
    assert b.queued == 0


async def test_an_expired_deadline_never_queues() -> None:
    b = Bulkhead(1, 5, 5.0)
    await b.acquire()
    with pytest.raises(UpstreamTimeout):
        await b.acquire(make_request(timeout=-1).deadline)
    assert b.queued == 0


async def test_a_cancelled_waiter_leaves_the_queue_without_leaking_a_slot() -> None:
    b = Bulkhead(1, 5, 5.0)
    await b.acquire()
    waiter = asyncio.create_task(b.acquire())
    await settle()
    assert b.queued == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (b.inflight, b.queued) == (1, 0)
    b.release()
    assert b.inflight == 0
    await b.acquire()  # the slot is really free
    assert b.inflight == 1


async def test_a_slot_handed_to_a_waiter_cancelled_at_that_moment_is_passed_on() -> None:
    b = Bulkhead(1, 5, 5.0)
    await b.acquire()
    doomed = asyncio.create_task(b.acquire())
    await settle()
    heir = asyncio.create_task(b.acquire())
    await settle()
    b.release()  # the slot goes to `doomed`...
    doomed.cancel()  # ...which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await asyncio.wait_for(heir, 1)  # so it must have gone on to `heir`
    assert (b.inflight, b.queued) == (1, 0)
    b.release()
    assert b.inflight == 0


async def test_a_slot_handed_to_the_last_waiter_cancelled_at_that_moment_is_released() -> None:
    b = Bulkhead(1, 5, 5.0)
    await b.acquire()
    doomed = asyncio.create_task(b.acquire())
    await settle()
    b.release()
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert (b.inflight, b.queued) == (0, 0)


async def test_releasing_more_than_acquired_is_a_bug() -> None:
    b = Bulkhead(1, 1, 1.0)
    with pytest.raises(RuntimeError):
        b.release()


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Bulkhead(0, 1, 1.0)


# The policy: a slot from the try until the response is closed.


async def test_policy_holds_the_slot_until_the_response_is_closed() -> None:
    b = Bulkhead(1, 0, 1.0)
    handler = bulkhead(b)(Recorder([200]))
    response = await handler(make_request())
    assert b.inflight == 1
    with pytest.raises(UpstreamSaturated):
        await handler(make_request())
    await response.close()
    assert b.inflight == 0
    await response.close()  # closing twice releases once
    assert b.inflight == 0
    second = await handler(make_request())
    assert b.inflight == 1
    await second.close()


async def test_policy_calls_the_inner_close() -> None:
    closed: list[bool] = []
    b = Bulkhead(1, 0, 1.0)

    async def ok(request: GatewayRequest) -> GatewayResponse:
        return make_response(200, on_close=lambda: closed.append(True))

    response = await bulkhead(b)(ok)(make_request())
    await response.close()
    assert closed == [True]


async def test_policy_releases_when_the_inner_close_fails() -> None:
    b = Bulkhead(1, 0, 1.0)

    def boom() -> None:
        raise OSError("close failed")

    async def ok(request: GatewayRequest) -> GatewayResponse:
        return make_response(200, on_close=boom)

    response = await bulkhead(b)(ok)(make_request())
    with pytest.raises(OSError):
        await response.close()
    assert b.inflight == 0


async def test_policy_releases_when_the_try_fails() -> None:
    b = Bulkhead(1, 0, 1.0)
    inner = Recorder([connect_error()])
    with pytest.raises(UpstreamUnavailable):
        await bulkhead(b)(inner)(make_request())
    assert b.inflight == 0


async def test_policy_releases_when_the_try_is_cancelled() -> None:
    b = Bulkhead(1, 0, 1.0)
    handler = bulkhead(b)(Recorder([5.0]))

    async def call() -> GatewayResponse:
        return await handler(make_request())

    task = asyncio.create_task(call())
    await settle()
    assert b.inflight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.inflight == 0


async def test_slow_handler_never_sees_more_than_the_limit() -> None:
    b = Bulkhead(3, 2, 2.0)
    inner = Recorder([0.05])
    handler = bulkhead(b)(inner)

    async def one() -> int:
        try:
            response = await handler(make_request())
        except UpstreamSaturated:
            return 503
        await response.close()
        return response.status

    statuses = await asyncio.gather(*(one() for _ in range(10)))
    assert inner.max_concurrent == 3
    assert sorted(statuses) == [200] * 5 + [503] * 5
    assert (b.inflight, b.queued) == (0, 0)
