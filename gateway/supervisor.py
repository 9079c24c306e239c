"""`gateway run --workers N`: one listening socket, N worker processes, one admin listener.

The supervisor binds the data port once and hands the socket to each worker (an
inherited file descriptor), so every worker accepts on the same port. Workers write
metrics to a shared prometheus-client multiprocess directory that the supervisor's
admin listener sums. A worker that dies is restarted (its counters stay on disk, its
live gauges are dropped). Reload is validated here first, then every worker is told to
reload (SIGHUP); SIGTERM/SIGINT drains every worker, and a second signal kills them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import uvicorn

from gateway.admin import build_admin_app
from gateway.app import GatewayState
from gateway.loader import ConfigError, load_config
from gateway.metrics import Metrics
from gateway.runtime import unsupported
from gateway.settings import GatewaySettings

__all__ = ["Supervisor", "worker_main"]

log = logging.getLogger("gateway.supervisor")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _ConfigView:
    """What the admin app needs of a runtime: the running settings."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings


def _use_multiprocess_values() -> None:
    """prometheus-client picks file-backed values at import time from the environment;
    the supervisor sets the directory later, so it picks again."""
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


class Supervisor:
    def __init__(
        self, settings: GatewaySettings, config_path: str, workers: int, port: int | None
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.workers = workers
        self.port = port
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.draining = False
        self._signals = 0
        self.metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        _use_multiprocess_values()
        self.state = GatewayState(metrics=Metrics())
        # The admin app reads `state.runtime.settings`; the supervisor has no runtime,
        # only the validated settings, which is all /config and /readyz need.
        self.state.runtime = _ConfigView(settings)  # type: ignore[assignment]
        server = settings.server
        self.admin = _Server(
            uvicorn.Config(
                build_admin_app(self.state, reload=self.reload),
                host=server.admin_host,
                port=server.admin_port,
                loop="none",
                http="httptools",
                lifespan="off",
                access_log=False,
                log_config=None,
            )
        )

    def _bind(self) -> socket.socket:
        server = self.settings.server
        family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((server.host, server.port))
        sock.listen(4096)
        sock.set_inheritable(True)
        return sock

    def _spawn(self, sock: socket.socket, slot: int) -> None:
        cmd = [
            sys.executable,
            "-m",
            "gateway.supervisor",
            "--fd",
            str(sock.fileno()),
            "--config",
            self.config_path,
        ]
        if self.port is not None:
            cmd += ["--port", str(self.port)]
        proc = subprocess.Popen(cmd, pass_fds=[sock.fileno()])
        self.procs[slot] = proc
        log.info("worker started", extra={"worker": slot, "pid": proc.pid})

    def _signal_workers(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        self.draining = True
        self.state.draining = True
        if self._signals > 1:
            log.warning("second signal: killing workers")
            self._signal_workers(signal.SIGKILL)
            return
        log.info("draining workers", extra={"signal": signal.Signals(signum).name})
        self._signal_workers(signal.SIGTERM)

    async def reload(self) -> list[str]:
        try:
            settings = load_config(self.config_path)
        except ConfigError as exc:
            self.state.metrics.reloads.labels("error").inc()
            log.error("reload refused; the running config is kept", extra={"errors": exc.errors})
            return exc.errors
        errors = [f"{self.config_path}: {p}" for p in unsupported(settings)]
        if errors:
            return errors
        self.settings = settings
        self.state.runtime = _ConfigView(settings)  # type: ignore[assignment]
        self._signal_workers(signal.SIGHUP)
        self.state.metrics.reloads.labels("ok").inc()
        log.info("reload sent to every worker")
        return []

    async def _watch(self) -> None:
        from gateway.server import _fingerprint

        last = _fingerprint(self.config_path)
        while True:
            await asyncio.sleep(1.0)
            current = _fingerprint(self.config_path)
            if current is not None and current != last:
                last = current
                await self.reload()

    async def run(self) -> int:
        from prometheus_client import multiprocess

        loop = asyncio.get_running_loop()
        sock = self._bind()
        for slot in range(self.workers):
            self._spawn(sock, slot)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        admin_task = asyncio.create_task(self.admin.serve())
        watch_task = asyncio.create_task(self._watch()) if self.settings.server.watch else None
        exit_code = 0
        try:
            while True:
                await asyncio.sleep(0.2)
                for slot, proc in list(self.procs.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    multiprocess.mark_process_dead(proc.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
                    if self.draining:
                        del self.procs[slot]
                        if code != 0:
                            exit_code = code if code > 0 else 1
                        continue
                    log.error(
                        "worker died; restarting",
                        extra={"worker": slot, "pid": proc.pid, "code": code},
                    )
                    self._spawn(sock, slot)
                if self.draining and not self.procs:
                    break
        finally:
            sock.close()
            if watch_task is not None:
                watch_task.cancel()
            self.admin.should_exit = True
            await admin_task
            self._signal_workers(signal.SIGKILL)
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return exit_code


def worker_main(argv: list[str] | None = None) -> int:
    """A worker: serve the data plane on the inherited socket, no admin listener."""
    import argparse

    from gateway.observability import configure_logging
    from gateway.server import GatewayServer, _event_loop_factory, _with_port

    parser = argparse.ArgumentParser(prog="gateway-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        settings = _with_port(load_config(args.config), args.port)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    configure_logging(settings.server.log_level)
    sock = socket.socket(fileno=args.fd)
    gateway = GatewayServer(settings, args.config, port=args.port, sockets=[sock], admin=False)
    with asyncio.Runner(loop_factory=_event_loop_factory) as runner:
        return runner.run(gateway.serve())


if __name__ == "__main__":
    raise SystemExit(worker_main())
