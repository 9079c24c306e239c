"""The h1 client over TLS: an https target is served by the gateway's own pool (not the
aiohttp fallback), with the configured context and the name it verifies."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl

import httpx
import pytest
import trustme

from gateway.upstream.transports.base import TransportSettings
from gateway.upstream.transports.h1 import H1Transport


def settings(tls: ssl.SSLContext, server_name: str | None = None) -> TransportSettings:
    return TransportSettings(
        max_connections=4,
        max_keepalive=4,
        keepalive_expiry=30.0,
        connect_timeout=2.0,
        read_timeout=2.0,
        tls=tls,
        server_name=server_name,
    )


async def tls_server(ca: trustme.CA, name: str) -> tuple[asyncio.Server, list[bytes]]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(name).configure_cert(context)
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                heads.append(await reader.readuntil(b"\r\n\r\n"))
            except asyncio.IncompleteReadError:
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context), heads


async def test_an_https_target_is_served_by_the_h1_pool_with_the_name_verified() -> None:
    ca = trustme.CA()
    server, heads = await tls_server(ca, "upstream.test")
    port = server.sockets[0].getsockname()[1]
    client = ssl.create_default_context()
    ca.configure_trust(client)
    t = H1Transport(settings(client, server_name="upstream.test"))
    try:
        for _ in range(2):
            response = await t.open("GET", f"https://127.0.0.1:{port}/x", [], None)
            assert (response.status, response.whole()) == (200, b"ok")
            await response.aclose()
        assert t.connections() == 1  # the h1 pool's, reused: not the aiohttp fallback
        assert heads[0].startswith(b"GET /x HTTP/1.1\r\n")
        assert f"host: 127.0.0.1:{port}".encode() in heads[0].lower()
    finally:
        await t.aclose()
        server.close()


async def test_a_name_the_certificate_does_not_have_is_a_connect_error() -> None:
    ca = trustme.CA()
    server, _ = await tls_server(ca, "upstream.test")
    port = server.sockets[0].getsockname()[1]
    client = ssl.create_default_context()
    ca.configure_trust(client)
    t = H1Transport(settings(client))  # verified as 127.0.0.1, which it does not name
    try:
        with pytest.raises(httpx.ConnectError, match="certificate verify failed"):
            await t.open("GET", f"https://127.0.0.1:{port}/x", [], None)
    finally:
        await t.aclose()
        server.close()


async def test_a_tls_handshake_that_never_ends_is_a_connect_timeout() -> None:
    # The server accepts the TCP connection and never answers the ClientHello: the
    # handshake is bounded by connect_timeout, and the pool is left empty.
    release = asyncio.Event()
    ended = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(100)
            await release.wait()
        finally:
            writer.close()
            ended.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    t = H1Transport(
        dataclasses.replace(settings(ssl.create_default_context()), connect_timeout=0.2)
    )
    try:
        with pytest.raises(httpx.ConnectTimeout, match=f"127.0.0.1:{port} timed out"):
            await t.open("GET", f"https://127.0.0.1:{port}/x", [], None)
        assert t.connections() == 0
    finally:
        await t.aclose()
        release.set()  # nothing of the server outlives the test (its loop closes next)
        async with asyncio.timeout(2):
            await ended.wait()
        server.close()
        await server.wait_closed()
