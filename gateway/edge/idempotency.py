"""Where Idempotency-Key answers are kept: per process in memory, or in Redis, shared by
every gateway pointing at it (docs/policies.md, "Idempotency keys").

A key has three states. Free; claimed (an in-flight marker: the claimant's random
`owner` token and the request body's fingerprint, held for a `lease` of seconds); or
stored (the fingerprint and the upstream's answer, held for the `ttl`). `claim` takes
a free key, or says what holds it; `complete` turns the claimant's marker into the
stored answer and `release` frees it, both only while the marker is still the
claimant's (its owner token matches), so a claimant whose lease ran out can never
overwrite or free a key someone else has taken since.

In Redis the claim is `SET key marker NX PX lease`, and `complete` / `release` are Lua
compare-and-set scripts, so two replicas never both forward one key. Every call goes
through `SharedRedis` (the rate limiter's and the cache's fail-fast client):
`StoreUnavailable`, fast, when Redis cannot be reached.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from gateway.edge.shared_redis import RELEASE_OWNED, SharedRedis, StoreUnavailable
from gateway.types import Headers

__all__ = [
    "REDIS_PREFIX",
    "Claim",
    "IdempotencyStore",
    "MemoryStore",
    "RedisStore",
    "StoreUnavailable",
    "StoredAnswer",
]

log = logging.getLogger("gateway.idempotency")

REDIS_PREFIX = "gateway:idem:"  # the Redis store's key prefix unless one is configured
LOG_EVERY = 10.0  # seconds between log lines while Redis stays unreachable
EVICT_WARN_EVERY = 60.0  # seconds between warnings that the memory store is full
_OWNER_LEN = 32  # hex digits of an owner token
_FP_LEN = 64  # hex digits of a body fingerprint (SHA-256)
DEFAULT_MAX_SIZE = 64 * 1024 * 1024  # bytes the memory store holds, unless configured
ENTRY_COST = 400  # bytes an entry counts besides its key and answer (objects, dict slot)


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """An upstream's answer as it is replayed: status, headers, whole body."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def encode(self) -> bytes:
        head = {
            "status": self.status,
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
        }
        # json.dumps escapes every newline, so the first one ends the head.
        return json.dumps(head, separators=(",", ":")).encode() + b"\n" + self.body

    @classmethod
    def decode(cls, data: bytes) -> StoredAnswer:
        head, _, body = data.partition(b"\n")
        doc = json.loads(head)
        headers = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in doc["headers"])
        return cls(int(doc["status"]), headers, body)

    def header_list(self) -> Headers:
        return list(self.headers)


@dataclass(frozen=True, slots=True)
class Claim:
    """What `claim` found. `claimed`: the key is ours, under `owner`; `in_flight`:
    another request holds it; `stored`: its answer is `answer`. `fingerprint` is the
    body fingerprint of whoever holds the key (ours when claimed)."""

    state: Literal["claimed", "in_flight", "stored"]
    fingerprint: str
    owner: str = ""
    answer: StoredAnswer | None = None


class IdempotencyStore(Protocol):
    async def claim(self, key: str, fingerprint: str, lease: float) -> Claim: ...

    async def complete(
        self, key: str, owner: str, fingerprint: str, answer: StoredAnswer, ttl: float
    ) -> bool: ...

    async def release(self, key: str, owner: str) -> bool: ...

    async def aclose(self) -> None: ...


def new_owner() -> str:
    return secrets.token_hex(_OWNER_LEN // 2)


@dataclass(slots=True)
class _Slot:
    expires_at: float  # monotonic
    fingerprint: str
    owner: str | None  # set while in flight
    answer: StoredAnswer | None  # set once stored
    cost: int  # bytes it counts against the memory store's max_size


class MemoryStore:
    """One process's keys, at most `max_size` bytes of them. Entries expire lazily: a
    lookup drops an expired one, and each claim drops expired entries from the oldest
    end (entries are kept in the order they were last written, which with one ttl is
    nearly their expiry order). Over `max_size`, the oldest stored answers go before
    their ttl (a key in flight is never dropped: that would let its retry through):
    without that bound, a client sending a new key per request could take the memory
    of the process. Each entry counts its body, its headers, its key and `ENTRY_COST`;
    the answer just stored is never the one dropped, so the store holds at most
    `max_size` and one answer."""

    def __init__(self, clock: Any = time.monotonic, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._stored: OrderedDict[str, None] = OrderedDict()  # keys with answers, oldest first
        self._clock = clock
        self.max_size = max_size
        self.size = 0  # bytes held, by the entries' `_cost`
        self.evicted = 0  # stored answers dropped before their ttl to stay in max_size
        self._warn_after = 0.0

    def __len__(self) -> int:
        return len(self._slots)

    def _get(self, key: str, now: float) -> _Slot | None:
        slot = self._slots.get(key)
        if slot is not None and slot.expires_at <= now:
            self._drop(key)
            return None
        return slot

    def _drop(self, key: str) -> None:
        self.size -= self._slots.pop(key).cost
        self._stored.pop(key, None)

    def _put(self, key: str, slot: _Slot) -> None:
        self._slots[key] = slot
        self.size += slot.cost
        if slot.answer is not None:
            self._stored[key] = None
        if self.size > self.max_size:
            self._evict(key)

    def _evict(self, keep: str) -> None:
        """Drop the oldest stored answers, never `keep`, until within `max_size`: one
        step per answer dropped (in-flight keys are not in `_stored`)."""
        stored = self._stored
        victims = 0
        while self.size > self.max_size and stored:
            oldest = next(iter(stored))
            if oldest == keep:
                break
            self._drop(oldest)
            victims += 1
        self.evicted += victims
        now = time.monotonic()
        if victims and now >= self._warn_after:
            self._warn_after = now + EVICT_WARN_EVERY
            log.warning(
                "idempotency memory store full: oldest answers dropped before their ttl",
                extra={"max_size": self.max_size, "evicted_total": self.evicted},
            )

    def _sweep(self, now: float) -> None:
        for _ in range(8):  # a bounded amount of work per claim
            if not self._slots:
                return
            key, slot = next(iter(self._slots.items()))
            if slot.expires_at > now:
                return
            self._drop(key)

    async def claim(self, key: str, fingerprint: str, lease: float) -> Claim:
        now = self._clock()
        self._sweep(now)
        slot = self._get(key, now)
        if slot is None:
            owner = new_owner()
            self._put(key, _Slot(now + lease, fingerprint, owner, None, _cost(key, None)))
            return Claim("claimed", fingerprint, owner)
        if slot.answer is not None:
            return Claim("stored", slot.fingerprint, answer=slot.answer)
        return Claim("in_flight", slot.fingerprint)

    def _owned(self, key: str, owner: str) -> bool:
        slot = self._get(key, self._clock())
        return slot is not None and slot.owner == owner

    async def complete(
        self, key: str, owner: str, fingerprint: str, answer: StoredAnswer, ttl: float
    ) -> bool:
        if not self._owned(key, owner):
            return False
        self._drop(key)
        slot = _Slot(self._clock() + ttl, fingerprint, None, answer, _cost(key, answer))
        self._put(key, slot)
        return True

    async def release(self, key: str, owner: str) -> bool:
        if not self._owned(key, owner):
            return False
        self._drop(key)
        return True

    async def aclose(self) -> None:
        self._slots.clear()
        self._stored.clear()
        self.size = 0

    def __repr__(self) -> str:
        return f"MemoryStore(keys={len(self._slots)}, bytes={self.size}/{self.max_size})"


def _cost(key: str, answer: StoredAnswer | None) -> int:
    """What an entry counts against `max_size`: roughly the memory it holds."""
    cost = ENTRY_COST + len(key)
    if answer is not None:
        cost += len(answer.body) + sum(len(n) + len(v) for n, v in answer.headers)
    return cost


# Replace the marker with the stored answer only while it is still the caller's: ARGV[1]
# is "I" + owner, the marker's first 33 bytes (`RELEASE_OWNED` deletes it the same way).
_COMPLETE = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""


class RedisStore:
    """Keys in Redis, shared by replicas. A value is `I<owner><fingerprint>` while in
    flight and `S<fingerprint><StoredAnswer.encode()>` once stored; its Redis TTL is the
    lease, then the ttl."""

    def __init__(self, url: str, prefix: str = REDIS_PREFIX, timeout: float = 0.2) -> None:
        self.url = url
        self.prefix = prefix
        self._redis = SharedRedis(
            url,
            timeout,
            log=log,
            log_every=LOG_EVERY,
            name="idempotency store",
            meanwhile="keyed requests are refused with 503 idempotency_unavailable",
            counted="keyed requests",
        )
        client = self._redis.client
        self._client = client
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(RELEASE_OWNED)

    async def claim(self, key: str, fingerprint: str, lease: float) -> Claim:
        full = self.prefix + key
        client = self._client
        px = max(1, int(lease * 1000))
        owner = new_owner()
        marker = f"I{owner}{fingerprint}".encode()
        for _ in range(3):  # the holder may expire between SET and GET: ask again
            taken = await self._redis.call(lambda: client.set(full, marker, nx=True, px=px))
            if taken:
                return Claim("claimed", fingerprint, owner)
            data: bytes | str | None = await self._redis.call(lambda: client.get(full))
            if data is not None:
                return _parse(data.encode("latin-1") if isinstance(data, str) else data)
        raise StoreUnavailable("idempotency store: the key kept changing hands")

    async def complete(
        self, key: str, owner: str, fingerprint: str, answer: StoredAnswer, ttl: float
    ) -> bool:
        value = b"S" + fingerprint.encode() + answer.encode()
        args: list[bytes | str | int] = [f"I{owner}", value, max(1, int(ttl * 1000))]
        script = self._complete
        done = await self._redis.call(lambda: script(keys=[self.prefix + key], args=args))
        return bool(done)

    async def release(self, key: str, owner: str) -> bool:
        script = self._release
        done = await self._redis.call(lambda: script(keys=[self.prefix + key], args=[f"I{owner}"]))
        return bool(done)

    async def aclose(self) -> None:
        await self._redis.aclose()

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r}, redis={self._redis!r})"


def _parse(data: bytes) -> Claim:
    try:
        return _parse_value(data)
    except (ValueError, KeyError, TypeError) as exc:  # json's and the codecs' errors
        raise StoreUnavailable("idempotency store: an entry it cannot read") from exc


def _parse_value(data: bytes) -> Claim:
    kind = data[:1]
    if kind == b"I":
        fingerprint = data[1 + _OWNER_LEN : 1 + _OWNER_LEN + _FP_LEN].decode("ascii")
        return Claim("in_flight", fingerprint)
    if kind == b"S":
        fingerprint = data[1 : 1 + _FP_LEN].decode("ascii")
        return Claim("stored", fingerprint, answer=StoredAnswer.decode(data[1 + _FP_LEN :]))
    raise StoreUnavailable("idempotency store: an entry it cannot read")
