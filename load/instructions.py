"""`make instructions`: CPU instructions per proxied request, counted by callgrind.

Wall-clock figures on a shared 2-core machine move by 10-30 % from run to run, which
hides the few-percent changes most hot-path work is about. An instruction count does
not move: the same code, config and requests give the same figure to the last digit.
It misses what instructions do not show (cache misses, system-call time), so a change
it favours is still confirmed with `make bench`; but it tells at once whether a change
made the gateway do more or less work per request.

Starts the bench's nginx upstream (CPU 1) and the gateway with the bench's config
(every policy on, access log to a file) under `valgrind --tool=callgrind` with
instrumentation off; warms it up with a few hundred requests, switches counting on,
sends `--requests` keep-alive requests over `--connections` connections, one at a time
per connection, and reads the total back. Everything on 127.0.0.1, bounded in time.

    python load/instructions.py                         # GET /hello, 2,000 requests
    python load/instructions.py --path /profile/1       # the fan-out route
    python load/instructions.py --checkout ../other     # another checkout of the gateway
    python load/instructions.py --sample-ratio 0.01     # with a tracing: block, 1% sampled
    python load/instructions.py --hedge p95             # /hello with hedge: {after: p95}
    python load/instructions.py --grpc                  # unary gRPC calls over h2c
    python load/instructions.py --h2-post               # the same bytes, plain POST, h2c
    make instructions                                   # the first, with valgrind ensured
    make instructions INSTR_ARGS="--sample-ratio 1"     # every request traced

With `--sample-ratio`, the config gets a `tracing:` block with that `sample_ratio`,
exporting to `load/collector.py` (a real OTLP/HTTP receiver on 127.0.0.1, CPU 1): the
export thread's work is in the count, as it is in the gateway's process. Without it,
there is no `tracing:` block (tracing off).

`--grpc` counts the bench's `grpc` scenario instead: unary calls of a 100-byte message
(`/test.Echo/Unary`) over h2c to load/refs/grpc_echo.py (CPU 1), sent by h2load
(`--connections` connections x `--streams` streams at once); `--h2-post` the plain POST
of the same bytes to `/upload` over h2c it is compared with. Their ratio is the gRPC
path's own cost, counted rather than timed.

Prints `<checkout> <path>: N requests, X k instructions per request (...)`, with the
sample ratio and the spans the collector received during the counted requests when
tracing is on.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from benchlib import CHECKOUT_LAUNCH, ROOT, Procs

_LENGTH = re.compile(rb"content-length:\s*(\d+)")
PREFIX = "/gateway"  # the collector counts this gateway's exports under it
GRPC_PATH = "/test.Echo/Unary"
GRPC_BYTES = 100  # the bench's grpc scenario: a 100-byte message each way


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=ROOT, help="gateway source tree")
    parser.add_argument("--path", default="/hello", help="the bench route to request")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--grpc", action="store_true", help="unary gRPC calls over h2c (h2load)")
    parser.add_argument(
        "--h2-post", action="store_true", help="plain POSTs of the gRPC bytes over h2c (h2load)"
    )
    parser.add_argument("--streams", type=int, default=10, help="h2load -m, with --grpc")
    parser.add_argument(
        "--keep", type=Path, help="copy the callgrind dump here (for callgrind_annotate)"
    )
    parser.add_argument(
        "--sample-ratio",
        type=float,
        metavar="R",
        help="add a tracing: block with this sample_ratio (0-1), exporting to "
        "load/collector.py; default: no tracing block (off)",
    )
    parser.add_argument(
        "--hedge",
        metavar="AFTER",
        help="give the /hello route hedge: {after: AFTER} (a duration, p95 or p99): "
        "what the hedge policy costs a request that is not hedged",
    )
    args = parser.parse_args(argv)
    if args.sample_ratio is not None and not 0 <= args.sample_ratio <= 1:
        parser.error("--sample-ratio is a share: between 0 and 1")
    if args.grpc and args.h2_post:
        parser.error("--grpc or --h2-post, not both")
    if args.grpc:
        args.path = GRPC_PATH
    elif args.h2_post:
        args.path = "/upload"
    return args


def _read_answer(sock: socket.socket) -> None:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the gateway closed the connection")
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            continue
        match = _LENGTH.search(head.lower())
        if match is not None and len(body) >= int(match.group(1)):
            return
        if match is None and body.endswith(b"0\r\n\r\n"):
            return


def drive(port: int, path: str, count: int, connections: int) -> int:
    """`count` requests (rounded down to whole rounds), one in flight per connection."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(connections)]
    done = 0
    try:
        for _ in range(count // connections):
            for sock in socks:
                sock.sendall(request)
            for sock in socks:
                _read_answer(sock)
                done += 1
    finally:
        for sock in socks:
            sock.close()
    return done


def drive_h2(
    port: int, path: str, count: int, connections: int, streams: int, data: Path, grpc: bool
) -> int:
    """`count` POSTs of `data` over h2c with h2load, as gRPC calls when `grpc`; the
    number that succeeded."""
    argv = ["h2load", "-t1", f"-n{count}", f"-c{connections}", f"-m{streams}", "-d", str(data)]
    if grpc:
        argv += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    out = subprocess.run(
        [*argv, f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    ).stdout
    match = re.search(r"(\d+) succeeded", out)
    done = int(match.group(1)) if match else 0
    if done < count:
        lines = [line for line in out.splitlines() if line.startswith(("requests:", "status"))]
        print(f"h2load: {done} of {count} succeeded; " + "; ".join(lines), file=sys.stderr)
    return done


def total_instructions(folder: Path) -> int:
    total = 0
    for dump in folder.glob("callgrind.out*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkout = args.checkout.resolve()
    with tempfile.TemporaryDirectory(prefix="gateway-instructions.") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx workers run as nobody
        procs = Procs(work)
        up, sink, port, admin, collector, grpc = benchlib.free_ports(6)
        (work / "upstream.conf").write_text(benchlib.nginx_upstream_conf(work, up, sink))
        tracing = None
        if args.sample_ratio is not None:
            tracing = {
                "endpoint": f"http://127.0.0.1:{collector}{PREFIX}",
                "sample_ratio": args.sample_ratio,
            }
        h2 = args.grpc or args.h2_post
        grpc_port = grpc if h2 else None
        config = benchlib.gateway_config(
            port=port, admin_port=admin, upstream_port=up, tracing=tracing, grpc_port=grpc_port
        )
        if args.hedge is not None:
            for route in config["routes"]:
                if route["name"] == "hello":
                    route["hedge"] = {"after": args.hedge}
        data = work / "message.bin"
        data.write_bytes(benchlib.grpc_frame(GRPC_BYTES))

        def send(count: int) -> int:
            if h2:
                return drive_h2(
                    port, args.path, count, args.connections, args.streams, data, args.grpc
                )
            return drive(port, args.path, count, args.connections)

        (work / "gateway.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        spans: int | None = None
        try:
            procs.start("upstream", ["nginx", "-c", str(work / "upstream.conf")], cpus="1")
            if grpc_port is not None:
                argv = benchlib.grpc_echo_argv(grpc_port, GRPC_BYTES)
                procs.start("grpc", argv, cpus="1")
            if tracing is not None:
                sink_proc = procs.start("collector", benchlib.collector_argv(collector), cpus="1")
                problem = benchlib.wait_http(
                    f"http://127.0.0.1:{collector}/stats", 10, sink_proc.pid
                )
                if problem is not None:
                    print(f"the collector did not start: {problem}", file=sys.stderr)
                    return 1
            gateway = procs.start(
                "gateway",
                [
                    "valgrind",
                    "--tool=callgrind",
                    "--instr-atstart=no",
                    f"--callgrind-out-file={work}/callgrind.out",
                    str(ROOT / ".venv" / "bin" / "python"),
                    "-c",
                    CHECKOUT_LAUNCH,
                    "run",
                    "-c",
                    str(work / "gateway.yaml"),
                ],
                cpus="0",
                # Python's own allocator: valgrind cannot follow a re-executed process.
                env={"GATEWAY_CHECKOUT": str(checkout), "GATEWAY_SERVER__ALLOCATOR": "python"},
                stdout=work / "access.log",
            )
            problem = benchlib.wait_http(f"http://127.0.0.1:{admin}/readyz", 300, gateway.pid)
            if problem is not None:
                print(f"the gateway did not start: {problem}", file=sys.stderr)
                print(procs.log_tail("gateway"), file=sys.stderr)
                return 1
            send(args.warmup)
            if tracing is not None:
                before, _ = benchlib.settle_spans(collector, PREFIX, None, limit=30)
            subprocess.run(
                ["callgrind_control", "-i", "on", str(gateway.pid)], check=True, capture_output=True
            )
            started = time.monotonic()
            done = send(args.requests)
            took = time.monotonic() - started
            subprocess.run(
                ["callgrind_control", "-d", str(gateway.pid)], check=True, capture_output=True
            )
            time.sleep(0.5)
            total = total_instructions(work)
            if tracing is not None:
                # The counted requests' spans (the warm-up's were settled before the
                # count; those of the last second are exported after the dump, uncounted).
                after, _ = benchlib.settle_spans(collector, PREFIX, None, limit=30)
                if before is not None and after is not None:
                    spans = after - before
            if args.keep is not None:
                dumps = sorted(work.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
                if dumps:
                    shutil.copy(dumps[-1], args.keep)
        finally:
            procs.stop_all()
    if not total or not done:
        print("no instructions were counted", file=sys.stderr)
        return 1
    traced = (
        "tracing off"
        if args.sample_ratio is None
        else f"tracing sample_ratio {args.sample_ratio:g}, "
        + ("spans not counted" if spans is None else f"{spans:,} spans exported")
    )
    if args.hedge is not None:
        traced += f", hedge after {args.hedge}"
    print(
        f"{checkout} {args.path}: {done:,} requests, "
        f"{total / done / 1000:.1f} k instructions per request "
        f"({took:.0f} s under callgrind; {traced})"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
