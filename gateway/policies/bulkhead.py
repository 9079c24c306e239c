"""The bulkhead: a per-upstream limit on requests in flight, with a bounded FIFO queue.

`asyncio.Semaphore` has no bound on its waiters and no notion of shedding, so the
semaphore is built here from a counter and a deque of futures. A released slot is handed
straight to the oldest waiter (the in-flight count never dips while anyone waits), which
keeps the queue strictly FIFO: a newcomer can never overtake a waiter.

One `Bulkhead` belongs to one `Upstream` and is shared by every route that uses it, so
the upstream never sees more than `max_concurrency` requests from this process. A slot
is held from the try until the response body is finished (`GatewayResponse.close`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

from gateway.errors import UpstreamSaturated, UpstreamTimeout
from gateway.ops.metrics import Gauge
from gateway.policies.expiry import Expiry
from gateway.types import Deadline, GatewayRequest, GatewayResponse, Handler, Policy

__all__ = ["SATURATED_RETRY_AFTER", "Bulkhead", "bulkhead"]

# Seconds a shed client is told to wait: the smallest value Retry-After can say. A
# queue drains in well under a second when the upstream is healthy.
SATURATED_RETRY_AFTER = 1


class Bulkhead:
    """`max_concurrency` slots and up to `max_queue` waiters for one upstream."""

    __slots__ = (
        "_gauge",
        "_inflight",
        "_waiters",
        "max_concurrency",
        "max_queue",
        "name",
        "queue_timeout",
    )

    def __init__(
        self,
        max_concurrency: int,
        max_queue: int,
        queue_timeout: float,
        name: str | None = None,
        queued_gauge: Gauge | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.name = name
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._inflight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._gauge = queued_gauge  # kept equal to the queue's length while it changes

    @property
    def inflight(self) -> int:
        """Slots taken: requests sent to the upstream whose response is not finished."""
        return self._inflight

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody is queued ahead; never waits."""
        if self._inflight < self.max_concurrency and not self._waiters:
            self._inflight += 1
            return True
        return False

    async def acquire(self, deadline: Deadline | None = None, route: str | None = None) -> None:
        """Take a slot, waiting in line for at most `queue_timeout` (or until `deadline`).

        Raises `UpstreamSaturated` (503) when the queue is full or `queue_timeout`
        passes, and `UpstreamTimeout` (504) when the deadline was the tighter limit.
        """
        if self.try_acquire():
            return
        if len(self._waiters) >= self.max_queue:
            raise UpstreamSaturated(
                f"upstream {self.name!r} is at max_concurrency ({self.max_concurrency}) "
                f"and its queue is full (max_queue {self.max_queue})",
                retry_after=SATURATED_RETRY_AFTER,
                route=route,
                upstream=self.name,
            )
        wait = self.queue_timeout
        deadline_limits = False
        if deadline is not None and deadline.remaining() < wait:
            wait = max(deadline.remaining(), 0.0)
            deadline_limits = True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._gauge is not None:
            self._gauge.inc()
        try:
            try:
                with Expiry(wait):
                    await waiter
            finally:
                if self._gauge is not None:
                    self._gauge.dec()
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over in the same instant we gave up (timeout or
                # cancellation): pass it on, or it would be lost for good.
                self.release()
            else:
                waiter.cancel()
                # Gone already if a release() popped it (and skipped it) meanwhile.
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if not isinstance(exc, TimeoutError):
                raise
            if deadline_limits:
                error: UpstreamTimeout | UpstreamSaturated = UpstreamTimeout(
                    f"the route deadline passed while queued for upstream {self.name!r}",
                    route=route,
                    upstream=self.name,
                )
                # The upstream was never called: not a failure for the breaker to count.
                error.outcome = "saturated"
            else:
                error = UpstreamSaturated(
                    f"no slot of upstream {self.name!r} came free within queue_timeout "
                    f"({self.queue_timeout * 1000:.0f} ms)",
                    retry_after=SATURATED_RETRY_AFTER,
                    route=route,
                    upstream=self.name,
                )
            raise error from None

    def release(self) -> None:
        """Give a slot back: to the oldest waiter if there is one, else to the pool."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands; inflight stays the same
                return
        if self._inflight <= 0:
            raise RuntimeError("Bulkhead.release() called more often than acquire()")
        self._inflight -= 1

    def __repr__(self) -> str:
        return (
            f"Bulkhead({self.name!r} inflight={self._inflight}/{self.max_concurrency} "
            f"queued={len(self._waiters)}/{self.max_queue} "
            f"queue_timeout={self.queue_timeout:g}s)"
        )


def bulkhead(state: Bulkhead) -> Policy:
    """Hold one of `state`'s slots from the try until the response body is closed."""

    def wrap(inner: Handler) -> Handler:
        async def handle(request: GatewayRequest) -> GatewayResponse:
            await state.acquire(request.deadline, request.route)
            try:
                response = await inner(request)
            except BaseException:
                state.release()
                raise
            inner_close = response.close
            released = False

            async def close() -> None:
                nonlocal released
                try:
                    await inner_close()
                finally:
                    if not released:
                        released = True
                        state.release()

            response.close = close
            return response

        return handle

    return wrap
