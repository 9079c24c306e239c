"""Serving: uvicorn (uvloop + httptools) for the data plane and the admin listener,
in one event loop, with the gateway's own signal handling for drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator

import uvicorn

from gateway.admin import build_admin_app
from gateway.app import DataPlane, GatewayState
from gateway.loader import ConfigError, load_config
from gateway.observability import configure_logging
from gateway.runtime import build_runtime, unsupported
from gateway.settings import GatewaySettings

__all__ = ["GatewayServer", "run"]

log = logging.getLogger("gateway.server")


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handlers: the gateway decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayServer:
    def __init__(self, settings: GatewaySettings, config_path: str) -> None:
        self.settings = settings
        self.config_path = config_path
        self.state = GatewayState()
        server = settings.server
        self.data = _Server(
            uvicorn.Config(
                DataPlane(self.state),
                host=server.host,
                port=server.port,
                loop="none",
                http="httptools",
                lifespan="off",
                access_log=False,
                server_header=False,
                date_header=False,
                log_config=None,
                timeout_graceful_shutdown=int(server.drain_timeout) or 1,
                backlog=4096,
            )
        )
        self.admin = _Server(
            uvicorn.Config(
                build_admin_app(self.state),
                host=server.admin_host,
                port=server.admin_port,
                loop="none",
                http="httptools",
                lifespan="off",
                access_log=False,
                log_config=None,
            )
        )
        self._signals = 0

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting at once")
            self.data.force_exit = True
            self.admin.force_exit = True
            self.data.should_exit = True
            self.admin.should_exit = True
            return
        log.info(
            "draining: finishing in-flight requests",
            extra={
                "signal": signal.Signals(signum).name,
                "drain_timeout": self.settings.server.drain_timeout,
            },
        )
        self.state.draining = True
        self.data.should_exit = True

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        runtime = build_runtime(self.settings)
        await runtime.start()
        self.state.runtime = runtime
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        admin_task = asyncio.create_task(self.admin.serve())
        try:
            await self.data.serve()
        finally:
            self.state.draining = True
            self.admin.should_exit = True
            await admin_task
            await runtime.aclose()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if not self.data.started:
            return 1
        log.info("stopped")
        return 0


def _event_loop_factory() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(config_path: str, *, workers: int | None = None, port: int | None = None) -> int:
    try:
        settings = load_config(config_path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if port is not None:
        server = settings.server.model_copy(update={"port": port})
        settings = settings.model_copy(update={"server": server})
    problems = unsupported(settings)
    if problems:
        for problem in problems:
            print(f"{config_path}: {problem}", file=sys.stderr)
        return 1
    configure_logging(settings.server.log_level)
    if (workers or settings.server.workers) > 1:
        log.warning("several workers are not supported yet; serving with one")
    gateway = GatewayServer(settings, config_path)
    with asyncio.Runner(loop_factory=_event_loop_factory) as runner:
        return runner.run(gateway.serve())
