"""A fault-injection TCP proxy for tests and the soak: it sits between the gateway and
an upstream on 127.0.0.1 and, per connection, passes bytes through or misbehaves.

    proxy = FaultProxy(upstream_port).start()      # its own thread and event loop
    proxy.fault = Fault.reset_after(1000)          # applies to connections accepted from now
    ...
    proxy.fault = None                             # healthy again
    proxy.stats                                    # accepted / open / closed by the gateway

A fault is chosen when a connection is accepted and holds for that connection's life,
so a pooled keep-alive connection keeps the behaviour it was born with: exactly what
lets a test prove the gateway did not reuse a broken connection.

Faults (upstream -> gateway direction unless said otherwise):

- `latency(s)`: every chunk of the answer is delayed by `s`.
- `reset()`: read the request, then reset the connection (RST) before any answer.
- `reset_after(n)`: pass the first `n` bytes of the answer through, then reset.
- `blackhole()`: accept and read, never answer, never close.
- `trickle(n, every)`: pass the answer through `n` bytes at a time, one piece every
  `every` seconds.
- `respond(data, then)`: answer the request with `data` (no upstream involved), then
  `close`, `reset` or `hang`: non-HTTP answers, huge headers, CR/LF in header values,
  bodies shorter than their Content-Length.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Fault", "FaultProxy", "ProxyStats"]

Then = Literal["close", "reset", "hang"]


@dataclass(frozen=True, slots=True)
class Fault:
    kind: Literal["latency", "reset", "reset_after", "blackhole", "trickle", "respond"]
    seconds: float = 0.0
    nbytes: int = 0
    data: bytes = b""
    then: Then = "close"

    @classmethod
    def latency(cls, seconds: float) -> Fault:
        return cls("latency", seconds=seconds)

    @classmethod
    def reset(cls) -> Fault:
        return cls("reset")

    @classmethod
    def reset_after(cls, nbytes: int) -> Fault:
        return cls("reset_after", nbytes=nbytes)

    @classmethod
    def blackhole(cls) -> Fault:
        return cls("blackhole")

    @classmethod
    def trickle(cls, nbytes: int = 1, every: float = 1.0) -> Fault:
        return cls("trickle", nbytes=nbytes, seconds=every)

    @classmethod
    def respond(cls, data: bytes, then: Then = "close") -> Fault:
        return cls("respond", data=data, then=then)


@dataclass(slots=True)
class ProxyStats:
    accepted: int = 0
    open: int = 0
    closed_by_gateway: int = 0  # the gateway's side ended first (EOF or reset)
    faults: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> ProxyStats:
        return ProxyStats(self.accepted, self.open, self.closed_by_gateway, dict(self.faults))


async def _flush(writer: asyncio.StreamWriter) -> None:
    """Wait until the transport has handed every written byte to the kernel."""
    await writer.drain()
    for _ in range(200):
        if writer.transport.get_write_buffer_size() == 0:
            break
        await asyncio.sleep(0.01)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: SO_LINGER with a zero timeout, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """TCP proxy on 127.0.0.1 with switchable faults; see the module docstring."""

    def __init__(self, upstream_port: int | None = None, fault: Fault | None = None) -> None:
        self.upstream_port = upstream_port
        self.fault = fault
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # Life

    def start(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout=5)

    def drop_all(self) -> None:
        """Reset every open connection (and forget their faults): a clean slate between
        tests that share one proxy. The peer's pool sees each one die."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._drop_all(), loop).result(timeout=5)

    async def _drop_all(self) -> None:
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    # One connection

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        fault = self.fault
        kind = fault.kind if fault is not None else "pass"
        with self._lock:
            self.stats.accepted += 1
            self.stats.open += 1
            self.stats.faults[kind] = self.stats.faults.get(kind, 0) + 1
        upstream: asyncio.StreamWriter | None = None
        pipes: list[asyncio.Task[None]] = []
        try:
            if fault is not None and fault.kind in ("reset", "blackhole", "respond"):
                await self._scripted(fault, reader, writer)
                return
            assert self.upstream_port is not None, "this fault needs an upstream"
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            to_upstream = asyncio.create_task(self._pipe(reader, upstream, None, gateway=True))
            to_gateway = asyncio.create_task(self._pipe(up_reader, writer, fault, gateway=False))
            pipes = [to_upstream, to_gateway]
            done, pending = await asyncio.wait(
                {to_upstream, to_gateway}, return_when=asyncio.FIRST_COMPLETED
            )
            if to_upstream in done and to_gateway not in done:
                # The gateway hung up: let the answer in flight finish briefly, then stop.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(to_gateway), 0.2)
            for task_ in pending:
                task_.cancel()
            await asyncio.gather(to_upstream, to_gateway, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # drop_all() or stop(): end quietly. (Python 3.11's start_server callback
            # calls task.exception(), which raises on a cancelled task.)
            pass
        finally:
            for pipe in pipes:
                pipe.cancel()
            if pipes:
                await asyncio.gather(*pipes, return_exceptions=True)
            self._count(open=-1)
            if upstream is not None:
                upstream.transport.abort()
            if not writer.transport.is_closing():
                writer.transport.abort()
            self._tasks.discard(task)

    async def _scripted(
        self, fault: Fault, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self._read_head(reader)
        if fault.kind == "reset":
            _reset(writer)
            return
        if fault.kind == "respond":
            writer.write(fault.data)
            await _flush(writer)
            if fault.then == "close":
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            if fault.then == "reset":
                await asyncio.sleep(0.05)  # let the bytes arrive before the RST
                _reset(writer)
                return
        # blackhole, or respond-then-hang: keep reading until the gateway gives up.
        while await reader.read(65536):
            pass
        self._count(closed_by_gateway=1)

    async def _read_head(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await reader.readuntil(b"\r\n\r\n")

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        fault: Fault | None,
        *,
        gateway: bool,
    ) -> None:
        sent = 0
        try:
            while True:
                chunk = await src.read(65536)
                if not chunk:
                    break
                if fault is None:
                    dst.write(chunk)
                elif fault.kind == "latency":
                    await asyncio.sleep(fault.seconds)
                    dst.write(chunk)
                elif fault.kind == "reset_after":
                    room = fault.nbytes - sent
                    dst.write(chunk[: max(room, 0)])
                    sent += len(chunk)
                    if sent >= fault.nbytes:
                        await _flush(dst)
                        await asyncio.sleep(0.05)
                        _reset(dst)
                        return
                elif fault.kind == "trickle":
                    for i in range(0, len(chunk), fault.nbytes):
                        dst.write(chunk[i : i + fault.nbytes])
                        await dst.drain()
                        await asyncio.sleep(fault.seconds)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        if gateway:
            self._count(closed_by_gateway=1)
        with contextlib.suppress(OSError, RuntimeError):
            if dst.can_write_eof():
                dst.write_eof()


def wait_for(predicate: object, timeout: float = 3.0, interval: float = 0.02) -> bool:
    """Poll `predicate()` until true or `timeout`; True when it became true."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
