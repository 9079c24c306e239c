"""Serving: uvicorn (uvloop + httptools) for the data plane and the admin listener,
in one event loop, with the gateway's own signal handling for drain."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import math
import os
import resource
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import uvicorn

from gateway.build.factory import build_runtime, unsupported
from gateway.build.runtime import Retirements, Runtime
from gateway.build.values import plain
from gateway.config.loader import ConfigError, load_config
from gateway.config.models import GatewaySettings, TlsSettings, TracingSettings
from gateway.dataplane.app import DataPlane
from gateway.dataplane.state import GatewayState
from gateway.dataplane.traced import TracedDataPlane
from gateway.ops.logs import AccessLog
from gateway.ops.metrics import Metrics
from gateway.ops.snapshots import publish
from gateway.server.h2 import H2Options
from gateway.server.listeners import Listener, admin_server
from gateway.server.protocol import ClientLimits, protocol_class
from gateway.server.reload import watch, with_port
from gateway.server.tls import Certificate, TlsError, TlsListener, TlsTerminator
from gateway.tracing.spans import TracedAccessLog, Tracer, TracingRules

__all__ = ["GatewayServer", "raise_open_file_limit"]

# gc.set_threshold while serving (see GatewayServer.serve).
GC_THRESHOLDS = (50_000, 20, 100)
FULL_COLLECTION_EVERY = 30.0  # seconds (GatewayServer._release_memory)

log = logging.getLogger("gateway.server")


class GatewayServer:
    """One process serving the data plane and the admin listener in one event loop.

    Reload (POST /reload, SIGHUP, or the `watch` setting) validates the file fully,
    builds a new runtime and swaps one reference; the old runtime finishes its
    in-flight requests, then closes what the new one did not keep. SIGTERM/SIGINT
    drains; a second signal exits at once."""

    def __init__(
        self,
        settings: GatewaySettings,
        config_path: str,
        *,
        port: int | None = None,
        sockets: list[socket.socket] | None = None,
        admin: bool = True,
        worker: bool = False,
        ready_fd: int | None = None,
        status_dir: str | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.port_override = port
        self.sockets = sockets
        # A worker of a supervisor: the supervisor watches the file and escalates on a
        # second signal; a worker that also got the signal directly (Ctrl-C, systemd's
        # control-group kill) must keep draining rather than count it twice.
        self.worker = worker
        self.ready_fd = ready_fd
        self.status_dir = status_dir  # a worker publishes its status snapshot there
        metrics = Metrics()
        # Tracing is set up once per process, here: in the worker itself under a
        # supervisor (its export thread starts in `serve`). Unset, OpenTelemetry is
        # never imported and the request path is the untraced one.
        self.tracer = make_tracer(settings.tracing, metrics) if settings.tracing else None
        self._access_log = AccessLog if self.tracer is None else TracedAccessLog
        self.state: GatewayState[Runtime] = GatewayState(
            metrics=metrics,
            access_log=self._access_log() if settings.server.access_log else None,
        )
        server = settings.server
        data_plane = (
            DataPlane(self.state, body_timeout=server.body_timeout)
            if self.tracer is None
            else TracedDataPlane(self.state, self.tracer, body_timeout=server.body_timeout)
        )
        self.tls = (
            TlsTerminator(tls_values(server.tls, http2=server.http2.enabled))
            if server.tls is not None
            else None
        )
        self.data = Listener(
            uvicorn.Config(
                data_plane,
                host=server.host,
                port=server.port,
                loop="none",
                # httptools plus the head size/count/timeout and connection limits
                # (protocol.py; the keep-alive timeout is applied there too).
                http=protocol_class(
                    ClientLimits.from_settings(server), self.state, H2Options.from_settings(server)
                ),
                timeout_keep_alive=max(1, math.ceil(server.keepalive_timeout)),
                lifespan="off",
                access_log=False,
                # The gateway reads X-Forwarded-* itself (trusted_proxies); uvicorn
                # must not rewrite the peer address from them first.
                proxy_headers=False,
                server_header=False,
                date_header=False,
                log_config=None,
                timeout_graceful_shutdown=max(1, int(server.drain_timeout + 0.999)),
                backlog=4096,
            ),
            # One process accepts in bursts; workers sharing a socket do not: the
            # first one woken would take a whole wave of connections (docs/performance.md).
            burst_accept=not worker,
            tls=self.tls.context if self.tls is not None else None,
            tls_handshake_timeout=server.header_timeout,
        )
        self.admin = admin_server(self.state, server, self.reload) if admin else None
        board = self.state.status
        board.config_path = os.path.abspath(config_path)
        board.connections = lambda: len(self.data.server_state.connections)
        if self.tls is not None:
            board.tls = self.tls.describe
        if server.http2.enabled:
            board.protocols = ("HTTP/2", "HTTP/1.1", "HTTP/1.0")
        if self.tracer is not None:
            board.tracing = self.tracer.describe
        self._signals = 0
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._retirements = Retirements()  # runtimes replaced by a reload, still closing

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1 and self.worker:
            return
        if self._signals > 1:
            log.warning("second signal: exiting at once")
            self.data.force_exit = True
            self.data.should_exit = True
            if self.admin is not None:
                self.admin.force_exit = True
                self.admin.should_exit = True
            return
        log.info(
            "draining: finishing in-flight requests",
            extra={
                "signal": signal.Signals(signum).name,
                "drain_timeout": self.settings.server.drain_timeout,
            },
        )
        self.begin_drain()

    def begin_drain(self) -> None:
        self.state.draining = True
        self.data.should_exit = True

    async def reload(self) -> list[str]:
        """Reload the config file; returns the errors (empty on success)."""
        async with self._reload_lock:
            try:
                settings = load_config(self.config_path)
            except ConfigError as exc:
                errors = exc.errors
            else:
                settings = with_port(settings, self.port_override)
                errors = [f"{self.config_path}: {p}" for p in unsupported(settings)]
                if not errors:
                    errors = self._reload_tls(settings)
            if errors:
                self.state.metrics.reloads.labels("error").inc()
                self.state.status.reloaded(errors)
                log.error("reload refused; the running config is kept", extra={"errors": errors})
                return errors
            if settings.tracing != self.settings.tracing:
                log.warning("tracing: a change takes effect at the next start")
            old = self.state.runtime
            runtime = build_runtime(
                settings, previous=old, metrics=self.state.metrics, traced=self.tracer is not None
            )
            await runtime.start(previous=old)
            self.state.runtime = runtime  # the swap: new requests start on the new config
            self.settings = settings
            if self.state.access_log is None and settings.server.access_log:
                self.state.access_log = self._access_log()
            if old is not None:
                grace = max(settings.server.drain_timeout, 30)
                self._retirements.retire(old, runtime, grace=grace)
            self.state.metrics.reloads.labels("ok").inc()
            self.state.status.reloaded([])
            log.info("config reloaded", extra={"routes": len(runtime.router)})
            return []

    def _reload_tls(self, settings: GatewaySettings) -> list[str]:
        """Read the certificate files again (new handshakes get the new pairs); the
        errors when one does not load, the pairs in use then staying."""
        tls = settings.server.tls
        if (tls is None) != (self.tls is None):
            log.warning("server.tls: turning TLS on or off takes effect at the next start")
            return []
        if tls is None or self.tls is None:
            return []
        try:
            self.tls.reload(tls_values(tls, http2=self.settings.server.http2.enabled))
        except TlsError as exc:
            return [f"{self.config_path}: server.tls: {exc}"]
        return []

    async def _report_stats(self, every: float) -> None:
        """Log the event loop's task count and open client connections every `every`
        seconds; opt-in (`GATEWAY_DEBUG_STATS_EVERY`), for the soak's leak check."""
        while True:
            await asyncio.sleep(every)
            log.info(
                "debug stats",
                extra={
                    "tasks": len(asyncio.all_tasks()),
                    "client_connections": len(self.data.server_state.connections),
                },
            )

    async def _release_memory(self, every: float = 1.0) -> None:
        """After a burst of client connections has closed (at least 1,000, and half of
        the peak), collect the garbage they left and hand freed heap back to the OS:
        young collections are rare while serving (GC_THRESHOLDS), and glibc keeps freed
        pages otherwise. What pymalloc's arenas keep is the rest (docs/limits.md, "Memory").

        And a full collection every `FULL_COLLECTION_EVERY` seconds whatever the load:
        with young collections every 50,000 allocations, a quiet gateway would
        otherwise keep reference cycles (exceptions and their tracebacks) for hours.
        Start-up objects are frozen, so it walks only what requests left behind."""
        trim = _malloc_trim()
        connections = self.data.server_state.connections
        peak = len(connections)
        since_full = 0.0
        while True:
            await asyncio.sleep(every)
            since_full += every
            now = len(connections)
            if now >= peak:
                peak = now
            elif peak - now >= 1000 and now <= peak // 2:
                gc.collect()
                since_full = 0.0
                if trim is not None:
                    trim(0)
                log.debug("memory released", extra={"client_connections": now, "peak": peak})
                peak = now
            if since_full >= FULL_COLLECTION_EVERY:
                gc.collect()
                since_full = 0.0

    async def _report_ready(self, fd: int) -> None:
        """Tell the supervisor (one line on a pipe) once this worker accepts requests
        and its signal handlers are in place."""
        await self.data.listening.wait()
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        runtime = build_runtime(
            self.settings, metrics=self.state.metrics, traced=self.tracer is not None
        )
        await runtime.start()
        self.state.runtime = runtime
        if self.tracer is not None:
            self.tracer.sink.start()
        # What exists now lives as long as the process: out of the collector's sight,
        # so a full collection under load walks per-request garbage only; and young
        # collections every 50,000 allocations instead of 700 (less CPU per request,
        # cyclic garbage waits a little longer; docs/performance.md has the figure).
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(_discard(self.reload())))
        if self.settings.server.watch and not self.worker:
            self._spawn(watch(self.config_path, self.reload))
        if self.ready_fd is not None:
            self._spawn(self._report_ready(self.ready_fd))
        stats_every = os.environ.get("GATEWAY_DEBUG_STATS_EVERY")
        if stats_every:  # load/soak.py: task and connection counts on stderr
            self._spawn(self._report_stats(float(stats_every)))
        if self.status_dir is not None:
            self._spawn(publish(self.state, self.status_dir))
        self._spawn(self._release_memory())
        admin_task = asyncio.create_task(self.admin.serve()) if self.admin else None
        try:
            await self.data.serve(sockets=self.sockets)
        finally:
            self.state.draining = True
            if self.admin is not None and admin_task is not None:
                self.admin.should_exit = True
                await admin_task
            for task in list(self._background):
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            await self._retirements.aclose()
            current = self.state.runtime
            if current is not None:
                await current.aclose()
            if runtime is not current:
                await runtime.aclose()
            if self.state.access_log is not None:
                self.state.access_log.flush()
            if self.tracer is not None:
                # What is queued goes out now, within the export timeout.
                await asyncio.to_thread(self.tracer.sink.close)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
                if self.worker:
                    # A late forwarded signal must not turn a clean exit into a kill;
                    # the supervisor escalates with SIGKILL when it means it.
                    signal.signal(sig, signal.SIG_IGN)
        if not self.data.started:
            return 1
        log.info("stopped")
        return 0


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where there is none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: libc's among them
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


async def _discard(coro: Coroutine[Any, Any, object]) -> None:
    await coro


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (every client and upstream
    connection is a descriptor) and log what was got; returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = _nr_open()  # Linux refuses an infinite soft limit for files
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning(
                "could not raise the open-file limit",
                extra={"soft": soft, "hard": hard, "error": str(exc)},
            )
            return soft, hard
        previous, soft = soft, target
    else:
        previous = soft
    log.info("open-file limit", extra={"soft": soft, "hard": hard, "was": previous})
    return soft, hard


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024 * 1024


def make_tracer(settings: TracingSettings, metrics: Metrics) -> Tracer:
    """The process's tracer, exporting with OpenTelemetry (imported here, and only
    when the `tracing` block is set)."""
    from gateway.tracing.export import BatchExporter

    rules = plain(TracingRules, settings)
    return Tracer(rules, BatchExporter(rules, metrics.spans_dropped))


def tls_values(tls: TlsSettings, *, http2: bool = True) -> TlsListener:
    """The `server.tls` block as the terminator's plain values (`http2`: offer h2)."""
    return TlsListener(
        certificates=tuple(Certificate(c.cert, c.key) for c in tls.certificates),
        sni_strict=tls.sni_strict,
        min_version=tls.min_version,
        client_auth=tls.client_auth,
        client_ca=tls.client_ca,
        alpn=("h2", "http/1.1") if http2 else ("http/1.1",),
    )
