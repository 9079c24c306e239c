"""`gateway run --workers N`: one listening socket, N worker processes, one admin listener.

The supervisor binds the data port once and hands the socket to each worker (an
inherited file descriptor), so every worker accepts on the same port. Workers write
metrics to a shared prometheus-client multiprocess directory that the supervisor's
admin listener sums. Workers serve a snapshot of the last config the supervisor
validated, never the file directly, so a worker restarted after a bad edit still serves
the running config. A worker that dies is restarted (with a growing pause if it keeps
dying); its counters stay on disk and its live gauges are dropped. `/readyz` turns 200
once every worker has reported that it accepts requests. Every worker writes its status
snapshot to a file once a second; `/status.json` here merges those of the live workers.
Reload is validated here, then every worker is told to reload (SIGHUP); SIGTERM/SIGINT
drains every worker, and a second signal kills them.
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.build.factory import unsupported
from gateway.config.loader import ConfigError, load_config, load_config_text
from gateway.config.models import GatewaySettings
from gateway.dataplane.state import GatewayState
from gateway.ops.metrics import Metrics
from gateway.ops.page import process_info, render
from gateway.ops.snapshots import read_snapshots, remove_snapshot
from gateway.server.listeners import admin_server, event_loop_factory
from gateway.server.reload import watch, with_port

__all__ = ["Supervisor", "worker_main"]

log = logging.getLogger("gateway.supervisor")


class _ConfigView:
    """What the admin app needs of a runtime: the running settings."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings


def _use_multiprocess_values() -> None:
    """prometheus-client picks file-backed values at import time from the environment;
    the supervisor sets the directory later, so it picks again."""
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def _ignore_sighup() -> None:
    # Until the worker installs its own handler, a reload signal must not kill it; an
    # ignored disposition survives exec.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


@dataclass
class _Worker:
    """One worker process in its slot, and whether it said it is ready."""

    slot: int
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    ready: bool = False


class Supervisor:
    """`gateway run --workers N`: binds the data port once, starts N worker processes
    that accept on it, restarts a worker that dies (with a growing pause for one that
    keeps dying at start), serves the admin listener over the workers' merged metrics
    and status, and passes reloads (validated here first) and drains on to them."""

    def __init__(
        self, settings: GatewaySettings, config_path: str, workers: int, port: int | None
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.workers = workers
        self.port = port
        self.procs: dict[int, _Worker] = {}
        self.draining = False
        self._signals = 0
        self._failures: dict[int, int] = {}
        self._reloads: set[asyncio.Task[list[str]]] = set()  # SIGHUP reloads under way
        self.workdir = tempfile.mkdtemp(prefix="gateway-")
        self.metrics_dir = os.path.join(self.workdir, "metrics")
        os.mkdir(self.metrics_dir)
        self.snapshot = os.path.join(self.workdir, "gateway.yaml")
        self.status_dir = os.path.join(self.workdir, "status")
        os.mkdir(self.status_dir)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        _use_multiprocess_values()
        # The supervisor serves no request: its runtime is a view of the running config.
        self.state: GatewayState[Any] = GatewayState(metrics=Metrics())
        self.state.status.config_path = os.path.abspath(config_path)
        self.admin = admin_server(
            self.state, settings.server, self.reload, status=self.status_document
        )

    def status_document(self) -> dict[str, Any]:
        """`/status.json` for the whole set: every live worker's snapshot, summed."""
        pids = [w.proc.pid for w in self.procs.values() if w.proc.poll() is None]
        snapshots = read_snapshots(self.status_dir, pids)
        process = process_info(
            self.state.status,
            workers=self.workers,
            snapshots=snapshots,
            draining=self.draining,
        )
        return render(self.settings, snapshots, process)

    def _write_snapshot(self, text: str) -> None:
        tmp = self.snapshot + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, self.snapshot)

    def _bind(self) -> socket.socket:
        server = self.settings.server
        family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((server.host, server.port))
        sock.listen(4096)
        sock.set_inheritable(True)
        return sock

    def _spawn(self, sock: socket.socket, ready_w: int, slot: int) -> None:
        cmd = [
            sys.executable,
            "-m",
            "gateway.server.supervisor",
            "--fd",
            str(sock.fileno()),
            "--ready-fd",
            str(ready_w),
            "--config",
            self.snapshot,
            "--status-dir",
            self.status_dir,
        ]
        if self.port is not None:
            cmd += ["--port", str(self.port)]
        proc = subprocess.Popen(cmd, pass_fds=[sock.fileno(), ready_w], preexec_fn=_ignore_sighup)
        self.procs[slot] = _Worker(slot, proc)
        log.info("worker started", extra={"worker": slot, "pid": proc.pid})

    def _signal_workers(self, sig: int, ready_only: bool = False) -> None:
        for worker in self.procs.values():
            if worker.proc.poll() is None and (worker.ready or not ready_only):
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)

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

    def _on_ready(self, reader: int) -> None:
        try:
            data = os.read(reader, 4096)
        except BlockingIOError:
            return
        for line in data.decode().split():
            pid = int(line)
            for worker in self.procs.values():
                if worker.proc.pid == pid:
                    worker.ready = True
                    self._failures.pop(worker.slot, None)
        if self.state.runtime is None and self.procs and all(w.ready for w in self.procs.values()):
            self.state.runtime = _ConfigView(self.settings)
            log.info("every worker is ready", extra={"workers": len(self.procs)})

    async def reload(self) -> list[str]:
        try:
            text = await asyncio.to_thread(Path(self.config_path).read_text, encoding="utf-8")
            settings = load_config_text(text, self.config_path)
        except OSError as exc:
            errors = [f"{self.config_path}:1:1: : cannot read config: {exc.strerror}"]
        except ConfigError as exc:
            errors = exc.errors
        else:
            errors = [f"{self.config_path}: {p}" for p in unsupported(settings)]
        if errors:
            self.state.metrics.reloads.labels("error").inc()
            self.state.status.reloaded(errors)
            log.error("reload refused; the running config is kept", extra={"errors": errors})
            return errors
        self._write_snapshot(text)
        self.settings = settings
        if self.state.runtime is not None:
            self.state.runtime = _ConfigView(settings)
        self._signal_workers(signal.SIGHUP, ready_only=True)
        self.state.metrics.reloads.labels("ok").inc()
        self.state.status.reloaded([])
        log.info("reload sent to every worker")
        return []

    def _reload_soon(self) -> None:
        """SIGHUP: reload in a task this supervisor holds (the loop keeps only a weak
        reference to a task) and awaits when it stops."""
        task = asyncio.create_task(self.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    def _restart_delay(self, slot: int, lived: float) -> float:
        """No pause for a worker that ran a while; a growing one (up to 10 s) for a
        worker that keeps dying at start, so a crash loop does not spin the CPU."""
        if lived > 10:
            self._failures.pop(slot, None)
            return 0.0
        count = self._failures[slot] = self._failures.get(slot, 0) + 1
        return float(min(10.0, 0.25 * 2 ** (count - 1)))

    async def run(self, config_text: str) -> int:
        from prometheus_client import multiprocess

        loop = asyncio.get_running_loop()
        self._write_snapshot(config_text)
        sock = self._bind()
        ready_r, ready_w = os.pipe()
        os.set_blocking(ready_r, False)
        loop.add_reader(ready_r, self._on_ready, ready_r)
        for slot in range(self.workers):
            self._spawn(sock, ready_w, slot)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reload_soon)
        admin_task = asyncio.create_task(self.admin.serve())
        watch_task = (
            asyncio.create_task(watch(self.config_path, self.reload))
            if self.settings.server.watch
            else None
        )
        pending_restart: dict[int, float] = {}
        exit_code = 0
        try:
            while True:
                await asyncio.sleep(0.1)
                now = time.monotonic()
                for slot, worker in list(self.procs.items()):
                    code = worker.proc.poll()
                    if code is None or slot in pending_restart:
                        continue
                    multiprocess.mark_process_dead(worker.proc.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
                    remove_snapshot(self.status_dir, worker.proc.pid)
                    if self.draining:
                        del self.procs[slot]
                        # A worker killed by the drain signal before it was ready had
                        # nothing in flight: that is a clean stop too.
                        if code > 0 or (code < 0 and worker.ready):
                            exit_code = code if code > 0 else 1
                        continue
                    delay = self._restart_delay(slot, now - worker.started)
                    log.error(
                        "worker died; restarting",
                        extra={
                            "worker": slot,
                            "pid": worker.proc.pid,
                            "code": code,
                            "restart_in": delay,
                        },
                    )
                    pending_restart[slot] = now + delay
                for slot, when in list(pending_restart.items()):
                    if self.draining:
                        pending_restart.pop(slot)
                        self.procs.pop(slot, None)
                    elif now >= when:
                        pending_restart.pop(slot)
                        self._spawn(sock, ready_w, slot)
                if self.draining and not self.procs:
                    break
        finally:
            loop.remove_reader(ready_r)
            os.close(ready_r)
            os.close(ready_w)
            sock.close()
            background = [*self._reloads, *([watch_task] if watch_task is not None else [])]
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            self.admin.should_exit = True
            await admin_task
            self._signal_workers(signal.SIGKILL)
            shutil.rmtree(self.workdir, ignore_errors=True)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return exit_code


def worker_main(argv: list[str] | None = None) -> int:
    """A worker: serve the data plane on the inherited socket, no admin listener."""
    import argparse

    from gateway.ops.logs import configure_logging
    from gateway.server.process import GatewayServer

    parser = argparse.ArgumentParser(prog="gateway-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, default=None)
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--status-dir", default=None)
    args = parser.parse_args(argv)
    try:
        settings = with_port(load_config(args.config), args.port)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    configure_logging(settings.server.log_level)
    sock = socket.socket(fileno=args.fd)
    gateway = GatewayServer(
        settings,
        args.config,
        port=args.port,
        sockets=[sock],
        admin=False,
        worker=True,
        ready_fd=args.ready_fd,
        status_dir=args.status_dir,
    )
    with asyncio.Runner(loop_factory=event_loop_factory) as runner:
        return runner.run(gateway.serve())


if __name__ == "__main__":
    raise SystemExit(worker_main())
