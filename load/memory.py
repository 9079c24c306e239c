"""Idle keep-alive connections against a server, and what they cost it in RSS.

Opens N connections to 127.0.0.1:PORT (in batches) and samples the server's RSS (the
process tree of --pid) and its socket count; then sends one `GET PATH` on each and
reads the answer, so every connection is a keep-alive connection that has served a
request, and samples again at once; closes them all, waits, and samples a last time.
"Held" is the server's socket count over its start, so connections the server closed
are not counted as held.

    python load/memory.py --port 8080 --pid 1234 --connections 10000

Prints one JSON object. Raises its own open-files limit to the hard limit and opens no
more connections than that allows (the figure it reached is in the output).
A server's idle keep-alive timeout (uvicorn's is 5 s) closes connections that served
their request longer ago than that: when the request phase takes longer (a slow or
busy machine), `held` is lower than `opened` and the per-connection figure uses it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import rss_kib, tree_pids


def socket_count(pid: int) -> int:
    """Open sockets of the process tree (listeners and upstream connections included)."""
    count = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{p}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{p}/fd/{fd}").startswith("socket:"):
                        count += 1
    return count


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def run(args: argparse.Namespace) -> dict[str, object]:
    limit = raise_nofile()
    wanted = args.connections
    count = min(wanted, max(limit - 200, 0))
    request = f"GET {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n\r\n".encode()

    await asyncio.sleep(0.5)
    rss_start = rss_kib(args.pid)
    sockets_start = socket_count(args.pid)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    failures: dict[str, int] = {}

    def failed(exc: BaseException) -> None:
        name = type(exc).__name__
        failures[name] = failures.get(name, 0) + 1

    # Phase 1: open every connection (no request yet).
    started = time.monotonic()
    deadline = started + args.timeout
    for i in range(0, count, args.batch):
        if time.monotonic() > deadline:
            break
        batch = min(args.batch, count - i)
        opened = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", args.port) for _ in range(batch)),
            return_exceptions=True,
        )
        for item in opened:
            if isinstance(item, BaseException):
                failed(item)
            else:
                conns.append(item)
    opened_s = time.monotonic() - started
    await asyncio.sleep(args.settle)
    rss_open = rss_kib(args.pid)
    sockets_open = socket_count(args.pid)

    # Phase 2: one request on each, few at a time (the upstream pool stays as it was).
    gate = asyncio.Semaphore(args.in_flight)
    statuses: dict[int, int] = {}

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with gate:
            try:
                writer.write(request)
                status = await asyncio.wait_for(_read_response(reader), args.timeout)
                statuses[status] = statuses.get(status, 0) + 1
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                failed(exc)

    requests_started = time.monotonic()
    await asyncio.gather(*(one(r, w) for r, w in conns))
    requests_s = time.monotonic() - requests_started
    # Sampled at once: a server's idle keep-alive timeout (uvicorn: 5 s) starts now.
    rss_held = rss_kib(args.pid)
    sockets_held = socket_count(args.pid)
    held_client = sum(1 for reader, _ in conns if not reader.at_eof() and not reader.exception())

    for _, writer in conns:
        writer.close()
    for _, writer in conns:
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    conns.clear()
    await asyncio.sleep(args.after)
    rss_after = rss_kib(args.pid)
    sockets_after = socket_count(args.pid)

    held_open = max(sockets_open - sockets_start, 0)
    held = min(max(sockets_held - sockets_start, 0), held_client)

    def per(rss: int, n: int) -> float | None:
        return round((rss - rss_start) / n, 2) if n else None

    return {
        "wanted": wanted,
        "opened": count - sum(failures.values()) if count else 0,
        "open_files_limit": limit,
        "held_open": held_open,
        "held": held,
        "held_client_view": held_client,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "failures": failures,
        "open_seconds": round(opened_s, 2),
        "request_seconds": round(requests_s, 2),
        "rss_start_kib": rss_start,
        "rss_open_kib": rss_open,
        "rss_held_kib": rss_held,
        "rss_after_kib": rss_after,
        "rss_per_open_connection_kib": per(rss_open, held_open),
        "rss_per_connection_kib": per(rss_held, held),
        "rss_retained_kib": rss_after - rss_start,
        "sockets_start": sockets_start,
        "sockets_after": sockets_after,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pid", type=int, required=True, help="the server whose RSS to sample")
    parser.add_argument("--path", default="/hello")
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500, help="connections opened at once")
    parser.add_argument("--in-flight", type=int, default=64, help="requests at once")
    parser.add_argument("--settle", type=float, default=0.5, help="s idle before sampling")
    parser.add_argument("--after", type=float, default=2.0, help="s after closing to sample")
    parser.add_argument("--timeout", type=float, default=60.0, help="bound for each phase")
    args = parser.parse_args(argv)
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
