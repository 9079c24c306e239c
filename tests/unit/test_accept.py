"""BurstAcceptor: up to ACCEPT_BURST connections per readiness of the listening socket
(libuv alone accepts one per loop iteration: seconds for a burst under load)."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from gateway.server.accept import ACCEPT_BURST, BurstAcceptor


async def accept_a_burst() -> None:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    made: list[asyncio.BaseTransport] = []

    class Recorder(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(transport)

    acceptor = BurstAcceptor(listener, Recorder, loop)
    loop.remove_reader(listener.fileno())  # driven by hand below: one readiness each
    total = ACCEPT_BURST + 40
    clients = [socket.create_connection(listener.getsockname()) for _ in range(total)]
    try:
        acceptor._accept()
        await asyncio.sleep(0.05)
        assert len(made) == ACCEPT_BURST
        acceptor._accept()
        await asyncio.sleep(0.05)
        assert len(made) == total
        # The loop's transport made each socket non-blocking and TCP_NODELAY.
        for transport in (made[0], made[-1]):
            sock = transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert not os.get_blocking(sock.fileno())
    finally:
        for client in clients:
            client.close()
        for transport in made:
            transport.close()
        acceptor.close()
        await acceptor.wait_closed()
    assert listener.fileno() == -1


async def test_a_burst_of_connections_is_accepted_per_readiness() -> None:
    await accept_a_burst()


def test_a_burst_is_accepted_the_same_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(accept_a_burst())
    finally:
        loop.close()


async def test_after_close_nothing_is_accepted() -> None:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()
    acceptor = BurstAcceptor(listener, asyncio.Protocol, loop)
    acceptor.close()
    acceptor.close()  # twice is fine
    try:
        socket.create_connection(address, timeout=1).close()
    except OSError:
        pass
    else:  # pragma: no cover - the port was taken by someone else meanwhile
        raise AssertionError("a closed acceptor's port still accepts")
