from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.config.models import BreakerSettings
from gateway.errors import (
    UpstreamSaturated,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnhealthy,
)
from gateway.policies.breaker import CircuitBreaker, breaker
from gateway.types import GatewayRequest, GatewayResponse, Handler
from tests.unit.fakes import FakeClock, Outcome, Recorder, connect_error, make_request


def state(b: CircuitBreaker) -> str:
    return b.state  # a function call, so mypy does not narrow the property across calls


def make(clock: FakeClock, **kw: float) -> CircuitBreaker:
    settings = dict(failure_ratio=0.5, min_requests=4, window=10.0, open_for=5.0)
    settings.update(kw)
    return CircuitBreaker(name="u", clock=clock, **settings)  # type: ignore[arg-type]


async def call(handler: Handler) -> int | str:
    """The status the client would see: the response's, or the error's code."""
    try:
        response = await handler(make_request())
    except (UpstreamUnavailable, UpstreamUnhealthy, UpstreamTimeout, UpstreamSaturated) as exc:
        return exc.code
    await response.close()
    return response.status


async def open_it(b: CircuitBreaker) -> None:
    failing = breaker(b)(Recorder([500]))
    for _ in range(b.min_requests):
        await call(failing)
    assert state(b) == "open"


async def test_closed_passes_everything_through() -> None:
    b = make(FakeClock())
    inner = Recorder([200])
    assert [await call(breaker(b)(inner)) for _ in range(10)] == [200] * 10
    assert state(b) == "closed" and not b.is_open
    assert repr(b) == "CircuitBreaker('u' closed failures=0/10 in 10s)"


async def test_stays_closed_below_min_requests() -> None:
    b = make(FakeClock(), min_requests=4)
    failing = breaker(b)(Recorder([connect_error()]))
    for _ in range(3):
        assert await call(failing) == "upstream_unavailable"
    assert state(b) == "closed"
    await call(failing)
    assert state(b) == "open"


async def test_opens_at_the_failure_ratio_and_stops_calling_the_upstream() -> None:
    clock = FakeClock()
    b = make(clock, failure_ratio=0.5, min_requests=4)
    inner = Recorder([200, 200, 200, 500, 500, 500])
    handler = breaker(b)(inner)
    # 5xx responses count as failures and are still passed through
    assert [await call(handler) for _ in range(5)] == [200, 200, 200, 500, 500]
    assert state(b) == "closed"  # 2 of 5 failed: below 50%
    assert await call(handler) == 500  # 3 of 6
    assert state(b) == "open" and b.is_open
    calls = len(inner.calls)
    with pytest.raises(UpstreamUnhealthy) as info:
        await handler(make_request())
    assert len(inner.calls) == calls
    error = info.value
    assert (error.status, error.code, error.upstream) == (503, "upstream_unhealthy", "u")
    assert (b"retry-after", b"5") in error.headers
    clock.advance(3.5)
    assert b.retry_after() == 2  # rounded up
    clock.advance(1.4)
    assert b.retry_after() == 1  # never 0
    assert "open reopens in" in repr(b)


async def test_half_open_after_open_for_then_a_success_closes() -> None:
    clock = FakeClock()
    b = make(clock)
    await open_it(b)
    clock.advance(5.0)
    assert state(b) == "half_open" and b.is_open
    inner = Recorder([200])
    assert await call(breaker(b)(inner)) == 200
    assert state(b) == "closed"
    assert len(inner.calls) == 1


async def test_half_open_failure_reopens() -> None:
    clock = FakeClock()
    b = make(clock)
    await open_it(b)
    clock.advance(5.0)
    inner = Recorder([connect_error()])
    assert await call(breaker(b)(inner)) == "upstream_unavailable"
    assert state(b) == "open"
    assert b.retry_after() == 5  # a full open_for again
    assert await call(breaker(b)(inner)) == "upstream_unhealthy"
    assert len(inner.calls) == 1


async def test_half_open_admits_only_half_open_requests_trials_at_a_time() -> None:
    clock = FakeClock()
    b = make(clock, half_open_requests=2)
    await open_it(b)
    clock.advance(5.0)
    release = asyncio.Event()

    async def slow(request: GatewayRequest) -> GatewayResponse:
        await release.wait()
        return await Recorder([200])(request)

    handler = breaker(b)(slow)
    trials = [asyncio.create_task(call(handler)) for _ in range(2)]
    await asyncio.sleep(0)
    assert "trials=2/2" in repr(b)
    assert await call(handler) == "upstream_unhealthy"  # a third is refused
    release.set()
    assert await asyncio.gather(*trials) == [200, 200]
    assert state(b) == "closed"


async def test_a_neutral_trial_frees_its_place() -> None:
    clock = FakeClock()
    b = make(clock)
    await open_it(b)
    clock.advance(5.0)
    saturated = Recorder([UpstreamSaturated("full")])
    assert await call(breaker(b)(saturated)) == "upstream_saturated"
    assert state(b) == "half_open"
    assert await call(breaker(b)(Recorder([200]))) == 200
    assert state(b) == "closed"


async def test_failures_older_than_the_window_are_forgotten() -> None:
    clock = FakeClock()
    b = make(clock, window=10.0, min_requests=4)
    failing = breaker(b)(Recorder([500]))
    for _ in range(3):
        await call(failing)
    clock.advance(11)
    await call(failing)
    assert state(b) == "closed"  # only 1 failure in the window


async def test_what_counts_as_a_failure() -> None:
    clock = FakeClock()
    failures: list[Outcome] = [
        connect_error(),
        UpstreamUnavailable("reset", outcome="reset"),
        UpstreamTimeout("slow"),
        502,
        503,
        504,
        500,
    ]
    for failure in failures:
        b = make(clock, min_requests=1, failure_ratio=1.0)
        await call(breaker(b)(Recorder([failure])))
        assert state(b) == "open", failure


async def test_what_does_not_count() -> None:
    clock = FakeClock()
    timeout_while_queued = UpstreamTimeout("queued too long")
    timeout_while_queued.outcome = "saturated"
    neutral: list[Outcome] = [
        UpstreamSaturated("full"),
        UpstreamUnhealthy("no healthy target"),
        timeout_while_queued,
        404,
        429,
    ]
    for outcome in neutral:
        b = make(clock, min_requests=1, failure_ratio=1.0)
        await call(breaker(b)(Recorder([outcome])))
        assert state(b) == "closed", outcome


async def test_a_client_going_away_is_not_a_failure_but_the_deadline_is() -> None:
    b = make(FakeClock(), min_requests=1, failure_ratio=1.0)
    handler = breaker(b)(Recorder([5.0]))

    async def call_slowly() -> GatewayResponse:
        return await handler(make_request(timeout=10))

    task = asyncio.create_task(call_slowly())
    await asyncio.sleep(0.01)
    task.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await task
    assert state(b) == "closed"

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.02):  # what the deadline policy does
            await handler(make_request(timeout=0.02))
    assert state(b) == "open"


async def test_outcomes_admitted_before_a_state_change_are_ignored() -> None:
    clock = FakeClock()
    b = make(clock, min_requests=1, failure_ratio=1.0)
    ticket = b.admit()
    await open_it(b)
    clock.advance(5)
    trial = b.admit()
    b.record(ticket, True)  # a straggler from the closed era
    assert state(b) == "half_open"
    b.record(trial, False)
    assert state(b) == "closed"


def test_from_settings_and_state_changes_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    b = CircuitBreaker.from_settings(
        BreakerSettings(failure_ratio=1.0, min_requests=1, open_for=2), name="u", clock=clock
    )
    assert (b.half_open_requests, b.open_for) == (1, 2)
    with caplog.at_level(logging.INFO, logger="gateway.breaker"):
        b.record(b.admit(), True)
        clock.advance(2)
        b.record(b.admit(), False)
    states = [(r.upstream, r.circuit) for r in caplog.records]  # type: ignore[attr-defined]
    assert states == [("u", "open"), ("u", "half_open"), ("u", "closed")]
