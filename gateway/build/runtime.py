"""One compiled config (`Runtime`) and the runtimes a reload replaced (`Retirements`).

`gateway/build/factory.py` compiles settings into a `Runtime`; a reload builds a new one
and swaps one reference, so requests in flight keep the runtime they started with, and
the old one closes what the new one did not take over once its last request is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.build.edge import EdgeResources
from gateway.build.upstreams import Upstream
from gateway.config.models import GatewaySettings
from gateway.dataplane.cache import Cache
from gateway.dataplane.idempotency import Idempotency
from gateway.dataplane.routes import Route
from gateway.dataplane.routing import Router

__all__ = ["Retirements", "Runtime"]

log = logging.getLogger("gateway.runtime")


class Runtime:
    """One compiled config. `active` counts the requests that started on it, so a
    reload can close what only this runtime used once its last request finishes."""

    def __init__(
        self,
        settings: GatewaySettings,
        router: Router[Route],
        upstreams: dict[str, Upstream],
        edge: EdgeResources | None = None,
        cache: Cache | None = None,
        *,
        idempotency: Idempotency | None = None,
    ) -> None:
        self.settings = settings
        self.idempotency = idempotency  # the Idempotency-Key store (`dataplane/idempotency.py`)
        self.cache = cache  # the response cache, when a route caches (`dataplane/cache.py`)
        self.router = router
        self.upstreams = upstreams
        self.edge = edge
        self.access_log = settings.server.access_log
        self.active = 0
        self._idle: asyncio.Event | None = None  # set up only once a reload retires us
        self._hurried = False  # shutting down: stop waiting for requests in `retire`

    def leave(self) -> None:
        """A request that started on this runtime has finished."""
        self.active -= 1
        if self.active == 0 and self._idle is not None:
            self._idle.set()

    async def start(self, previous: Runtime | None = None) -> None:
        """Start background work (health checks) inside the running event loop. A start
        that fails or is cancelled (a shutdown during a reload) closes again what it
        does not share with `previous`, so no health check or pool outlives it."""
        try:
            for upstream in self.upstreams.values():
                await upstream.start()
            if self.edge is not None:
                await self.edge.start()
        except BaseException:
            await self._close_unshared(previous)
            raise

    async def aclose(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.aclose()
        if self.edge is not None:
            await self.edge.aclose()
        if self.cache is not None:
            await self.cache.aclose()
        if self.idempotency is not None:
            await self.idempotency.aclose()

    async def retire(self, successor: Runtime, grace: float) -> None:
        """After a reload: wait for this runtime's requests to finish (up to `grace`
        seconds, or until `hurry`), then close the upstreams the successor does not
        keep."""
        if self.active > 0 and not self._hurried:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._idle.wait()
        await self._close_unshared(successor)

    def hurry(self) -> None:
        """Shutting down: `retire` stops waiting for requests and closes at once."""
        self._hurried = True
        if self._idle is not None:
            self._idle.set()

    async def _close_unshared(self, other: Runtime | None) -> None:
        """Close the upstreams, edge resources and cache `other` does not also hold."""
        kept = {id(u) for u in other.upstreams.values()} if other is not None else set()
        for upstream in self.upstreams.values():
            if id(upstream) not in kept:
                await upstream.aclose()
        if self.edge is not None:
            await self.edge.retire(other.edge if other is not None else None)
        if self.cache is not None and (other is None or other.cache is not self.cache):
            await self.cache.aclose()
        keys = self.idempotency
        if keys is not None and (other is None or other.idempotency is not keys):
            await keys.aclose()

    def __repr__(self) -> str:
        return (
            f"Runtime({len(self.router)} routes, upstreams={sorted(self.upstreams)}, "
            f"active={self.active})"
        )


class Retirements:
    """The runtimes a reload replaced, each finishing its requests in a task of its own
    (`Runtime.retire`); owned here so that a shutdown can end them all cleanly.

    `aclose` does not cancel a retirement halfway through closing a pool: it tells each
    runtime to stop waiting (`hurry`) and awaits the close; only a close that hangs past
    `CLOSE_TIMEOUT` seconds is cancelled."""

    CLOSE_TIMEOUT = 5.0

    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task[None], Runtime] = {}
        self._closed = False

    def retire(self, old: Runtime, successor: Runtime, grace: float) -> None:
        if self._closed:
            old.hurry()  # a reload that raced the shutdown: nothing waits any more
        task = asyncio.create_task(old.retire(successor, grace), name=f"retire {old!r}")
        self._tasks[task] = old
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("closing a replaced runtime failed", exc_info=task.exception())

    async def aclose(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        if not tasks:
            return
        for runtime in self._tasks.values():
            runtime.hurry()
        _, late = await asyncio.wait(tasks, timeout=self.CLOSE_TIMEOUT)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._tasks)

    def __repr__(self) -> str:
        return f"Retirements(pending={len(self._tasks)}, closed={self._closed})"
