"""The circuit breaker: stop calling an upstream that keeps failing, and try it again later.

    closed ──(failure ratio over `window` ≥ `failure_ratio`, ≥ `min_requests` tries)──▶ open
    open ──(`open_for` passed)──▶ half_open
    half_open ──(a trial succeeds)──▶ closed
    half_open ──(a trial fails)──▶ open

While open, tries fail at once with `503 upstream_unhealthy` and `Retry-After` (the
seconds until half-open, at least 1); the upstream is not called. Half-open lets up to
`half_open_requests` trial tries through at a time; the others get the same 503.

Failures are connect errors, resets, timeouts (including a try cut short by the route
deadline) and 5xx responses (which are still passed through to the client). Tries the
upstream never saw (shed by the bulkhead, no healthy target) and tries cancelled
because the client went away count neither way. One breaker belongs to one `Upstream`
and is shared by all of its routes; outcomes of tries admitted before the last state
change are ignored, so a slow straggler cannot re-open a circuit that just closed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gateway.errors import UpstreamError, UpstreamUnhealthy
from gateway.ops.metrics import Gauge
from gateway.policies.window import RollingCounter
from gateway.types import GatewayRequest, GatewayResponse, Handler, Policy

__all__ = [
    "FAILURE_OUTCOMES",
    "BreakerRules",
    "BreakerState",
    "CircuitBreaker",
    "Ticket",
    "breaker",
]

log = logging.getLogger("gateway.breaker")

BreakerState = Literal["closed", "open", "half_open"]
# (generation, is a half-open trial): what `admit` hands out and `record` takes back.
Ticket = tuple[int, bool]
FAILURE_OUTCOMES = frozenset({"connect_error", "reset", "timeout"})
# uvloop's timers run on a millisecond clock: a deadline timer may fire a hair before
# `time.monotonic()` reaches the deadline itself.
_DEADLINE_SLACK = 0.005


@dataclass(frozen=True, slots=True)
class BreakerRules:
    """When a circuit opens and how it closes again (the `circuit_breaker` block)."""

    failure_ratio: float = 0.5  # failed share of the window's tries that opens it
    min_requests: int = 20  # tries in the window before the ratio counts
    window: float = 10.0  # seconds of history the ratio is taken over
    open_for: float = 5.0  # seconds it stays open before half-open trials
    half_open_requests: int = 1  # trial tries let through at a time while half-open


class CircuitBreaker:
    """Per-upstream breaker state. `clock` is injectable so tests need not sleep."""

    __slots__ = (
        "_clock",
        "_failures",
        "_gauge",
        "_generation",
        "_open_until",
        "_state",
        "_total",
        "_trials",
        "failure_ratio",
        "half_open_requests",
        "min_requests",
        "name",
        "open_for",
        "window",
    )

    def __init__(
        self,
        *,
        failure_ratio: float = 0.5,
        min_requests: int = 20,
        window: float = 10.0,
        open_for: float = 5.0,
        half_open_requests: int = 1,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        open_gauge: Gauge | None = None,
    ) -> None:
        self.name = name
        self._gauge = open_gauge
        self.failure_ratio = failure_ratio
        self.min_requests = min_requests
        self.window = window
        self.open_for = open_for
        self.half_open_requests = half_open_requests
        self._clock = clock
        self._state: BreakerState = "closed"
        self._generation = 0
        self._open_until = 0.0
        self._trials = 0
        self._total = RollingCounter(window, clock=clock)
        self._failures = RollingCounter(window, clock=clock)

    @classmethod
    def from_settings(
        cls,
        settings: BreakerRules,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        open_gauge: Gauge | None = None,
    ) -> CircuitBreaker:
        return cls(
            open_gauge=open_gauge,
            failure_ratio=settings.failure_ratio,
            min_requests=settings.min_requests,
            window=settings.window,
            open_for=settings.open_for,
            half_open_requests=settings.half_open_requests,
            name=name,
            clock=clock,
        )

    @property
    def state(self) -> BreakerState:
        if self._state == "open" and self._clock() >= self._open_until:
            self._transition("half_open")
        return self._state

    @property
    def is_open(self) -> bool:
        """True while the circuit is not closed (open or half-open), as the
        `gateway_circuit_open` gauge reports it."""
        return self.state != "closed"

    def retry_after(self) -> int:
        """Whole seconds until the circuit lets a try through again, at least 1."""
        if self.state == "open":
            return max(1, math.ceil(self._open_until - self._clock()))
        return 1

    def admit(self, route: str | None = None) -> Ticket:
        """Let a try through, or raise `UpstreamUnhealthy` (503) without calling it."""
        state = self.state
        if state == "closed":
            return (self._generation, False)
        if state == "half_open" and self._trials < self.half_open_requests:
            self._trials += 1
            return (self._generation, True)
        what = "open" if state == "open" else "half-open, its trial requests are in flight"
        raise UpstreamUnhealthy(
            f"the circuit breaker of upstream {self.name!r} is {what}",
            retry_after=self.retry_after(),
            route=route,
            upstream=self.name,
        )

    def record(self, ticket: Ticket, failed: bool | None) -> None:
        """The outcome of an admitted try: failed, succeeded, or neither (None)."""
        generation, trial = ticket
        if generation != self._generation:
            return  # admitted under an earlier state: its outcome says nothing now
        if trial:
            self._trials -= 1
            if failed is not None:
                self._transition("open" if failed else "closed")
            return
        if failed is None:
            return
        self._total.add()
        if failed:
            self._failures.add()
            total = self._total.total()
            if total >= self.min_requests and self._failures.total() >= self.failure_ratio * total:
                self._transition("open")

    def _transition(self, state: BreakerState) -> None:
        previous = self._state
        self._state = state
        self._generation += 1
        self._trials = 0
        self._total.reset()
        self._failures.reset()
        if self._gauge is not None:
            self._gauge.set(0 if state == "closed" else 1)
        if state == "open":
            self._open_until = self._clock() + self.open_for
            log.warning(
                "circuit opened for %gs (was %s)",
                self.open_for,
                previous,
                extra={"upstream": self.name, "circuit": state},
            )
        else:
            log.info(
                "circuit %s (was %s)",
                state.replace("_", "-"),
                previous,
                extra={"upstream": self.name, "circuit": state},
            )

    def __repr__(self) -> str:
        state = self.state
        if state == "open":
            detail = f"reopens in {max(0.0, self._open_until - self._clock()):.2f}s"
        elif state == "half_open":
            detail = f"trials={self._trials}/{self.half_open_requests}"
        else:
            detail = f"failures={self._failures.total()}/{self._total.total()} in {self.window:g}s"
        return f"CircuitBreaker({self.name!r} {state} {detail})"


def breaker(state: CircuitBreaker) -> Policy:
    """Admit each try through `state` and record how it went."""

    def wrap(inner: Handler) -> Handler:
        async def handle(request: GatewayRequest) -> GatewayResponse:
            ticket = state.admit(request.route)
            try:
                response = await inner(request)
            except UpstreamError as exc:
                state.record(ticket, True if exc.outcome in FAILURE_OUTCOMES else None)
                raise
            except asyncio.CancelledError:
                # The route deadline cut the try short: the upstream did not answer in
                # time. Any other cancellation (the client left) says nothing about it.
                deadline_passed = request.deadline.remaining() < _DEADLINE_SLACK
                state.record(ticket, True if deadline_passed else None)
                raise
            except BaseException:
                state.record(ticket, None)
                raise
            state.record(ticket, response.status >= 500)
            return response

        return handle

    return wrap
