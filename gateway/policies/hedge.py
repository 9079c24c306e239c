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

__all__ = ["HedgeRules", "hedge"]


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
        async def race(request: GatewayRequest, delay: float) -> GatewayResponse:
            # Every try gets these headers: a traced try swaps the list on its request
            # while it runs, and a hedge must not inherit the first try's span.
            headers = request.headers
            # (`ensure_future`: a Handler is any awaitable, create_task wants a coroutine)
            tasks: list[asyncio.Future[GatewayResponse]] = [asyncio.ensure_future(inner(request))]
            starts = [clock()]
            pending = set(tasks)
            failures: dict[int, BaseException] = {}
            winner = -1
            hedges_left = max_hedges
            try:
                while True:
                    timeout = max(0.0, starts[-1] + delay - clock()) if hedges_left else None
                    done, pending = await asyncio.wait(
                        pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                    for i, task in enumerate(tasks):
                        if task not in done:
                            continue
                        if task.cancelled():
                            failures[i] = asyncio.CancelledError()
                        elif (exc := task.exception()) is not None:
                            failures[i] = exc
                        elif winner < 0:
                            winner = i
                    if winner >= 0:
                        break
                    if not pending:  # every try failed: the first one's error stands
                        raise failures[min(failures)]
                    if done or not hedges_left:
                        continue  # a try failed: wait for the others (or the hedge time)
                    if not budget.try_spend():
                        hedges_left = 0  # the first try runs on alone
                        continue
                    hedges_left -= 1
                    again = dataclasses.replace(
                        request, headers=headers, attempt=request.attempt + len(tasks)
                    )
                    task = asyncio.ensure_future(inner(again))
                    tasks.append(task)
                    starts.append(clock())
                    pending.add(task)
                    stats.sent.inc()
            finally:
                await _discard([t for i, t in enumerate(tasks) if i != winner])
            if len(tasks) > 1:
                (stats.first_won if winner == 0 else stats.hedge_won).inc()
            if record is not None:
                now = clock()
                record.add(now - starts[winner], now)
                for i in range(winner):
                    if i not in failures:
                        # Cut short, but slower than that: keeping the lower bound keeps
                        # the slow tail in the record (dropping it would pull p95 down,
                        # hedge more, and pull it down further).
                        record.add(now - starts[i], now)
            return tasks[winner].result()

        async def handle(request: GatewayRequest) -> GatewayResponse:
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
            if delay is not None and delay < request.deadline.remaining():
                return await race(request, delay)
            # No hedge can fire (a cold record, or after is past the deadline): one
            # plain try, timed to warm the record.
            if record is None:
                return await inner(request)
            started = clock()
            response = await inner(request)
            now = clock()
            record.add(now - started, now)
            return response

        return handle

    return wrap


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
