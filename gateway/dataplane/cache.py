"""The response cache (docs/cache.md): an in-memory LRU store shared by every caching
route of a process, and `RouteCache`, what one route's requests go through in place of
calling its handler directly (`app.py`, one check per request when the route caches).

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
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

from gateway.dataplane.cacherules import (
    Freshness,
    current_age,
    freshness,
    http_time,
    vary_names,
    vary_values,
)
from gateway.errors import GatewayError, UpstreamError, UpstreamTimeout
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

__all__ = ["HIT_FOR_MISS", "Cache", "Entry", "MemoryStore", "RouteCache"]

log = logging.getLogger("gateway.cache")

HIT_FOR_MISS = 10.0  # seconds a key whose answer was not storable is not waited for
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


class Cache:
    """The process's cache: the store, the object size limit, the keys being fetched
    (coalescing) and those recently found not storable (hit-for-miss), and the metrics.
    Shared by every caching route and kept across reloads while its settings hold."""

    def __init__(self, max_size: int, max_object_size: int, metrics: Metrics | None = None) -> None:
        self.store = MemoryStore(max_size)
        self.max_object_size = max_object_size
        self.inflight: dict[tuple[Primary, tuple[bytes, ...]], asyncio.Future[bool]] = {}
        self.not_storable: dict[Primary, float] = {}  # until when (monotonic)
        self.refreshing: set[Key] = set()  # keys with a background refresh under way
        self.tasks: set[asyncio.Task[None]] = set()  # those refreshes (kept referenced)
        self._metrics = metrics
        self._results: dict[tuple[str, str], Any] = {}
        self._bytes = metrics.cache_bytes if metrics is not None else None

    def count(self, route: str, result: str) -> None:
        if self._metrics is None:
            return
        child = self._results.get((route, result))
        if child is None:
            child = self._results[(route, result)] = self._metrics.cache_requests.labels(
                route, result
            )
        child.inc()

    def put(self, entry: Entry) -> None:
        self.store.put(entry)
        self._gauge()

    def purge(
        self, route: str | None = None, path: str | None = None, prefix: str | None = None
    ) -> int:
        """Remove stored responses: a route's, one target of a route's, or every
        route's under a path prefix. Returns how many variants went."""

        def match(primary: Primary) -> bool:
            name, target = primary
            if route is not None and name != route:
                return False
            if path is not None and target != path:
                return False
            return prefix is None or target.startswith(prefix)

        purged = self.store.purge(match)
        self.not_storable = {p: t for p, t in self.not_storable.items() if not match(p)}
        self._gauge()
        return purged

    def _gauge(self) -> None:
        if self._bytes is not None:
            self._bytes.set(self.store.size)

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
                cache.purge(route=self.route, path=target)  # RFC 9111 4.4
            cache.count(self.route, "bypass")
            return response, b"gateway; fwd=method"
        headers = request.headers
        authorized = any(n == b"authorization" for n, _ in headers)
        now = time.time()
        names = cache.store.names(primary)
        entry: Entry | None = None
        key: Key | None = None
        if names is not None:
            key = (self.route, target, names, vary_values(headers, names))
            entry = cache.store.get(key)
            if entry is not None and authorized and not entry.shared_with_auth:
                entry = None
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
            stored = await self._wait(waiting, request)
            if stored:
                names = cache.store.names(primary)
                if names is not None:
                    entry = cache.store.get(
                        (self.route, target, names, vary_values(headers, names))
                    )
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
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        cache.inflight[flight] = future

        def settle(stored: bool) -> None:
            if cache.inflight.get(flight) is future:
                del cache.inflight[flight]
            if not future.done():
                future.set_result(stored)
            if not stored:
                cache.not_storable[primary] = time.monotonic() + HIT_FOR_MISS

        cache.count(self.route, "miss")
        try:
            response, stored = await self._forward(request, handler, primary, authorized, settle)
        except BaseException:
            if not future.done():  # a failed fetch: let the waiters try for themselves
                if cache.inflight.get(flight) is future:
                    del cache.inflight[flight]
                future.set_result(False)
            raise
        return response, b"gateway; fwd=miss" + (b"; stored" if stored else b"")

    async def _wait(self, future: asyncio.Future[bool], request: GatewayRequest) -> bool:
        remaining = request.deadline.remaining()
        try:
            async with asyncio.timeout(max(remaining, 0)):
                return await asyncio.shield(future)
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
    ) -> tuple[GatewayResponse, bool]:
        """Send `request` upstream and store the answer if it may be; True when it is
        being stored (a streamed body is stored once it has all arrived, within the
        object size limit). `settle` hears the outcome once it is known."""
        response = await handler(request)
        return response, self._store(request, response, primary, authorized, settle)

    def _store(
        self,
        request: GatewayRequest,
        response: GatewayResponse,
        primary: Primary,
        authorized: bool,
        settle: Callable[[bool], None] | None,
    ) -> bool:
        def done(stored: bool) -> None:
            if settle is not None:
                settle(stored)

        cache = self.cache
        now = time.time()
        fresh = freshness(
            response.status, response.headers, self.default_ttl, authorized=authorized
        )
        if fresh.lifetime is None or response.trailers or request.method != "GET":
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
            cache.put(Entry(key, status, headers, response.whole, fresh, now))
            done(True)
            return True

        def complete(body: bytes | None) -> None:
            if body is None:
                done(False)
                return
            cache.put(Entry(key, status, headers, body, fresh, now))
            done(True)

        response.body = _Tee(response.body, cache.max_object_size, complete)
        original_close = response.close

        async def close() -> None:
            tee = response.body
            if isinstance(tee, _Tee):
                tee.abandon()
            await original_close()

        response.close = close
        return True

    async def _revalidate(
        self, entry: Entry, request: GatewayRequest, handler: Handler, authorized: bool
    ) -> tuple[GatewayResponse, bytes]:
        """A stale entry with validators: ask upstream whether it still holds."""
        cache = self.cache
        cache.count(self.route, "stale")
        conditional = [(n, v) for n, v in request.headers if n.lower() not in _CONDITIONAL]
        if entry.etag is not None:
            conditional.append((b"if-none-match", entry.etag))
        if entry.last_modified is not None:
            conditional.append((b"if-modified-since", entry.last_modified))
        original = request.headers
        request.headers = conditional
        try:
            response = await self._upstream(request, handler, entry)
        finally:
            request.headers = original
        if response.status != 304:
            primary = (self.route, entry.key[1])
            stored = self._store(request, response, primary, authorized, None)
            status = b"gateway; fwd=stale; fwd-status=%d" % response.status
            return response, status + (b"; stored" if stored else b"")
        await response.close()
        entry = self._not_modified(entry, response.headers, authorized)
        now = time.time()
        return self._answer(entry, request, now), b"gateway; fwd=stale; fwd-status=304"

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
        self, request: GatewayRequest, handler: Handler, entry: Entry
    ) -> GatewayResponse:
        """`handler`'s answer for a stale `entry`; `_ServeStale` instead when it failed
        (an upstream error, or 500, 502, 503, 504) while `entry` is within its
        `stale-if-error` window."""
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
        headers = [(n, v) for n, v in request.headers if n.lower() not in _CONDITIONAL]
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
        task = asyncio.get_running_loop().create_task(run())
        cache.tasks.add(task)
        task.add_done_callback(cache.tasks.discard)

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


class _Tee:
    """The upstream's body as it streams to the client, copied up to `limit` bytes;
    at its end the copy goes to `complete` (None: too large, failed or abandoned)."""

    __slots__ = ("_body", "_complete", "_limit", "_parts", "_size")

    def __init__(
        self, body: AsyncIterator[bytes], limit: int, complete: Callable[[bytes | None], None]
    ) -> None:
        self._body = body
        self._limit = limit
        self._complete: Callable[[bytes | None], None] | None = complete
        self._parts: list[bytes] | None = []
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
