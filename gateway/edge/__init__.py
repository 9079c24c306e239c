"""Edge policies: the request-filter phase, run after routing and before any upstream.

A filter is `async (EdgeContext) -> EarlyResponse | None`, built once per route. It may
refuse the request by raising a `GatewayError` (401 `unauthorized`, 429 `rate_limited`,
with its headers on the error), answer it itself by returning an `EarlyResponse` (a
CORS preflight), or let it through, adding headers to the eventual response
(`RateLimit-*`, `Access-Control-*`) or to the upstream request (verified claims).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway.types import Headers, Scope

__all__ = ["EarlyResponse", "EdgeContext", "RequestFilter", "run_filters"]


@dataclass(slots=True)
class EdgeContext:
    """One request as the filters see it, and what they add to the upstream request and
    to the answer."""

    scope: Scope
    method: str
    route: str
    client_ip: str  # the real client: X-Forwarded-For believed only from trusted_proxies
    request_headers: list[tuple[bytes, bytes]]  # as the client sent them (lower-case names)
    upstream_headers: Headers  # what goes upstream; filters may remove or add
    response_headers: Headers = field(default_factory=list)  # added to the final answer
    # Who is calling, once auth has said so (Idempotency-Key scopes): the SHA-256 of the
    # API key (bytes), or the JWT `sub` (str); None: only the client IP is known.
    caller: bytes | str | None = None

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.request_headers:
            if key == name:
                return value
        return None


@dataclass(slots=True)
class EarlyResponse:
    status: int
    headers: Headers
    body: bytes = b""


RequestFilter = Callable[[EdgeContext], Awaitable[EarlyResponse | None]]


async def run_filters(filters: tuple[RequestFilter, ...], ctx: EdgeContext) -> EarlyResponse | None:
    """Run a route's filters in order; the first early answer ends the phase. A refusal
    propagates as the GatewayError the filter raised."""
    for check in filters:
        early = await check(ctx)
        if early is not None:
            return early
    return None
