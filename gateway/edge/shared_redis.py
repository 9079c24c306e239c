"""A Redis client for the gateway's shared stores (the rate limiter's buckets, the
response cache's entries) that fails fast and says so once.

Every call is bounded (short socket timeouts, no redis-py retry, `2 x timeout` overall);
after a failure Redis is not asked for `REDIS_BACKOFF` seconds; each call made without
it raises `StoreUnavailable`, for the caller to decide what that means (a rate limit
decided locally, a cache miss). The outage is logged when it starts, at most once per
`log_every` seconds while it lasts, and when Redis answers again.

redis-py is imported only when such a client is built: it loads OpenTelemetry's SDK
whenever that is installed, which a gateway without `tracing` must never do
(docs/tracing.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

__all__ = [
    "REDIS_BACKOFF",
    "REDIS_MAX_CONNECTIONS",
    "RELEASE_OWNED",
    "SharedRedis",
    "StoreUnavailable",
]

REDIS_MAX_CONNECTIONS = 64  # per process; a request waits at most `timeout` for one
# Delete KEYS[1] only while its value starts with ARGV[1], the caller's owner token:
# the release of a claim taken with `SET NX PX`, which may have expired and been taken
# by another gateway since (the cache's fetch locks, the Idempotency-Key markers).
RELEASE_OWNED = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""
REDIS_BACKOFF = 1.0  # after a failure, seconds during which Redis is not asked at all

T = TypeVar("T")


class StoreUnavailable(Exception):
    """The shared store could not answer; the caller decides what that means."""


class SharedRedis:
    """One store's Redis pool and its outage bookkeeping. The log lines name the store
    (`name`), what happens meanwhile (`meanwhile`) and what is counted (`counted`)."""

    def __init__(
        self,
        url: str,
        timeout: float,
        *,
        log: logging.Logger,
        log_every: float,
        name: str,
        meanwhile: str,
        counted: str,
    ) -> None:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        self.timeout = timeout
        self._errors = (RedisError, OSError, TimeoutError, ValueError, IndexError, TypeError)
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_MAX_CONNECTIONS,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # a retry would double the stall; fail fast
        )
        self.client: Redis = Redis.from_pool(pool)
        self._log = log
        self._log_every = log_every
        self._name = name
        self._meanwhile = meanwhile
        self._counted = counted
        self._down_until = 0.0  # monotonic: skip Redis until then after a failure
        self.failing_since: float | None = None
        self.failures = 0  # calls made without Redis since the last log line
        self._logged_at = 0.0
        self._closed = False

    async def call(self, what: Callable[[], Awaitable[T]], *, bounded: bool = True) -> T:
        """`what()` against Redis, within `2 x timeout` unless not `bounded` (a walk of
        many commands, each bounded by the socket timeout); `StoreUnavailable` when
        Redis cannot answer (or has just failed: the backoff). Errors while reading its
        reply count too."""
        now = time.monotonic()
        if now < self._down_until:
            self._failed(now, None)
        try:
            async with asyncio.timeout(self.timeout * 2 if bounded else None):
                reply = await what()
        except self._errors as exc:
            self._down_until = time.monotonic() + REDIS_BACKOFF
            self._failed(time.monotonic(), exc)
        if self.failing_since is not None:
            self._log.warning(
                "%s reachable again after %.1fs (%d %s without it)",
                self._name,
                time.monotonic() - self.failing_since,
                self.failures,
                self._counted,
                extra={"store": "redis"},
            )
            self.failing_since = None
            self.failures = 0
        return reply

    def _failed(self, now: float, exc: BaseException | None) -> NoReturn:
        """Count the failure and log it, at most once per `log_every` seconds."""
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = now
            self._logged_at = now
            self._log.error(
                "%s unreachable: %s; %s until it answers",
                self._name,
                f"{type(exc).__name__}: {exc}" if exc else "backing off",
                self._meanwhile,
                extra={"store": "redis"},
            )
        elif now - self._logged_at >= self._log_every:
            self._logged_at = now
            self._log.error(
                "%s still unreachable (%d %s without it so far)",
                self._name,
                self.failures,
                self._counted,
                extra={"store": "redis"},
            )
        raise StoreUnavailable(f"{self._name} unreachable") from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self.client.aclose()

    def __repr__(self) -> str:
        state = "down" if self.failing_since is not None else "up"
        return f"{state}, failures={self.failures}"
