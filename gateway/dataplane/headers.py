"""Headers both ways: what the client sent, what goes upstream, what comes back.

Everything here runs per request, so it works on ASGI's raw `(bytes, bytes)` header
lists and precomputed constants, and allocates only what the request itself needs.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from gateway.edge.client_ip import client_is_trusted
from gateway.types import Headers, IPNetwork, Scope

__all__ = [
    "DROP_UP",
    "IncomingHeaders",
    "add_forwarded",
    "http_date",
    "new_request_id",
    "parse_incoming",
    "response_headers",
]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Replaced by the gateway's own values rather than forwarded as they came.
_REPLACED = frozenset(
    {
        b"host",
        b"x-request-id",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-timeout-ms",
        b"expect",
        # Only the gateway vouches for a client certificate (mTLS): never the client.
        b"x-forwarded-client-cert",
        # gRPC's deadline: every try gets the time left (policies' per-try headers).
        b"grpc-timeout",
    }
)
# Never forwarded as they came: hop-by-hop, or replaced by the gateway.
DROP_UP = HOP_BY_HOP | _REPLACED
_FRAMING = frozenset({b"content-length"})
_DROP_DOWN = HOP_BY_HOP | {b"x-request-id"}


def _connection_tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


_ids = random.Random(int.from_bytes(os.urandom(16), "big"))


def new_request_id() -> str:
    """128 random bits as hex. A request id needs uniqueness, not secrecy: a PRNG seeded
    from the OS is enough and costs no system call per request."""
    return f"{_ids.getrandbits(128):032x}"


_date: list[Any] = [0, b""]  # [the second it was made for, the header value]


def http_date() -> bytes:
    """`Date` for a response the gateway makes or forwards without one (RFC 9110,
    6.6.1: an origin MUST send it, a proxy MUST add it where it is missing), in
    IMF-fixdate form, made once per second."""
    now = int(time.time())
    if _date[0] != now:
        _date[0] = now
        _date[1] = formatdate(now, usegmt=True).encode("ascii")
    value: bytes = _date[1]
    return value


def sane_request_id(value: bytes) -> str | None:
    if 0 < len(value) <= 128 and all(0x21 <= c <= 0x7E for c in value):
        return value.decode("ascii")
    return None


@dataclass(slots=True)
class IncomingHeaders:
    """What the gateway reads from the client's headers, in one pass."""

    upstream: Headers
    host: str
    request_id: str
    content_length: int | None
    chunked: bool
    timeout_ms: int | None
    forwarded_for: bytes | None
    forwarded_proto: bytes | None
    forwarded_host: bytes | None
    # Why the request's framing or Host is ambiguous, if it is: such a request is
    # answered 400 and never forwarded. (httptools refuses most of these before the
    # gateway sees them; this holds whatever the HTTP parser lets through.)
    framing_error: str | None = None
    grpc: bool = False  # the content type starts with application/grpc
    grpc_timeout: bytes | None = None  # the client's grpc-timeout, as it came


def parse_incoming(
    raw: list[tuple[bytes, bytes]],
    drop: frozenset[bytes] = DROP_UP,
    fresh_id: str | None = None,
) -> IncomingHeaders:
    """Split the client's headers into what goes upstream and what the gateway needs.

    The upstream request is framed by the gateway: the client's Content-Length is
    replaced by the canonical form of the one value it gave, Transfer-Encoding is
    dropped (the transport chunks a body of unknown length itself). `drop`: the names
    never forwarded, `DROP_UP` and any the caller adds (the traced data plane adds the
    trace headers). `fresh_id`: the request id when the client sent no sane one (the
    traced data plane gives a new trace's id), else a new one is drawn."""
    for name, value in raw:
        if name == b"connection":
            # Connection may not strip what frames the request: Content-Length stays
            # (Transfer-Encoding and Host are handled by the gateway either way).
            drop = drop | (_connection_tokens(value) - _FRAMING)
    upstream: Headers = []
    host = ""
    request_id: str | None = None
    content_length: int | None = None
    chunked = False
    timeout_ms: int | None = None
    xff = xfp = xfh = grpc_timeout = None
    grpc = False
    framing_error: str | None = None
    hosts = 0
    te_seen = False
    for name, value in raw:
        if name not in drop:
            if name == b"content-length":
                length = value.strip()
                if content_length is not None:
                    framing_error = "more than one Content-Length"
                elif not length.isdigit() or len(length) > 18:
                    framing_error = "invalid Content-Length"
                else:
                    content_length = int(length)
                continue
            if name == b"content-type" and value[:16].lower() == b"application/grpc":
                grpc = True
            upstream.append((name, value))
            continue
        if name == b"host":
            hosts += 1
            host = value.decode("latin-1")
        elif name == b"x-request-id":
            request_id = sane_request_id(value)
        elif name == b"transfer-encoding":
            if te_seen or value.strip().lower() != b"chunked":
                framing_error = "unsupported Transfer-Encoding (only chunked is accepted)"
            te_seen = True
            chunked = b"chunked" in value.lower()
        elif name == b"x-request-timeout-ms":
            try:
                timeout_ms = max(0, int(value))
            except ValueError:
                timeout_ms = None
        elif name == b"x-forwarded-for":
            xff = value if xff is None else xff + b", " + value
        elif name == b"x-forwarded-proto":
            xfp = value
        elif name == b"x-forwarded-host":
            xfh = value
        elif name == b"grpc-timeout":
            grpc_timeout = value
    if content_length is not None:
        if te_seen:
            framing_error = "both Content-Length and Transfer-Encoding"
        upstream.append((b"content-length", str(content_length).encode()))
    if hosts > 1:
        framing_error = "more than one Host header"
    return IncomingHeaders(
        upstream=upstream,
        host=host,
        request_id=request_id or fresh_id or new_request_id(),
        content_length=content_length,
        chunked=chunked,
        timeout_ms=timeout_ms,
        forwarded_for=xff,
        forwarded_proto=xfp,
        forwarded_host=xfh,
        framing_error=framing_error,
        grpc=grpc,
        grpc_timeout=grpc_timeout,
    )


def add_forwarded(incoming: IncomingHeaders, scope: Scope, trusted: tuple[IPNetwork, ...]) -> None:
    """X-Forwarded-For is appended to; -Proto and -Host are kept from a trusted proxy,
    otherwise set from this connection."""
    client = scope.get("client")
    client_ip = client[0] if client else ""
    headers = incoming.upstream
    xff = incoming.forwarded_for
    ip = client_ip.encode("latin-1")
    headers.append((b"x-forwarded-for", xff + b", " + ip if xff else ip))
    from_proxy = (incoming.forwarded_proto or incoming.forwarded_host) and client_is_trusted(
        client_ip, trusted
    )
    proto = incoming.forwarded_proto if from_proxy and incoming.forwarded_proto else None
    headers.append((b"x-forwarded-proto", proto or scope.get("scheme", "http").encode()))
    fhost = incoming.forwarded_host if from_proxy and incoming.forwarded_host else None
    headers.append((b"x-forwarded-host", fhost or incoming.host.encode("latin-1")))
    headers.append((b"x-request-id", incoming.request_id.encode("ascii")))
    extensions = scope.get("extensions")
    if extensions is not None:
        tls = extensions.get("tls")
        if tls is not None and tls.get("xfcc") is not None:
            headers.append((b"x-forwarded-client-cert", tls["xfcc"]))


def response_headers(raw: Headers, request_id: bytes) -> Headers:
    """The upstream's headers minus hop-by-hop ones (and those Connection names), with
    a `Date` added when the upstream sent none."""
    drop = _DROP_DOWN
    dated = False
    for name, value in raw:
        lname = name.lower()
        if lname == b"connection":
            drop = drop | _connection_tokens(value)
        elif lname == b"date":
            dated = True
    out = [(n, v) for n, v in raw if n.lower() not in drop]
    out.append((b"x-request-id", request_id))
    if not dated:
        out.append((b"date", http_date()))
    return out
