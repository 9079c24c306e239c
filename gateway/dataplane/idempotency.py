"""Idempotency-Key handling (draft-ietf-httpapi-idempotency-key-header) for routes with
`idempotency:` (docs/policies.md, "Idempotency keys").

A POST or PATCH carrying `Idempotency-Key` is scoped by route, caller (the API key's
hash or the JWT `sub`, else the client IP) and key. The first such request claims the
key in the store and is forwarded; its answer streams to the client while it is
buffered (up to `max_response_size`) and is stored when it is complete. A repeat with
the same fingerprint (method, target and body) gets the stored answer with
`Idempotent-Replayed: true`; one while the first is in flight gets 409; one with
another fingerprint 422. The gateway's own errors, oversized answers, answers cut
short and client disconnects release the key instead, so a retry is forwarded again.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from gateway.dataplane.headers import response_headers
from gateway.dataplane.state import Exchange
from gateway.edge.client_ip import real_client_ip
from gateway.edge.idempotency import IdempotencyStore, StoredAnswer, StoreUnavailable
from gateway.errors import (
    BadRequest,
    IdempotencyInFlight,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    IdempotencyUnavailable,
    RequestTimeout,
)
from gateway.ops.metrics import Metrics
from gateway.policies.expiry import Expiry
from gateway.types import GatewayRequest, GatewayResponse, Handler, IPNetwork, Scope, WholeBody

__all__ = [
    "KEYED_METHODS",
    "LEASE_GRACE",
    "MAX_KEY_LENGTH",
    "Idempotency",
    "RouteIdempotency",
    "parse_key",
]

log = logging.getLogger("gateway.idempotency")

KEYED_METHODS = frozenset({"POST", "PATCH"})  # the draft's non-idempotent methods
MAX_KEY_LENGTH = 255  # characters of a key, quotes and escapes left out
# Seconds an in-flight marker outlives the route deadline: the answer's body may still
# be streaming after it. A gateway that dies mid-request frees its keys after this.
LEASE_GRACE = 60.0
REPLAYED = (b"idempotent-replayed", b"true")
_HEADER = b"idempotency-key"
# sf-token characters (RFC 9651 3.3.4: tchar, ":" and "/"); a bare key may start with any
_SIMPLE = re.compile(rb'"([\x20\x21\x23-\x5b\x5d-\x7e]*)"|([!#$%&\'*+\-.^_`|~:/0-9A-Za-z]+)')
_TOKEN = frozenset(
    b"!#$%&'*+-.^_`|~:/0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


def parse_key(value: bytes) -> str:
    """The key of one `Idempotency-Key` field value: an sf-string (`"..."`, printable
    ASCII, `\\"` and `\\\\` escapes) or a bare token read as the same key. Raises
    `BadRequest` for anything else, an empty key or one over `MAX_KEY_LENGTH`."""
    text = value.strip(b" \t")
    simple = _SIMPLE.fullmatch(text)  # the common case: no escapes
    if simple is not None:
        key = simple.group(1) or simple.group(2)
    elif text[:1] == b'"':
        chars: list[int] = []
        i, end = 1, len(text)
        while True:
            if i >= end:
                raise _malformed("an unterminated quoted string")
            c = text[i]
            if c == 0x5C:  # backslash: only \" and \\ are escapes
                if i + 1 >= end or text[i + 1] not in (0x22, 0x5C):
                    raise _malformed("a bad escape in the quoted string")
                chars.append(text[i + 1])
                i += 2
            elif c == 0x22:
                break
            elif 0x20 <= c <= 0x7E:
                chars.append(c)
                i += 1
            else:
                raise _malformed("a character outside printable ASCII")
        if i + 1 != end:
            raise _malformed("text after the quoted string")
        key = bytes(chars)
    else:
        if not all(c in _TOKEN for c in text):
            raise _malformed("neither a quoted string nor a token")
        key = text
    if not key:
        raise _malformed("an empty key")
    if len(key) > MAX_KEY_LENGTH:
        raise _malformed(f"a key over {MAX_KEY_LENGTH} characters")
    return key.decode("ascii")


def _malformed(why: str) -> BadRequest:
    return BadRequest(f'Idempotency-Key must be a quoted string like "abc-123": {why}')


class Idempotency:
    """What every idempotency route of a runtime shares: the store (one per process for
    memory), the ttl, `max_response_size`, and the counters."""

    def __init__(
        self,
        store: IdempotencyStore,
        ttl: float,
        max_response_size: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.max_response_size = max_response_size
        self._metrics = metrics
        self._results: dict[tuple[str, str], Any] = {}

    def count(self, route: str, result: str, exchange: Exchange) -> None:
        """One `gateway_idempotency_requests_total{route,result}`, and the access log's
        `idempotency` field."""
        exchange.idempotency = result
        if self._metrics is None:
            return
        child = self._results.get((route, result))
        if child is None:
            child = self._results[(route, result)] = self._metrics.idempotency_requests.labels(
                route, result
            )
        child.inc()

    async def aclose(self) -> None:
        await self.store.aclose()

    def __repr__(self) -> str:
        return (
            f"Idempotency(store={self.store!r}, ttl={self.ttl:g}s, "
            f"max_response_size={self.max_response_size})"
        )


class RouteIdempotency:
    """One route's Idempotency-Key handling around its handler chain."""

    __slots__ = ("_prefix", "lease", "name", "required", "shared", "trusted_proxies")

    def __init__(
        self,
        shared: Idempotency,
        name: str,
        *,
        required: bool,
        lease: float,
        trusted_proxies: tuple[IPNetwork, ...] = (),
    ) -> None:
        self.shared = shared
        self.name = name
        self.required = required
        self.lease = lease
        self.trusted_proxies = trusted_proxies
        self._prefix = quote(name, safe="") + ":"  # the route's part of its store keys

    async def fetch(
        self,
        request: GatewayRequest,
        scope: Scope,
        forwarded_for: bytes | None,
        exchange: Exchange,
        handler: Handler,
    ) -> GatewayResponse:
        if request.method not in KEYED_METHODS or request.grpc:
            return await handler(request)  # the header means nothing here: passed on as is
        shared = self.shared
        values = [v for n, v in scope["headers"] if n == _HEADER]
        if not values:
            if self.required:
                shared.count(self.name, "missing", exchange)
                raise IdempotencyKeyMissing(
                    f"{request.method} on this route needs an Idempotency-Key header"
                )
            return await handler(request)
        if len(values) > 1:
            shared.count(self.name, "invalid", exchange)
            raise _malformed("more than one Idempotency-Key field")
        try:
            key = parse_key(values[0])
        except BadRequest:
            shared.count(self.name, "invalid", exchange)
            raise
        body = await _whole_body(request)
        digest = hashlib.sha256(f"{request.method} {exchange.path}?".encode("latin-1"))
        digest.update(request.query + b"\0" + body)
        fingerprint = digest.hexdigest()
        scoped = hashlib.sha256(f"{self._caller(exchange, scope, forwarded_for)}\0{key}".encode())
        slot = self._prefix + scoped.hexdigest()
        try:
            claim = await shared.store.claim(slot, fingerprint, self.lease)
        except StoreUnavailable:
            shared.count(self.name, "store_error", exchange)
            raise IdempotencyUnavailable(
                "the Idempotency-Key store cannot be reached; the request was not forwarded"
            ) from None
        if claim.fingerprint != fingerprint:
            shared.count(self.name, "reused", exchange)
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used with another request (method, target or body)"
            )
        if claim.state == "in_flight":
            shared.count(self.name, "in_flight", exchange)
            raise IdempotencyInFlight("the first request with this Idempotency-Key is in flight")
        if claim.answer is not None:
            shared.count(self.name, "replayed", exchange)
            answer = claim.answer
            headers = [*answer.headers, REPLAYED]
            return GatewayResponse(
                answer.status, headers, WholeBody(answer.body), _closed, whole=answer.body
            )
        record = _Recording(self, slot, claim.owner, fingerprint, exchange)
        request.keyed = True
        try:
            response = await handler(request)
        except BaseException:  # a gateway error, or the client left: not stored
            await record.release("not_stored")
            raise
        return await record.watch(response)

    def _caller(self, exchange: Exchange, scope: Scope, forwarded_for: bytes | None) -> str:
        """`key:<sha256 hex>` of the API key, `sub:<sub>` of the JWT, else `ip:<client>`."""
        caller = exchange.caller
        if isinstance(caller, bytes):
            return "key:" + caller.hex()
        if isinstance(caller, str):
            return "sub:" + caller
        client = scope.get("client")
        peer = client[0] if client else ""
        return "ip:" + real_client_ip(peer, forwarded_for, self.trusted_proxies)


async def _closed() -> None:
    """`close` of a replayed answer: it holds nothing open."""


async def _whole_body(request: GatewayRequest) -> bytes:
    """The request body, read whole (within `max_body_size`, the reader's limit, and the
    deadline) so it can be fingerprinted; the request keeps it, and may be replayed."""
    if request.body is not None:
        return request.body
    stream = request.stream
    if stream is None:
        return b""
    parts: list[bytes] = []
    try:
        with Expiry(max(request.deadline.remaining(), 0)):
            async for chunk in stream:
                parts.append(chunk)
    except TimeoutError:
        raise RequestTimeout(
            "the request body did not arrive within the deadline",
            headers=[(b"connection", b"close")],
        ) from None
    body = b"".join(parts)
    request.body, request.stream, request.source = body, None, None
    return body


class _Recording:
    """The first request's answer on its way to the client: buffered as it streams,
    stored once complete, or the key released when it cannot be."""

    __slots__ = ("_close", "exchange", "fingerprint", "owner", "route", "settled", "slot")

    def __init__(
        self,
        route: RouteIdempotency,
        slot: str,
        owner: str,
        fingerprint: str,
        exchange: Exchange,
    ) -> None:
        self.route = route
        self.slot = slot
        self.owner = owner
        self.fingerprint = fingerprint
        self.exchange = exchange
        self.settled = False

    async def watch(self, response: GatewayResponse) -> GatewayResponse:
        limit = self.route.shared.max_response_size
        headers = tuple(h for h in response_headers(response.headers, b"") if h[0] != _RID)
        whole = response.whole
        if whole is not None:  # the whole answer is here already: store it now
            if len(whole) > limit:
                await self.oversized(len(whole))
            else:
                await self.store(StoredAnswer(response.status, headers, whole))
            return response
        response.body = self._tee(response.body, response.status, headers, limit)
        self._close = response.close
        response.close = self._closing
        return response

    async def _tee(
        self,
        body: AsyncIterator[bytes],
        status: int,
        headers: tuple[tuple[bytes, bytes], ...],
        limit: int,
    ) -> AsyncIterator[bytes]:
        parts: list[bytes] | None = []
        size = 0
        async for chunk in body:
            size += len(chunk)
            if parts is not None:
                if size > limit:
                    parts = None  # too big to keep: passed through, not stored
                else:
                    parts.append(chunk)
            yield chunk
        if parts is None:
            await self.oversized(size)
        else:
            await self.store(StoredAnswer(status, headers, b"".join(parts)))

    async def _closing(self) -> None:
        try:
            await self._close()
        finally:
            if not self.settled:  # the body never finished: the client left, or it failed
                await self.release("not_stored")

    async def store(self, answer: StoredAnswer) -> None:
        self.settled = True
        shared = self.route.shared
        try:
            done = await shared.store.complete(
                self.slot, self.owner, self.fingerprint, answer, shared.ttl
            )
        except StoreUnavailable:
            shared.count(self.route.name, "store_error", self.exchange)
            return
        if not done:
            # The lease ran out before the answer was complete: another request may
            # hold the key now, and it is not overwritten.
            log.warning(
                "idempotency key lease expired before the answer was complete; not stored",
                extra={"request_id": self.exchange.request_id, "route": self.route.name},
            )
        shared.count(self.route.name, "stored" if done else "not_stored", self.exchange)

    async def oversized(self, size: int) -> None:
        log.info(
            "answer of %d+ bytes is over idempotency.max_response_size (%d); passed "
            "through, not stored, key released",
            size,
            self.route.shared.max_response_size,
            extra={"request_id": self.exchange.request_id, "route": self.route.name},
        )
        await self.release("not_stored")

    async def release(self, result: str) -> None:
        self.settled = True
        shared = self.route.shared
        try:
            await shared.store.release(self.slot, self.owner)
        except StoreUnavailable:
            result = "store_error"  # the marker lapses with its lease
        shared.count(self.route.name, result, self.exchange)


_RID = b"x-request-id"
