"""What every upstream transport shares: its settings, the raw `open` the hot path
calls, and the one place httpx's exceptions become the gateway's.

A transport is an `httpx.AsyncBaseTransport` (`handle_async_request` + `aclose`, what
the upstream's `httpx.AsyncClient` uses off the hot path) that also offers `open`:
the same request without httpx's Request and Response objects. Every transport raises
httpx's exceptions; `map_httpx_errors` turns them into the gateway's own at the
boundary, as httpx's `map_httpcore_exceptions` does for httpcore's.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import httpx

from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable

__all__ = [
    "RawAnswer",
    "RawTransport",
    "TransportSettings",
    "connect",
    "connect_failed",
    "default_tls_context",
    "host_port",
    "map_httpx_errors",
]

log = logging.getLogger("gateway.upstream")


@dataclass(frozen=True, slots=True)
class TransportSettings:
    """One upstream's connection limits and timeouts, as its transport needs them."""

    max_connections: int  # connections per target, open or opening
    max_keepalive: int  # idle connections kept per target; 0 closes each after use
    keepalive_expiry: float  # seconds an idle connection is kept
    connect_timeout: float  # seconds to establish a connection
    read_timeout: float  # seconds between two reads of one answer
    tls: ssl.SSLContext | None = None  # for https:// targets; None: the system defaults
    server_name: str | None = None  # SNI and the name verified; None: the target's host
    # http1: the h1 client (or GATEWAY_TRANSPORT's); http2: the h2 one, whatever that says
    protocol: Literal["http1", "http2"] = "http1"


def default_tls_context(
    ca_file: str | None = None, alpn: Sequence[str] = ("http/1.1",)
) -> ssl.SSLContext:
    """TLS to an upstream: verified against `ca_file`, else the system trust store, the
    target's host as SNI and verified name, `alpn` offered (HTTP/1.1 unless told: an
    HTTP/2 upstream's context offers only "h2")."""
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(list(alpn))
    return context


async def connect(
    loop: asyncio.AbstractEventLoop,
    protocol: asyncio.BaseProtocol,
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    server_hostname: str | None,
    handshake_timeout: float,
) -> None:
    """Open a connection to `host:port` for `protocol`, over TLS with `tls` (its
    handshake within `handshake_timeout`), as every transport's pool does. The caller
    bounds the whole opening (its own protocol's handshake included) with
    `asyncio.timeout`; httpx's exceptions come from `connect_failed`."""
    if tls is None:
        await loop.create_connection(lambda: protocol, host, port)
    else:
        await loop.create_connection(
            lambda: protocol,
            host,
            port,
            ssl=tls,
            server_hostname=server_hostname,
            ssl_handshake_timeout=handshake_timeout,
        )


def connect_failed(exc: BaseException, host: str, port: int) -> httpx.TransportError | None:
    """httpx's exception for a connection that could not be opened: `ConnectTimeout`
    for the opening's deadline, `ConnectError` for the OS's refusal; None for any other
    (it is raised as it is)."""
    if isinstance(exc, TimeoutError):
        return httpx.ConnectTimeout(f"connecting to {host}:{port} timed out")
    if isinstance(exc, OSError):
        return httpx.ConnectError(str(exc) or type(exc).__name__)
    return None


class RawAnswer(Protocol):
    """What `open` returns: status and raw headers now, the body as it arrives."""

    status: int
    headers: list[tuple[bytes, bytes]]

    def whole(self) -> bytes | None:
        """The entire body when it came with the head (the connection is then free
        once `aclose` is called), else None and it streams from `body`."""

    def body(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...

    @property
    def trailers(self) -> list[tuple[bytes, bytes]] | None:
        """The trailer fields, filled as the body ends (HTTP/2); None: never any."""


class RawTransport(httpx.AsyncBaseTransport, abc.ABC):
    """A transport the hot path can call directly, without httpx's objects."""

    @abc.abstractmethod
    async def open(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> RawAnswer:
        """Send one request; return as soon as the answer's head is in."""


class map_httpx_errors:
    """Translate httpx's exceptions into the gateway's. Client-facing details name the
    upstream, never the internal target address; the cause is logged with the target.

    A class rather than a `@contextmanager` generator: it wraps every upstream try, and
    a generator-based context manager costs a generator and its frame each time."""

    __slots__ = ("_target", "_upstream")

    def __init__(self, upstream: str, target: str) -> None:
        self._upstream = upstream
        self._target = target

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if isinstance(exc, httpx.HTTPError):
            log.debug(
                "upstream try failed: %s: %s",
                type(exc).__name__,
                exc,
                extra={"upstream": self._upstream, "target": self._target},
            )
            raise _translate(exc, self._upstream) from exc


def _translate(exc: httpx.HTTPError, upstream: str) -> UpstreamError:
    if isinstance(exc, httpx.ConnectError) and _certificate_failure(exc):
        return UpstreamUnavailable(
            f"the TLS certificate of upstream {upstream!r} did not verify "
            f"({_certificate_failure(exc)})",
            upstream=upstream,
            outcome="connect_error",
        )
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return UpstreamUnavailable(
            f"connecting to upstream {upstream!r} timed out",
            upstream=upstream,
            outcome="connect_error",
        )
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"upstream {upstream!r} did not answer in time", upstream=upstream)
    if isinstance(exc, httpx.ConnectError):
        return UpstreamUnavailable(
            f"cannot connect to upstream {upstream!r}", upstream=upstream, outcome="connect_error"
        )
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return UpstreamUnavailable(
            f"upstream {upstream!r} closed the connection or spoke bad HTTP",
            upstream=upstream,
            outcome="reset",
        )
    return UpstreamUnavailable(
        f"upstream {upstream!r} failed ({type(exc).__name__})", upstream=upstream, outcome="reset"
    )


def _certificate_failure(exc: BaseException) -> str | None:
    """The reason, when a connect error is a certificate that did not verify."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message or "certificate verify failed")
        seen = seen.__cause__ or seen.__context__
    return "certificate verify failed" if "CERTIFICATE_VERIFY_FAILED" in str(exc) else None


def host_port(authority: str, default: int) -> tuple[str, int, bytes]:
    """A URL authority split for connecting: (host, port, the authority as the Host
    header or `:authority` sends it, without a default port, IDNA-encoded)."""
    if authority.startswith("["):
        end = authority.index("]")
        host, rest = authority[1:end], authority[end + 1 :]
        port = int(rest[1:]) if rest.startswith(":") else default
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            host, port = authority, default
        else:
            port = int(port_text)
    suffix = f":{default}"
    header = authority[: -len(suffix)] if authority.endswith(suffix) else authority
    return host, port, header.encode("idna" if not header.isascii() else "ascii")
