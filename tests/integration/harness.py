"""Real servers on loopback for integration tests.

`UpstreamServer` runs any ASGI app under uvicorn in a background thread (its own event
loop) on a free 127.0.0.1 port; `GatewayProcess` runs the real `gateway run -c FILE` as
a subprocess and waits for its admin `/readyz`. Both stop by themselves on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

__all__ = ["GatewayProcess", "UpstreamServer", "free_port", "read_body"]


# Ports for test servers come from below the kernel's ephemeral range (32768-60999 by
# default), so an outgoing connection of another test can never take a port between the
# moment it is chosen and the moment its server binds it. Each xdist worker draws from its
# own slice, and no process hands the same port out twice.
_PORT_LOW, _PORT_HIGH = 20_000, 32_000
_SLICES = 8


def _port_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) % _SLICES if worker[2:].isdigit() else _SLICES - 1
    width = (_PORT_HIGH - _PORT_LOW) // _SLICES
    start = _PORT_LOW + index * width
    return range(start, start + width)


class _PortPool:
    def __init__(self) -> None:
        ports = list(_port_slice())
        random.SystemRandom().shuffle(ports)
        self._ports = iter(ports)
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            for port in self._ports:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    try:
                        s.bind(("127.0.0.1", port))
                    except OSError:
                        continue
                    return port
        raise RuntimeError("no free test port left in this worker's slice")


@functools.cache
def _port_pool() -> _PortPool:
    return _PortPool()


def free_port() -> int:
    """A loopback port that is free now and that no other test will be handed."""
    return _port_pool().take()


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def read_body(receive: Any) -> bytes:
    """The whole body of an ASGI request, as the test upstreams read it."""
    body = b""
    while True:
        message = await receive()
        chunk: bytes = message.get("body", b"")
        body += chunk
        if not message.get("more_body"):
            return body


class UpstreamServer:
    """An ASGI app served by uvicorn on 127.0.0.1 in a thread of its own."""

    def __init__(self, app: Any, port: int | None = None, **config: Any) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            loop="asyncio",
            timeout_graceful_shutdown=1,
            **config,
        )
        self.server = _QuietServer(cfg)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    def start(self) -> UpstreamServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"upstream on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=5)

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _PortTaken(RuntimeError):
    """The gateway could not bind a port the harness chose for it."""


class GatewayProcess:
    """`python -m gateway run -c FILE` with its ports filled in; stopped on exit."""

    def __init__(
        self,
        config: dict[str, Any] | str,
        tmp_path: Path,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        if isinstance(config, str):
            config = yaml.safe_load(config) or {}
        server = config.setdefault("server", {})
        self._auto_ports = "port" not in server and "admin_port" not in server
        server.setdefault("host", "127.0.0.1")
        if "port" not in server:
            server["port"] = free_port()
        server.setdefault("admin_host", "127.0.0.1")
        if "admin_port" not in server:
            server["admin_port"] = free_port()
        server.setdefault("drain_timeout", "5s")
        self._config = config
        self._tmp_path = tmp_path
        self._place(server["port"], server["admin_port"])
        self.env = {**os.environ, **(env or {})}
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None

    def _place(self, port: int, admin_port: int) -> None:
        self._config["server"].update(port=port, admin_port=admin_port)
        self.port, self.admin_port = port, admin_port
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.config_path = self._tmp_path / f"gateway-{port}.yaml"
        self.config_path.write_text(yaml.safe_dump(self._config, sort_keys=False))
        self.stdout_path = self._tmp_path / f"gateway-{port}.out"
        self.stderr_path = self._tmp_path / f"gateway-{port}.err"

    def start(self, timeout: float = 15.0) -> GatewayProcess:
        # A port taken between choosing it and binding it (by a process outside this test
        # run) is the one failure that says nothing about the gateway: try other ports.
        for _ in range(2):
            try:
                return self._start(timeout)
            except _PortTaken:
                if not self._auto_ports:
                    raise
                self._place(free_port(), free_port())
        return self._start(timeout)

    def _start(self, timeout: float) -> GatewayProcess:
        # The child keeps its own copies of the descriptors; ours close right away.
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "-c", str(self.config_path), *self.args],
                stdout=out,
                stderr=err,
                env=self.env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if "address already in use" in self.stderr:
                    raise _PortTaken(self.stderr)
                raise RuntimeError(f"gateway exited {self.proc.returncode}: {self.stderr}")
            try:
                if httpx.get(self.admin_url + "/readyz", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gateway did not become ready: {self.stderr}")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=5)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
