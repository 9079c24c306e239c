"""The uvicorn internals the server builds on (gateway/server/protocol.py and
listeners.py subclass uvicorn's httptools protocol, its request cycle and its Server).

uvicorn is pinned below its next minor version in pyproject.toml; when the pin moves,
this test names every private attribute or method that went missing, rather than the
gateway failing somewhere under load."""

from __future__ import annotations

import asyncio
import inspect
import re

import pytest
import uvicorn
from uvicorn.protocols.http import httptools_impl
from uvicorn.server import ServerState

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


def test_the_websocket_protocol_builds_its_scope_in_handle_connect() -> None:
    """`server/protocol.tls_websocket_protocol` adds the `tls` extension to the scope
    that uvicorn's sans-I/O WebSocket protocol builds in `handle_connect`."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    assert hasattr(WebSocketsSansIOProtocol, "handle_connect"), "handle_connect is gone"
    source = inspect.getsource(WebSocketsSansIOProtocol.handle_connect)
    assert "self.scope" in source and '"extensions"' in source
    assert "transport" in _assigned_names(WebSocketsSansIOProtocol)
