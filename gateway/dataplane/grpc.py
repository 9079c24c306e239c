"""gRPC as the data plane sees it (contract: "gRPC"): which requests are gRPC, their
`grpc-timeout`, and the gateway's own errors as gRPC answers rather than problem+json.

A gRPC error the gateway makes is a trailers-only answer (gRPC's PROTOCOL-HTTP2.md):
HTTP 200 and one HEADERS frame carrying `content-type: application/grpc`,
`grpc-status`, `grpc-message` (`<code>: <detail>`, percent-encoded) and
`x-request-id`. The status of each of the gateway's error codes is the contract's
where it names one, else the one gRPC's own HTTP-to-gRPC table gives the HTTP status
(doc/http-grpc-status-mapping.md): `GRPC_STATUS`.
"""

from __future__ import annotations

import re

from gateway.errors import GatewayError
from gateway.types import GatewayResponse, Headers, Send

__all__ = [
    "GRPC_STATUS",
    "RESET",
    "grpc_error_headers",
    "grpc_message",
    "grpc_status_of",
    "grpc_timeout",
    "is_grpc",
    "send_grpc_error",
    "timeout_header",
]

# The gateway's error codes as gRPC status codes.
GRPC_STATUS: dict[str, int] = {
    # the contract's mapping
    "route_not_found": 12,  # UNIMPLEMENTED
    "method_not_allowed": 12,
    "body_too_large": 8,  # RESOURCE_EXHAUSTED
    "rate_limited": 8,
    "unauthorized": 16,  # UNAUTHENTICATED
    "upstream_timeout": 4,  # DEADLINE_EXCEEDED
    "upstream_unavailable": 14,  # UNAVAILABLE
    "upstream_saturated": 14,
    "upstream_unhealthy": 14,
    "shutting_down": 14,
    "bad_request": 13,  # INTERNAL (as gRPC maps HTTP 400)
    # where the contract is silent: gRPC's table for the HTTP status, or the meaning
    "request_timeout": 4,  # the request's body did not arrive in time: a deadline
    "headers_too_large": 8,
    "uri_too_long": 8,
    "too_many_connections": 14,
    "rate_limit_unavailable": 14,
    "client_disconnected": 1,  # CANCELLED
    "not_cached": 14,  # gRPC's table for 504 (gRPC calls are POSTs, never cached)
    # Idempotency-Key (gRPC calls ignore the header; by meaning, should one get here)
    "idempotency_key_missing": 3,  # INVALID_ARGUMENT
    "idempotency_key_reused": 3,
    "idempotency_in_flight": 10,  # ABORTED: a concurrency conflict, retry later
    "idempotency_unavailable": 14,
    "internal_error": 13,
}
UNKNOWN = 2
# The gateway's own ASGI extension (HTTP/2 only): `{"type": RESET, "code": N}` resets
# the client's stream with that error code, passing on an upstream's RST_STREAM.
RESET = "gateway.http.reset"

_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
_UNIT_SECONDS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}
# What grpc-message leaves as it is: printable ASCII but '%' (PROTOCOL-HTTP2.md).
_PLAIN = frozenset(range(0x20, 0x7F)) - {ord("%")}


def is_grpc(content_type: bytes | None) -> bool:
    """A request whose content type starts with `application/grpc` (gRPC-Web's
    `application/grpc-web...` is translated before it gets here)."""
    return content_type is not None and content_type[:16].lower() == b"application/grpc"


def grpc_timeout(value: bytes | None) -> float | None:
    """`grpc-timeout` in seconds: at most 8 digits and a unit (`H M S m u n`); None
    when absent or malformed (a malformed one is ignored)."""
    if value is None:
        return None
    match = _TIMEOUT.fullmatch(value.strip())
    if match is None:
        return None
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)[0]]


def timeout_header(seconds_left: float) -> bytes:
    """`grpc-timeout` for the upstream: the whole milliseconds left (at least 1, never
    more than 8 digits)."""
    return b"%dm" % min(99_999_999, max(1, int(seconds_left * 1000)))


def grpc_message(text: str) -> bytes:
    """`grpc-message`: UTF-8, percent-encoded outside printable ASCII and `%`."""
    raw = text.encode("utf-8", "replace")
    if all(b in _PLAIN for b in raw):
        return raw
    return b"".join(bytes((b,)) if b in _PLAIN else b"%%%02X" % b for b in raw)


def grpc_error_headers(error: GatewayError, request_id: str) -> list[tuple[bytes, bytes]]:
    """The one HEADERS frame of a trailers-only answer for `error` (HTTP status 200)."""
    status = GRPC_STATUS.get(error.code, UNKNOWN)
    return [
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % status),
        (b"grpc-message", grpc_message(f"{error.code}: {error.detail}")),
        (b"x-request-id", request_id.encode("ascii")),
    ]


async def send_grpc_error(
    send: Send, error: GatewayError, request_id: str, extra: Headers | None = None
) -> int:
    """Answer `error` as a trailers-only gRPC answer; returns its gRPC status. Headers
    the edge filters added (CORS) ride along; the error's own HTTP headers do not
    (Retry-After, Allow and Connection mean nothing to a gRPC client)."""
    headers = grpc_error_headers(error, request_id)
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
    return GRPC_STATUS.get(error.code, UNKNOWN)


def grpc_status_of(response: GatewayResponse) -> int | None:
    """The grpc-status of a proxied answer: from its trailers, else from its headers (a
    trailers-only answer); None when it carried none."""
    for fields in (response.trailers, response.headers):
        if fields:
            for name, value in fields:
                if name.lower() == b"grpc-status":
                    try:
                        return int(value)
                    except ValueError:
                        return UNKNOWN
    return None
