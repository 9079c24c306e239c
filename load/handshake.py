"""New TLS connections per second against a server: a full handshake for every request.

N clients each loop until the time is up: open a TCP connection, do a full TLS
handshake (a fresh session every time: the client keeps no session, so nothing is
resumed), send `GET PATH` with `Connection: close`, read the whole answer, close. A
closed loop like wrk's, with one request per connection:

    python load/handshake.py --port 8443 --connections 64 --seconds 5

Why not wrk or h2load: with `Connection: close` both reconnect on the session they
had (wrk's `SSL_clear`, h2load's saved session), so nearly every handshake they make
is a resumption; `openssl s_time -new` does full handshakes but one at a time, at
twice this client's CPU per connection. The server's certificate is not verified
(wrk and h2load do not verify either); the bench checks it once, before any load.

Prints one line, `WRK_JSON {...}`, with the figures `wrk_stats.lua` prints (so the
bench reads both alike; latencies are whole connections: connect, handshake, request,
answer), plus `resumed` (handshakes the server resumed: 0 unless something is wrong)
and the TLS version, cipher and ALPN protocol of the last connection.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import ssl
import sys
import time
from dataclasses import dataclass, field

__all__ = ["main"]


@dataclass
class Tally:
    latencies_us: list[int] = field(default_factory=list)
    bytes: int = 0
    connect: int = 0
    read: int = 0
    timeout: int = 0
    status: int = 0  # answers that were not 2xx
    resumed: int = 0
    tls: str = ""


class _Exchange(asyncio.Protocol):
    """One request on one connection: the answer is complete at EOF or once its
    Content-Length has arrived, whichever comes first."""

    def __init__(self, request: bytes, done: asyncio.Future[bytes]) -> None:
        self.request = request
        self.done = done
        self.buffer = bytearray()
        self.wanted: int | None = None  # head + body bytes, once the head is in

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is no asyncio.WriteTransport subclass, but writes.
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.wanted is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = None
            for line in bytes(self.buffer[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length is None:
                return  # delimited by EOF
            self.wanted = end + 4 + length
        if len(self.buffer) >= self.wanted and not self.done.done():
            self.done.set_result(bytes(self.buffer))

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(bytes(self.buffer))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(bytes(self.buffer))
            else:
                self.done.set_exception(exc)


async def _client(args: argparse.Namespace, context: ssl.SSLContext, tally: Tally) -> None:
    loop = asyncio.get_running_loop()
    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\nConnection: close\r\n\r\n"
    ).encode()
    stop = time.monotonic() + args.seconds
    while time.monotonic() < stop:
        started = time.perf_counter()
        done: asyncio.Future[bytes] = loop.create_future()
        try:
            async with asyncio.timeout(args.timeout):
                transport, _ = await loop.create_connection(
                    functools.partial(_Exchange, request, done),
                    args.host,
                    args.port,
                    ssl=context,
                    server_hostname=args.server_name or None,
                )
        except TimeoutError:
            tally.timeout += 1
            continue
        except (OSError, ssl.SSLError):
            tally.connect += 1
            await asyncio.sleep(0.01)  # a refused connection would otherwise spin
            continue
        try:
            async with asyncio.timeout(args.timeout):
                answer = await done
        except TimeoutError:
            tally.timeout += 1
            transport.abort()
            continue
        except (OSError, ssl.SSLError):
            tally.read += 1
            transport.abort()
            continue
        tls = transport.get_extra_info("ssl_object")
        transport.close()
        if not answer.startswith(b"HTTP/1."):
            tally.read += 1
            continue
        tally.latencies_us.append(int((time.perf_counter() - started) * 1e6))
        tally.bytes += len(answer)
        if answer[9:10] != b"2":
            tally.status += 1
        if tls is not None:
            if tls.session_reused:
                tally.resumed += 1
            tally.tls = f"{tls.version()} {tls.cipher()[0]} {tls.selected_alpn_protocol()}"


def _percentile(ordered: list[int], q: float) -> int:
    """Nearest rank on a sorted list (0 when empty)."""
    if not ordered:
        return 0
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


async def run(args: argparse.Namespace) -> dict[str, object]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    tally = Tally()
    started = time.monotonic()
    await asyncio.gather(*(_client(args, context, tally) for _ in range(args.connections)))
    elapsed = time.monotonic() - started
    ordered = sorted(tally.latencies_us)
    return {
        "requests": len(ordered),
        "duration_us": int(elapsed * 1e6),
        "bytes": tally.bytes,
        "connect": tally.connect,
        "read": tally.read,
        "write": 0,
        "status": tally.status,
        "timeout": tally.timeout,
        "mean_us": sum(ordered) / len(ordered) if ordered else 0,
        "max_us": ordered[-1] if ordered else 0,
        "p50_us": _percentile(ordered, 50),
        "p75_us": _percentile(ordered, 75),
        "p90_us": _percentile(ordered, 90),
        "p99_us": _percentile(ordered, 99),
        "p999_us": _percentile(ordered, 99.9),
        "resumed": tally.resumed,
        "tls": tally.tls,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/hello")
    parser.add_argument("--server-name", default="", help="SNI (default: none, as for an IP)")
    parser.add_argument("--connections", type=int, default=64, help="clients at once")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=10.0, help="bound for each step")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    print("WRK_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
