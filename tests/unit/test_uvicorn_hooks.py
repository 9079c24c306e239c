"""The uvicorn internals the server builds on (gateway/server/protocol.py and
listeners.py subclass uvicorn's httptools protocol, its request cycle, its sans-I/O
WebSocket protocol and its Server), and the `websockets` internals the WebSocket close
relay builds on (gateway/dataplane/websocket.py).

uvicorn is pinned below its next minor version in pyproject.toml; when the pin moves,
this test names every private attribute or method that went missing, rather than the
gateway failing somewhere under load."""

from __future__ import annotations

import asyncio
import inspect
import re
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http import httptools_impl
from uvicorn.server import ServerState
from websockets.protocol import Side

# Methods of HttpToolsProtocol that LimitedHttpProtocol overrides and calls through
# super(), or calls itself.
PROTOCOL_METHODS = (
    "connection_made",
    "connection_lost",
    "data_received",
    "on_message_begin",
    "on_url",
    "on_header",
    "on_headers_complete",
    "on_message_complete",
    "on_body",
    "on_response_complete",
    "handle_websocket_upgrade",
    "_should_upgrade",
    "_unset_keepalive_if_required",
    "_unsupported_upgrade_warning",
)
# Attributes of a protocol instance the gateway reads or replaces.
PROTOCOL_ATTRIBUTES = (
    "app",
    "client",
    "connections",
    "cycle",
    "flow",
    "headers",
    "logger",
    "loop",
    "parser",
    "scope",
    "server_state",
    "timeout_keep_alive",
    "transport",
    "url",
)
# What Http10Cycle overrides or reads on uvicorn's RequestResponseCycle.
CYCLE_METHODS = ("send", "receive")
CYCLE_ATTRIBUTES = (
    "chunked_encoding",
    "disconnected",
    "flow",
    "keep_alive",
    "message_event",
    "on_response",
    "response_complete",
    "response_started",
    "scope",
    "transport",
)
# What the listeners' Server subclass overrides or reads.
SERVER_METHODS = ("capture_signals", "startup", "shutdown", "_wait_tasks_to_complete", "serve")
SERVER_ATTRIBUTES = ("config", "force_exit", "should_exit", "server_state", "started", "lifespan")
SERVER_STATE_ATTRIBUTES = ("connections", "tasks")
CONFIG_ATTRIBUTES = ("http_protocol_class", "timeout_graceful_shutdown")


async def _app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("never called")


def _missing(obj: object, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if not hasattr(obj, name)]


def test_the_status_lines_the_protocol_writes_exist() -> None:
    assert all(code in httptools_impl.STATUS_LINE for code in (400, 408, 414, 431, 503))


async def test_the_protocol_attributes_the_gateway_uses_exist() -> None:
    config = uvicorn.Config(_app, http="httptools", log_config=None)
    config.load()
    protocol = httptools_impl.HttpToolsProtocol(
        config=config,
        server_state=ServerState(),
        app_state={},
        _loop=asyncio.get_running_loop(),
    )
    # Some are set only once a connection or a request exists: found in the source.
    assigned = _assigned_names(httptools_impl.HttpToolsProtocol)
    missing = [n for n in PROTOCOL_ATTRIBUTES if not hasattr(protocol, n) and n not in assigned]
    assert missing == [], f"uvicorn's HttpToolsProtocol no longer has {missing}"


def _assigned_names(cls: type) -> set[str]:
    """The `self.NAME = ...` assignments in a class's source."""
    return set(re.findall(r"self\.(\w+)\s*(?::[^=\n]*)?=", inspect.getsource(cls)))


def test_the_request_cycle_members_the_gateway_uses_exist() -> None:
    cycle = httptools_impl.RequestResponseCycle
    missing = _missing(cycle, CYCLE_METHODS)
    missing += [n for n in CYCLE_ATTRIBUTES if n not in _assigned_names(cycle)]
    assert missing == [], f"uvicorn's RequestResponseCycle no longer has {missing}"


def test_the_server_members_the_listeners_use_exist() -> None:
    config = uvicorn.Config(_app, log_config=None)
    config.load()
    server = uvicorn.Server(config)
    assigned = _assigned_names(uvicorn.Server)  # `servers`, `lifespan`: set at startup
    missing = _missing(uvicorn.Server, SERVER_METHODS)
    missing += [n for n in SERVER_ATTRIBUTES if not hasattr(server, n) and n not in assigned]
    missing += [n for n in ("servers",) if n not in assigned]
    missing += _missing(server.server_state, SERVER_STATE_ATTRIBUTES)
    missing += _missing(server.config, CONFIG_ATTRIBUTES)
    assert missing == [], f"uvicorn's Server no longer has {missing}"


@pytest.mark.parametrize("name", PROTOCOL_METHODS)
def test_each_protocol_method_the_gateway_overrides_exists(name: str) -> None:
    assert hasattr(httptools_impl.HttpToolsProtocol, name), f"HttpToolsProtocol.{name} is gone"


# What `server/protocol.websocket_protocol` overrides or calls on uvicorn's sans-I/O
# WebSocket protocol (the one `ws="auto"` picks when `websockets` is installed).
WS_METHODS = (
    "connection_lost",
    "handle_connect",
    "handle_close",
    "send",
    "on_task_complete",
    "stop_keepalive",
)
WS_ATTRIBUTES = (
    "close_sent",
    "close_timeout",
    "close_timer",
    "conn",
    "disconnected",
    "handshake_complete",
    "initial_response",
    "loop",
    "queue",
    "read_paused",
    "scope",
    "transport",
)
# What `dataplane/websocket.answer_close_later` overrides or uses on websockets'
# sans-I/O Protocol (both hops), and `_UpstreamConnection` on its asyncio client.
WEBSOCKETS_PROTOCOL_METHODS = ("recv_frame", "send_close", "send_frame", "send_eof", "discard")
WEBSOCKETS_PROTOCOL_ATTRIBUTES = (
    "close_rcvd",
    "close_rcvd_then_sent",
    "close_sent",
    "current_size",
    "events",
    "parser",
    "side",
    "state",
)
WEBSOCKETS_CONNECTION_METHODS = ("process_event", "connection_made")


def _ws_protocol() -> object:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    config = uvicorn.Config(_app, log_config=None)
    config.load()
    return WebSocketsSansIOProtocol(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.new_event_loop()
    )


def test_ws_auto_is_the_sans_io_protocol() -> None:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    config = uvicorn.Config(_app, log_config=None)
    config.load()
    assert config.ws_protocol_class is WebSocketsSansIOProtocol


def test_the_websocket_protocol_members_the_gateway_uses_exist() -> None:
    protocol = _ws_protocol()
    try:
        cls = type(protocol)
        assigned = _assigned_names(cls)  # `scope`: set once a handshake arrives
        missing = _missing(cls, WS_METHODS)
        missing += [n for n in WS_ATTRIBUTES if not hasattr(protocol, n) and n not in assigned]
        assert missing == [], f"uvicorn's WebSocketsSansIOProtocol no longer has {missing}"
    finally:
        protocol.loop.close()  # type: ignore[attr-defined]


def test_the_websocket_protocol_builds_a_plain_websockets_server_protocol() -> None:
    """`answer_close_later` converts exactly that class, in place."""
    from websockets.server import ServerProtocol

    protocol = _ws_protocol()
    try:
        assert type(protocol.conn) is ServerProtocol  # type: ignore[attr-defined]
    finally:
        protocol.loop.close()  # type: ignore[attr-defined]


def test_the_websocket_protocol_behaves_as_the_close_relay_relies_on() -> None:
    """Read off uvicorn's source, since these are behaviours rather than names: the
    scope is built in `handle_connect`; a pending `close_timer` keeps `run_asgi` from
    closing the transport when the app ends (the relay answers in `on_task_complete`);
    a close frame received after `close_sent` cancels that timer and closes."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    source = inspect.getsource(WebSocketsSansIOProtocol.handle_connect)
    assert "self.scope" in source and '"extensions"' in source
    run_asgi = inspect.getsource(WebSocketsSansIOProtocol.run_asgi)
    assert "if self.close_timer is None:" in run_asgi
    assert "on_task_complete" in inspect.getsource(WebSocketsSansIOProtocol.handle_connect)
    handle_close = inspect.getsource(WebSocketsSansIOProtocol.handle_close)
    assert "if self.close_sent:" in handle_close and "self.close_timer.cancel()" in handle_close


def test_uvicorn_reports_a_dropped_websocket_as_1005_after_the_handshake() -> None:
    """uvicorn's `connection_lost` queues `websocket.disconnect` with 1005 (as for a
    close frame without a code) when the connection ends after the handshake; the
    gateway's protocol queues its 1006 before it, so that the app reads that one."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    source = inspect.getsource(WebSocketsSansIOProtocol.connection_lost)
    assert '"websocket.disconnect"' in source and "self.queue.put_nowait" in source
    assert "1005 if self.handshake_complete" in source


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def _gateway_ws_protocol() -> Any:
    """The gateway's WebSocket protocol, past the handshake, on a stand-in transport."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    from gateway.server.protocol import websocket_protocol

    config = uvicorn.Config(_app, log_config=None)
    config.load()
    protocol = websocket_protocol(WebSocketsSansIOProtocol)(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.new_event_loop()
    )
    protocol.transport = _Transport()
    protocol.connections.add(protocol)
    protocol.handshake_complete = True
    return protocol


def _lose(protocol: Any) -> list[dict[str, object]]:
    protocol.connection_lost(None)
    return [protocol.queue.get_nowait() for _ in range(protocol.queue.qsize())]


def test_a_dropped_websocket_reaches_the_app_as_1006() -> None:
    protocol = _gateway_ws_protocol()
    try:
        assert _lose(protocol)[0] == {"type": "websocket.disconnect", "code": 1006}
    finally:
        protocol.loop.close()


def test_the_end_of_a_connection_after_a_close_frame_is_not_taken_for_a_drop() -> None:
    """The close frame's own `websocket.disconnect` (queued by `handle_close`) is the
    one the app reads; the end of the connection adds no 1006."""
    from websockets.frames import Close

    protocol = _gateway_ws_protocol()
    try:
        protocol.conn.close_rcvd = Close(1005, "")
        assert all(message["code"] != 1006 for message in _lose(protocol))
    finally:
        protocol.loop.close()


def test_the_websockets_members_the_close_relay_uses_exist() -> None:
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.asyncio.messages import Assembler
    from websockets.protocol import Protocol, State

    protocol = Protocol(Side.SERVER, state=State.OPEN)
    missing = _missing(Protocol, WEBSOCKETS_PROTOCOL_METHODS)
    missing += [n for n in WEBSOCKETS_PROTOCOL_ATTRIBUTES if not hasattr(protocol, n)]
    missing += _missing(ClientConnection, WEBSOCKETS_CONNECTION_METHODS)
    missing += _missing(Assembler, ("get", "close"))
    if "recv_messages" not in _assigned_names(ClientConnection.__mro__[1]):
        missing.append("recv_messages")
    if "create_connection" not in inspect.signature(connect).parameters:
        missing.append("connect(create_connection=)")
    assert missing == [], f"websockets no longer has {missing}"
