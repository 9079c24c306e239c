"""Accept new client connections in bursts, not one per event-loop iteration.

libuv (1.45 and later, inside uvloop) accepts a single connection each time the
listening socket polls readable. Under load one loop iteration takes milliseconds, so a
burst of new connections waited seconds to be accepted while the gateway's own request
durations stayed short (docs/performance.md has the figures; the plain asyncio loop,
which accepts up to its backlog per event, did not show it). `BurstAcceptor` takes the
listening socket over from uvloop's server and accepts up to `ACCEPT_BURST` connections
per readiness, each handed to `loop.connect_accepted_socket` with the server's own
protocol factory.

Only a single-process gateway uses it: workers sharing one listening socket keep
libuv's one-at-a-time accept, or the first worker woken would take a whole wave of
connections while the others idle (docs/performance.md has the figures).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl as ssl_module
from collections.abc import Callable
from typing import Any

__all__ = ["ACCEPT_BURST", "BurstAcceptor"]

log = logging.getLogger(__name__)

ACCEPT_BURST = 128  # connections accepted per readiness of the listening socket
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# What accept(2) may report for one connection (Linux passes pending network errors
# on): skip it, keep accepting.
_TRANSIENT_ERRORS = (
    errno.EPROTO,
    errno.ENETDOWN,
    errno.ENOPROTOOPT,
    errno.EHOSTDOWN,
    errno.ENONET,
    errno.EHOSTUNREACH,
    errno.EOPNOTSUPP,
    errno.ENETUNREACH,
    errno.EPERM,
)
_RESUME_AFTER = 0.1  # seconds without accepting after running out of descriptors


class _Accepted(socket.socket):
    """An accepted connection's socket object (subclassed per listener, above)."""

    __slots__ = ()


class BurstAcceptor:
    """Owns one listening socket; `close` stops accepting and closes it."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        loop: asyncio.AbstractEventLoop,
        *,
        ssl: ssl_module.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        # Under TLS each accepted socket does its handshake first, bounded in time.
        self._tls: dict[str, Any] = (
            {"ssl": ssl, "ssl_handshake_timeout": ssl_handshake_timeout} if ssl else {}
        )
        self._factory = protocol_factory
        self._loop = loop
        self._pending: set[asyncio.Task[object]] = set()
        self._closed = False
        # Accepted sockets are made as `_Accepted` of this listener's family, whose
        # `family` and `type` are plain class attributes: `socket.accept()` and uvloop
        # read them several times per connection, and the properties of
        # `socket.socket` build an enum member on each read.
        self._family, self._type, self._proto = sock.family, sock.type, sock.proto
        if self._family in (socket.AF_INET, socket.AF_INET6):
            # What an accepted TCP socket is: asyncio's own loop sets TCP_NODELAY only
            # on sockets that say so (uvloop sets it on every TCP transport).
            self._proto = socket.IPPROTO_TCP
        self._accepted = type(
            "_Accepted",
            (_Accepted,),
            {"__slots__": (), "family": self._family, "type": self._type},
        )
        loop.add_reader(sock.fileno(), self._accept)

    @property
    def sockets(self) -> list[socket.socket]:
        return [self._sock]

    def _accept(self) -> None:
        accept = self._sock._accept  # type: ignore[attr-defined]  # accept4(2), no wrapper
        make = self._accepted
        family, kind, proto = self._family, self._type, self._proto
        for _ in range(ACCEPT_BURST):
            try:
                fd, _ = accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued: next one
            except OSError as exc:
                if exc.errno in _TRANSIENT_ERRORS:
                    continue
                if exc.errno in _RESOURCE_ERRORS:
                    # Out of descriptors: stop polling for a moment instead of spinning;
                    # the kernel keeps the rest queued in the backlog.
                    log.warning("cannot accept client connections for now: %s", exc.strerror)
                    self._loop.remove_reader(self._sock.fileno())
                    self._loop.call_later(_RESUME_AFTER, self._resume)
                    return
                raise
            # No setblocking(False) or TCP_NODELAY here: the loop's transport sets both
            # on the descriptor (uvloop: libuv's uv_tcp_open and uv_tcp_nodelay; asyncio:
            # `_create_connection_transport` and `_set_nodelay`).
            conn = make(family, kind, proto, fd)
            task = self._loop.create_task(
                self._loop.connect_accepted_socket(self._factory, conn, **self._tls)
            )
            self._pending.add(task)
            task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[object]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("accepted connection failed to start: %r", task.exception())

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    async def wait_closed(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def __repr__(self) -> str:
        return f"BurstAcceptor({self._sock!r}, closed={self._closed})"
