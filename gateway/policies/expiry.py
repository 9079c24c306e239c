"""`with Expiry(seconds):` is `async with asyncio.timeout(seconds):` for the hot path.

It behaves as Python 3.11's `asyncio.timeout` does (the current task is cancelled when
the time is up, and the block then raises `TimeoutError`, unless another cancellation
is pending too, which then wins), for a fraction of the cost: a plain (synchronous)
context manager, one timer, and no state machine, rescheduling or re-entry checks
(docs/performance.md has what each cost under `make instructions`). Nesting works as
with `asyncio.timeout`: the inner one that fires raises `TimeoutError`; when an outer
one fires, the inner ones let the cancellation through to it.
"""

from __future__ import annotations

import asyncio

__all__ = ["Expiry"]


class Expiry:
    """Cancel the current task `delay` seconds from now; the block then raises
    `TimeoutError`. `fired` says whether the time was up."""

    __slots__ = ("_cancelling", "_handle", "_task", "fired")

    def __init__(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("Expiry must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self.fired = False
        if delay > 0:
            self._handle: asyncio.Handle = loop.call_at(loop.time() + delay, self._fire)
        else:
            self._handle = loop.call_soon(self._fire)

    def _fire(self) -> None:
        self.fired = True
        self._task.cancel()

    def __enter__(self) -> Expiry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: object,
    ) -> None:
        self._handle.cancel()
        if (
            self.fired
            and self._task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            # No other cancellation is pending: this one is ours to turn into a timeout.
            raise TimeoutError from exc
