"""The transports under each upstream's pool: `h1` (the default, the gateway's own
HTTP/1.1 client, holding the aiohttp one as its fallback), `aiohttp`, httpx's own
(`GATEWAY_TRANSPORT=httpx`, for the benchmark's comparison), and `h2` for upstreams
whose `protocol` is `http2`."""

from __future__ import annotations

import logging
import os

import httpx

from gateway.upstream.transports.base import RawTransport, TransportSettings
from gateway.upstream.transports.h1 import H1Transport
from gateway.upstream.transports.h2 import H2Transport

__all__ = ["RawTransport", "TransportSettings", "make_transport"]

log = logging.getLogger("gateway.upstream")
_KINDS = ("h1", "aiohttp", "httpx")


def make_transport(settings: TransportSettings) -> httpx.AsyncBaseTransport:
    """The HTTP/2 transport for an `http2` upstream; else the one `GATEWAY_TRANSPORT`
    names: `h1` (default), `aiohttp` or `httpx` (all three speak HTTP/1.1 only)."""
    if settings.protocol == "http2":
        return H2Transport(settings)
    kind = os.environ.get("GATEWAY_TRANSPORT", "h1")
    if kind not in _KINDS:
        log.warning(
            "unknown GATEWAY_TRANSPORT; using aiohttp", extra={"value": kind, "known": _KINDS}
        )
    if kind == "h1":
        return H1Transport(settings)
    if kind == "httpx":
        return httpx.AsyncHTTPTransport(
            limits=httpx.Limits(
                max_connections=settings.max_connections,
                max_keepalive_connections=settings.max_keepalive,
                keepalive_expiry=settings.keepalive_expiry,
            ),
            retries=0,
        )
    from gateway.upstream.transports.aiohttp import AiohttpTransport  # only when chosen

    return AiohttpTransport(settings)
