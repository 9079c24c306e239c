"""Every background task the gateway starts has an owner that cancels and awaits it: a
whole life in-process (start, requests, reloads, one of them cut short by the shutdown,
drain) ends with no task pending, no "Task was destroyed but it is pending", no unclosed
client and no ResourceWarning. The server runs on the production event loop (uvloop),
in asyncio debug mode, in this test's main thread (its signal handlers need that)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import threading
import warnings
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.config.loader import load_config
from gateway.server.listeners import event_loop_factory as _event_loop_factory
from gateway.server.process import GatewayServer
from tests.hardening.apps import RecordingApp
from tests.integration.harness import UpstreamServer, free_port


def config(port: int, admin_port: int, upstream_url: str, **extra: Any) -> dict[str, Any]:
    read_timeout = extra.pop("read_timeout", "5s")
    return {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "admin_port": admin_port,
            "drain_timeout": "2s",
        },
        "upstreams": {
            "app": {
                "targets": [upstream_url],
                "read_timeout": read_timeout,
                "health_check": {"path": "/health", "interval": "200ms"},
            }
        },
        "routes": [{"name": "all", "path": "/{rest:path}", "upstream": "app"}],
        **extra,
    }


class SilentJwks:
    """A JWKS URL that accepts the connection and never answers; `asked` is set once a
    fetch is under way."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/jwks.json"
        self.asked = threading.Event()
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self._held.append(conn)
        self.asked.set()

    def close(self) -> None:
        self.sock.close()
        for conn in self._held:
            conn.close()


async def life(path: Path, write: Any, jwks: SilentJwks, gw: GatewayServer) -> set[Any]:
    loop = asyncio.get_running_loop()
    problems: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: problems.append(context))
    serving = asyncio.create_task(gw.serve())
    await asyncio.wait_for(gw.data.listening.wait(), 10)
    admin = gw.admin
    assert admin is not None
    await asyncio.wait_for(admin.listening.wait(), 10)
    port, admin_port = gw.settings.server.port, gw.settings.server.admin_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(3):
            assert (await client.get("/ok")).status_code == 200
        # A reload that replaces the upstream while a request is in flight on it: the
        # old runtime is retired once that request is done.
        slow = asyncio.create_task(client.get("/slow?s=0.5"))
        await asyncio.sleep(0.1)
        write(read_timeout="4s")
        reload = await client.post(f"http://127.0.0.1:{admin_port}/reload")
        assert reload.status_code == 200, reload.text
        assert (await slow).status_code == 200
        assert (await client.get("/ok")).status_code == 200
    # A SIGHUP reload still starting (its JWKS fetch hangs) when the shutdown comes: its
    # new runtime, health checks running already, must be closed, not left behind.
    write(read_timeout="3s", auth={"jwt": {"jwks_url": jwks.url}})
    os.kill(os.getpid(), signal.SIGHUP)
    assert await asyncio.to_thread(jwks.asked.wait, 5)
    gw.begin_drain()
    assert await asyncio.wait_for(serving, 10) == 0
    for _ in range(3):  # let anything cancelled but unfinished show up, then collect
        await asyncio.sleep(0)
    gc.collect()
    left = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    for context in problems:
        raise AssertionError(f"event loop reported: {context.get('message')}: {context}")
    return left


def test_start_reloads_and_shutdown_leave_no_task_or_unclosed_resource(tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    path = tmp_path / "gateway.yaml"
    jwks = SilentJwks()
    with UpstreamServer(RecordingApp()) as up:

        def write(**extra: Any) -> None:
            path.write_text(yaml.safe_dump(config(port, admin_port, up.url, **extra)))

        write()
        gw = GatewayServer(load_config(str(path)), str(path))
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with asyncio.Runner(loop_factory=_event_loop_factory, debug=True) as runner:
                    left = runner.run(life(path, write, jwks, gw))
                gc.collect()
        finally:
            jwks.close()
    assert not left, f"tasks still pending after shutdown: {left}"
    resource = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    never = [str(w.message) for w in caught if "never awaited" in str(w.message)]
    assert not resource and not never, resource + never
