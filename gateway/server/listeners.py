"""The listeners: uvicorn servers the gateway drives itself (no signal handlers of
their own, burst accept, a drain that gives WebSockets their time), the admin one, and
the event loop they all run on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn

from gateway.config.models import ServerSettings
from gateway.dataplane.state import GatewayState
from gateway.ops.admin import build_admin_app
from gateway.server.accept import BurstAcceptor
from gateway.server.protocol import websocket_protocol

__all__ = ["WS_CLOSE_GRACE", "Listener", "admin_server", "event_loop_factory"]

log = logging.getLogger("gateway.server")

WS_CLOSE_GRACE = 1.0


class Listener(uvicorn.Server):
    """uvicorn's server without its own signal handlers: the gateway decides when to stop."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        burst_accept: bool = False,
        tls: ssl.SSLContext | None = None,
        tls_handshake_timeout: float | None = None,
    ) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()
        self.burst_accept = burst_accept
        self.tls = tls  # the listener's TLS context (server/tls.py), or cleartext
        self.tls_handshake_timeout = tls_handshake_timeout

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.tls is not None:
            # uvicorn would build its own context from ssl_* settings; ours chooses the
            # certificate by SNI and reloads in place. `Config.load` has run by now.
            self.config.ssl = self.tls
        ws = self.config.ws_protocol_class
        if ws is not None:  # closes relayed; under TLS, upgrades carry the connection's TLS
            self.config.ws_protocol_class = websocket_protocol(ws)
        await super().startup(sockets)
        if self.started:
            if self.burst_accept:
                self._take_over_listeners()
            self.listening.set()

    def _take_over_listeners(self) -> None:
        """Accept in bursts (`accept.py`): each listening socket uvicorn opened
        is duplicated, uvloop's server on it closed, and the duplicate given to a
        `BurstAcceptor` that creates connections with the same protocol factory."""
        loop = asyncio.get_running_loop()
        config = self.config

        def create_protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=loop,
            )

        acceptors: list[Any] = []
        for server in self.servers:
            for listener in server.sockets:
                sock = socket.socket(fileno=os.dup(listener.fileno()))
                acceptors.append(
                    BurstAcceptor(
                        sock,
                        create_protocol,
                        loop,
                        ssl=self.tls,
                        ssl_handshake_timeout=self.tls_handshake_timeout,
                    )
                )
            server.close()
        self.servers = acceptors

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's graceful shutdown, except that WebSockets are not told to go at once:
        like HTTP requests in flight, they get `drain_timeout`; then they are closed
        with 1012 (service restart) and given `WS_CLOSE_GRACE` for the close handshake
        before anything left is cancelled."""
        for server in self.servers:
            server.close()
        for server in self.servers:
            if isinstance(server, BurstAcceptor):
                await server.wait_closed()  # connections accepted just before: join them
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            if not _is_websocket(connection):
                connection.shutdown()  # idle keep-alives close now, busy ones after
        await asyncio.sleep(0.1)
        drain = self.config.timeout_graceful_shutdown or 0
        try:
            await asyncio.wait_for(self._wait_tasks_to_complete(), timeout=drain)
        except TimeoutError:
            websockets = [c for c in self.server_state.connections if _is_websocket(c)]
            for connection in websockets:
                connection.shutdown()  # close 1012, then wait for the close handshake
            try:
                await asyncio.wait_for(
                    self._wait_tasks_to_complete(), timeout=WS_CLOSE_GRACE if websockets else 0
                )
            except TimeoutError:
                running = list(self.server_state.tasks)
                if running:  # (a listener without drain time, the admin one, has none)
                    log.error(
                        "drain_timeout passed: cancelling %d request(s) still running",
                        len(running),
                    )
                    for task in running:
                        task.cancel(msg="drain_timeout passed")
                    # ...and awaited, so their own cleanup runs before the runtime closes.
                    await asyncio.wait(running, timeout=WS_CLOSE_GRACE)
        if not self.force_exit:
            await self.lifespan.shutdown()


def _is_websocket(connection: object) -> bool:
    """A WebSocket connection (the gateway's relaying protocol, or uvicorn's own)."""
    kind = type(connection)
    return bool(getattr(kind, "relays_closes", False)) or "websocket" in kind.__module__


def admin_server(
    state: GatewayState[Any],
    server: ServerSettings,
    reload: Callable[[], Awaitable[list[str]]],
    status: Callable[[], dict[str, Any]] | None = None,
) -> Listener:
    """The admin listener: a Starlette app on its own uvicorn server, same event loop."""
    return Listener(
        uvicorn.Config(
            build_admin_app(state, reload=reload, status=status),
            host=server.admin_host,
            port=server.admin_port,
            loop="none",
            http="httptools",
            lifespan="off",
            access_log=False,
            log_config=None,
        )
    )


def event_loop_factory() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
