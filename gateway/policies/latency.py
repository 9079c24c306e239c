"""An upstream's recent latency: time to response headers of its last answers.

What `hedge: {after: p95}` reads. A ring of the last `capacity` answers (512 floats,
one array slot written per answer) and the percentiles taken from it, re-sorted at most
every `every` answers (100) or `interval` seconds (1 s), whichever comes first: never
per request. With fewer than `min_samples` answers (20) a percentile is None and no
hedge is sent; while the record warms up it is refreshed on every answer until it has
its first figures, so the 20th answer already gives them.

The record is fed by the hedge policy only (a route without `hedge` pays nothing), and
is shared by every hedging route of one upstream (it lives on the `Upstream`, and a
reload that keeps the upstream keeps it).
"""

from __future__ import annotations

import math
from array import array

__all__ = ["DEFAULT_CAPACITY", "MIN_SAMPLES", "PERCENTILES", "LatencyRecord"]

DEFAULT_CAPACITY = 512
MIN_SAMPLES = 20  # the contract: with fewer recent answers, no hedge
PERCENTILES = {"p95": 0.95, "p99": 0.99}


class LatencyRecord:
    """The last `capacity` latencies (seconds) and their percentiles, refreshed lazily."""

    __slots__ = (
        "_filled",
        "_index",
        "_next_at",
        "_pending",
        "_samples",
        "_values",
        "capacity",
        "every",
        "interval",
        "min_samples",
    )

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        *,
        min_samples: int = MIN_SAMPLES,
        every: int = 100,
        interval: float = 1.0,
    ) -> None:
        if capacity < min_samples:
            raise ValueError("capacity must hold at least min_samples answers")
        self.capacity = capacity
        self.min_samples = min_samples
        self.every = every
        self.interval = interval
        self._samples = array("d", bytes(8 * capacity))
        self._index = 0
        self._filled = 0
        self._pending = 0  # answers since the last refresh
        self._next_at = 0.0  # monotonic time of the next refresh by age
        self._values: dict[str, float] | None = None

    @property
    def count(self) -> int:
        """Answers held (at most `capacity`)."""
        return self._filled

    def add(self, seconds: float, now: float) -> None:
        """One answer's time to response headers; `now` is the caller's clock reading
        (monotonic), so the record needs no clock of its own."""
        i = self._index
        self._samples[i] = seconds
        i += 1
        self._index = 0 if i == self.capacity else i
        if self._filled < self.capacity:
            self._filled += 1
        self._pending += 1
        if (
            self._pending >= self.every
            or now >= self._next_at
            or (self._values is None and self._filled >= self.min_samples)
        ):
            self._refresh(now)

    def percentile(self, name: str) -> float | None:
        """`p95` or `p99` of the recent answers, as of the last refresh; None with
        fewer than `min_samples` answers."""
        values = self._values
        return None if values is None else values[name]

    def _refresh(self, now: float) -> None:
        self._pending = 0
        self._next_at = now + self.interval
        n = self._filled
        if n < self.min_samples:
            self._values = None
            return
        ordered = sorted(self._samples[:n])
        # Nearest rank: the smallest value with at least q of the answers at or below it.
        self._values = {
            name: ordered[max(0, math.ceil(q * n) - 1)] for name, q in PERCENTILES.items()
        }

    def __repr__(self) -> str:
        values = self._values
        shown = (
            "warming up"
            if values is None
            else " ".join(f"{k}={v * 1000:.1f}ms" for k, v in values.items())
        )
        return f"LatencyRecord({self._filled}/{self.capacity} answers, {shown})"
