"""A rolling count over the last `window` seconds, kept in a few time buckets.

The breaker and the retry budget both ask "how many of X in the last N seconds?" on
every request; a ring of fixed buckets answers that in O(buckets) with constant memory,
where a deque of timestamps would grow with the request rate. The price is that the
window slides in steps of `window / buckets` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["RollingCounter"]


class RollingCounter:
    """Counts events in the last `window` seconds, in `buckets` steps."""

    __slots__ = ("_clock", "_counts", "_epochs", "_width", "window")

    def __init__(
        self,
        window: float,
        buckets: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self.window = window
        self._width = window / buckets
        self._clock = clock
        # Bucket i holds the count for the time step `_epochs[i]`; a stale epoch means 0.
        self._epochs = [-1] * buckets
        self._counts = [0] * buckets

    def add(self, n: int = 1) -> None:
        epoch = int(self._clock() / self._width)
        i = epoch % len(self._counts)
        if self._epochs[i] != epoch:
            self._epochs[i] = epoch
            self._counts[i] = 0
        self._counts[i] += n

    def total(self) -> int:
        now = int(self._clock() / self._width)
        oldest = now - len(self._counts) + 1
        return sum(c for e, c in zip(self._epochs, self._counts, strict=True) if e >= oldest)

    def reset(self) -> None:
        self._epochs = [-1] * len(self._epochs)
        self._counts = [0] * len(self._counts)

    def __repr__(self) -> str:
        return f"RollingCounter({self.total()} in {self.window:g}s)"
