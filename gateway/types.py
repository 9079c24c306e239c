"""The gateway's shared types: ASGI shapes, header lists, and the handler chain's records.

A handler is `async (GatewayRequest) -> GatewayResponse`; a policy is `(Handler) -> Handler`.
Policies are composed once per route at build time (`gateway/build/factory.py`),
outermost first: deadline, retry, breaker, bulkhead, upstream try. This module imports
no other gateway module.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "ASGIApp",
    "BodySource",
    "Deadline",
    "GatewayRequest",
    "GatewayResponse",
    "Handler",
    "Headers",
    "IPNetwork",
    "Message",
    "Policy",
    "Receive",
    "Scope",
    "Send",
    "WholeBody",
    "closed",
    "empty_body",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Headers = list[tuple[bytes, bytes]]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class BodySource(Protocol):
    """Where a streamed request body comes from; `error` says why it stopped early
    (the client left, or sent too much), which outranks the transport's own error."""

    @property
    def error(self) -> BaseException | None: ...


class Deadline:
    """An absolute point on the monotonic clock by which the request must be answered."""

    __slots__ = ("expires_at",)

    def __init__(self, expires_at: float) -> None:
        self.expires_at = expires_at

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()

    def expired(self) -> bool:
        return time.monotonic() >= self.expires_at

    def __repr__(self) -> str:
        return f"Deadline(remaining={self.remaining():.3f}s)"


async def _no_body() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


def empty_body() -> AsyncIterator[bytes]:
    return _no_body()


@dataclass(slots=True)
class GatewayRequest:
    """What one upstream try needs. `path` is the upstream path, already rewritten and
    percent-encoded; `query` is the raw query string; `headers` are already filtered
    for the upstream (hop-by-hop removed, X-Forwarded-* and X-Request-ID set)."""

    method: str
    path: str
    query: bytes
    headers: Headers
    deadline: Deadline
    request_id: str
    route: str
    # The request's trace (`gateway/tracing/spans.py`'s `RequestTrace`) with tracing on:
    # each try's CLIENT span and trace headers come from it (`client_spans`).
    trace: Any = None
    # The body: `body` is the full bytes when it was small enough to keep for replay,
    # otherwise `stream` yields it once (and a retry after it started is not safe).
    body: bytes | None = None
    stream: AsyncIterator[bytes] | None = None
    source: BodySource | None = None
    host: str | None = None  # the incoming Host, for preserve_host
    params: dict[str, str] | None = None  # the route's path parameters, as they came
    attempt: int = 0
    exclude_targets: set[str] = field(default_factory=set)
    grpc: bool = False  # a gRPC call: each try carries grpc-timeout, statuses may retry
    # An Idempotency-Key the gateway holds for this request (routes with `idempotency`):
    # such a request may be retried, hedged and sent to a fallback like an idempotent one.
    keyed: bool = False
    # The fallback upstream this request was sent to once its own could not answer
    # (routes with `fallback`; set by `policies/fallback.py`, logged by the data plane).
    fallback: str | None = None
    # Hedges sent for this request, and whether one of them gave the answer (routes with
    # `hedge`; set by `policies/hedge.py`, logged by the data plane).
    hedges: int = 0
    hedge_won: bool = False

    @property
    def replayable(self) -> bool:
        return self.stream is None


@dataclass(slots=True)
class GatewayResponse:
    """Status and headers now, the body as a stream. `whole` is the entire body when it
    had already arrived with the headers (its upstream connection is then back in the
    pool): whoever reads the body may take it in one piece instead of iterating `body`,
    which yields the same bytes."""

    status: int
    headers: Headers
    body: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]
    upstream: str | None = None
    target: str | None = None
    whole: bytes | None = None
    # The trailer fields (HTTP/2 upstreams), filled in place as the body ends: complete
    # once `body` is exhausted (or at once when `whole` is set). None: no trailers.
    trailers: Headers | None = None
    # The error code of the upstream's RST_STREAM, once its body failed (HTTP/2).
    reset_code: Callable[[], int | None] | None = None


class WholeBody:
    """`body` for a response whose `whole` is set: yields it once. A plain iterator
    object rather than an async generator: it is built for most small answers."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> WholeBody:
        return self

    async def __anext__(self) -> bytes:
        data = self._data
        if data is None:
            raise StopAsyncIteration
        self._data = None
        return data


async def closed() -> None:
    """`close` of a response that holds nothing open."""


Handler = Callable[[GatewayRequest], Awaitable[GatewayResponse]]
Policy = Callable[[Handler], Handler]
