from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.config.models import RetrySettings
from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.policies.budget import RetryBudget
from gateway.policies.deadline import deadline
from gateway.policies.retry import IDEMPOTENT_METHODS, backoff_delay, retry
from gateway.policies.try_timeout import try_timeout
from gateway.types import GatewayRequest, GatewayResponse, Handler
from tests.unit.fakes import FakeClock, Recorder, connect_error, make_request


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def policy(
    inner: Handler,
    *,
    attempts: int = 2,
    on: tuple[Any, ...] = ("connect_error", 503),
    backoff: float = 0.01,
    budget: RetryBudget | None = None,
    sleep: FakeSleep | None = None,
    retry_non_idempotent: bool = False,
) -> Handler:
    settings = RetrySettings(attempts=attempts, on=on, backoff=backoff)
    return retry(
        settings,
        budget or RetryBudget(1.0),
        retry_non_idempotent=retry_non_idempotent,
        upstream="u",
        rng=random.Random(7),
        sleep=sleep or FakeSleep(),
    )(inner)


async def test_ok_is_tried_once() -> None:
    inner = Recorder([200])
    response = await policy(inner)(make_request())
    assert response.status == 200
    assert inner.calls == [0]


async def test_a_connect_error_is_retried_and_the_success_returned() -> None:
    inner = Recorder([connect_error(), 200])
    response = await policy(inner)(make_request())
    assert response.status == 200
    assert inner.calls == [0, 1]  # the attempt number is set on the request


@pytest.mark.parametrize("method", sorted(IDEMPOTENT_METHODS))
async def test_idempotent_methods_are_retried(method: str) -> None:
    inner = Recorder([connect_error(), 200])
    assert (await policy(inner)(make_request(method))).status == 200
    assert len(inner.calls) == 2


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_non_idempotent_methods_are_not_retried(method: str) -> None:
    inner = Recorder([connect_error(), 200])
    with pytest.raises(UpstreamUnavailable):
        await policy(inner)(make_request(method, body=b"{}"))
    assert len(inner.calls) == 1


async def test_a_route_may_opt_in_to_retrying_post() -> None:
    inner = Recorder([connect_error(), 200])
    handler = policy(inner, retry_non_idempotent=True)
    assert (await handler(make_request("POST", body=b"{}"))).status == 200
    assert len(inner.calls) == 2


async def test_a_streamed_body_is_never_retried() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"x"

    inner = Recorder([connect_error(), 200])
    with pytest.raises(UpstreamUnavailable):
        await policy(inner)(make_request("PUT", stream=chunks()))
    assert len(inner.calls) == 1


async def test_attempts_are_tries_after_the_first_and_the_last_response_passes_through() -> None:
    inner = Recorder([503])
    response = await policy(inner, attempts=2)(make_request())
    assert response.status == 503
    assert len(inner.calls) == 3
    assert response is inner.responses[-1]
    assert inner.closed == [0, 1]  # the responses given up on were closed, not the last


async def test_the_last_error_is_raised_when_retries_run_out() -> None:
    errors: list[UpstreamError] = [connect_error() for _ in range(3)]
    inner = Recorder(errors)
    with pytest.raises(UpstreamUnavailable) as info:
        await policy(inner, attempts=2)(make_request())
    assert info.value is errors[-1]


async def test_statuses_and_outcomes_not_listed_are_not_retried() -> None:
    inner = Recorder([502])
    assert (await policy(inner, on=("connect_error", 503))(make_request())).status == 502
    assert len(inner.calls) == 1
    assert inner.closed == []

    reset = UpstreamUnavailable("reset", outcome="reset")
    inner = Recorder([reset, 200])
    with pytest.raises(UpstreamUnavailable):
        await policy(inner)(make_request())
    assert len(inner.calls) == 1


async def test_attempts_zero_means_one_try() -> None:
    inner = Recorder([503])
    assert (await policy(inner, attempts=0)(make_request())).status == 503
    assert len(inner.calls) == 1


async def test_backoff_doubles_with_jitter() -> None:
    sleep = FakeSleep()
    inner = Recorder([*(connect_error() for _ in range(4)), 200])
    budget = RetryBudget(1.0, min_retries=10)
    await policy(inner, attempts=4, backoff=0.1, sleep=sleep, budget=budget)(make_request())
    assert len(sleep.delays) == 4
    for n, delay in enumerate(sleep.delays):
        nominal = 0.1 * 2**n
        assert 0.5 * nominal <= delay < 1.5 * nominal
    # jitter: not simply the nominal values
    assert [round(d / (0.1 * 2**n), 6) for n, d in enumerate(sleep.delays)] != [1.0] * 4


def test_backoff_jitter_spreads() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(1.0, 1, rng) for _ in range(1000)]
    assert min(delays) >= 0.5 and max(delays) < 1.5
    assert min(delays) < 0.6 and max(delays) > 1.4


async def test_no_retry_when_the_backoff_would_pass_the_deadline() -> None:
    sleep = FakeSleep()
    inner = Recorder([503, 200])
    response = await policy(inner, backoff=1.0, sleep=sleep)(make_request(timeout=0.3))
    assert response.status == 503  # the first answer stands
    assert len(inner.calls) == 1
    assert sleep.delays == []


async def test_no_try_starts_after_the_deadline() -> None:
    async def oversleep(seconds: float) -> None:
        await asyncio.sleep(0.1)  # the event loop was late: past the deadline

    settings = RetrySettings(attempts=2, on=("connect_error",), backoff=0.001)
    inner = Recorder([connect_error(), 200])
    handler = retry(settings, RetryBudget(1.0), sleep=oversleep)(inner)
    with pytest.raises(UpstreamTimeout):
        await handler(make_request(timeout=0.05))
    assert len(inner.calls) == 1


async def test_a_zero_budget_means_no_retries() -> None:
    budget = RetryBudget(0.0)
    inner = Recorder([503])
    assert (await policy(inner, budget=budget)(make_request())).status == 503
    assert len(inner.calls) == 1
    assert budget.requests == 1


async def test_a_spent_budget_returns_the_first_failure() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.1, window=10, min_retries=3, clock=clock)
    inner = Recorder([503])
    handler = policy(inner, attempts=2, budget=budget)
    await handler(make_request())  # 1 request, 2 retries: within the minimum of 3
    await handler(make_request())  # 1 retry left, then spent
    await handler(make_request())  # none left
    assert len(inner.calls) == 3 + 2 + 1
    assert budget.retries == 3
    clock.advance(11)  # the window slides past them
    await handler(make_request())
    assert len(inner.calls) == 6 + 3


def test_budget_is_a_share_of_recent_requests_with_a_minimum() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.2, window=10, min_retries=3, clock=clock)
    assert budget.allowed() == 3
    for _ in range(100):
        budget.record_request()
    assert budget.allowed() == 20
    spent = sum(budget.try_spend() for _ in range(30))
    assert spent == 20
    assert "20/20 retries for 100 requests" in repr(budget)
    clock.advance(5)
    assert budget.allowed() == 20  # still in the window
    clock.advance(6)
    assert (budget.requests, budget.retries, budget.allowed()) == (0, 0, 3)


def test_zero_budget_allows_nothing_not_even_the_minimum() -> None:
    budget = RetryBudget(0.0)
    for _ in range(100):
        budget.record_request()
    assert not budget.try_spend()


async def test_retries_go_to_another_target() -> None:
    # The upstream excludes tried targets; the policy must keep `exclude_targets` across tries.
    seen: list[set[str]] = []

    async def send(request: GatewayRequest) -> GatewayResponse:
        seen.append(set(request.exclude_targets))
        request.exclude_targets.add(f"t{len(seen)}")
        raise connect_error()

    with pytest.raises(UpstreamUnavailable):
        await policy(send, attempts=2)(make_request())
    assert seen == [set(), {"t1"}, {"t1", "t2"}]


# try_timeout: each try bounded by min(read_timeout, time left)


async def test_a_try_slower_than_read_timeout_is_outcome_timeout_and_retried() -> None:
    inner = Recorder([1.0, 200])
    handler = policy(try_timeout(0.05, "u")(inner), on=("timeout",))
    response = await handler(make_request(timeout=5))
    assert response.status == 200
    assert len(inner.calls) == 2


async def test_a_try_cut_by_the_deadline_is_504_and_not_retried() -> None:
    inner = Recorder([1.0, 200])
    handler = deadline("u")(policy(try_timeout(10.0, "u")(inner), on=("timeout",)))
    with pytest.raises(UpstreamTimeout) as info:
        await handler(make_request(timeout=0.05))
    assert info.value.status == 504
    assert "deadline" in info.value.detail
    assert len(inner.calls) == 1


async def test_a_try_after_the_deadline_never_starts() -> None:
    inner = Recorder([200])
    with pytest.raises(UpstreamTimeout):
        await try_timeout(1.0)(inner)(make_request(timeout=-1))
    assert inner.calls == []


async def test_try_timeout_passes_fast_answers() -> None:
    inner = Recorder([0.01])
    assert (await try_timeout(1.0)(inner)(make_request())).status == 200
