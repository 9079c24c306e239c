"""The response cache (docs/cache.md): an in-memory LRU store shared by every caching
route of a process, or a Redis store shared by replicas (`RedisStore`: a failing Redis
is a miss, counted and logged, never an error), and `RouteCache`, what one route's
requests go through in place of calling its handler directly (`app.py`, one check per
request when the route caches).

The rules (freshness, storability, `Vary`) are `cacherules.py`. Here: the key (the
route, the target as the client sent it, the values of the `Vary`'d request headers;
GET and HEAD share it), hits with `Age` and RFC 9211 `Cache-Status`, revalidation of
stale entries, 304s to a client's own conditional request, coalescing of concurrent
misses (one upstream request; the others wait for its stored answer, or, when it is not
storable, go upstream at once and the key is remembered as not storable for
`HIT_FOR_MISS` seconds), bodies teed into the store as they stream to the client,
RFC 5861's stale answers (`stale-while-revalidate`: served at once while one background
refresh per key goes upstream; `stale-if-error`: served instead of an upstream failure),
and purges.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from gateway.dataplane.cacherules import (
    Freshness,
    RequestDirectives,
    current_age,
    freshness,
    http_time,
    request_directives,
    vary_names,
    vary_values,
)
from gateway.edge.shared_redis import RELEASE_OWNED, SharedRedis, StoreUnavailable
from gateway.errors import (
    GatewayError,
    NotCached,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.ops.metrics import Metrics
from gateway.types import (
    Deadline,
    GatewayRequest,
    GatewayResponse,
    Handler,
    Headers,
    WholeBody,
    closed,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "HIT_FOR_MISS",
    "REDIS_PREFIX",
    "Cache",
    "Entry",
    "MemoryStore",
    "RedisStore",
    "RouteCache",
    "StoreUnavailable",
]

log = logging.getLogger("gateway.cache")

HIT_FOR_MISS = 10.0  # seconds a key whose answer was not storable is not waited for
REDIS_PREFIX = "gateway:cache:"  # the Redis store's key prefix unless one is configured
REVALIDATE_MARGIN = 600.0  # seconds an entry with validators outlives its windows in Redis
LOG_EVERY = 60.0  # while Redis stays unreachable, one log line per this many seconds
CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
_UNSAFE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
# Not kept with a stored answer: framing (recomputed), the age (recomputed per hit).
_NOT_STORED = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"age"}
)
# Not taken from a 304 into the stored head (RFC 9111 3.2).
_NOT_UPDATED = frozenset({b"content-length", b"content-encoding", b"transfer-encoding"})
# What a 304 to the client keeps of the stored head (RFC 9110 15.4.5).
_IN_304 = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary", b"last-modified"}
)
_CONDITIONAL = frozenset({b"if-none-match", b"if-modified-since", b"if-match", b"if-range"})
_NOT_REFRESHED = _CONDITIONAL | {b"cache-control"}
# Upstream statuses a `stale-if-error` entry is served in place of (RFC 5861 4).
_ERROR_STATUSES = frozenset({500, 502, 503, 504})

Primary = tuple[str, str]  # (route, target as sent: path and query)
Key = tuple[str, str, tuple[bytes, ...], tuple[bytes, ...]]  # + vary names, their values


class Entry:
    """One stored response (a variant): status, head, identity-or-upstream-coded bytes,
    and what its freshness is computed from."""

    __slots__ = (
        "body",
        "etag",
        "headers",
        "initial_age",
        "key",
        "last_modified",
        "lifetime",
        "no_cache",
        "shared_with_auth",
        "size",
        "stale_if_error",
        "stale_while_revalidate",
        "status",
        "stored_at",
    )

    def __init__(
        self, key: Key, status: int, headers: Headers, body: bytes, fresh: Freshness, now: float
    ) -> None:
        assert fresh.lifetime is not None
        self.key = key
        self.status = status
        self.headers = [(n, v) for n, v in headers if n.lower() not in _NOT_STORED]
        self.body = body
        self.lifetime = fresh.lifetime
        self.initial_age = fresh.initial_age
        self.no_cache = fresh.no_cache
        self.shared_with_auth = fresh.shared_with_auth
        self.stale_while_revalidate = fresh.stale_while_revalidate
        self.stale_if_error = fresh.stale_if_error
        self.stored_at = now
        self.etag = _get(self.headers, b"etag")
        self.last_modified = _get(self.headers, b"last-modified")
        self.size = len(body) + sum(len(n) + len(v) for n, v in self.headers) + 64

    def age(self, now: float) -> float:
        return current_age(self.initial_age, self.stored_at, now)

    def ttl(self, now: float) -> float:
        return self.lifetime - self.age(now)

    def usable(self, now: float) -> bool:
        """Fresh, and allowed to be served without revalidation."""
        return not self.no_cache and self.ttl(now) > 0

    def within(self, window: float, now: float) -> bool:
        """Stale for no more than `window` seconds (an RFC 5861 window; 0: never)."""
        return window > 0 and not self.no_cache and -self.ttl(now) <= window

    def redis_ttl(self, now: float) -> float:
        """Seconds the entry is worth keeping in a shared store: its freshness left, plus
        its stale windows, plus `REVALIDATE_MARGIN` when it has validators (a stale
        entry that can be revalidated with a 304 is still worth having)."""
        ttl = self.ttl(now) + max(self.stale_while_revalidate, self.stale_if_error)
        if self.etag is not None or self.last_modified is not None:
            ttl += REVALIDATE_MARGIN
        return ttl

    def encode(self) -> bytes:
        """The entry as bytes for a shared store: 4 bytes of metadata length, the
        metadata (JSON), the body as it is."""
        meta = orjson.dumps(
            [
                self.status,
                [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
                self.lifetime,
                self.initial_age,
                self.no_cache,
                self.shared_with_auth,
                self.stale_while_revalidate,
                self.stale_if_error,
                self.stored_at,
            ]
        )
        return struct.pack(">I", len(meta)) + meta + self.body

    @classmethod
    def decode(cls, key: Key, data: bytes) -> Entry:
        """An entry `encode` made (ValueError when `data` is not one)."""
        if len(data) < 4:
            raise ValueError("truncated cache entry")
        (length,) = struct.unpack(">I", data[:4])
        meta = orjson.loads(data[4 : 4 + length])
        (status, headers, lifetime, initial_age, no_cache, shared, swr, sie, stored_at) = meta
        entry = cls.__new__(cls)
        entry.key = key
        entry.status = int(status)
        entry.headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]
        entry.body = data[4 + length :]
        entry.lifetime = float(lifetime)
        entry.initial_age = float(initial_age)
        entry.no_cache = bool(no_cache)
        entry.shared_with_auth = bool(shared)
        entry.stale_while_revalidate = float(swr)
        entry.stale_if_error = float(sie)
        entry.stored_at = float(stored_at)
        entry.etag = _get(entry.headers, b"etag")
        entry.last_modified = _get(entry.headers, b"last-modified")
        entry.size = len(entry.body) + sum(len(n) + len(v) for n, v in entry.headers) + 64
        return entry

    def __repr__(self) -> str:
        return f"Entry({self.key[1]!r}, {self.status}, {self.size}B, lifetime={self.lifetime})"


class MemoryStore:
    """Entries by key, least recently used evicted once `max_size` bytes are held."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.size = 0
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._vary: dict[Primary, tuple[bytes, ...]] = {}  # the latest Vary names per key
        self._by_primary: dict[Primary, set[Key]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def names(self, primary: Primary) -> tuple[bytes, ...] | None:
        return self._vary.get(primary)

    def get(self, key: Key) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, entry: Entry) -> None:
        key = entry.key
        primary = (key[0], key[1])
        if key in self._entries:
            self._remove(key)
        self._vary[primary] = key[2]
        self._entries[key] = entry
        self._by_primary.setdefault(primary, set()).add(key)
        self.size += entry.size
        while self.size > self.max_size and self._entries:
            self._remove(next(iter(self._entries)))

    def _remove(self, key: Key) -> None:
        entry = self._entries.pop(key)
        self.size -= entry.size
        primary = (key[0], key[1])
        keys = self._by_primary.get(primary)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_primary[primary]
                self._vary.pop(primary, None)

    def purge(self, match: Callable[[Primary], bool]) -> int:
        """Remove every variant whose (route, target) `match`es; how many."""
        keys = [k for p, ks in self._by_primary.items() if match(p) for k in ks]
        for key in keys:
            self._remove(key)
        return len(keys)

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._entries)} entries, {self.size}/{self.max_size}B)"


def _glob(text: str) -> str:
    """`text` matched literally in a Redis SCAN pattern."""
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)


_TAG = 16  # hex digits of a variant's tag in its key
_NAMES_TAG = "vary-names------"  # the tag of a target's Vary names key (same width)
_ANY_TAG = "?" * _TAG
PUMP_TIMEOUT = 30.0  # seconds a followed body may take, when the route sets no timeout
REMOTE_POLL = 0.02  # seconds between looks at another gateway's fetch of a key


class RedisStore:
    """Entries in Redis, shared by every gateway pointing at it (docs/cache.md).

    Keys: `<prefix><route>:<tag>:<target>`, the route percent-encoded (no `:` in it),
    the tag 16 hex digits of the hash of the `Vary`'d names and values (one key per
    variant), or `vary-names------` for the key holding the target's latest Vary names.
    A value is `Entry.encode()`'s bytes; its Redis TTL is `Entry.redis_ttl`. Eviction
    under `maxmemory` is Redis's own (`allkeys-lru`). Every call goes through
    `SharedRedis` (the rate limiter's client too): `StoreUnavailable`, fast, when Redis
    cannot be reached."""

    def __init__(self, url: str, prefix: str = REDIS_PREFIX, timeout: float = 0.2) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self.size = 0  # not known here: Redis holds the bytes
        self._redis = SharedRedis(
            url,
            timeout,
            log=log,
            log_every=LOG_EVERY,
            name="cache store",
            meanwhile="requests are served as misses",
            counted="requests served",
        )
        self._client = self._redis.client
        self._release = self._client.register_script(RELEASE_OWNED)

    def __len__(self) -> int:
        return 0  # not known here

    async def _call(self, what: Callable[[], Awaitable[Any]], *, bounded: bool = True) -> Any:
        return await self._redis.call(what, bounded=bounded)

    def _key(self, route: str, tag: str, target: str) -> str:
        return f"{self.prefix}{quote(route, safe='')}:{tag}:{target}"

    @staticmethod
    def _tag(names: tuple[bytes, ...], values: tuple[bytes, ...]) -> str:
        raw = b"\0".join(names) + b"\1" + b"\0".join(values)
        return hashlib.sha256(raw).hexdigest()[:_TAG]

    async def lookup(
        self, route: str, target: str, headers: Headers
    ) -> tuple[Key | None, Entry | None]:
        """The key and entry of the variant `headers` select: one round trip (the Vary
        names and the variant of a target without Vary in one MGET), two with Vary."""
        names_key = self._key(route, _NAMES_TAG, target)
        plain_key = self._key(route, self._tag((), ()), target)
        client = self._client
        raw_names, data = await self._call(lambda: client.mget(names_key, plain_key))
        if raw_names is None:
            return None, None
        names = tuple(n for n in bytes(raw_names).split(b",") if n)
        key: Key = (route, target, names, vary_values(headers, names))
        if names:
            variant = self._key(route, self._tag(names, key[3]), target)
            data = await self._call(lambda: client.get(variant))
        if data is None:
            return key, None
        try:
            return key, Entry.decode(key, bytes(data))
        except (ValueError, TypeError, struct.error) as exc:
            log.warning("unreadable cache entry for %s: %r", target, exc)
            return key, None

    def _lock_key(self, route: str, tag: str, target: str) -> str:
        # Outside the entries' `<prefix><route>:` space, so a purge never counts it.
        return f"{self.prefix.rstrip(':')}-fetching:{quote(route, safe='')}:{tag}:{target}"

    def lock_tag(self, key: Key | None) -> str:
        """The fetch lock's tag for `key`: its variant's, or one for the whole target
        while its Vary names are not known."""
        return self._tag(key[2], key[3]) if key is not None else "any"

    async def claim(self, route: str, tag: str, target: str, ttl: float) -> str | None:
        """Take the fetch lock of a key for `ttl` seconds (`SET NX PX`): a token to
        release it with, or None when another gateway holds it."""
        token = secrets.token_hex(8)
        ms = max(1, int(ttl * 1000))
        lock = self._lock_key(route, tag, target)
        got = await self._call(lambda: self._client.set(lock, token, nx=True, px=ms))
        return token if got else None

    async def release(self, route: str, tag: str, target: str, token: str) -> None:
        """Drop the fetch lock if it is still `token`'s (it may have expired and been
        taken by another gateway since)."""
        lock = self._lock_key(route, tag, target)
        script = self._release
        await self._call(lambda: script(keys=[lock], args=[token]))

    async def held(self, route: str, tag: str, target: str) -> bool:
        lock = self._lock_key(route, tag, target)
        return bool(await self._call(lambda: self._client.exists(lock)))

    async def put(self, entry: Entry) -> None:
        route, target, names, values = entry.key
        ttl_ms = max(1, int(entry.redis_ttl(time.time()) * 1000))
        pipe = self._client.pipeline(transaction=False)
        pipe.set(self._key(route, _NAMES_TAG, target), b",".join(names), px=ttl_ms)
        pipe.set(self._key(route, self._tag(names, values), target), entry.encode(), px=ttl_ms)
        await self._call(pipe.execute)

    async def purge(self, route: str | None, path: str | None, prefix: str | None) -> int:
        """SCAN for the matching keys and UNLINK them: a walk over the whole keyspace
        of the Redis database (docs/cache.md). Returns how many variants went."""
        base = _glob(self.prefix) + (_glob(quote(route, safe="")) if route is not None else "*")
        if path is not None:
            pattern = f"{base}:{_ANY_TAG}:{_glob(path)}"
        elif prefix is not None:
            pattern = f"{base}:{_ANY_TAG}:{_glob(prefix)}*"
        else:
            pattern = f"{base}:*"
        client = self._client

        async def walk() -> int:
            purged = 0
            batch: list[bytes] = []
            async for key in client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    await client.unlink(*batch)
                    purged += sum(1 for k in batch if _NAMES_TAG.encode() not in k)
                    batch = []
            if batch:
                await client.unlink(*batch)
                purged += sum(1 for k in batch if _NAMES_TAG.encode() not in k)
            return purged

        return await self._redis.call(walk, bounded=False)  # each command is bounded

    async def aclose(self) -> None:
        await self._redis.aclose()

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r}, {self._redis!r})"


class Cache:
    """The process's cache: the store (in memory, or Redis shared by replicas), the
    object size limit, the keys being fetched (coalescing, per process whatever the
    store) and those recently found not storable (hit-for-miss), and the metrics.
    Shared by every caching route and kept across reloads while its settings hold."""

    def __init__(
        self,
        max_size: int,
        max_object_size: int,
        metrics: Metrics | None = None,
        store: RedisStore | None = None,
    ) -> None:
        self.store: MemoryStore | RedisStore = store if store is not None else MemoryStore(max_size)
        self.max_object_size = max_object_size
        self.inflight: dict[tuple[Primary, tuple[bytes, ...]], _Flight] = {}
        self.not_storable: dict[Primary, float] = {}  # until when (monotonic)
        self.refreshing: set[Key] = set()  # keys with a background refresh under way
        self.tasks: set[asyncio.Task[None]] = set()  # those refreshes (kept referenced)
        self._metrics = metrics
        self._results: dict[tuple[str, str], Any] = {}
        self._errors: dict[str, Any] = {}
        self._bytes = metrics.cache_bytes if metrics is not None else None

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in a task of its own, kept referenced until it ends (`tasks`,
        which `aclose` waits for)."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def count(self, route: str, result: str) -> None:
        if self._metrics is None:
            return
        child = self._results.get((route, result))
        if child is None:
            child = self._results[(route, result)] = self._metrics.cache_requests.labels(
                route, result
            )
        child.inc()

    def store_error(self, route: str) -> None:
        """A request of `route` the shared store failed (served as a miss)."""
        if self._metrics is None:
            return
        child = self._errors.get(route)
        if child is None:
            child = self._errors[route] = self._metrics.cache_store_errors.labels(route)
        child.inc()

    async def lookup(
        self, route: str, target: str, headers: Headers
    ) -> tuple[Key | None, Entry | None]:
        """The stored variant of (route, target) that `headers` select, with its key
        (None: no Vary names known for the target). A failing store: (None, None)."""
        store = self.store
        if isinstance(store, MemoryStore):
            names = store.names((route, target))
            if names is None:
                return None, None
            key: Key = (route, target, names, vary_values(headers, names))
            return key, store.get(key)
        try:
            return await store.lookup(route, target, headers)
        except StoreUnavailable:
            self.store_error(route)
            return None, None

    def put(self, entry: Entry, then: Callable[[bool], None] | None = None) -> None:
        """Store `entry`; `then` hears whether it was (with Redis: once the write is
        done, in a task of its own; a failed write is counted and logged)."""
        store = self.store
        if isinstance(store, MemoryStore):
            store.put(entry)
            self._gauge()
            if then is not None:
                then(True)
            return

        async def write() -> None:
            stored = False
            try:
                await store.put(entry)
                stored = True
            except StoreUnavailable:
                self.store_error(entry.key[0])
            finally:
                if then is not None:
                    then(stored)

        self.spawn(write())

    def _match(
        self, route: str | None, path: str | None, prefix: str | None
    ) -> Callable[[Primary], bool]:
        def match(primary: Primary) -> bool:
            name, target = primary
            if route is not None and name != route:
                return False
            if path is not None and target != path:
                return False
            return prefix is None or target.startswith(prefix)

        return match

    def purge(
        self, route: str | None = None, path: str | None = None, prefix: str | None = None
    ) -> int:
        """Remove stored responses: a route's, one target of a route's, or every
        route's under a path prefix. Returns how many variants went. With Redis the
        removal runs in a task of its own and 0 is returned: `apurge` waits for it
        and counts."""
        match = self._match(route, path, prefix)
        self.not_storable = {p: t for p, t in self.not_storable.items() if not match(p)}
        store = self.store
        if isinstance(store, MemoryStore):
            purged = store.purge(match)
            self._gauge()
            return purged

        async def run() -> None:
            await self._redis_purge(store, route, path, prefix)

        self.spawn(run())
        return 0

    async def apurge(
        self, route: str | None = None, path: str | None = None, prefix: str | None = None
    ) -> int:
        """`purge`, waiting for a Redis store's removal and counting it (0 when Redis
        failed: counted in the store errors, logged)."""
        store = self.store
        if isinstance(store, MemoryStore):
            return self.purge(route, path, prefix)
        match = self._match(route, path, prefix)
        self.not_storable = {p: t for p, t in self.not_storable.items() if not match(p)}
        return await self._redis_purge(store, route, path, prefix)

    async def _redis_purge(
        self, store: RedisStore, route: str | None, path: str | None, prefix: str | None
    ) -> int:
        try:
            return await store.purge(route, path, prefix)
        except StoreUnavailable:
            self.store_error(route or "")
            return 0

    def _gauge(self) -> None:
        if self._bytes is not None:
            self._bytes.set(self.store.size)

    async def aclose(self) -> None:
        """Close the Redis store's connections (nothing to do for memory)."""
        if isinstance(self.store, RedisStore):
            await self.store.aclose()

    def __repr__(self) -> str:
        return f"Cache({self.store!r}, max_object_size={self.max_object_size})"


class RouteCache:
    """One caching route: its name and `default_ttl`, over the shared `Cache`, and its
    `timeout`, which bounds a background refresh (None: the time the request that
    started it had left)."""

    __slots__ = ("cache", "default_ttl", "route", "timeout")

    def __init__(
        self, cache: Cache, route: str, default_ttl: float, timeout: float | None = None
    ) -> None:
        self.cache = cache
        self.route = route
        self.default_ttl = default_ttl
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"RouteCache({self.route!r}, default_ttl={self.default_ttl})"

    async def fetch(
        self, request: GatewayRequest, target: str, handler: Handler
    ) -> GatewayResponse:
        """The answer to `request` (whose client sent `target`): from the store, from a
        revalidation, from another request's fetch, or from `handler`; with
        `Cache-Status` in every case, on the error a failure raises too."""
        try:
            response, status = await self._fetch(request, target, handler)
        except GatewayError as exc:
            exc.headers.append((b"cache-status", b"gateway; fwd=miss"))
            raise
        response.headers.append((b"cache-status", status))
        return response

    async def _fetch(
        self, request: GatewayRequest, target: str, handler: Handler
    ) -> tuple[GatewayResponse, bytes]:
        cache = self.cache
        primary = (self.route, target)
        method = request.method
        if method not in CACHEABLE_METHODS:
            response = await handler(request)
            if method in _UNSAFE_METHODS and response.status < 400:
                await cache.apurge(route=self.route, path=target)  # RFC 9111 4.4
            cache.count(self.route, "bypass")
            return response, b"gateway; fwd=method"
        headers = request.headers
        authorized = any(n == b"authorization" for n, _ in headers)
        directives = request_directives(headers)
        now = time.time()
        key, entry = await cache.lookup(self.route, target, headers)
        if entry is not None and authorized and not entry.shared_with_auth:
            entry = None
        if directives is not None:
            return await self._directed(
                request, handler, target, entry, key, directives, authorized
            )
        if entry is not None:
            if entry.usable(now):
                cache.count(self.route, "hit")
                ttl = int(entry.ttl(now))
                return self._answer(entry, request, now), b"gateway; hit; ttl=%d" % ttl
            if entry.within(entry.stale_while_revalidate, now):
                # RFC 5861 3: served stale at once (a hit with a ttl of 0 or below, RFC
                # 9211 2.2), one refresh per key going upstream off the request path.
                cache.count(self.route, "stale")
                self._refresh(entry, request, handler, authorized)
                ttl = int(entry.ttl(now))
                return self._answer(entry, request, now), b"gateway; hit; ttl=%d" % ttl
            try:
                if entry.etag is not None or entry.last_modified is not None:
                    return await self._revalidate(entry, request, handler, authorized)
                cache.count(self.route, "stale")
                response = await self._upstream(request, handler, entry)
                stored = self._store(request, response, primary, authorized, None)
                return response, b"gateway; fwd=stale" + (b"; stored" if stored else b"")
            except _ServeStale as failed:  # RFC 5861 4: stale-if-error
                now = time.time()
                left = b"; ttl=%d" % int(entry.ttl(now))
                return self._answer(entry, request, now), b"gateway; fwd=stale" + (
                    failed.status + left + failed.detail
                )
        if method == "HEAD":  # HEAD is answered from a GET's entry; it never fills one
            cache.count(self.route, "miss")
            return await handler(request), b"gateway; fwd=miss"
        return await self._miss(request, handler, target, key, authorized)

    async def _miss(
        self,
        request: GatewayRequest,
        handler: Handler,
        target: str,
        key: Key | None,
        authorized: bool,
    ) -> tuple[GatewayResponse, bytes]:
        cache = self.cache
        headers = request.headers
        primary = (self.route, target)
        # A miss: coalesce with a fetch of the same key already under way. A client's
        # conditional request goes upstream as it is: its 304 says nothing of the key.
        flight = (primary, key[3] if key is not None else ())
        until = cache.not_storable.get(primary)
        conditional = any(n in _CONDITIONAL for n, _ in headers)
        if until is not None and until <= time.monotonic():
            del cache.not_storable[primary]
            until = None
        if until is not None or conditional:
            cache.count(self.route, "miss")
            response, stored = await self._forward(request, handler, primary, authorized)
            return response, b"gateway; fwd=miss" + (b"; stored" if stored else b"")
        waiting = cache.inflight.get(flight)
        if waiting is not None:
            await self._wait(waiting, request, follow=True)
            if waiting.follows(request.headers, authorized):
                cache.count(self.route, "collapsed")
                return waiting.follower(), b"gateway; fwd=miss; collapsed"
            await self._wait(waiting, request)
            stored = waiting.stored.result()
            if stored:
                _, entry = await cache.lookup(self.route, target, headers)
                now = time.time()
                if (
                    entry is not None
                    and entry.usable(now)
                    and (entry.shared_with_auth or not authorized)
                ):
                    cache.count(self.route, "collapsed")
                    return self._answer(entry, request, now), b"gateway; fwd=miss; collapsed"
            cache.count(self.route, "miss")
            response, stored = await self._forward(request, handler, primary, authorized)
            return response, b"gateway; fwd=miss" + (b"; stored" if stored else b"")
        shared = _Flight(asyncio.get_running_loop())
        future = shared.stored
        cache.inflight[flight] = shared

        def give_up() -> None:  # a failed fetch: let the waiters try for themselves
            if not future.done():
                if cache.inflight.get(flight) is shared:
                    del cache.inflight[flight]
                future.set_result(False)

        # With the Redis store, gateways sharing it coalesce too: the first takes the
        # key's fetch lock, the others watch the store for its answer.
        store = cache.store
        lock: tuple[RedisStore, str, str] | None = None
        if isinstance(store, RedisStore):
            tag = store.lock_tag(key)
            try:
                token = await store.claim(self.route, tag, target, request.deadline.remaining())
            except StoreUnavailable:
                cache.store_error(self.route)
            else:
                if token is not None:
                    lock = (store, tag, token)
                else:
                    try:
                        entry = await self._remote(store, tag, target, request, authorized)
                    except BaseException:
                        give_up()
                        raise
                    if entry is not None:
                        if cache.inflight.get(flight) is shared:
                            del cache.inflight[flight]
                        future.set_result(True)  # local waiters find it in the store
                        cache.count(self.route, "collapsed")
                        now = time.time()
                        return self._answer(entry, request, now), b"gateway; fwd=miss; collapsed"

        def settle(stored: bool) -> None:
            if cache.inflight.get(flight) is shared:
                del cache.inflight[flight]
            if not future.done():
                future.set_result(stored)
            if not stored:
                cache.not_storable[primary] = time.monotonic() + HIT_FOR_MISS
            if lock is not None:
                self._release(lock, target)

        cache.count(self.route, "miss")
        try:
            response, stored = await self._forward(
                request, handler, primary, authorized, settle, shared
            )
        except BaseException:
            give_up()
            if lock is not None:
                self._release(lock, target)
            raise
        return response, b"gateway; fwd=miss" + (b"; stored" if stored else b"")

    async def _remote(
        self,
        store: RedisStore,
        tag: str,
        target: str,
        request: GatewayRequest,
        authorized: bool,
    ) -> Entry | None:
        """Another gateway is fetching the key: its stored answer once it is there, or
        None when its lock went without one (not storable, or its fetch failed) or the
        store failed. Bounded by the request's deadline (then `upstream_timeout`)."""
        while True:
            remaining = request.deadline.remaining()
            if remaining <= 0:
                raise UpstreamTimeout(
                    "the route deadline passed while waiting for another gateway's "
                    "upstream request",
                    route=self.route,
                )
            await asyncio.sleep(min(REMOTE_POLL, remaining))
            try:
                # The lock first: an answer is stored before its lock goes.
                held = await store.held(self.route, tag, target)
                _, entry = await store.lookup(self.route, target, request.headers)
            except StoreUnavailable:
                self.cache.store_error(self.route)
                return None
            if (
                entry is not None
                and entry.usable(time.time())
                and (entry.shared_with_auth or not authorized)
            ):
                return entry
            if not held:
                return None

    def _release(self, lock: tuple[RedisStore, str, str], target: str) -> None:
        store, tag, token = lock

        async def release() -> None:
            try:
                await store.release(self.route, tag, target, token)
            except StoreUnavailable:
                pass  # it expires with the deadline it was taken for

        self.cache.spawn(release())

    async def _directed(
        self,
        request: GatewayRequest,
        handler: Handler,
        target: str,
        entry: Entry | None,
        key: Key | None,
        directives: RequestDirectives,
        authorized: bool,
    ) -> tuple[GatewayResponse, bytes]:
        """`_fetch` for a request with its own `Cache-Control` (RFC 9111 5.2.1): a
        stored answer it accepts (`max-age`, `min-fresh`, `max-stale`) is a hit; a fresh
        one it refuses (`no-cache`, or too old for it) is revalidated upstream
        (`fwd=request`); `no-store` stores nothing and joins no shared fetch;
        `only-if-cached` never goes upstream (504 `not_cached` instead)."""
        cache = self.cache
        now = time.time()
        if entry is not None:
            age = entry.age(now)
            if directives.accepts(age, entry.lifetime, entry.no_cache, entry.headers):
                cache.count(self.route, "hit")
                ttl = int(entry.ttl(now))
                return self._answer(entry, request, now), b"gateway; hit; ttl=%d" % ttl
            if directives.only_if_cached:
                cache.count(self.route, "miss")
                raise NotCached("no stored answer satisfies the request", route=self.route)
            if not directives.strict and entry.within(entry.stale_while_revalidate, now):
                cache.count(self.route, "stale")
                self._refresh(entry, request, handler, authorized)
                ttl = int(entry.ttl(now))
                return self._answer(entry, request, now), b"gateway; hit; ttl=%d" % ttl
            fresh = entry.usable(now)
            reason = b"request" if fresh else b"stale"
            stale_ok = not directives.strict  # RFC 5861 4, unless the request forbids it
            try:
                if entry.etag is not None or entry.last_modified is not None:
                    return await self._revalidate(
                        entry,
                        request,
                        handler,
                        authorized,
                        reason,
                        store=not directives.no_store,
                        stale_ok=stale_ok,
                    )
                cache.count(self.route, "miss" if fresh else "stale")
                response = await self._upstream(request, handler, entry, stale_ok)
            except _ServeStale as failed:
                now = time.time()
                left = b"; ttl=%d" % int(entry.ttl(now))
                return self._answer(entry, request, now), b"gateway; fwd=stale" + (
                    failed.status + left + failed.detail
                )
            stored = False
            if not directives.no_store:
                stored = self._store(request, response, (self.route, target), authorized, None)
            return response, b"gateway; fwd=" + reason + (b"; stored" if stored else b"")
        if directives.only_if_cached:
            cache.count(self.route, "miss")
            raise NotCached("no stored answer for this request", route=self.route)
        if directives.no_store or request.method == "HEAD":
            cache.count(self.route, "miss")
            return await handler(request), b"gateway; fwd=miss"
        # `no-cache`, `max-age` and the rest ask nothing more of a miss: the usual path,
        # coalescing included (a shared fetch is a fresh answer from the upstream).
        return await self._miss(request, handler, target, key, authorized)

    async def _wait(self, flight: _Flight, request: GatewayRequest, follow: bool = False) -> None:
        """Until `flight`'s outcome is known (stored or not) or, with `follow`, its
        answer can be followed as it streams; within the request's deadline."""
        remaining = request.deadline.remaining()
        try:
            async with asyncio.timeout(max(remaining, 0)):
                while not flight.stored.done() and not (follow and flight.head is not None):
                    await flight.changed()
        except TimeoutError:
            raise UpstreamTimeout(
                "the route deadline passed while waiting for a shared upstream request",
                route=self.route,
            ) from None

    async def _forward(
        self,
        request: GatewayRequest,
        handler: Handler,
        primary: Primary,
        authorized: bool,
        settle: Callable[[bool], None] | None = None,
        flight: _Flight | None = None,
    ) -> tuple[GatewayResponse, bool]:
        """Send `request` upstream and store the answer if it may be; True when it is
        being stored (a streamed body is stored once it has all arrived, within the
        object size limit). `settle` hears the outcome once it is known; `flight`'s
        waiters may follow the body as it streams."""
        response = await handler(request)
        return response, self._store(request, response, primary, authorized, settle, flight)

    def _store(
        self,
        request: GatewayRequest,
        response: GatewayResponse,
        primary: Primary,
        authorized: bool,
        settle: Callable[[bool], None] | None,
        flight: _Flight | None = None,
    ) -> bool:
        def done(stored: bool) -> None:
            if settle is not None:
                settle(stored)

        cache = self.cache
        now = time.time()
        fresh = freshness(
            response.status, response.headers, self.default_ttl, authorized=authorized
        )
        if (
            fresh.lifetime is None
            or response.trailers
            or request.method != "GET"
            or request.fallback is not None  # a stand-in's answer: not the route's own
        ):
            done(False)
            return False
        length = _get(response.headers, b"content-length")
        if length is not None and length.isdigit() and int(length) > cache.max_object_size:
            done(False)
            return False
        names = vary_names(response.headers)
        key: Key = (self.route, primary[1], names, vary_values(request.headers, names))
        status, headers = response.status, list(response.headers)
        if response.whole is not None:
            if len(response.whole) > cache.max_object_size:
                done(False)
                return False
            cache.put(Entry(key, status, headers, response.whole, fresh, now), done)
            return True

        def complete(body: bytes | None) -> None:
            if flight is not None:
                flight.end(body is not None)
            if body is None:
                done(False)
                return
            cache.put(Entry(key, status, headers, body, fresh, now), done)

        tee = _Tee(response.body, cache.max_object_size, complete)
        if flight is not None and length is not None and length.isdigit():
            # Declared within max_object_size (above): a task of its own reads the body
            # into the flight, which this client and the waiters all follow as it
            # arrives; one of them leaving stops no one else's answer.
            flight.open(status, headers, names, key[3], fresh.shared_with_auth, tee.parts)
            tee.pulse = flight.pulse
            self._pump(tee, response.close)
            response.body = flight.follow()
            response.close = closed
            return True
        response.body = tee
        original_close = response.close

        async def close() -> None:
            tee.abandon()
            await original_close()

        response.close = close
        return True

    def _pump(self, tee: _Tee, close: Callable[[], Awaitable[None]]) -> None:
        """Read a followed body (within the object size limit) to its end, bounded by
        the route's timeout, then close it; a failure ends it short for its followers."""

        async def run() -> None:
            try:
                async with asyncio.timeout(self.timeout or PUMP_TIMEOUT):
                    async for _ in tee:
                        pass
            except Exception as exc:
                log.info("a shared upstream answer failed while followed: %r", exc)
            finally:
                tee.abandon()  # no-op once the body ended
                await close()

        self.cache.spawn(run())

    async def _revalidate(
        self,
        entry: Entry,
        request: GatewayRequest,
        handler: Handler,
        authorized: bool,
        reason: bytes = b"stale",
        store: bool = True,
        stale_ok: bool = True,
    ) -> tuple[GatewayResponse, bytes]:
        """An entry with validators, stale (or fresh, but refused by the request's own
        `Cache-Control`: `reason` b"request"): ask upstream whether it still holds.
        `store` False: the answer replaces nothing (a `no-store` request)."""
        cache = self.cache
        cache.count(self.route, "stale" if reason == b"stale" else "miss")
        conditional = [(n, v) for n, v in request.headers if n.lower() not in _CONDITIONAL]
        if entry.etag is not None:
            conditional.append((b"if-none-match", entry.etag))
        if entry.last_modified is not None:
            conditional.append((b"if-modified-since", entry.last_modified))
        original = request.headers
        request.headers = conditional
        try:
            response = await self._upstream(request, handler, entry, stale_ok)
        finally:
            request.headers = original
        fwd = b"gateway; fwd=" + reason
        if response.status != 304:
            primary = (self.route, entry.key[1])
            stored = store and self._store(request, response, primary, authorized, None)
            status = fwd + b"; fwd-status=%d" % response.status
            return response, status + (b"; stored" if stored else b"")
        await response.close()
        if store:
            entry = self._not_modified(entry, response.headers, authorized)
        now = time.time()
        return self._answer(entry, request, now), fwd + b"; fwd-status=304"

    def _not_modified(self, entry: Entry, headers: Headers, authorized: bool) -> Entry:
        """`entry` refreshed by a 304's `headers` (stored in its place), or as it was
        when the merged head says it may not be stored."""
        merged = _updated(entry.headers, headers)
        fresh = freshness(entry.status, merged, self.default_ttl, authorized=authorized)
        if fresh.lifetime is None:
            return entry
        refreshed = Entry(entry.key, entry.status, merged, entry.body, fresh, time.time())
        self.cache.put(refreshed)
        return refreshed

    async def _upstream(
        self, request: GatewayRequest, handler: Handler, entry: Entry, stale_ok: bool = True
    ) -> GatewayResponse:
        """`handler`'s answer for a stale `entry`; `_ServeStale` instead when it failed
        (an upstream error, or 500, 502, 503, 504) while `entry` is within its
        `stale-if-error` window (and `stale_ok`: the request does not forbid it)."""
        if not stale_ok:
            return await handler(request)
        try:
            response = await handler(request)
        except UpstreamError as exc:
            if not entry.within(entry.stale_if_error, time.time()):
                raise
            log.info("serving a stale answer for %s: %r", entry.key[1], exc)
            raise _ServeStale(b"", b"; detail=%s" % exc.code.encode("ascii")) from None
        if response.status in _ERROR_STATUSES and entry.within(entry.stale_if_error, time.time()):
            await response.close()
            raise _ServeStale(b"; fwd-status=%d" % response.status, b"")
        return response

    def _refresh(
        self, entry: Entry, request: GatewayRequest, handler: Handler, authorized: bool
    ) -> None:
        """Start the background refresh of a stale `entry` unless one is under way: a
        GET of its target (conditional when it has validators), bounded by the route's
        timeout, whose storable answer (or 304) replaces the entry. A failure leaves
        the entry as it is."""
        cache = self.cache
        if entry.key in cache.refreshing:
            return
        budget = self.timeout if self.timeout is not None else request.deadline.remaining()
        budget = max(budget, 0.001)
        # The refresh is the gateway's own: none of the client's validators or
        # Cache-Control directives (a `no-store` would keep it from storing anything).
        headers = [(n, v) for n, v in request.headers if n.lower() not in _NOT_REFRESHED]
        if entry.etag is not None:
            headers.append((b"if-none-match", entry.etag))
        if entry.last_modified is not None:
            headers.append((b"if-modified-since", entry.last_modified))
        background = dataclasses.replace(
            request,
            method="GET",
            headers=headers,
            deadline=Deadline.after(budget),
            body=None,
            stream=None,
            source=None,
            attempt=0,
            exclude_targets=set(),
        )
        primary = (self.route, entry.key[1])

        async def run() -> None:
            try:
                async with asyncio.timeout(budget):
                    response = await handler(background)
                    try:
                        if response.status == 304 and (entry.etag or entry.last_modified):
                            self._not_modified(entry, response.headers, authorized)
                        elif response.status not in _ERROR_STATUSES:
                            self._store(background, response, primary, authorized, None)
                            async for _ in response.body:  # tees it into the store
                                pass
                    finally:
                        await response.close()
            except Exception as exc:  # the stale entry stays
                log.info("background refresh of %s failed: %r", entry.key[1], exc)
            finally:
                cache.refreshing.discard(entry.key)

        cache.refreshing.add(entry.key)
        cache.spawn(run())

    def _answer(self, entry: Entry, request: GatewayRequest, now: float) -> GatewayResponse:
        """A response made from `entry` (its own Date kept, `Age` added): a 304 when the
        client's own conditional matches it, no body for HEAD."""
        age = b"%d" % int(entry.age(now))
        if entry.status == 200 and _not_modified(entry, request.headers):
            head = [(n, v) for n, v in entry.headers if n.lower() in _IN_304]
            head.append((b"age", age))
            return GatewayResponse(304, head, WholeBody(b""), closed, whole=b"")
        headers = [*entry.headers, (b"content-length", b"%d" % len(entry.body)), (b"age", age)]
        body = b"" if request.method == "HEAD" else entry.body
        return GatewayResponse(entry.status, headers, WholeBody(body), closed, whole=body)


class _ServeStale(Exception):
    """The upstream failed and the stale entry is to be served: the `Cache-Status`
    parameters saying how (`fwd-status`, or `detail` for the gateway's own error)."""

    def __init__(self, status: bytes, detail: bytes) -> None:
        super().__init__()
        self.status = status
        self.detail = detail


class _Flight:
    """One key's fetch under way: its waiters wait on `stored` (whether the answer was
    stored), or, once `open`, follow the body as it streams (an answer of declared
    length within `max_object_size`, which the tee keeps whole anyway)."""

    __slots__ = (
        "_changed",
        "ended",
        "head",
        "names",
        "ok",
        "parts",
        "shared_with_auth",
        "status",
        "stored",
        "values",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stored: asyncio.Future[bool] = loop.create_future()
        self._changed = asyncio.Event()
        self.head: Headers | None = None
        self.status = 0
        self.names: tuple[bytes, ...] = ()
        self.values: tuple[bytes, ...] = ()
        self.shared_with_auth = False
        self.parts: list[bytes] = []
        self.ended = False
        self.ok = False
        self.stored.add_done_callback(lambda _: self.pulse())

    def pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        await self._changed.wait()

    def open(
        self,
        status: int,
        headers: Headers,
        names: tuple[bytes, ...],
        values: tuple[bytes, ...],
        shared_with_auth: bool,
        parts: list[bytes],
    ) -> None:
        self.status = status
        self.head = [(n, v) for n, v in headers if n.lower() not in _NOT_STORED]
        self.head.append((b"content-length", _get(headers, b"content-length") or b"0"))
        self.head.append((b"age", b"0"))
        self.names, self.values = names, values
        self.shared_with_auth = shared_with_auth
        self.parts = parts
        self.pulse()

    def end(self, ok: bool) -> None:
        self.ended, self.ok = True, ok
        self.pulse()

    def follows(self, headers: Headers, authorized: bool) -> bool:
        """Whether a waiter with these request `headers` may follow the body: it is
        open, not failed, and the variant the waiter would be served."""
        return (
            self.head is not None
            and not (self.ended and not self.ok)
            and (self.shared_with_auth or not authorized)
            and vary_values(headers, self.names) == self.values
        )

    def follower(self) -> GatewayResponse:
        assert self.head is not None
        return GatewayResponse(self.status, list(self.head), self.follow(), closed)

    async def follow(self) -> AsyncIterator[bytes]:
        """The body from its first byte, as it arrives."""
        sent = 0
        while True:
            changed = self._changed
            parts = self.parts
            while sent < len(parts):
                yield parts[sent]
                sent += 1
            if self.ended:
                if not self.ok:
                    raise UpstreamUnavailable("the shared upstream answer ended short")
                return
            await changed.wait()


class _Tee:
    """The upstream's body as it streams to the client, copied up to `limit` bytes;
    at its end the copy goes to `complete` (None: too large, failed or abandoned)."""

    __slots__ = ("_body", "_complete", "_limit", "_parts", "_size", "parts", "pulse")

    def __init__(
        self, body: AsyncIterator[bytes], limit: int, complete: Callable[[bytes | None], None]
    ) -> None:
        self._body = body
        self._limit = limit
        self._complete: Callable[[bytes | None], None] | None = complete
        self._parts: list[bytes] | None = []
        self.parts = self._parts  # the copy so far, which a flight's followers read
        self.pulse: Callable[[], None] | None = None  # told of every chunk
        self._size = 0

    def __aiter__(self) -> _Tee:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._body.__anext__()
        except StopAsyncIteration:
            self._finish(b"".join(self._parts) if self._parts is not None else None)
            raise
        except BaseException:
            self._finish(None)
            raise
        if self._parts is not None:
            self._size += len(chunk)
            if self._size > self._limit:
                self._parts = None  # too large: streamed through, not stored
            else:
                self._parts.append(chunk)
                if self.pulse is not None:
                    self.pulse()
        return chunk

    def _finish(self, body: bytes | None) -> None:
        complete, self._complete = self._complete, None
        if complete is not None:
            complete(body)

    def abandon(self) -> None:
        """The response closed: a body that did not end is not stored."""
        self._finish(None)


def _get(headers: Headers, name: bytes) -> bytes | None:
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def _updated(stored: Headers, fresh: Headers) -> Headers:
    """The stored head with the fields a 304 sent replacing theirs (RFC 9111 3.2)."""
    names = {n.lower() for n, _ in fresh if n.lower() not in _NOT_UPDATED}
    kept = [(n, v) for n, v in stored if n.lower() not in names]
    return kept + [(n, v) for n, v in fresh if n.lower() in names]


def _not_modified(entry: Entry, headers: Headers) -> bool:
    """The client's `If-None-Match` (weak comparison) or, without one,
    `If-Modified-Since` says its copy is current (RFC 9110 13.1.2, 13.1.3)."""
    inm = _get(headers, b"if-none-match")
    if inm is not None:
        if entry.etag is None:
            return inm.strip() == b"*"
        mine = entry.etag.strip().removeprefix(b"W/")
        for tag in inm.split(b","):
            tag = tag.strip()
            if tag == b"*" or tag.removeprefix(b"W/") == mine:
                return True
        return False
    ims = http_time(_get(headers, b"if-modified-since"))
    if ims is None:
        return False
    modified = http_time(entry.last_modified) or http_time(_get(entry.headers, b"date"))
    return modified is not None and modified <= ims
