"""The gateway's own errors, and the one place where they become problem+json responses.

    GatewayError                      (status, code)
    ├── BadRequest                    400 bad_request
    ├── Unauthorized                  401 unauthorized
    ├── RouteNotFound                 404 route_not_found
    ├── MethodNotAllowed              405 method_not_allowed
    ├── RequestTimeout                408 request_timeout
    ├── BodyTooLarge                  413 body_too_large
    ├── UriTooLong                    414 uri_too_long           (max_request_line)
    ├── IdempotencyKeyMissing         400 idempotency_key_missing (a `required` route)
    ├── IdempotencyInFlight           409 idempotency_in_flight   (its first is still running)
    ├── IdempotencyKeyReused          422 idempotency_key_reused  (same key, another body)
    ├── RateLimited                   429 rate_limited
    ├── HeadersTooLarge               431 headers_too_large      (max_header_size / _count)
    ├── ClientClosedRequest           499 client_disconnected    (never sent: the client left)
    ├── InternalError                 500 internal_error
    ├── TooManyConnections            503 too_many_connections   (max_client_connections)
    ├── RateLimitUnavailable          503 rate_limit_unavailable (fail_closed, store down)
    ├── IdempotencyUnavailable        503 idempotency_unavailable (the key store is down)
    ├── UpstreamError
    │   ├── UpstreamUnavailable       502 upstream_unavailable   (refused, reset, bad HTTP)
    │   ├── UpstreamTimeout           504 upstream_timeout       (the deadline passed)
    │   ├── UpstreamSaturated         503 upstream_saturated     (queue full / queue_timeout)
    │   └── UpstreamUnhealthy         503 upstream_unhealthy     (circuit open / no healthy target)
    └── ShuttingDown                  503 shutting_down

Foreign exceptions (httpx's) are translated at the upstream boundary by
`gateway.upstream.transports.base.map_httpx_errors`, which also records the
retry-relevant `outcome` of the failure (`connect_error`, `timeout`, `reset`), as
Pingora's errors carry their retry decision.

Every problem+json answer the gateway makes (the data plane's, the protocol's raw
refusals, WebSocket refusals) is rendered by `problem_response`. This module imports no
other gateway module.
"""

from __future__ import annotations

import json
from typing import ClassVar

__all__ = [
    "BadRequest",
    "BodyTooLarge",
    "ClientClosedRequest",
    "GatewayError",
    "HeadersTooLarge",
    "IdempotencyInFlight",
    "IdempotencyKeyMissing",
    "IdempotencyKeyReused",
    "IdempotencyUnavailable",
    "InternalError",
    "MethodNotAllowed",
    "NotCached",
    "RateLimitUnavailable",
    "RateLimited",
    "RequestTimeout",
    "RouteNotFound",
    "ShuttingDown",
    "TooManyConnections",
    "Unauthorized",
    "UpstreamError",
    "UpstreamSaturated",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "UpstreamUnhealthy",
    "UriTooLong",
    "problem_body",
    "problem_response",
]

PROBLEM_TYPE = "https://gateway.dev/problems/"
Headers = list[tuple[bytes, bytes]]


class GatewayError(Exception):
    """An answer the gateway makes itself: `status` and `code` (the contract's), a
    `detail` for the client, the route and upstream it concerns, and the headers it
    carries (Allow, Retry-After, Connection)."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal gateway error"

    def __init__(
        self,
        detail: str = "",
        *,
        route: str | None = None,
        upstream: str | None = None,
        headers: Headers | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.route = route
        self.upstream = upstream
        self.headers: Headers = headers or []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status} {self.code}: {self.detail!r})"


class BadRequest(GatewayError):
    status, code, title = 400, "bad_request", "Bad request"


class Unauthorized(GatewayError):
    status, code, title = 401, "unauthorized", "Missing or bad credentials"


class RequestTimeout(GatewayError):
    status, code, title = 408, "request_timeout", "Request body not received in time"


class NotCached(GatewayError):
    """A request with `Cache-Control: only-if-cached` that the cache cannot answer
    (RFC 9111 5.2.1.7: a 504, without going upstream)."""

    status, code, title = 504, "not_cached", "Not in the cache"


class RouteNotFound(GatewayError):
    status, code, title = 404, "route_not_found", "No route matches"


class MethodNotAllowed(GatewayError):
    status, code, title = 405, "method_not_allowed", "Method not allowed"

    def __init__(self, allow: list[str], **kw: str | None) -> None:
        super().__init__(f"allowed methods: {', '.join(allow)}", **kw)  # type: ignore[arg-type]
        self.headers.append((b"allow", ", ".join(allow).encode()))


class BodyTooLarge(GatewayError):
    status, code, title = 413, "body_too_large", "Request body too large"


class UriTooLong(GatewayError):
    status, code, title = 414, "uri_too_long", "Request target too long"


class HeadersTooLarge(GatewayError):
    """The head, or the trailer section of a chunked body, is over the size or count limit."""

    status, code, title = 431, "headers_too_large", "Request header fields too large"


class ClientClosedRequest(GatewayError):
    """The client went away before the exchange finished (nginx's 499). Nothing is
    sent back; it is recorded, and it never counts against an upstream."""

    status, code, title = 499, "client_disconnected", "Client closed the request"


class RateLimited(GatewayError):
    status, code, title = 429, "rate_limited", "Rate limit exceeded"


class TooManyConnections(GatewayError):
    """Refused by the protocol before the data plane sees the request."""

    status, code, title = 503, "too_many_connections", "Too many client connections"

    def __init__(self, detail: str = "", **kw: str | None) -> None:
        super().__init__(detail, **kw)  # type: ignore[arg-type]
        self.headers.append((b"retry-after", b"1"))


class RateLimitUnavailable(GatewayError):
    """`fail_closed`: the shared rate-limit store is unreachable, so the request is
    refused."""

    status, code, title = 503, "rate_limit_unavailable", "Rate limit store unavailable"

    def __init__(self, detail: str = "", **kw: str | None) -> None:
        super().__init__(detail, **kw)  # type: ignore[arg-type]
        self.headers.append((b"retry-after", b"1"))


class IdempotencyKeyMissing(GatewayError):
    """A POST or PATCH without an Idempotency-Key on a route where it is `required`."""

    status, code, title = 400, "idempotency_key_missing", "Idempotency-Key required"


class IdempotencyInFlight(GatewayError):
    """The first request with this Idempotency-Key has not been answered yet."""

    status, code, title = 409, "idempotency_in_flight", "Request with this key in flight"

    def __init__(self, detail: str = "", **kw: str | None) -> None:
        super().__init__(detail, **kw)  # type: ignore[arg-type]
        self.headers.append((b"retry-after", b"1"))


class IdempotencyKeyReused(GatewayError):
    """The Idempotency-Key was used before with another request body."""

    status, code, title = 422, "idempotency_key_reused", "Idempotency-Key reused"


class IdempotencyUnavailable(GatewayError):
    """The Idempotency-Key store cannot be reached: a keyed request is refused rather
    than risk being carried out twice."""

    status, code, title = 503, "idempotency_unavailable", "Idempotency store unavailable"

    def __init__(self, detail: str = "", **kw: str | None) -> None:
        super().__init__(detail, **kw)  # type: ignore[arg-type]
        self.headers.append((b"retry-after", b"1"))


class InternalError(GatewayError):
    status, code, title = 500, "internal_error", "Internal gateway error"


class UpstreamError(GatewayError):
    """A failure talking to an upstream. `outcome` is what retry policies match on."""

    outcome: str = "error"


class UpstreamUnavailable(UpstreamError):
    status, code, title = 502, "upstream_unavailable", "Upstream unavailable"

    def __init__(self, detail: str = "", *, outcome: str = "connect_error", **kw: str | None):
        super().__init__(detail, **kw)  # type: ignore[arg-type]
        self.outcome = outcome


class UpstreamTimeout(UpstreamError):
    status, code, title = 504, "upstream_timeout", "Upstream timed out"
    outcome = "timeout"


class UpstreamSaturated(UpstreamError):
    status, code, title = 503, "upstream_saturated", "Upstream saturated"
    outcome = "saturated"

    def __init__(self, detail: str = "", *, retry_after: int = 1, **kw: str | None) -> None:
        super().__init__(detail, **kw)  # type: ignore[arg-type]
        self.headers.append((b"retry-after", str(retry_after).encode()))


class UpstreamUnhealthy(UpstreamError):
    status, code, title = 503, "upstream_unhealthy", "Upstream unhealthy"
    outcome = "unhealthy"

    def __init__(self, detail: str = "", *, retry_after: int = 1, **kw: str | None) -> None:
        super().__init__(detail, **kw)  # type: ignore[arg-type]
        self.headers.append((b"retry-after", str(max(1, retry_after)).encode()))


class ShuttingDown(GatewayError):
    status, code, title = 503, "shutting_down", "Gateway is shutting down"

    def __init__(self, detail: str = "", **kw: str | None) -> None:
        super().__init__(detail, **kw)  # type: ignore[arg-type]
        self.headers.append((b"connection", b"close"))


def problem_body(error: GatewayError, request_id: str) -> bytes:
    """RFC 9457 problem details, plus the contract's `code`, `request_id`, `route`, `upstream`."""
    doc: dict[str, object] = {
        "type": PROBLEM_TYPE + error.code,
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "code": error.code,
        "request_id": request_id,
    }
    if error.route is not None:
        doc["route"] = error.route
    if error.upstream is not None:
        doc["upstream"] = error.upstream
    return json.dumps(doc, separators=(",", ":")).encode()


def problem_response(
    error: GatewayError,
    request_id: str,
    extra: Headers | None = None,
    *,
    date: bytes | None = None,
    length: bool = True,
) -> tuple[Headers, bytes]:
    """The headers and problem+json body of an answer the gateway makes for `error`:
    content type, length (left out where the server frames the body itself, as for a
    WebSocket refusal), request id, `date` when given, the error's own headers
    (Allow, Retry-After, Connection) and `extra` (the filters' headers)."""
    body = problem_body(error, request_id)
    headers: Headers = [(b"content-type", b"application/problem+json")]
    if length:
        headers.append((b"content-length", str(len(body)).encode()))
    headers.append((b"x-request-id", request_id.encode("ascii")))
    if date is not None:
        headers.append((b"date", date))
    headers.extend(error.headers)
    if extra:
        headers.extend(extra)
    return headers, body
