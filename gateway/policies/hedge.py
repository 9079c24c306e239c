"""Hedged requests: when the first try is slow, a second one races it on another target.

`routes[].hedge: {after, max}`. A request that may be sent twice (an idempotent method,
or `request.keyed`: the gateway holds its Idempotency-Key) with a replayable body gets
its first try; if no response headers came within `after` (a duration, or `p95`/`p99`
of the upstream's recent latency, `latency.py`), another try starts, up to `max` of
them, each `after` after the previous one. The first try to return response headers
wins; the others are cancelled (their connections are aborted, so the upstream sees the
disconnect) and any response they produced is closed. A try that fails while another
still runs is not the end: the others are waited for, and only when every try has
failed is the first try's error raised (for the retry policy above to judge).

The first try runs in the request's own task, as an unhedged try does: until a hedge
is sent, the race is one timer. A hedge is a task of its own; when it answers first,
it cancels the request's task, which ends the first try where it waits, and the
cancellation is told apart from any other (the deadline, the client leaving) as
`Expiry` does, by the task's cancellation count.

Unlike Envoy, whose hedging fires only on per-try timeouts, the trigger here is a
latency percentile, so the tail is cut without an operator guessing a timeout.

Why here in the chain (inside retry, around breaker -> bulkhead -> try timeout -> try):
each hedge is a try of its own, admitted by the breaker, holding its own bulkhead slot
and bounded by its own `read_timeout`, and a race in which every try failed is one
outcome for the retry policy, as a single failed try is. Each hedge spends one retry
from the upstream's retry budget (`budget.py`): with the budget spent, the first try
simply runs on; `budget: 0%` composes no hedge at all.

Not hedged: POST, PATCH and others without an Idempotency-Key, even on a route with
`retry_non_idempotent` (a hedge runs two copies at once, both to completion on the
upstream side as often as not; a retry after a failure is a weaker promise), and
streamed bodies (sent once). The hedge goes to a target this request has not tried
(`exclude_targets`, shared by the tries); with a single target, or every other one
unhealthy, it goes to the same target over another connection: one URL often fronts
several instances (a Kubernetes Service, a cloud load balancer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass

from gateway.ops.metrics import HedgeStats
from gateway.policies.budget import RetryBudget
from gateway.policies.latency import PERCENTILES, LatencyRecord
from gateway.policies.retry import IDEMPOTENT_METHODS
from gateway.types import GatewayRequest, GatewayResponse, Handler, Policy

__all__ = ["MIN_PERCENTILE_AFTER", "HedgeRules", "hedge"]

# The least a percentile `after` waits: below a few milliseconds the event loop's own
# turns (and its 1 ms timers) decide, and a hedge would often fire for an answer that
# had already arrived but was not yet read (measured: p95 of 2 ms hedged 29 % of
# requests, not 5 %). A duration the operator wrote is taken as it is.
MIN_PERCENTILE_AFTER = 0.005


@dataclass(frozen=True, slots=True)
class HedgeRules:
    """The `hedge` block: `after` in seconds, or "p95" / "p99"; `max` hedges."""

    after: float | str
    max: int = 1


def hedge(
    rules: HedgeRules,
    budget: RetryBudget,
    latency: LatencyRecord | None,
    stats: HedgeStats,
    *,
    count_requests: bool = False,
) -> Policy:
    """Race up to `rules.max` extra tries against a slow first one. `latency` is the
    upstream's record (fed here, read for a percentile `after`); `count_requests`: no
    retry policy is composed above, so this one tells the budget of each request."""
    if isinstance(rules.after, str):
        if rules.after not in PERCENTILES:
            raise ValueError(f"hedge after must be a duration or one of {list(PERCENTILES)}")
        if latency is None:
            raise ValueError("a percentile hedge needs the upstream's latency record")
        fixed: float | None = None
        percentile: str | None = rules.after
        record = latency
    else:
        fixed, percentile, record = float(rules.after), None, None
    max_hedges = rules.max
    clock = time.monotonic

    def wrap(inner: Handler) -> Handler:
        async def handle(request: GatewayRequest) -> GatewayResponse:
            request.hedge_won = False  # a retry's own race decides it again
            if count_requests:
                budget.record_request()
            if not request.replayable or not (
                request.keyed or request.method in IDEMPOTENT_METHODS
            ):
                return await inner(request)
            if record is None:
                delay = fixed
            else:
                assert percentile is not None
                delay = record.percentile(percentile)
                if delay is not None and delay < MIN_PERCENTILE_AFTER:
                    delay = MIN_PERCENTILE_AFTER
            started = clock()
            if delay is None or delay >= request.deadline.remaining():
                # No hedge can fire (a cold record, or after is past the deadline): one
                # plain try, timed to warm the record.
                response = await inner(request)
                if record is not None:
                    now = clock()
                    record.add(now - started, now)
                return response
            # The first try runs in this task, as an unhedged one does: until a hedge
            # is sent the race costs a timer (a task per request cost 4x as much).
            race = _Race(inner, request, delay, budget, stats, max_hedges, started)
            try:
                response = await inner(request)
            except BaseException as exc:
                response = await race.first_failed(exc)
            else:
                race.settle()
                if race.hedges:
                    await race.first_won()
            if record is not None:
                race.record_into(record)
            return response

        return handle

    return wrap


class _Race:
    """One hedged request while its first try runs in the request's own task: the timer
    that sends hedges (as tasks of their own), and who won. A hedge that answers first
    cancels the request's task, which ends the first try where it waits (its connection
    aborted); `first_failed` then tells that cancellation from any other."""

    __slots__ = (
        "_budget",
        "_cancelling",
        "_delay",
        "_headers",
        "_hedges_left",
        "_inner",
        "_loop",
        "_request",
        "_stats",
        "_task",
        "_timer",
        "first_error",
        "hedges",
        "settled",
        "starts",
        "winner",
    )

    def __init__(
        self,
        inner: Handler,
        request: GatewayRequest,
        delay: float,
        budget: RetryBudget,
        stats: HedgeStats,
        max_hedges: int,
        started: float,
    ) -> None:
        self._inner = inner
        self._request = request
        # Every try gets these headers. With tracing on, the first try's own trace
        # headers may be added to this very list (an unsampled try's, in place); a
        # hedge's try is not the first, so `client_spans` takes them out of its copy
        # and writes the hedge's own span.
        self._headers = request.headers
        self._delay = delay
        self._budget = budget
        self._stats = stats
        self._hedges_left = max_hedges
        self._loop = loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        self._task = task
        self._cancelling = 0
        self.hedges: list[asyncio.Future[GatewayResponse]] = []
        self.starts = [started]  # the first try's, then each hedge's
        self.winner = 0  # index into starts: 0 the first try, i the hedge hedges[i - 1]
        self.settled = False  # the first try is over: hedges no longer cancel the task
        self.first_error = False  # the first try failed on its own
        self._timer = loop.call_at(loop.time() + delay, self._fire)

    def _fire(self) -> None:
        """`after` passed without an answer: send a hedge, if the budget allows."""
        if self.settled or not self._budget.try_spend():
            return
        self._hedges_left -= 1
        request = self._request
        request.hedges += 1  # for the access log
        again = dataclasses.replace(
            request, headers=self._headers, attempt=request.attempt + len(self.starts)
        )
        # (`ensure_future`: a Handler is any awaitable, create_task wants a coroutine)
        hedge = asyncio.ensure_future(self._inner(again))
        hedge.add_done_callback(self._landed)
        self.hedges.append(hedge)
        self.starts.append(time.monotonic())
        self._stats.sent.inc()
        if self._hedges_left:
            self._timer = self._loop.call_at(self._loop.time() + self._delay, self._fire)

    def _landed(self, hedge: asyncio.Future[GatewayResponse]) -> None:
        """A hedge ended: if it answered while the first try still runs, it wins."""
        if self.settled or hedge.cancelled() or hedge.exception() is not None:
            return
        self.settled = True
        self.winner = self.hedges.index(hedge) + 1
        self._timer.cancel()
        self._cancelling = self._task.cancelling()
        self._task.cancel()  # the first try ends where it waits

    def settle(self) -> None:
        """The first try is over: no more hedges, and none may cancel the task."""
        self.settled = True
        self._timer.cancel()

    async def first_won(self) -> None:
        """The first try answered before the hedges: they lose."""
        await _discard(self.hedges)
        self._stats.first_won.inc()

    async def first_failed(self, exc: BaseException) -> GatewayResponse:
        """The first try ended without an answer: cancelled by a winning hedge (return
        its answer), by anything else (cancel the hedges too), or failed on its own
        (wait for the hedges; if they all fail, its error stands)."""
        self.settle()
        if self.winner:
            winner = self.hedges[self.winner - 1]
            others = [h for h in self.hedges if h is not winner]
            # Ours, unless another cancellation (the deadline, the client) came too.
            if self._task.uncancel() > self._cancelling and isinstance(exc, asyncio.CancelledError):
                await _discard(self.hedges)
                raise exc
            await _discard(others)
            self._stats.hedge_won.inc()
            self._request.hedge_won = True
            return winner.result()
        if isinstance(exc, asyncio.CancelledError) or not self.hedges:
            await _discard(self.hedges)
            raise exc
        self.first_error = True
        pending = set(self.hedges)
        try:
            while True:
                for i, hedge in enumerate(self.hedges, 1):
                    if hedge.done() and not hedge.cancelled() and hedge.exception() is None:
                        self.winner = i
                        self._stats.hedge_won.inc()
                        self._request.hedge_won = True
                        return hedge.result()
                pending = {h for h in pending if not h.done()}
                if not pending:
                    raise exc  # every try failed: the first one's error stands
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _discard([h for i, h in enumerate(self.hedges, 1) if i != self.winner])

    def __repr__(self) -> str:
        return (
            f"_Race(tries={len(self.starts)}, winner={self.winner}, "
            f"settled={self.settled}, after={self._delay * 1000:.1f}ms)"
        )

    def record_into(self, record: LatencyRecord) -> None:
        """The winner's time to headers; when a hedge won, the first try's time waited
        until it was cut short, a lower bound of its own: keeping it keeps the slow tail
        in the record (dropping it would pull p95 down, hedge more, and pull it down
        further). A first try that failed is left out, as failures are."""
        now = time.monotonic()
        record.add(now - self.starts[self.winner], now)
        if self.winner and not self.first_error:
            record.add(now - self.starts[0], now)


async def _discard(tasks: list[asyncio.Future[GatewayResponse]]) -> None:
    """Cancel the tries that lost (or are moot), wait until they are gone, and close any
    answer one of them got in the same instant."""
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled() and task.exception() is None:
            await task.result().close()
