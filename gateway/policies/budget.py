"""The retry budget: retries to an upstream may be at most a share of its recent requests.

Per-request retry limits alone multiply load when an upstream struggles (every request
becomes `1 + attempts` tries, just when the upstream can least afford it). Like Envoy's
`retry_budget` and Finagle's `RetryBudget`, a budget caps retries as a share of
traffic: within the last `window` seconds, retries may be at most `ratio` times the
requests that arrived (first tries), but at least `min_retries` per window are always
allowed. `ratio == 0` turns retries off altogether.

The minimum is Finagle's default, 10 retries a second (100 per 10 s window), rather than
a handful per window: a window minimum of 3 would let a quiet upstream with one dead
target of two fail most requests after its third retry, while Envoy's own minimum (3
retries *in flight*) allows far more than that at low traffic. Above ~50 requests a
second the share is what binds, which is where retry storms happen.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.policies.window import RollingCounter

__all__ = ["DEFAULT_BUDGET_WINDOW", "DEFAULT_MIN_RETRIES", "RetryBudget"]

DEFAULT_BUDGET_WINDOW = 10.0
DEFAULT_MIN_RETRIES = 100  # per window: 10 a second over the default 10 s


class RetryBudget:
    """Shared by every route of one upstream."""

    __slots__ = ("_requests", "_retries", "min_retries", "ratio")

    def __init__(
        self,
        ratio: float,
        window: float = DEFAULT_BUDGET_WINDOW,
        min_retries: int = DEFAULT_MIN_RETRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.min_retries = min_retries
        self._requests = RollingCounter(window, clock=clock)
        self._retries = RollingCounter(window, clock=clock)

    @property
    def requests(self) -> int:
        return self._requests.total()

    @property
    def retries(self) -> int:
        return self._retries.total()

    def record_request(self) -> None:
        """A request arrived (its first try is about to be sent)."""
        self._requests.add()

    def allowed(self) -> int:
        """Retries allowed in the current window."""
        if self.ratio <= 0:
            return 0
        return max(self.min_retries, int(self.ratio * self._requests.total()))

    def try_spend(self) -> bool:
        """Take one retry out of the budget; False when it is spent."""
        if self._retries.total() >= self.allowed():
            return False
        self._retries.add()
        return True

    def __repr__(self) -> str:
        return (
            f"RetryBudget({self.ratio:.0%}: {self._retries.total()}/{self.allowed()} retries "
            f"for {self._requests.total()} requests in {self._requests.window:g}s)"
        )
