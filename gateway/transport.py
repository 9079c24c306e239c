"""The transport under each upstream's `httpx.AsyncClient`: one small replaceable class.

httpx's own pool (httpcore) collapses under concurrency on this workload (see README,
"Choosing the HTTP client"), so each client runs on aiohttp's connector instead. This
transport does only what a proxy needs: it sends the URL exactly as encoded, adds no
headers of its own (no User-Agent, no Accept-Encoding), never decompresses, streams both
bodies, and translates aiohttp's exceptions into httpx's so the rest of the gateway sees
one exception tree. `GATEWAY_TRANSPORT=httpx` selects httpx's default transport instead
(used by the benchmark to show the difference).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
from yarl import URL

__all__ = ["AiohttpTransport", "RawResponse", "TransportSettings", "make_transport"]

# aiohttp would otherwise invent these when the client did not send them.
_SKIP_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})
_HTTP11 = {"http_version": b"HTTP/1.1"}


@dataclass(frozen=True, slots=True)
class TransportSettings:
    max_connections: int
    max_keepalive: int
    keepalive_expiry: float
    connect_timeout: float
    read_timeout: float


@contextmanager
def _map_aiohttp_errors() -> Iterator[None]:
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timeout") from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc.os_error) if exc.os_error else str(exc)) from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "read timeout") from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
    except aiohttp.ClientOSError as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
    except aiohttp.ClientError as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc


class RawResponse:
    """The proxy's own view of a response: status, raw headers, a body stream and
    `aclose`. The hot path uses it instead of building httpx objects per request."""

    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers: list[tuple[bytes, bytes]] = list(response.raw_headers)

    def whole(self) -> bytes | None:
        return None  # the body always streams (see H1Response.whole)

    async def body(self) -> AsyncIterator[bytes]:
        content = self._response.content
        with _map_aiohttp_errors():
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk

    async def aclose(self) -> None:
        response = self._response
        if response.content.at_eof():
            response.release()  # body complete: the connection goes back to the pool
        else:
            response.close()  # abandoned mid-body: the connection cannot be reused


class _ResponseStream(httpx.AsyncByteStream):
    """A `RawResponse` body as httpx's stream, for the `httpx.AsyncClient` path."""

    __slots__ = ("_raw",)

    def __init__(self, raw: RawResponse) -> None:
        self._raw = raw

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._raw.body():
            yield chunk

    async def aclose(self) -> None:
        await self._raw.aclose()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport on one pooled `aiohttp.ClientSession` (pools are per target).

    `open` is the same request without httpx's Request/Response objects: what the
    gateway's own hot path calls. `handle_async_request` serves the upstream's
    `httpx.AsyncClient` (health checks, tests, anything off the hot path)."""

    def __init__(self, settings: TransportSettings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.connect_timeout,
            sock_read=settings.read_timeout,
        )

    def _open(self) -> aiohttp.ClientSession:
        s = self._settings
        connector = aiohttp.TCPConnector(
            limit=s.max_connections,
            limit_per_host=0,
            keepalive_timeout=s.keepalive_expiry if s.max_keepalive > 0 else None,
            force_close=s.max_keepalive == 0,
            ttl_dns_cache=10,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            timeout=self._timeout,
            trust_env=False,
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        data: bytes | httpx.AsyncByteStream | None
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        if isinstance(request.stream, httpx.ByteStream):
            data = request.content or None
        else:
            data = request.stream  # type: ignore[assignment]
            # aiohttp frames the body itself (chunked unless Content-Length is given).
            headers = [h for h in headers if h[0].lower() != "transfer-encoding"]
        url = request.url
        if url.userinfo:
            # httpx already turned the URL's credentials into an Authorization header;
            # aiohttp refuses to be given both.
            url = url.copy_with(username=None, password=None)
        with _map_aiohttp_errors():
            response = await session.request(
                request.method,
                URL(str(url), encoded=True),
                headers=headers,
                data=data,
                allow_redirects=False,
                compress=None,
            )
        extensions: dict[str, object] = dict(_HTTP11)
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode("latin-1", "replace")
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(RawResponse(response)),
            request=request,
            extensions=extensions,
        )

    async def open(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> RawResponse:
        session = self._session or self._open()
        with _map_aiohttp_errors():
            response = await session.request(
                method,
                URL(url, encoded=True),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                data=body,
                allow_redirects=False,
                compress=None,
            )
        return RawResponse(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def __repr__(self) -> str:
        state = "closed" if self._session is None else repr(self._session.connector)
        return f"AiohttpTransport({state})"


@contextmanager
def _map_reqwest_errors() -> Iterator[None]:
    from pyreqwest import exceptions as rx

    try:
        yield
    except rx.ConnectTimeoutError as exc:
        raise httpx.ConnectTimeout(exc.message) from exc
    except rx.PoolTimeoutError as exc:
        raise httpx.PoolTimeout(exc.message) from exc
    except rx.RequestTimeoutError as exc:
        raise httpx.ReadTimeout(exc.message) from exc
    except rx.ConnectError as exc:
        raise httpx.ConnectError(exc.message) from exc
    except (rx.ReadError, rx.WriteError) as exc:
        raise httpx.ReadError(exc.message) from exc
    except rx.PyreqwestError as exc:
        raise httpx.RemoteProtocolError(str(exc)) from exc


class ReqwestResponse:
    """`RawResponse`'s twin over pyreqwest (Rust hyper pool)."""

    __slots__ = ("_request", "_response", "headers", "status")

    def __init__(self, request: Any, response: Any) -> None:
        self._request = request
        self._response = response
        self.status: int = response.status
        self.headers: list[tuple[bytes, bytes]] = [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()
        ]

    def whole(self) -> bytes | None:
        return None  # the body always streams (see H1Response.whole)

    async def body(self) -> AsyncIterator[bytes]:
        reader = self._response.body_reader
        with _map_reqwest_errors():
            while (chunk := await reader.read_chunk()) is not None:
                yield bytes(chunk)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self._request.__aexit__(None, None, None)


class ReqwestTransport(httpx.AsyncBaseTransport):
    """The upstream pool in Rust (pyreqwest over reqwest/hyper): connection handling,
    parsing and pooling happen off the Python thread. No decompression, no redirects,
    no cookies, no default headers."""

    def __init__(self, settings: TransportSettings) -> None:
        from datetime import timedelta

        from pyreqwest.client import ClientBuilder

        builder = (
            ClientBuilder()
            .gzip(False)
            .brotli(False)
            .zstd(False)
            .deflate(False)
            .follow_redirects(False)
            .referer(False)
            .default_cookie_store(False)
            .http1_only()
            .http1_lower_case_headers()
            .max_connections(settings.max_connections)
            .pool_max_idle_per_host(settings.max_keepalive)
            .connect_timeout(timedelta(seconds=settings.connect_timeout))
            .read_timeout(timedelta(seconds=settings.read_timeout))
        )
        if settings.max_keepalive > 0:
            builder = builder.pool_idle_timeout(timedelta(seconds=settings.keepalive_expiry))
        self._client = builder.build()
        self._compat: httpx.AsyncBaseTransport | None = None

    async def open(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> ReqwestResponse:
        builder = self._client.request(method, url).headers(
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        )
        if isinstance(body, bytes):
            builder = builder.body_bytes(body)
        elif body is not None:
            builder = builder.body_stream(body)
        request = builder.build_streamed()
        with _map_reqwest_errors():
            response = await request.__aenter__()
        return ReqwestResponse(request, response)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._compat is None:
            from pyreqwest.compatibility.httpx import HttpxTransport

            self._compat = HttpxTransport(self._client, close_client=False)
        return await self._compat.handle_async_request(request)

    async def aclose(self) -> None:
        await self._client.close()


def make_transport(settings: TransportSettings) -> httpx.AsyncBaseTransport:
    kind = os.environ.get("GATEWAY_TRANSPORT", "h1")
    if kind == "h1":
        from gateway.h1 import H1Transport

        return H1Transport(settings)
    if kind == "reqwest":
        return ReqwestTransport(settings)
    if kind == "httpx":
        return httpx.AsyncHTTPTransport(
            limits=httpx.Limits(
                max_connections=settings.max_connections,
                max_keepalive_connections=settings.max_keepalive,
                keepalive_expiry=settings.keepalive_expiry,
            ),
            retries=0,
        )
    return AiohttpTransport(settings)
