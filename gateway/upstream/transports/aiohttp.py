"""The aiohttp transport: the mature fallback under each upstream's `httpx.AsyncClient`.

httpx's own pool (httpcore) collapses under concurrency on this workload (see
docs/performance.md, "Choosing the HTTP client"), so the h1 client (`h1.py`) holds one
of these for what it does not serve itself, and `GATEWAY_TRANSPORT=aiohttp` puts it on
the hot path. This transport does only what a proxy needs: it sends the URL exactly as
encoded, adds no headers of its own (no User-Agent, no Accept-Encoding), never
decompresses, streams both bodies, and translates aiohttp's exceptions into httpx's so
the rest of the gateway sees one exception tree.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp
import httpx
from yarl import URL

from gateway.upstream.transports.base import RawTransport, TransportSettings

__all__ = ["AiohttpTransport", "RawResponse"]

# aiohttp would otherwise invent these when the client did not send them.
_SKIP_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})
_HTTP11 = {"http_version": b"HTTP/1.1"}


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

    trailers = None  # not kept over HTTP/1.1

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


class AiohttpTransport(RawTransport):
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
            ssl=s.tls if s.tls is not None else True,  # True: verified, system defaults
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
                server_hostname=self._settings.server_name,
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
                server_hostname=self._settings.server_name,
            )
        return RawResponse(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def __repr__(self) -> str:
        state = "closed" if self._session is None else repr(self._session.connector)
        return f"AiohttpTransport({state})"
