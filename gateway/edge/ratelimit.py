"""Rate limiting: a token bucket per key, in process memory or shared through Redis.

A bucket holds at most `burst` tokens and refills at `rate` tokens a second; a request
takes one or is refused with 429. Buckets are keyed by route plus the client's address,
a header's value, or nothing (the whole route shares one bucket).

Two stores answer the same question, "take one token from this bucket":

- `MemoryStore`, per process: an LRU-bounded dict of buckets.
- `RedisBucketStore`, shared by every replica: the check-and-take is ONE Lua script run
  on the server with the server's own clock (`TIME`), so replicas neither race each
  other nor disagree about time. A Redis that cannot be reached raises
  `StoreUnavailable`; the filter then lets the request through (fail-open) or refuses
  it with 503 (`fail_closed`), and counts it. The client's timeouts are short and a
  failure opens a short back-off window, so a dead Redis never stalls requests.

Every answer of a rate-limited route, allowed or refused, carries the bucket's state
twice over, from the same `Decision`: the `RateLimit-Limit/-Remaining/-Reset` triple
and the IETF draft-10 structured fields (RFC 9651) `RateLimit-Policy: "<route>";q=;w=`
(constant per route, serialised once at build time) and `RateLimit: "<route>";r=;t=`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.edge import EdgeContext, RequestFilter
from gateway.edge.shared_redis import SharedRedis, StoreUnavailable
from gateway.errors import RateLimited, RateLimitUnavailable
from gateway.ops.metrics import Metrics

__all__ = [
    "Decision",
    "MemoryStore",
    "RateLimit",
    "RateLimitFields",
    "RateLimitStore",
    "RedisBucketStore",
    "RedisStoreSpec",
    "StoreUnavailable",
    "make_store",
    "policy_name",
    "rate_limit",
    "whole_seconds",
]

log = logging.getLogger("gateway.ratelimit")

MEMORY_MAX_BUCKETS = 100_000
"""Buckets one process keeps; past it the least recently used one is dropped. A bucket
idle for burst/rate seconds is full again, the same as one never seen, so dropping the
oldest loses nothing unless 100k other clients were seen more recently."""

LOG_EVERY = 10.0  # while Redis stays unreachable, one log line per this many seconds
_MAX_KEY_PART = 64  # longer header values are hashed so a key stays small
_SF_INTEGER_MAX = 999_999_999_999_999  # RFC 9651: an sf-integer has at most 15 digits
# Float noise (3 / 0.1 == 30.000000000000004; Redis returns tokens with 14 digits) must
# not turn a whole number of seconds into the next one up. A nanosecond is far below
# anything a client can act on and far above the noise for any realistic window.
_NOISE = 1e-9


def whole_seconds(seconds: float) -> int:
    """`seconds` rounded up to a whole second, at least 1, at most an sf-integer's
    largest. Every duration the headers carry goes through here, so a shorter duration
    never gives a larger number (Retry-After <= t)."""
    whole = math.ceil(seconds - _NOISE)
    if whole < 1:
        return 1  # after a take the bucket is never full: t is at least one second
    return whole if whole <= _SF_INTEGER_MAX else _SF_INTEGER_MAX


def policy_name(route: str) -> bytes:
    """The route's name as an RFC 9651 sf-string: quoted, `"` and `\\` escaped. An
    sf-string holds printable ASCII only, so any other character (non-ASCII, controls)
    is written as its UTF-8 bytes percent-encoded (`%C3%A9`); `%` itself is left alone,
    so a printable-ASCII name is never changed beyond the escapes."""
    chars = []
    for char in route:
        if char in '"\\':
            chars.append("\\" + char)
        elif " " <= char <= "~":
            chars.append(char)
        else:
            chars.extend(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    return ('"' + "".join(chars) + '"').encode("ascii")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """What the rate-limit filter reads: one route's bucket size, refill and key."""

    rate: float  # tokens added to a bucket per second; required
    burst: int  # a bucket's size, in tokens (requests); required
    key: str = "client_ip"  # client_ip, route or header:NAME; default client_ip
    fail_closed: bool = False  # refuse with 503 when the store is unreachable; default false


@dataclass(frozen=True, slots=True)
class RedisStoreSpec:
    """Where the shared (Redis) bucket store lives. The in-process store is the string
    "memory" instead."""

    redis: str  # redis://, rediss:// or unix:// URL; required
    prefix: str = "gateway:rl:"  # every bucket key starts with it; default gateway:rl:
    timeout: float = 0.2  # seconds for connect, pool wait and reply, each; default 0.2


def _spec(settings: RedisStoreSpec) -> RedisStoreSpec:
    """The same values as a `RedisStoreSpec`, whatever object carries them."""
    return RedisStoreSpec(redis=settings.redis, prefix=settings.prefix, timeout=settings.timeout)


@dataclass(frozen=True, slots=True)
class Decision:
    """One check-and-take: whether a token was taken, and the bucket afterwards."""

    allowed: bool
    limit: int  # the bucket's size (burst)
    remaining: int  # whole tokens left
    reset: float  # seconds until the bucket is full again
    retry_after: float  # seconds until the next token (0 when allowed)


class RateLimitFields:
    """One route's IETF RateLimit fields. The policy (`q` = burst, `w` = seconds to
    refill the whole burst) is constant, so its bytes are made here, once; per request
    only `RateLimit`'s `r` and `t` are formatted."""

    __slots__ = ("_limit", "_state", "policy")

    def __init__(self, route: str, rate: float, burst: int) -> None:
        name = policy_name(route)
        quota = min(burst, _SF_INTEGER_MAX)
        self.policy: bytes = b"%s;q=%d;w=%d" % (name, quota, whole_seconds(burst / rate))
        self._limit = b"%d" % burst
        # Escaped so that one `%` formatting fills in r and t (a `%` in the name stays).
        self._state = name.replace(b"%", b"%%") + b";r=%d;t=%d"

    def headers(self, decision: Decision) -> list[tuple[bytes, bytes]]:
        """All five headers for one decision: the triple, then the two fields. `t` and
        `RateLimit-Reset` are the same number, as are `r` and `RateLimit-Remaining`."""
        reset = whole_seconds(decision.reset)
        remaining = decision.remaining
        if remaining > _SF_INTEGER_MAX:  # only for a burst beyond any sf-integer
            remaining = _SF_INTEGER_MAX
        return [
            (b"ratelimit-limit", self._limit),
            (b"ratelimit-remaining", b"%d" % decision.remaining),
            (b"ratelimit-reset", b"%d" % reset),
            (b"ratelimit-policy", self.policy),
            (b"ratelimit", self._state % (remaining, reset)),
        ]

    def retry_after(self, decision: Decision) -> int:
        """Whole seconds until the next token, never more than `t`: one token comes no
        later than the whole bucket (burst >= 1), and `whole_seconds` is monotonic;
        the `min` holds the contract even so."""
        return min(whole_seconds(decision.retry_after), whole_seconds(decision.reset))

    def __repr__(self) -> str:
        return f"RateLimitFields(policy={self.policy.decode()!r})"


class RateLimitStore(Protocol):
    async def take(self, key: str, rate: float, burst: int) -> Decision: ...

    async def aclose(self) -> None: ...

    def same_settings(self, settings: str | RedisStoreSpec) -> bool: ...


def _decide(tokens: float, rate: float, burst: int, allowed: bool) -> Decision:
    return Decision(
        allowed=allowed,
        limit=burst,
        remaining=max(0, math.floor(tokens)),
        reset=max(0.0, (burst - tokens) / rate),
        retry_after=0.0 if allowed else max(0.0, (1 - tokens) / rate),
    )


class MemoryStore:
    """Buckets in this process: `key -> [tokens, last refill]`, least recently used first."""

    def __init__(
        self,
        max_buckets: int = MEMORY_MAX_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_buckets = max_buckets
        self._clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    async def take(self, key: str, rate: float, burst: int) -> Decision:
        return self.take_now(key, rate, burst)

    def take_now(self, key: str, rate: float, burst: int) -> Decision:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [float(burst), now]
            if len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket[1])
            bucket[0] = min(float(burst), bucket[0] + elapsed * rate)
            bucket[1] = now
        allowed = bucket[0] >= 1.0
        if allowed:
            bucket[0] -= 1.0
        return _decide(bucket[0], rate, burst, allowed)

    def __len__(self) -> int:
        return len(self._buckets)

    async def aclose(self) -> None:
        self._buckets.clear()

    def same_settings(self, settings: str | RedisStoreSpec) -> bool:
        return settings == "memory"

    def __repr__(self) -> str:
        return f"MemoryStore(buckets={len(self._buckets)}, max={self.max_buckets})"


# KEYS[1] the bucket; ARGV rate (tokens/s), burst. State: hash {s, us: last refill as the
# server's TIME, v: tokens}. The clock is the server's, so every replica sees the same
# time; the key expires once the bucket would be full again, when it is the same as absent.
# (Seconds and microseconds are kept apart: Lua prints numbers with 14 digits.)
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local s, us = tonumber(t[1]), tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 's', 'us', 'v')
local tokens = burst
if state[1] and state[2] and state[3] then
  local elapsed = (s - tonumber(state[1])) + (us - tonumber(state[2])) / 1000000
  tokens = math.min(burst, tonumber(state[3]) + math.max(0, elapsed) * rate)
end
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 's', s, 'us', us, 'v', tokens)
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {allowed, tostring(tokens)}
"""


class RedisBucketStore:
    """Buckets in Redis, shared by every gateway pointing at it. One round trip per
    request (EVALSHA of `_TAKE`; redis-py loads the script on NOSCRIPT)."""

    def __init__(self, settings: RedisStoreSpec) -> None:
        settings = _spec(settings)  # plain values, compared by `same_settings`
        self.settings = settings
        self._prefix = settings.prefix
        self._redis = SharedRedis(
            settings.redis,
            settings.timeout,
            log=log,
            log_every=LOG_EVERY,
            name="rate-limit store",
            meanwhile="rate limits are decided without it "
            "(allowed, or refused on fail_closed routes)",
            counted="checks decided",
        )
        self._script = self._redis.client.register_script(_TAKE)

    async def take(self, key: str, rate: float, burst: int) -> Decision:
        keys = [self._prefix + key]

        async def run() -> tuple[int, float]:
            reply: Any = await self._script(keys=keys, args=[rate, burst])
            return int(reply[0]), float(reply[1])

        allowed, tokens = await self._redis.call(run)
        return _decide(tokens, rate, burst, bool(allowed))

    async def aclose(self) -> None:
        await self._redis.aclose()

    def same_settings(self, settings: str | RedisStoreSpec) -> bool:
        return not isinstance(settings, str) and _spec(settings) == self.settings

    def __repr__(self) -> str:
        return f"RedisBucketStore(prefix={self._prefix!r}, {self._redis!r})"


def make_store(
    settings: str | RedisStoreSpec, previous: RateLimitStore | None = None
) -> RateLimitStore:
    """The runtime's one store: "memory", or the Redis one these values describe. A
    reload with the same store settings keeps the old one (and with it every bucket and
    the Redis pool)."""
    if previous is not None and previous.same_settings(settings):
        return previous
    if isinstance(settings, str):
        return MemoryStore()
    return RedisBucketStore(settings)


def _bucket_key(key: str, route: str) -> Callable[[EdgeContext], str]:
    """How a request names its bucket. Route names are unique, so they namespace keys."""
    if key == "route":
        whole = f"{route}|route"
        return lambda ctx: whole
    if key == "client_ip":
        return lambda ctx: f"{route}|ip|{ctx.client_ip}"
    header = key.removeprefix("header:").lower().encode("latin-1")
    missing = f"{route}|h0"  # every request without the header shares this one bucket

    def by_header(ctx: EdgeContext) -> str:
        value = ctx.header(header)
        if value is None:
            return missing
        if len(value) > _MAX_KEY_PART:
            return f"{route}|h#{hashlib.sha256(value).hexdigest()}"
        return f"{route}|h1|{value.decode('latin-1')}"

    return by_header


def rate_limit(
    settings: RateLimit, route: str, store: RateLimitStore, metrics: Metrics | None
) -> RequestFilter:
    """The route's rate-limit filter: take a token or refuse with 429."""
    rate, burst, fail_closed = settings.rate, settings.burst, settings.fail_closed
    bucket_of = _bucket_key(settings.key, route)
    fields = RateLimitFields(route, rate, burst)
    store_errors = metrics.rate_limit_store_errors.labels(route) if metrics else None

    async def check(ctx: EdgeContext) -> None:
        try:
            decision = await store.take(bucket_of(ctx), rate, burst)
        except StoreUnavailable:
            if store_errors is not None:
                store_errors.inc()
            if fail_closed:
                raise RateLimitUnavailable(
                    "the rate-limit store is unreachable and this route fails closed"
                ) from None
            return None
        headers = fields.headers(decision)
        if decision.allowed:
            ctx.response_headers.extend(headers)
            return None
        retry_after = fields.retry_after(decision)
        raise RateLimited(
            f"rate limit of {burst} requests (refilling at {rate:g}/s) spent; "
            f"retry in {retry_after}s",
            headers=[(b"retry-after", str(retry_after).encode()), *headers],
        )

    return check
