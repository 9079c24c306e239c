"""The hedge policy (`gateway/policies/hedge.py`) with scripted fake tries, and the
recent-latency record it reads (`gateway/policies/latency.py`)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.ops.metrics import HedgeStats, Metrics
from gateway.policies.budget import RetryBudget
from gateway.policies.deadline import deadline
from gateway.policies.hedge import HedgeRules, hedge
from gateway.policies.latency import LatencyRecord
from gateway.policies.retry import RetryRules, retry
from gateway.tracing.spans import Tracer, TracingRules, client_spans
from gateway.types import GatewayRequest, GatewayResponse, Handler
from tests.unit.fakes import connect_error, make_request, make_response
from tests.unit.test_trace_context import Sink

# -- the latency record ------------------------------------------------------------


def test_no_percentile_before_twenty_answers_and_one_at_the_twentieth() -> None:
    record = LatencyRecord()
    for i in range(19):
        record.add(0.001 * (i + 1), now=0.0)
    assert record.percentile("p95") is None
    record.add(0.020, now=0.0)
    assert record.percentile("p95") == 0.019  # nearest rank: ceil(0.95 * 20) = 19th
    assert record.percentile("p99") == 0.020


def test_percentiles_are_nearest_rank_over_the_answers_held() -> None:
    record = LatencyRecord(every=1)
    for i in range(1, 101):
        record.add(float(i), now=0.0)
    assert record.percentile("p95") == 95.0
    assert record.percentile("p99") == 99.0
    assert record.count == 100


def test_the_ring_keeps_only_the_last_capacity_answers() -> None:
    record = LatencyRecord(capacity=20, every=1)
    for _ in range(20):
        record.add(5.0, now=0.0)
    for _ in range(20):
        record.add(1.0, now=0.0)
    assert record.count == 20
    assert record.percentile("p99") == 1.0  # the 5 s answers are gone


def test_refreshed_every_100_answers_not_per_answer() -> None:
    record = LatencyRecord(every=100, interval=3600.0)
    for _ in range(20):
        record.add(0.010, now=0.0)
    assert record.percentile("p95") == 0.010  # the first figures, at the 20th answer
    for _ in range(99):
        record.add(1.0, now=0.0)
    assert record.percentile("p95") == 0.010  # 99 answers since: not recomputed yet
    record.add(1.0, now=0.0)
    assert record.percentile("p95") == 1.0


def test_refreshed_every_second_when_answers_are_few() -> None:
    record = LatencyRecord(capacity=40, every=100, interval=1.0)
    for _ in range(20):
        record.add(0.010, now=0.0)
    for _ in range(39):
        record.add(1.0, now=0.5)
    assert record.percentile("p95") == 0.010  # within the second: the old figure
    record.add(1.0, now=1.0)
    assert record.percentile("p95") == 1.0
    assert "40/40 answers" in repr(record)


# -- the race ----------------------------------------------------------------------


@dataclass
class Tries:
    """A handler playing one (delay, outcome) per try in call order (the last repeats);
    records each try's attempt number, target exclusions, and whether it was cancelled
    or its response closed."""

    script: list[tuple[float, int | UpstreamError]]
    attempts: list[int] = field(default_factory=list)
    requests: list[GatewayRequest] = field(default_factory=list)
    sent: list[list[tuple[bytes, bytes]]] = field(default_factory=list)  # headers, as sent
    cancelled: list[int] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)

    async def __call__(self, request: GatewayRequest) -> GatewayResponse:
        index = len(self.attempts)
        self.attempts.append(request.attempt)
        self.requests.append(request)
        self.sent.append(list(request.headers))
        request.exclude_targets.add(f"t{index}")
        delay, outcome = self.script[min(index, len(self.script) - 1)]
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self.cancelled.append(index)
            raise
        if isinstance(outcome, UpstreamError):
            raise outcome
        response = make_response(outcome, on_close=lambda: self.closed.append(index))
        response.target = f"t{index}"
        return response


def stats() -> tuple[HedgeStats, Metrics]:
    metrics = Metrics()
    return HedgeStats(metrics, "r", "u"), metrics


def counted(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"route": "r", "upstream": "u", **labels})
    return value or 0.0


def hedged(
    inner: Handler,
    *,
    after: float | str = 0.05,
    max_hedges: int = 1,
    budget: RetryBudget | None = None,
    record: LatencyRecord | None = None,
    hedge_stats: HedgeStats | None = None,
) -> Handler:
    return hedge(
        HedgeRules(after=after, max=max_hedges),
        budget or RetryBudget(1.0),
        record,
        hedge_stats or stats()[0],
        count_requests=True,
    )(inner)


async def test_a_fast_first_try_is_not_hedged() -> None:
    tries = Tries([(0.0, 200)])
    hedge_stats, metrics = stats()
    request = make_request()
    response = await hedged(tries, hedge_stats=hedge_stats)(request)
    assert response.target == "t0"
    assert tries.attempts == [0]
    assert (request.hedges, request.hedge_won) == (0, False)  # the access log says nothing
    assert counted(metrics, "gateway_hedges_total") == 0


async def test_a_slow_first_try_is_hedged_and_the_hedge_wins() -> None:
    tries = Tries([(5.0, 200), (0.0, 201)])
    hedge_stats, metrics = stats()
    started = time.monotonic()
    request = make_request()
    response = await hedged(tries, after=0.05, hedge_stats=hedge_stats)(request)
    assert time.monotonic() - started < 1.0
    assert (response.status, response.target) == (201, "t1")
    assert (request.hedges, request.hedge_won) == (1, True)  # for the access log
    assert tries.attempts == [0, 1]  # the hedge is a resend: resend_count 1
    assert tries.cancelled == [0]  # the loser is cancelled, not left running
    assert counted(metrics, "gateway_hedges_total") == 1
    assert counted(metrics, "gateway_hedge_wins_total", winner="hedge") == 1
    assert counted(metrics, "gateway_hedge_wins_total", winner="first") == 0


async def test_a_retry_after_a_winning_hedge_logs_its_own_outcome() -> None:
    # Attempt 0: the hedge answers 503 first and wins; the retry policy tries again and
    # attempt 1's first try answers 200 before any hedge: that answer is not a hedge's.
    tries = Tries([(5.0, 200), (0.0, 503), (0.0, 200)])
    rules = RetryRules(attempts=1, backoff=0.001, on=(503,))
    chain = retry(rules, RetryBudget(1.0), upstream="u")(hedged(tries, after=0.02))
    request = make_request()
    response = await chain(request)
    assert (response.status, response.target) == (200, "t2")
    assert (request.hedges, request.hedge_won) == (1, False)


async def test_the_first_try_wins_when_it_answers_before_the_hedge() -> None:
    tries = Tries([(0.1, 200), (5.0, 201)])
    hedge_stats, metrics = stats()
    request = make_request()
    response = await hedged(tries, after=0.02, hedge_stats=hedge_stats)(request)
    assert response.target == "t0"
    assert (request.hedges, request.hedge_won) == (1, False)
    assert tries.cancelled == [1]
    assert counted(metrics, "gateway_hedge_wins_total", winner="first") == 1


async def test_the_hedge_avoids_the_targets_already_tried() -> None:
    tries = Tries([(5.0, 200), (0.0, 200)])
    await hedged(tries)(make_request())
    # The tries share exclude_targets: the hedge saw the first one's target.
    assert "t0" in tries.requests[1].exclude_targets
    assert tries.requests[1] is not tries.requests[0]


async def test_the_hedge_carries_the_request_headers_not_the_first_tries_swap() -> None:
    async def swapping(request: GatewayRequest) -> GatewayResponse:
        # A traced try swaps its request's header list while it runs (client_spans).
        request.headers = [*request.headers, (b"traceparent", b"first")]
        return await tries(request)

    tries = Tries([(5.0, 200), (0.0, 200)])
    request = make_request()
    request.headers = [(b"x-a", b"1")]
    await hedged(swapping)(request)
    assert tries.requests[1].headers == [(b"x-a", b"1"), (b"traceparent", b"first")]
    # ...its own swap only: the hedge started from the original list.
    assert tries.requests[0].headers == [(b"x-a", b"1"), (b"traceparent", b"first")]
    assert tries.requests[0].headers is not tries.requests[1].headers


async def test_a_failed_try_waits_for_the_other() -> None:
    tries = Tries([(0.1, connect_error()), (0.2, 200)])
    request = make_request()
    response = await hedged(tries, after=0.02)(request)
    assert response.target == "t1"  # the hedge is a second chance, not a doubled failure
    assert (request.hedges, request.hedge_won) == (1, True)


async def test_every_try_failed_raises_the_first_tries_error() -> None:
    first = UpstreamTimeout("slow", upstream="u")
    tries = Tries([(0.1, first), (0.0, connect_error())])
    with pytest.raises(UpstreamError) as caught:
        await hedged(tries, after=0.02)(make_request())
    assert caught.value is first


async def test_a_first_try_failing_before_after_is_raised_without_a_hedge() -> None:
    tries = Tries([(0.0, connect_error())])
    with pytest.raises(UpstreamError):
        await hedged(tries, after=0.05)(make_request())
    assert tries.attempts == [0]


async def test_post_is_not_hedged_a_keyed_post_is() -> None:
    tries = Tries([(0.15, 200), (0.0, 201)])
    response = await hedged(tries, after=0.02)(make_request("POST", body=b"x"))
    assert (response.target, tries.attempts) == ("t0", [0])

    tries = Tries([(5.0, 200), (0.0, 201)])
    keyed = make_request("POST", body=b"x")
    keyed.keyed = True  # the gateway holds its Idempotency-Key
    response = await hedged(tries, after=0.02)(keyed)
    assert response.target == "t1"


async def test_a_streamed_body_is_not_hedged() -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        yield b"x"

    tries = Tries([(0.15, 200), (0.0, 201)])
    response = await hedged(tries, after=0.02)(make_request("PUT", stream=chunks()))
    assert (response.target, tries.attempts) == ("t0", [0])


async def test_a_spent_budget_sends_no_hedge() -> None:
    tries = Tries([(0.15, 200), (0.0, 201)])
    response = await hedged(tries, after=0.02, budget=RetryBudget(0.0))(make_request())
    assert (response.target, tries.attempts) == ("t0", [0])

    budget = RetryBudget(0.5, min_retries=1)
    tries = Tries([(0.15, 200), (0.0, 201)])
    await hedged(tries, after=0.02, budget=budget)(make_request())
    assert budget.retries == 1  # a hedge spends a retry
    tries = Tries([(0.15, 200), (0.0, 201)])
    response = await hedged(tries, after=0.02, budget=budget)(make_request())
    assert response.target == "t0"  # 2 requests x 50%: the one retry is spent


async def test_max_sends_several_hedges_each_after_the_previous() -> None:
    tries = Tries([(5.0, 200), (5.0, 200), (0.0, 202)])
    hedge_stats, metrics = stats()
    started = time.monotonic()
    response = await hedged(tries, after=0.03, max_hedges=2, hedge_stats=hedge_stats)(
        make_request()
    )
    assert time.monotonic() - started >= 0.055
    assert response.target == "t2"
    assert tries.attempts == [0, 1, 2]
    assert sorted(tries.cancelled) == [0, 1]
    assert counted(metrics, "gateway_hedges_total") == 2


async def test_the_deadline_cancels_every_try() -> None:
    tries = Tries([(5.0, 200)])
    handler = deadline("u")(hedged(tries, after=0.02))
    with pytest.raises(UpstreamTimeout):
        await handler(make_request(timeout=0.1))
    assert sorted(tries.cancelled) == [0, 1]


async def test_a_percentile_waits_for_twenty_answers() -> None:
    record = LatencyRecord()
    handler = hedged(Tries([(0.0, 200)]), after="p95", record=record)
    for _ in range(19):
        await handler(make_request())
    assert record.percentile("p95") is None
    tries = Tries([(0.15, 200), (0.0, 201)])
    response = await hedged(tries, after="p95", record=record)(make_request())
    assert (response.target, tries.attempts) == ("t0", [0])  # cold: no hedge
    assert record.count == 20
    p95 = record.percentile("p95")
    assert p95 is not None and p95 < 0.1

    tries = Tries([(5.0, 200), (0.0, 201)])
    started = time.monotonic()
    response = await hedged(tries, after="p95", record=record)(make_request())
    assert response.target == "t1"
    assert time.monotonic() - started < 1.0
    assert record.count == 22  # the hedge's answer and the loser's time so far


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValueError):
        hedged(Tries([(0.0, 200)]), after="p50", record=LatencyRecord())
    with pytest.raises(ValueError):
        hedged(Tries([(0.0, 200)]), after="p95", record=None)


async def test_each_try_has_its_own_client_span_and_the_hedge_a_resend_count() -> None:
    sink = Sink()
    rules = TracingRules("http://127.0.0.1:4318/", 1.0, ("tracecontext",), "svc", 0.5)
    trace, _ = Tracer(rules, sink).begin([])
    tries = Tries([(5.0, 200), (0.0, 201)])
    handler = hedged(client_spans("u")(tries), after=0.02)
    req = make_request()
    req.trace = trace
    await handler(req)
    first, second = sorted(
        sink.spans, key=lambda s: s.attributes.get("http.request.resend_count", 0)
    )
    assert "http.request.resend_count" not in first.attributes
    assert second.attributes["http.request.resend_count"] == 1
    assert first.attributes["error.type"] == "cancelled"  # the loser, cut short
    assert second.attributes["http.response.status_code"] == 201
    # Each try sent one traceparent, naming its own span.
    for headers, span in zip(tries.sent, (first, second), strict=True):
        parents = [v for n, v in headers if n == b"traceparent"]
        assert len(parents) == 1 and span.span_id.encode() in parents[0]


async def test_a_failed_hedge_leaves_the_first_try_to_answer() -> None:
    tries = Tries([(0.1, 200), (0.0, connect_error())])
    hedge_stats, metrics = stats()
    response = await hedged(tries, after=0.02, hedge_stats=hedge_stats)(make_request())
    assert response.target == "t0"
    assert counted(metrics, "gateway_hedge_wins_total", winner="first") == 1


async def test_a_winning_hedge_leaves_the_task_uncancelled() -> None:
    async def converting(request: GatewayRequest) -> GatewayResponse:
        # A layer that turns the cancellation into its own error must not confuse the
        # race: the hedge's answer still stands.
        try:
            return await tries(request)
        except asyncio.CancelledError:
            if request.attempt == 0:
                raise connect_error() from None
            raise

    tries = Tries([(5.0, 200), (0.05, 201)])
    response = await hedged(converting, after=0.02)(make_request())
    assert response.target == "t1"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # our cancel was taken back
    await asyncio.sleep(0.01)  # and no cancellation is left pending for the next await


async def test_a_cancelled_request_cancels_its_hedges() -> None:
    tries = Tries([(5.0, 200), (5.0, 201)])
    request_task = asyncio.ensure_future(hedged(tries, after=0.01)(make_request()))
    await asyncio.sleep(0.1)
    assert len(tries.attempts) == 2
    request_task.cancel()  # the client left
    with pytest.raises(asyncio.CancelledError):
        await request_task
    assert sorted(tries.cancelled) == [0, 1]
