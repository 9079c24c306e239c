"""`make bench`: the gateway side by side with nginx and three Python reference proxies.

Starts an nginx upstream, nginx as a reverse proxy, the naive proxy (Starlette + httpx),
the aiohttp pipe (pure ASGI on uvicorn + aiohttp), the fast pipe (pure ASGI on granian
+ pyreqwest) and the gateway with every policy on; for the TLS scenarios, nginx and the
gateway again with a TLS listener (HTTP/2 by ALPN) and a throwaway certificate; for the
tracing scenario, the gateway with tracing off, 1% and 100% sampled, exporting to a real
OTLP/HTTP collector (load/collector.py) that counts the spans; pins the
proxy under test to one CPU and the load generator (wrk, h2load, load/handshake.py) with
the upstream to another; runs every scenario in interleaved rounds; holds 10,000 idle
connections against the gateway for its RSS; writes `load/results/<timestamp>/`
(results.json, report.md, PNG plots). See load/README.md.

    python load/bench.py --quick          # or: make bench QUICK=1
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from benchlib import BLOB_BYTES, LOAD_DIR, ROOT, Procs, RssSampler, Timer, TlsFiles, WrkResult

VENV_BIN = ROOT / ".venv" / "bin"
MiB = 1 << 20
PROFILE_RATE = 200  # py-spy samples per second in the tracing profile
INSTRUCTIONS_LINE = re.compile(r"([\d,]+) requests, ([\d.]+) k instructions per request")
SPANS_EXPORTED = re.compile(r"([\d,]+) spans exported")
# The grpc scenario: unary calls of one 100-byte message each way, over h2c.
GRPC_MESSAGE_BYTES = 100
GRPC_PATH = "/test.Echo/Unary"
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
GRPC_SYSTEMS = ("grpc-direct", "nginx-grpc", "gateway-grpc")


@dataclass
class System:
    """One thing wrk can load: a server on a port, pinned or not."""

    name: str
    label: str
    kind: str  # nginx | reference | gateway
    port: int
    pinned: bool = True
    admin_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    failure: str | None = None
    description: str = ""
    scheme: str = "http"  # https: a TLS listener (HTTP/1.1 and HTTP/2 by ALPN)

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    path: str
    systems: tuple[str, ...]
    connections: tuple[int, ...]
    method: str = "GET"
    body_bytes: int | None = None
    payload_bytes: int | None = None  # for MiB/s: the body each request moves
    pinned: bool = True
    # wrk (keep-alive HTTP/1.1), h2load (HTTP/2, BENCH_H2_STREAMS streams per
    # connection) or handshake (load/handshake.py: a new TLS connection per request)
    tool: str = "wrk"
    data: bytes | None = None  # h2load: the body each request POSTs (-d)
    headers: tuple[str, ...] = ()  # h2load: extra request headers (-H)


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    out: Path
    procs: Procs
    timer: Timer = field(default_factory=Timer)
    systems: dict[str, System] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    memory: dict[str, Any] | None = None
    upstream_proc: subprocess.Popen[bytes] | None = None
    upstream_sink: int = 0
    pin: bool = True
    all_cpus: str | None = None  # taskset's list of every CPU, for what runs unpinned
    gateway_dropped: list[str] = field(default_factory=list)
    tls: TlsFiles | None = None  # the throwaway certificates, once made
    collector_port: int | None = None  # load/collector.py, for the tracing scenario
    tracing: dict[str, Any] = field(default_factory=dict)  # profile, instruction counts
    grpc_port: int | None = None  # load/refs/grpc_echo.py, for the grpc scenario
    cache: dict[str, Any] = field(default_factory=dict)  # load/cachebench.py (issue 22)
    hedge: dict[str, Any] = field(default_factory=dict)  # load/hedgebench.py (issue 23)

    def log(self, message: str) -> None:
        print(f"[{self.timer}] {message}", file=sys.stderr, flush=True)


# --- knobs ---------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise SystemExit(f"bench: {name} must be a whole number, got {value!r}")
    return int(value)


def _env_list(name: str, default: str) -> list[str]:
    return [v.strip() for v in (os.environ.get(name) or default).split(",") if v.strip()]


TLS_SCENARIOS = ("tls-keepalive", "h2", "tls-handshake")
# The tracing scenario's gateways: the bench config with no tracing block, and with one
# sampling 1% and 100% of requests (docs/tracing.md), all exporting to load/collector.py.
TRACING_SYSTEMS: dict[str, float | None] = {
    "gateway-trace-off": None,
    "gateway-trace-1pct": 0.01,
    "gateway-trace-all": 1.0,
}
ALL_SCENARIOS = (
    "simple",
    "tracing",
    "fanout",
    "stream",
    "upload",
    *TLS_SCENARIOS,
    "grpc",
    "cache",
    "cache-stampede",
    "compression",
    "hedge",
    "sweep",
    "workers",
    "memory",
)
TLS_SYSTEMS = ("nginx-proxy-tls", "gateway-tls")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    quick_env = os.environ.get("QUICK", "").strip().lower() not in ("", "0", "false", "no")
    parser.add_argument("--quick", action="store_true", default=quick_env, help="1 round, 2 s")
    parser.add_argument("--work", type=Path, help="temp dir (default: a new one, removed)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("BENCH_OUT", "")))
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = _env_int("BENCH_ROUNDS", 1 if quick else 3)
    args.seconds = _env_int("BENCH_SECONDS", 2 if quick else 5)
    args.warmup = _env_int("BENCH_WARMUP", 0 if quick else 1)
    args.connections = _env_int("BENCH_CONNECTIONS", 64)
    args.sweep = [
        int(c) for c in _env_list("BENCH_SWEEP", "16,64,256" if quick else "1,16,64,256,1024")
    ]
    args.scenarios = _env_list("BENCH_SCENARIOS", ",".join(ALL_SCENARIOS))
    unknown = [s for s in args.scenarios if s not in ALL_SCENARIOS]
    if unknown:
        raise SystemExit(f"bench: unknown BENCH_SCENARIOS {unknown}; known: {ALL_SCENARIOS}")
    args.idle_connections = _env_int("BENCH_IDLE_CONNECTIONS", 10_000)
    args.h2_streams = _env_int("BENCH_H2_STREAMS", benchlib.H2_STREAMS)
    args.proxy_cpu = _env_int("BENCH_PROXY_CPU", 0)
    args.client_cpu = _env_int("BENCH_CLIENT_CPU", 1)
    args.ready_timeout = _env_int("BENCH_READY_TIMEOUT", 30)
    args.access_log = os.environ.get("BENCH_ACCESS_LOG", "file")
    args.max_error_ratio = float(os.environ.get("BENCH_MAX_ERROR_RATIO", "0.01"))
    args.variants = _parse_variants(os.environ.get("BENCH_GATEWAY_VARIANTS", ""))
    # Seconds of py-spy on each tracing gateway (100%, 1%, off) after the rounds
    # (0: none); whether to count instructions per request under callgrind (valgrind).
    args.tracing_profile = _env_int("BENCH_TRACING_PROFILE", 3 if quick else 5)
    args.tracing_instructions = _env_int("BENCH_TRACING_INSTRUCTIONS", 0 if quick else 1)
    # A fresh process per round for each tracing gateway (see `restart_gateway`).
    args.tracing_restart = _env_int("BENCH_TRACING_RESTART", 1)
    # A source tree to count untraced too (the tree before tracing, say): the "off costs
    # nothing" goal is then judged against it, counted in the same run.
    baseline = os.environ.get("BENCH_TRACING_BASELINE", "").strip()
    args.tracing_baseline = Path(baseline).resolve() if baseline else None
    if args.tracing_baseline and not (args.tracing_baseline / "gateway").is_dir():
        raise SystemExit(f"bench: BENCH_TRACING_BASELINE {baseline!r} has no gateway/ package")
    if args.rounds < 1 or args.seconds < 1 or args.connections < 1 or args.h2_streams < 1:
        raise SystemExit(
            "bench: BENCH_ROUNDS, BENCH_SECONDS, BENCH_CONNECTIONS, BENCH_H2_STREAMS must be >= 1"
        )
    if not str(args.out) or str(args.out) == ".":
        args.out = LOAD_DIR / "results"
    return args


def _parse_variants(text: str) -> dict[str, dict[str, str]]:
    """`BENCH_GATEWAY_VARIANTS="httpx:GATEWAY_TRANSPORT=httpx;other:A=1,B=2"`: extra
    gateway processes, each with its own environment, in the simple GET and the sweep."""
    variants: dict[str, dict[str, str]] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, _, assignments = item.partition(":")
        env = {}
        for pair in filter(None, assignments.split(",")):
            key, sep, value = pair.partition("=")
            if not sep:
                raise SystemExit(f"bench: BENCH_GATEWAY_VARIANTS: {pair!r} is not NAME=VALUE")
            env[key.strip()] = value
        variants[f"gateway-{name.strip()}"] = env
    return variants


# --- systems --------------------------------------------------------------------------


def define_systems(bench: Bench) -> None:
    args = bench.args
    # Two per system at most (data + admin), plus the upstream's sink and the collector.
    ports = iter(benchlib.free_ports(2 * (18 + len(args.variants))))
    up = next(ports)
    bench.systems["nginx-direct"] = System(
        "nginx-direct",
        "nginx upstream, direct",
        "nginx",
        up,
        description="wrk straight to the upstream nginx (both on the client CPU): the "
        "ceiling of this rig, not a proxy",
    )
    bench.upstream_sink = next(ports)
    bench.collector_port = next(ports)
    bench.grpc_port = next(ports)
    bench.systems["grpc-direct"] = System(
        "grpc-direct",
        "gRPC upstream, direct",
        "upstream",
        bench.grpc_port,
        description="h2load straight to the gRPC upstream (load/refs/grpc_echo.py: grpcio, "
        "8 threads, both on the client CPU): the ceiling of the grpc scenario, not a proxy",
    )
    specs = [
        ("nginx-proxy", "nginx reverse proxy", "nginx", "nginx, 1 worker, upstream keepalive"),
        (
            "fast-pipe",
            "granian + pyreqwest pipe",
            "reference",
            "pure ASGI on granian (ASGI interface) + pyreqwest: load/refs/pipe_pyreqwest.py",
        ),
        (
            "aiohttp-pipe",
            "uvicorn + aiohttp pipe",
            "reference",
            "pure ASGI on uvicorn + one aiohttp ClientSession: load/refs/pipe_aiohttp.py",
        ),
        (
            "gateway",
            "gateway",
            "gateway",
            "gateway run, 1 worker, every policy on, metrics + access log on",
        ),
        *(
            (name, name, "gateway", f"gateway run with {env}")
            for name, env in args.variants.items()
        ),
        (
            "naive",
            "naive Starlette + httpx",
            "reference",
            "Starlette + one httpx.AsyncClient, default transport: load/refs/naive.py",
        ),
        (
            "gateway-trace-off",
            "gateway, tracing off",
            "gateway",
            "the gateway's config, no tracing block (a process of its own)",
        ),
        (
            "gateway-trace-1pct",
            "gateway, tracing 1% sampled",
            "gateway",
            "the gateway's config plus tracing: sample_ratio 0.01, exporting to load/collector.py",
        ),
        (
            "gateway-trace-all",
            "gateway, tracing 100% sampled",
            "gateway",
            "the gateway's config plus tracing: sample_ratio 1.0, exporting to load/collector.py",
        ),
        ("gateway-1w", "gateway, 1 worker (unpinned)", "gateway", "workers: 1, not pinned"),
        ("gateway-2w", "gateway, 2 workers (unpinned)", "gateway", "workers: 2, not pinned"),
        ("gateway-mem", "gateway (memory test)", "gateway", "fresh gateway for the idle test"),
        (
            "nginx-proxy-tls",
            "nginx reverse proxy, TLS",
            "nginx",
            "nginx-proxy's config with an ssl + http2 listener: HTTP/1.1 or h2 by ALPN",
        ),
        (
            "gateway-tls",
            "gateway, TLS",
            "gateway",
            "the gateway's config plus server.tls (server.http2 at its default, on): "
            "HTTP/1.1 or h2 by ALPN",
        ),
        (
            "nginx-grpc",
            "nginx grpc_pass (h2c)",
            "nginx",
            "nginx, 1 worker, cleartext http2 listener (h2c), grpc_pass with keepalive to "
            "the gRPC upstream; other paths proxied to the nginx upstream",
        ),
        (
            "gateway-grpc",
            "gateway (h2c, gRPC route)",
            "gateway",
            "the gateway's config, cleartext (h2c by prior knowledge), plus an upstream "
            "with protocol: http2 and a route /test.Echo/{method} to the gRPC upstream",
        ),
    ]
    for name, label, kind, description in specs:
        system = System(name, label, kind, next(ports), description=description)
        if kind == "gateway":
            system.admin_port = next(ports)
        system.pinned = name not in ("gateway-1w", "gateway-2w")
        if name in TLS_SYSTEMS:
            system.scheme = "https"
        bench.systems[name] = system


def scenarios(bench: Bench) -> list[Scenario]:
    args = bench.args
    c = args.connections
    variants = tuple(args.variants)
    gateway_set = ("gateway", *variants)
    out = [
        Scenario(
            "simple",
            f"simple GET, {c} connections",
            "/hello",
            ("nginx-direct", "nginx-proxy", "fast-pipe", "aiohttp-pipe", *gateway_set, "naive"),
            (c,),
        ),
        Scenario(
            "tracing",
            f"simple GET with tracing off / 1% / 100% sampled, {c} connections",
            "/hello",
            tuple(TRACING_SYSTEMS),
            (c,),
        ),
        Scenario(
            "fanout",
            f"fan-out of 3 backends, {c} connections",
            "/profile/1",
            ("gateway", "naive"),
            (c,),
        ),
        Scenario(
            "stream",
            f"1 MiB streamed response, {c} connections",
            "/blob",
            ("nginx-proxy", "fast-pipe", "aiohttp-pipe", "gateway"),
            (c,),
            payload_bytes=BLOB_BYTES,
        ),
        Scenario(
            "upload",
            f"1 MiB POST body, {c} connections",
            "/upload",
            ("nginx-proxy", "fast-pipe", "aiohttp-pipe", "gateway"),
            (c,),
            method="POST",
            body_bytes=BLOB_BYTES,
            payload_bytes=BLOB_BYTES,
        ),
        Scenario(
            "tls-keepalive",
            f"HTTP/1.1 over TLS, keep-alive, {c} connections",
            "/hello",
            TLS_SYSTEMS,
            (c,),
        ),
        Scenario(
            "h2",
            f"HTTP/2 over TLS, {c} connections x {args.h2_streams} streams",
            "/hello",
            TLS_SYSTEMS,
            (c,),
            tool="h2load",
        ),
        Scenario(
            "tls-handshake",
            f"new TLS connections (full handshake, one request each), {c} clients",
            "/hello",
            TLS_SYSTEMS,
            (c,),
            tool="handshake",
        ),
        Scenario(
            "sweep",
            "concurrency sweep, simple GET",
            "/hello",
            ("nginx-proxy", "fast-pipe", "aiohttp-pipe", *gateway_set, "naive"),
            # The simple GET rows are the sweep's point at BENCH_CONNECTIONS.
            tuple(n for n in args.sweep if n != c or "simple" not in args.scenarios),
        ),
        Scenario(
            "workers",
            f"--workers 2 vs 1, simple GET, {c} connections, nothing pinned",
            "/hello",
            ("gateway-1w", "gateway-2w"),
            (c,),
            pinned=False,
        ),
    ]
    frame = benchlib.grpc_frame(GRPC_MESSAGE_BYTES)
    streams = f"{c} connections x {args.h2_streams} streams"
    out += [
        Scenario(
            "grpc",
            f"unary gRPC, {GRPC_MESSAGE_BYTES}-byte messages, h2c, {streams}",
            GRPC_PATH,
            GRPC_SYSTEMS,
            (c,),
            method="POST",
            tool="h2load",
            data=frame,
            headers=GRPC_HEADERS,
        ),
        Scenario(
            "grpc-post",
            f"plain POST of the same {len(frame)} bytes to /upload, h2c, {streams}",
            "/upload",
            ("nginx-grpc", "gateway-grpc"),
            (c,),
            method="POST",
            tool="h2load",
            data=frame,
        ),
    ]
    # The grpc goal is a ratio to the same gateway's plain POST over h2c: measured with it.
    wanted = [*args.scenarios, *(["grpc-post"] if "grpc" in args.scenarios else [])]
    plan = [s for s in out if s.key in wanted and s.connections]
    if "simple" not in args.scenarios and any(s.key in TLS_SCENARIOS for s in plan):
        # The TLS goals are ratios to the same proxies' cleartext simple GET: measure it.
        plan.insert(0, dataclasses.replace(out[0], systems=("nginx-proxy", "gateway")))
    return plan


def wanted_systems(bench: Bench, plan: list[Scenario]) -> set[str]:
    names = {name for s in plan for name in s.systems}
    if "memory" in bench.args.scenarios:
        names.add("gateway-mem")
    return names


def start_systems(bench: Bench, names: set[str]) -> None:
    args, work, procs = bench.args, bench.work, bench.procs
    proxy_cpu = str(args.proxy_cpu) if bench.pin else None
    client_cpu = str(args.client_cpu) if bench.pin else None
    up = bench.systems["nginx-direct"]
    (work / "upstream.conf").write_text(
        benchlib.nginx_upstream_conf(work, up.port, bench.upstream_sink)
    )
    bench.upstream_proc = procs.start("upstream", _nginx_argv(work, "upstream"), cpus=client_cpu)
    up.proc = bench.upstream_proc
    upstream_url = f"http://127.0.0.1:{up.port}"
    ref_env = {"BENCH_UPSTREAM": upstream_url, "PYTHONPATH": str(LOAD_DIR)}
    if names & set(TLS_SYSTEMS):
        make_tls(bench, names)
    if any(TRACING_SYSTEMS.get(name) is not None for name in names):
        start_collector(bench, names, client_cpu)
    if names & set(GRPC_SYSTEMS):
        start_grpc_upstream(bench, names, client_cpu)

    for name in sorted(names):
        system = bench.systems[name]
        cpus = proxy_cpu if system.pinned else bench.all_cpus
        if name in ("nginx-direct", "grpc-direct") or system.failure:
            continue
        if name == "nginx-proxy":
            (work / "proxy.conf").write_text(benchlib.nginx_proxy_conf(work, system.port, up.port))
            system.proc = procs.start(name, _nginx_argv(work, "proxy"), cpus=cpus)
        elif name == "nginx-proxy-tls":
            conf = benchlib.nginx_proxy_conf(
                work,
                system.port,
                up.port,
                tls=bench.tls,
                version=benchlib.nginx_version(),
                name="proxy-tls",
            )
            (work / "proxy-tls.conf").write_text(conf)
            system.proc = procs.start(name, _nginx_argv(work, "proxy-tls"), cpus=cpus)
        elif name == "nginx-grpc":
            assert bench.grpc_port is not None
            conf = benchlib.nginx_grpc_conf(
                work, system.port, bench.grpc_port, up.port, version=benchlib.nginx_version()
            )
            (work / "grpc.conf").write_text(conf)
            system.proc = procs.start(name, _nginx_argv(work, "grpc"), cpus=cpus)
        elif name == "naive":
            system.proc = procs.start(
                name, _uvicorn_argv("refs.naive:app", system.port), cpus=cpus, env=ref_env
            )
        elif name == "aiohttp-pipe":
            argv = _uvicorn_argv("refs.pipe_aiohttp:app", system.port)
            argv += ["--no-server-header", "--no-date-header"]
            system.proc = procs.start(name, argv, cpus=cpus, env=ref_env)
        elif name == "fast-pipe":
            granian = VENV_BIN / "granian"
            if not granian.exists():
                system.failure = "granian is not installed (pip install -e '.[dev]')"
                continue
            argv = [
                str(granian),
                "--interface",
                "asgi",
                "--http",
                "1",
                "--loop",
                "uvloop",
                "--no-ws",
                "--workers",
                "1",
                "--backlog",
                "4096",
                "--log-level",
                "warning",
                "--host",
                "127.0.0.1",
                "--port",
                str(system.port),
                "refs.pipe_pyreqwest:app",
            ]
            system.proc = procs.start(name, argv, cpus=cpus, env=ref_env)
        elif system.kind == "gateway":
            start_gateway(bench, system, cpus)

    wait_ready(bench, up)
    if "grpc-direct" in names and bench.systems["grpc-direct"].failure is None:
        wait_ready(bench, bench.systems["grpc-direct"])
    for name in sorted(names - {"nginx-direct", "grpc-direct"}):
        system = bench.systems[name]
        if system.failure is None:
            wait_ready(bench, system)


def start_grpc_upstream(bench: Bench, names: set[str], cpus: str | None) -> None:
    """The gRPC upstream (load/refs/grpc_echo.py), on the client CPU with the nginx
    upstream; the grpc systems fail, with the reason, if it cannot start."""
    assert bench.grpc_port is not None
    system = bench.systems["grpc-direct"]
    try:
        import grpc  # noqa: F401
    except ImportError:
        for name in names & set(GRPC_SYSTEMS):
            bench.systems[name].failure = "grpcio is not installed (pip install -e '.[dev]')"
        return
    argv = benchlib.grpc_echo_argv(bench.grpc_port, GRPC_MESSAGE_BYTES)
    system.proc = bench.procs.start("grpc-direct", argv, cpus=cpus)


def _wait_h2c(bench: Bench, system: System, scenario_path: str = GRPC_PATH) -> str | None:
    """A cleartext HTTP/2-only server (h2c by prior knowledge: nginx < 1.25 on an http2
    listener, the gRPC upstream) is ready when one gRPC call over h2load succeeds."""
    data = _data_file(bench, benchlib.grpc_frame(GRPC_MESSAGE_BYTES))
    deadline = time.monotonic() + bench.args.ready_timeout
    problem: str | None = "not tried"
    while time.monotonic() < deadline:
        if system.proc is not None and not benchlib.alive(system.proc.pid):
            return "exited"
        problem = benchlib.probe_h2(
            system.url(scenario_path), data=data, headers=GRPC_HEADERS, limit=10
        )
        if problem is None:
            return None
        time.sleep(0.3)
    return problem


def _data_file(bench: Bench, data: bytes) -> Path:
    """A file in the temp dir holding `data`, for h2load's -d."""
    path = bench.work / f"body-{len(data)}-{hash(data) & 0xFFFFFFFF:08x}.bin"
    if not path.exists():
        path.write_bytes(data)
    return path


def grpc_call(url_port: int, timeout: float = 10) -> str | None:
    """One unary call with grpcio's own client: None when it returned OK and the
    upstream's message, else why not (h2load sees HTTP 200 even for a gRPC error)."""
    import grpc

    try:
        with grpc.insecure_channel(f"127.0.0.1:{url_port}") as channel:
            call = channel.unary_unary(GRPC_PATH)
            answer = call(b"x" * GRPC_MESSAGE_BYTES, timeout=timeout)
    except grpc.RpcError as exc:
        return f"gRPC call failed: {exc.code()} {exc.details()}"[:200]
    if len(answer) != GRPC_MESSAGE_BYTES:
        return f"gRPC call answered {len(answer)} bytes, not {GRPC_MESSAGE_BYTES}"
    return None


def make_tls(bench: Bench, names: set[str]) -> None:
    """The throwaway CA and server certificate, into the results folder (`tls/`); the
    TLS systems fail, with the reason, if they cannot be made."""
    try:
        bench.tls = benchlib.make_tls_files(bench.out / "tls")
    except (ImportError, OSError, ValueError) as exc:
        for name in names & set(TLS_SYSTEMS):
            bench.systems[name].failure = f"no certificates: {exc!r} (pip install -e '.[dev]')"
        bench.log(f"TLS: could not make the certificates: {exc!r}")
        return
    folder = _rel(bench.tls.ca.parent)
    bench.log(f"TLS: a throwaway CA and {bench.tls.key_type} certificate in {folder}")


def start_collector(bench: Bench, names: set[str], cpus: str | None) -> None:
    """The OTLP/HTTP collector the traced gateways export to, on the client CPU with the
    upstream; they fail, with the reason, if it does not answer."""
    assert bench.collector_port is not None
    proc = bench.procs.start("collector", benchlib.collector_argv(bench.collector_port), cpus=cpus)
    problem = benchlib.wait_http(f"http://127.0.0.1:{bench.collector_port}/stats", 10, proc.pid)
    if problem is None:
        bench.log(f"collector ready on 127.0.0.1:{bench.collector_port} (load/collector.py)")
        return
    bench.log(f"collector: FAILED to start: {problem}")
    for name in names:
        if TRACING_SYSTEMS.get(name) is not None:
            bench.systems[name].failure = f"the OTLP collector did not start: {problem}"


def _tracing_block(bench: Bench, name: str) -> dict[str, Any] | None:
    """The `tracing:` block of a tracing-scenario gateway: its own path on the collector,
    so the spans of each are counted apart."""
    ratio = TRACING_SYSTEMS.get(name)
    if ratio is None:
        return None
    return {
        "endpoint": f"http://127.0.0.1:{bench.collector_port}/{name}",
        "sample_ratio": ratio,
    }


def _context(bench: Bench, system: System) -> ssl.SSLContext | None:
    """What verifies `system`'s certificate (None for cleartext)."""
    return bench.tls.client_context() if system.scheme == "https" and bench.tls else None


def _nginx_argv(work: Path, name: str) -> list[str]:
    return [
        "nginx",
        "-p",
        str(work),
        "-e",
        str(work / f"{name}-error.log"),
        "-c",
        str(work / f"{name}.conf"),
    ]


def _uvicorn_argv(app: str, port: int) -> list[str]:
    return [
        str(VENV_BIN / "uvicorn"),
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--log-level",
        "warning",
        "--no-access-log",
        "--backlog",
        "4096",
    ]


def start_gateway(bench: Bench, system: System, cpus: str | None) -> None:
    args, work = bench.args, bench.work
    up = bench.systems["nginx-direct"]
    workers = 2 if system.name == "gateway-2w" else 1
    yaml_path = work / f"{system.name}.yaml"
    assert system.admin_port is not None
    admin_port = system.admin_port

    tls = bench.tls if system.scheme == "https" else None
    tracing = _tracing_block(bench, system.name)
    grpc_port = bench.grpc_port if system.name == "gateway-grpc" else None

    def build(dropped: list[str]) -> dict[str, Any]:
        return benchlib.gateway_config(
            port=system.port,
            admin_port=admin_port,
            upstream_port=up.port,
            workers=workers,
            dropped=dropped,
            tls=tls,
            tracing=tracing,
            grpc_port=grpc_port,
        )

    dropped, problem = benchlib.check_gateway_config(yaml_path, build)
    if problem is not None:
        system.failure = f"gateway check refused the bench config: {problem}"
        return
    if dropped and not bench.gateway_dropped:
        bench.gateway_dropped = dropped
        bench.notes.append(
            f"This gateway build refused {', '.join(dropped)}: the bench ran without "
            "those keys (see gateway.yaml in this folder)."
        )
    if system.name in ("gateway", "gateway-tls", "gateway-trace-all", "gateway-grpc"):
        shutil.copy(yaml_path, bench.out / f"{system.name}.yaml")
    access = Path("/dev/null") if args.access_log == "/dev/null" else None
    stdout = access or work / f"{system.name}.access.log"
    system.proc = bench.procs.start(
        system.name,
        [benchlib.gateway_executable(), "run", "-c", str(yaml_path)],
        cpus=cpus,
        env=bench.args.variants.get(system.name, {}),
        stdout=stdout,
    )


def wait_ready(bench: Bench, system: System) -> None:
    timeout = bench.args.ready_timeout
    pid = system.proc.pid if system.proc else None
    if system.admin_port is not None:
        problem = benchlib.wait_http(
            f"http://127.0.0.1:{system.admin_port}/readyz", timeout, pid=pid
        )
        if problem:
            system.failure = f"not ready: {problem}"
    if system.failure is None and system.name in ("nginx-grpc", "grpc-direct"):
        system.failure = _wait_h2c(bench, system)
    elif system.failure is None:
        system.failure = benchlib.wait_http(
            system.url("/hello"), timeout, pid=pid, context=_context(bench, system)
        )
    if system.failure:
        bench.log(f"{system.name}: FAILED to start: {system.failure}")
        tail = bench.procs.log_tail(system.name)
        if tail:
            print(tail, file=sys.stderr)
    else:
        bench.log(f"{system.name} ready on 127.0.0.1:{system.port}")


def verify(bench: Bench, plan: list[Scenario]) -> dict[tuple[str, str], str]:
    """Each system answers each of its scenarios' requests with 200, before any load."""
    broken: dict[tuple[str, str], str] = {}
    for scenario in plan:
        body = b"x" * scenario.body_bytes if scenario.body_bytes else None
        for name in scenario.systems:
            system = bench.systems[name]
            if system.failure:
                broken[(scenario.key, name)] = system.failure
                continue
            if scenario.tool == "h2load":
                # One request over h2: a server that does not choose h2 by ALPN (or
                # fails it) is reported with the reason, and its runs are skipped.
                data = _data_file(bench, scenario.data) if scenario.data else None
                problem = benchlib.probe_h2(
                    system.url(scenario.path), data=data, headers=scenario.headers
                )
                if problem is None and scenario.key == "grpc":
                    problem = grpc_call(system.port)
                if problem:
                    broken[(scenario.key, name)] = problem
                    bench.log(f"{name}: {problem}")
                continue
            try:
                status, answer = benchlib.http_status(
                    system.url(scenario.path),
                    method=scenario.method,
                    body=body,
                    timeout=10,
                    context=_context(bench, system),
                )
            except OSError as exc:
                status, answer = 0, str(exc).encode()
            if status == 200 and scenario.key == "fanout":
                try:
                    merged = json.loads(answer)
                except ValueError:
                    merged = None
                if not isinstance(merged, dict) or not {"user", "orders", "recs"} <= set(merged):
                    status = -1  # 200, but not the three backends merged
            if status != 200:
                reason = f"{scenario.method} {scenario.path} answered {status}: {answer[:200]!r}"
                broken[(scenario.key, name)] = reason
                bench.log(f"{name}: {reason}")
    return broken


def prime(bench: Bench, plan: list[Scenario], broken: dict[tuple[str, str], str]) -> None:
    """One second of load on every (system, request) at once: pools filled, code warm."""
    jobs = []
    seen = set()
    for scenario in plan:
        for name in scenario.systems:
            key = (name, scenario.path, scenario.method, scenario.tool)
            if (scenario.key, name) in broken or key in seen:
                continue
            seen.add(key)
            system = bench.systems[name]
            connections = min(bench.args.connections, 64)
            if scenario.tool == "h2load":
                # A count, not -D: h2load's timed mode never ends when a connection is
                # still in its handshake as the time runs out, as here, 64 connections
                # among every other priming job.
                argv = benchlib.h2load_argv(
                    system.url(scenario.path),
                    connections,
                    requests=connections * bench.args.h2_streams * 5,
                    streams=bench.args.h2_streams,
                    data=_data_file(bench, scenario.data) if scenario.data else None,
                    headers=scenario.headers,
                )
            elif scenario.tool == "handshake":
                argv = benchlib.handshake_argv(system.port, connections, 1)
            else:
                argv = benchlib.wrk_argv(
                    system.url(scenario.path),
                    connections,
                    1,
                    method=scenario.method if scenario.body_bytes else None,
                    body_bytes=scenario.body_bytes,
                )
            job = subprocess.Popen(
                argv,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
            )
            jobs.append((f"{scenario.key} {name}", job))
    bench.log(f"priming {len(jobs)} (system, request) pairs for 1 s")
    deadline = time.monotonic() + 30  # for all of them together
    for what, job in jobs:
        try:
            job.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            job.kill()
            job.wait()
            bench.log(f"priming {what}: still running after 30 s, stopped")


# --- running ------------------------------------------------------------------------------


@contextlib.contextmanager
def unpinned_upstream(bench: Bench) -> Iterator[None]:
    """The workers scenario pins nothing: the upstream nginx may use every CPU meanwhile."""
    proc = bench.upstream_proc
    if proc is None or not bench.pin:
        yield
        return
    every = set(range(os.cpu_count() or 1))
    benchlib.set_tree_affinity(proc.pid, every)
    try:
        yield
    finally:
        benchlib.set_tree_affinity(proc.pid, {bench.args.client_cpu})


def plan_rounds(bench: Bench, plan: list[Scenario]) -> list[tuple[int, Scenario, int, str]]:
    """Every round runs every (scenario, connections, system); the system order rotates
    from round to round so no system always runs first or last."""
    out = []
    for r in range(bench.args.rounds):
        for scenario in plan:
            for connections in scenario.connections:
                names = list(scenario.systems)
                shift = r % len(names)
                for name in names[shift:] + names[:shift]:
                    out.append((r + 1, scenario, connections, name))
    return out


def run_all(bench: Bench, plan: list[Scenario], broken: dict[tuple[str, str], str]) -> None:
    args = bench.args
    todo = plan_rounds(bench, plan)
    per_run = args.seconds + args.warmup + 0.4
    bench.log(
        f"{len(todo)} runs ({args.rounds} round(s)) x ~{per_run:.1f}s "
        f"= ~{len(todo) * per_run / 60:.1f} min"
    )
    width = len(str(len(todo)))
    for i, (rnd, scenario, connections, name) in enumerate(todo, 1):
        system = bench.systems[name]
        prefix = (
            f"[{i:>{width}}/{len(todo)}] r{rnd} {scenario.key:<13} c{connections:<5} {name:<15}"
        )
        failure = broken.get((scenario.key, name))
        record: dict[str, Any] = {
            "round": rnd,
            "scenario": scenario.key,
            "system": name,
            "connections": connections,
        }
        if failure:
            record["failure"] = failure
            bench.runs.append(record)
            bench.log(f"{prefix} skipped: {failure[:80]}")
            continue
        if scenario.key == "tracing" and args.tracing_restart and rnd > 1:
            restart_gateway(bench, system)
            if system.failure:
                record["failure"] = system.failure
                bench.runs.append(record)
                bench.log(f"{prefix} skipped: {system.failure[:80]}")
                continue
        with unpinned_upstream(bench) if not scenario.pinned else contextlib.nullcontext():
            record.update(run_one(bench, scenario, connections, system))
        bench.runs.append(record)
        bench.log(f"{prefix} {_summary(record)}")


def restart_gateway(bench: Bench, system: System) -> None:
    """A fresh process for `system` (a tracing gateway) before its run in a new round.

    Two processes of the same gateway and config differ by a few percent in req/s, one
    against the other, for as long as they live (where hash randomisation and address
    layout put things): over 4 identical untraced gateways, 6 rounds each, medians
    spread 2.4 %. The tracing goals are a few percent wide, so each round's run of a
    tracing gateway is a new process, and the median over rounds is over processes,
    not over one process's luck. (`BENCH_TRACING_RESTART=0` keeps one per system.)"""
    if system.proc is not None:
        bench.procs.retire(system.proc)
        system.proc = None
    proxy_cpu = str(bench.args.proxy_cpu) if bench.pin else None
    start_gateway(bench, system, proxy_cpu if system.pinned else bench.all_cpus)
    if system.failure is None:
        wait_ready(bench, system)


def load(
    bench: Bench, scenario: Scenario, connections: int, system: System, seconds: int
) -> tuple[WrkResult, dict[str, Any], str]:
    """One run of the scenario's load generator on the client CPU: (figures, extras such
    as the TLS version and ALPN protocol, the tool's output)."""
    args = bench.args
    cpus = str(args.client_cpu) if scenario.pinned and bench.pin else bench.all_cpus
    url = system.url(scenario.path)
    if scenario.tool == "h2load":
        return benchlib.run_h2load(
            url,
            connections,
            seconds,
            cpus=cpus,
            streams=args.h2_streams,
            work=bench.work,
            data=_data_file(bench, scenario.data) if scenario.data else None,
            headers=scenario.headers,
        )
    if scenario.tool == "handshake":
        return benchlib.run_handshakes(system.port, connections, seconds, cpus=cpus)
    method = scenario.method if scenario.body_bytes else None
    result, output = benchlib.run_wrk(
        url, connections, seconds, cpus=cpus, method=method, body_bytes=scenario.body_bytes
    )
    return result, {}, output


def run_one(bench: Bench, scenario: Scenario, connections: int, system: System) -> dict[str, Any]:
    args = bench.args
    if args.warmup:
        load(bench, scenario, connections, system, args.warmup)
    traced = scenario.key == "tracing" and TRACING_SYSTEMS.get(system.name) is not None
    if traced:
        # The warm-up's (or the last run's) spans exported first, so the count below is
        # this run's alone.
        spans_before = _spans(bench, system)
    with RssSampler(system.proc.pid if system.proc else None) as rss:
        result, extras, output = load(bench, scenario, connections, system, args.seconds)
    if system.scheme == "https" and not result.failure and not result.requests:
        # Over TLS, nothing completed and errors instead: the target failed (a refused
        # handshake, say), which is a reason to give, not a figure of 0 req/s.
        errors = f"{result.connect} connect, {result.read} read, {result.timeout} timeout"
        result = WrkResult(failure=f"no request completed ({errors} errors)")
    if system.proc is not None:
        settled = benchlib.wait_idle(system.proc.pid)
        if settled > 1:
            bench.log(f"  {system.name} was still busy {settled:.1f}s after wrk stopped")
    bench.raw.append(
        f"### {scenario.key} c{connections} {system.name}\n\n```\n{output.strip()}\n```\n"
    )
    out = {**result.as_dict(), **extras}
    if scenario.payload_bytes:
        out["mib_s"] = out["rps"] * scenario.payload_bytes / MiB
    out.update(
        rss_before_kib=rss.before,
        rss_peak_kib=rss.peak,
        rss_after_kib=rss.after,
        cpu_pct=rss.cpu_pct,
        cpu_split=rss.cpu_split,
        host_busy_pct=rss.host_busy_pct,
    )
    if traced:
        spans_after = _spans(bench, system)
        out.update(_span_counts(spans_before, spans_after, result.requests))
    if system.proc is not None and not benchlib.alive(system.proc.pid):
        out["failure"] = f"{system.name} exited during the run"
        bench.log(bench.procs.log_tail(system.name))
    return out


def _spans(bench: Bench, system: System) -> dict[str, Any]:
    """Once the gateway's export has settled: what the collector received from it, and
    the gateway's own counts (exported, dropped)."""
    assert bench.collector_port is not None
    spans, exports = benchlib.settle_spans(
        bench.collector_port, f"/{system.name}", system.admin_port
    )
    status = benchlib.tracing_status(system.admin_port) if system.admin_port else None
    return {"spans": spans, "exports": exports, "status": status or {}}


def _span_counts(before: dict[str, Any], after: dict[str, Any], requests: int) -> dict[str, Any]:
    """One run's spans: received by the collector, per request, and dropped by the
    gateway (queue full or a failed export)."""
    out: dict[str, Any] = {"exports": after["exports"] - before["exports"]}
    if before["spans"] is not None and after["spans"] is not None:
        out["spans"] = after["spans"] - before["spans"]
        out["spans_per_request"] = out["spans"] / requests if requests else None
    dropped = [s.get("spans_dropped") for s in (before["status"], after["status"])]
    if None not in dropped:
        out["spans_dropped"] = dropped[1] - dropped[0]
    return out


def _summary(record: dict[str, Any]) -> str:
    if record.get("failure"):
        return f"FAILED: {record['failure'][:80]}"
    p99 = record.get("p99_ms")
    text = f"{record['rps']:>9,.0f} req/s"
    text += f"  p99 {p99:8.2f} ms" if p99 is not None else "  (no request completed)"
    if "mib_s" in record:
        text += f"  {record['mib_s']:7.0f} MiB/s"
    if record.get("spans") is not None:
        text += f"  spans {record['spans']:,}"
        if record.get("spans_dropped"):
            text += f" ({record['spans_dropped']:,} dropped)"
    errors = record["non_2xx"] + record["socket_errors"]
    return text + (f"  errors {errors}" if errors else "")


def run_memory(bench: Bench) -> None:
    system = bench.systems["gateway-mem"]
    if system.failure or system.proc is None:
        bench.memory = {"failure": system.failure or "not started"}
        return
    cpus = str(bench.args.client_cpu) if bench.pin else None
    bench.log("memory: priming the fresh gateway (1 s of wrk)")
    benchlib.run_wrk(system.url("/hello"), bench.args.connections, 1, cpus=cpus)
    count = bench.args.idle_connections
    bench.log(f"memory: {count:,} idle keep-alive connections against the gateway")
    argv = [
        sys.executable,
        str(LOAD_DIR / "memory.py"),
        "--port",
        str(system.port),
        "--pid",
        str(system.proc.pid),
        "--connections",
        str(count),
    ]
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=240, check=False, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        bench.memory = {"failure": "the idle-connection client did not finish within 240 s"}
        return
    try:
        bench.memory = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        bench.memory = {"failure": (done.stdout + done.stderr).strip()[-500:] or "no output"}
        return
    m = bench.memory
    per = m.get("rss_per_connection_kib")
    bench.log(
        f"memory: held {m['held']:,}/{m['wanted']:,}, "
        f"RSS {m['rss_start_kib'] / 1024:.1f} -> {m['rss_held_kib'] / 1024:.1f} MiB "
        f"({per} KiB/connection), after close {m['rss_after_kib'] / 1024:.1f} MiB"
    )
    if m["open_files_limit"] < m["wanted"] + 200:
        bench.notes.append(
            f"The open-files limit ({m['open_files_limit']}) allowed {m['opened']:,} of the "
            f"{m['wanted']:,} idle connections."
        )


# --- tracing: where the time goes, and instructions --------------------------------------


def _pyspy() -> str | None:
    exe = VENV_BIN / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def profile_tracing(bench: Bench) -> None:
    """py-spy on each tracing gateway in turn (100%, 1%, off), under the scenario's wrk
    load for `BENCH_TRACING_PROFILE` seconds, sampling the thread that holds the
    interpreter's lock: top frames, own time per package and per thread for the report."""
    import flametop

    args = bench.args
    seconds = args.tracing_profile
    if not seconds or "tracing" not in args.scenarios:
        return
    pyspy = _pyspy()
    if pyspy is None:
        bench.notes.append("py-spy is not installed: no profile of the traced gateway.")
        return
    cpus = str(args.client_cpu) if bench.pin else None
    profiles = bench.tracing.setdefault("profiles", {})
    for name in reversed(TRACING_SYSTEMS):
        system = bench.systems[name]
        if system.failure or system.proc is None:
            continue
        bench.log(f"tracing: py-spy on {name} for {seconds}s under wrk -c{args.connections}")
        wrk = benchlib.wrk_argv(system.url("/hello"), args.connections, seconds + 2)
        loader = subprocess.Popen(
            ["taskset", "-c", cpus, *wrk] if cpus else wrk,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        raw = bench.out / f"tracing-profile-{name}.raw"
        argv = [
            pyspy,
            "record",
            "--pid",
            str(system.proc.pid),
            "--rate",
            str(PROFILE_RATE),
            "--duration",
            str(seconds),
            "--format",
            "raw",
            "--threads",
            "--gil",  # the thread holding the interpreter's lock: a waiting one is not
            "--subprocesses",
            "--output",
            str(raw),
        ]
        time.sleep(1)  # past wrk's connection burst
        try:
            done = subprocess.run(
                ["taskset", "-c", cpus, *argv] if cpus else argv,
                capture_output=True,
                text=True,
                timeout=seconds + 60,
                check=False,
            )
            said = (done.stdout + done.stderr).strip()
        except subprocess.TimeoutExpired:
            said = "py-spy did not finish"
        try:
            output, _ = loader.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            loader.kill()
            output, _ = loader.communicate()
        benchlib.wait_idle(system.proc.pid)
        if not raw.exists():
            profiles[name] = {"failure": said[-300:] or "py-spy wrote nothing"}
            continue
        with raw.open(errors="replace") as fh:
            found = flametop.parse(fh)
        result = benchlib.parse_wrk(output)
        profiles[name] = {
            "seconds": seconds,
            "rate": PROFILE_RATE,
            "flags": "--gil --threads",
            "raw": raw.name,
            "rps_under_pyspy": None if result.failure else result.rps,
            "samples": found.samples,
            "top": [[key, n, found.total[key]] for key, n in found.own.most_common(25)],
            "packages": _tracing_apart(found),
            "threads": dict(found.threads.most_common()),
        }
        (bench.out / f"tracing-profile-{name}.txt").write_text(flametop.render(found, 30))


TRACING_CODE = ("gateway/tracing/", "gateway/dataplane/traced.py")


def _tracing_apart(profile: Any) -> dict[str, int]:
    """Own samples per package, the gateway's tracing code (`gateway/tracing/`, the traced
    data plane) apart from the rest of the gateway."""
    packages = dict(profile.packages)
    traced = sum(
        count for key, count in profile.own.items() if any(f"({p}" in key for p in TRACING_CODE)
    )
    if traced:
        packages["gateway"] -= traced
        packages["gateway (tracing code)"] = traced
    return dict(sorted(packages.items(), key=lambda kv: -kv[1]))


def count_instructions(bench: Bench) -> None:
    """`load/instructions.py` with no tracing block, then sample ratios 0.01 and 1:
    instructions per simple GET under callgrind, the figure that does not move with
    the machine's load (`BENCH_TRACING_INSTRUCTIONS=0` skips it; QUICK does)."""
    args = bench.args
    if not args.tracing_instructions or "tracing" not in args.scenarios:
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        bench.notes.append(
            "valgrind is not installed: no instruction counts (`make instructions` installs it)."
        )
        return
    counts = bench.tracing.setdefault("instructions", {})
    runs: list[tuple[str, list[str]]] = []
    if args.tracing_baseline is not None:
        runs.append(("baseline", ["--checkout", str(args.tracing_baseline)]))
    for name, ratio in TRACING_SYSTEMS.items():
        runs.append((name, [] if ratio is None else ["--sample-ratio", f"{ratio:g}"]))
    for name, extra in runs:
        argv = [sys.executable, str(LOAD_DIR / "instructions.py"), *extra]
        bench.log(f"tracing: instructions per request, {' '.join(argv[1:])}")
        counts[name] = _instructions(argv)
        bench.log(f"  {counts[name].get('line') or counts[name].get('failure')}")
    if "baseline" in counts:
        counts["baseline"]["checkout"] = str(args.tracing_baseline)


def _instructions(argv: list[str], timeout: float = 600) -> dict[str, Any]:
    # SIGINT on a timeout or when interrupted: instructions.py then stops its valgrind
    # and nginx itself (they run in sessions of their own, out of the bench's record).
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=20)
        raise
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        return {"failure": f"instructions.py did not finish within {timeout:.0f} s"}
    match = INSTRUCTIONS_LINE.search(output)
    if proc.returncode != 0 or match is None:
        return {"failure": output.strip()[-300:] or f"exit status {proc.returncode}"}
    spans = SPANS_EXPORTED.search(output)
    return {
        "kilo_per_request": float(match.group(2)),
        "requests": int(match.group(1).replace(",", "")),
        "spans": int(spans.group(1).replace(",", "")) if spans else None,
        "line": output.strip().splitlines()[-1],
    }


# --- main ---------------------------------------------------------------------------------


def write_results(bench: Bench, facts: dict[str, Any], plan: list[Scenario]) -> Path:
    import report

    args = bench.args
    data = {
        "meta": {
            "date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "quick": args.quick,
            "rounds": args.rounds,
            "tracing_restart": bool(args.tracing_restart),
            "seconds": args.seconds,
            "warmup": args.warmup,
            "connections": args.connections,
            "sweep": args.sweep,
            "idle_connections": args.idle_connections,
            "h2_streams": args.h2_streams,
            "pinning": (
                f"proxy under test on CPU {args.proxy_cpu} (taskset -c {args.proxy_cpu}); "
                f"wrk and the nginx upstream on CPU {args.client_cpu}; the workers "
                "scenario pins nothing"
                if bench.pin
                else "not pinned (fewer than 2 CPUs)"
            ),
            "load": (
                f"wrk -t1 -d{args.seconds}s --timeout 10s -s load/wrk_stats.lua, "
                f"{args.warmup}s warm-up per run, keep-alive, {args.rounds} interleaved "
                "round(s), medians"
            ),
            "load_tls": (
                f"HTTP/1.1 over TLS: wrk as above, over https; HTTP/2: h2load -t1 "
                f"-c{args.connections} -m{args.h2_streams} -D{args.seconds} (ALPN h2, "
                "percentiles from its per-request --log-file); new connections: "
                f"load/handshake.py, {args.connections} clients, each a full TLS handshake "
                "(no session resumption) and one GET with Connection: close"
            ),
            "load_grpc": (
                f"h2load -t1 -c{args.connections} -m{args.h2_streams} -D{args.seconds} over "
                f"h2c (prior knowledge), POST {GRPC_PATH} with one {GRPC_MESSAGE_BYTES}-byte "
                "gRPC message (-d), content-type: application/grpc, te: trailers; the "
                f"upstream answers {GRPC_MESSAGE_BYTES} bytes (load/refs/grpc_echo.py, "
                "grpcio, 8 threads, on the client CPU); each proxy first makes one call with "
                "grpcio's client (status OK, the message back) before any load"
            ),
            "tls": (
                {
                    "certificates": f"a throwaway CA and an {bench.tls.key_type} server "
                    "certificate for 127.0.0.1 and localhost, made by trustme for this run "
                    "(in tls/ beside this report)",
                    "nginx_listener": (
                        "listen ... ssl; http2 on; (nginx >= 1.25.1)"
                        if (benchlib.nginx_version() or (0,)) >= (1, 25, 1)
                        else "listen ... ssl http2; (nginx < 1.25.1)"
                    )
                    + ", ssl_protocols TLSv1.2 TLSv1.3, nginx's defaults otherwise",
                }
                if bench.tls
                else None
            ),
            "gateway_access_log": (
                "/dev/null" if args.access_log == "/dev/null" else "a file in the temp dir"
            ),
            "gateway_dropped_keys": bench.gateway_dropped,
            "loadavg_end": benchlib.loadavg(),
            "notes": bench.notes,
            "machine": facts,
        },
        "systems": {
            name: {
                "label": s.label,
                "kind": s.kind,
                "pinned": s.pinned,
                "description": s.description,
                "failure": s.failure,
            }
            for name, s in bench.systems.items()
        },
        "scenarios": {
            s.key: {
                "title": s.title,
                "path": s.path,
                "method": s.method,
                "body_bytes": s.body_bytes,
                "payload_bytes": s.payload_bytes,
                "systems": list(s.systems),
                "connections": list(s.connections),
                "pinned": s.pinned,
            }
            for s in plan
        },
        "runs": bench.runs,
        "memory": bench.memory,
        "tracing": bench.tracing or None,
        "cachebench": bench.cache or None,
        "hedgebench": bench.hedge or None,
    }
    (bench.out / "wrk-output.md").write_text(
        "# Load generator output (wrk, h2load, load/handshake.py), every run\n\n"
        + "\n".join(bench.raw)
    )
    return report.write(bench.out, data)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out / stamp
    out.mkdir(parents=True, exist_ok=True)
    own_work = args.work is None
    work = args.work or Path(tempfile.mkdtemp(prefix="gateway-bench."))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # nginx workers run as nobody
    bench = Bench(args=args, work=work, out=out, procs=Procs(work))
    cpus = os.cpu_count() or 1
    bench.pin = cpus >= 2 and max(args.proxy_cpu, args.client_cpu) < cpus
    if bench.pin:
        # This process (its RSS sampler, the priming wrk runs) stays off the proxy's CPU;
        # what must run unpinned is started under `taskset -c 0-N` instead of inheriting.
        bench.all_cpus = f"0-{cpus - 1}"
        os.sched_setaffinity(0, {args.client_cpu})

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    code = 0
    plan: list[Scenario] = []
    facts: dict[str, Any] = {}
    try:
        facts = benchlib.machine_facts()
        bench.log(
            f"{facts['cpus']} CPUs ({facts['cpu_model']}), kernel {facts['kernel']}, "
            f"python {facts['python']}; results in {_rel(out)}"
        )
        if not bench.pin:
            bench.notes.append("Fewer than 2 CPUs (or BENCH_*_CPU out of range): nothing pinned.")
        busy = facts.get("loadavg_start")
        if busy is not None and busy > 0.5:
            bench.notes.append(
                f"The machine was busy before the bench started (load average {busy:.2f}): "
                "other processes share the CPUs, so absolute figures are low and noisy; "
                "ratios within this run are the figures to read."
            )
            bench.log(f"warning: load average {busy:.2f} before the start: figures will be noisy")
        define_systems(bench)
        plan = scenarios(bench)
        start_systems(bench, wanted_systems(bench, plan))
        broken = verify(bench, plan)
        prime(bench, plan, broken)
        run_all(bench, plan, broken)
        profile_tracing(bench)
        count_instructions(bench)
        import cachebench

        bench.cache = cachebench.run(bench)
        import hedgebench

        bench.hedge = hedgebench.run(bench)
        if "memory" in args.scenarios:
            run_memory(bench)
    except KeyboardInterrupt as exc:
        bench.log(f"interrupted ({exc or 'SIGINT'}): stopping, writing what was measured")
        code = 130
    finally:
        bench.procs.stop_all()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    measured_apart = bench.cache.get("scenarios") or bench.hedge.get("plain")
    if not bench.runs and bench.memory is None and not measured_apart:
        bench.log("nothing was measured")
        return code or 1
    report_path = write_results(bench, facts, plan)
    print(report_path.with_name("summary.txt").read_text(), flush=True)
    bench.log(f"report: {report_path}")
    if code:
        return code
    return _exit_status(bench)


def _rel(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _exit_status(bench: Bench) -> int:
    """1 when a system needed by a scenario did not start, or a gateway row errored."""
    failed = [
        f"{name}: {s.failure}"
        for name, s in bench.systems.items()
        if s.failure and any(r["system"] == name for r in bench.runs)
    ]
    for record in bench.runs:
        if not bench.systems[record["system"]].kind == "gateway" or record.get("failure"):
            continue
        errors = record["non_2xx"] + record["socket_errors"]
        if record["requests"] and errors / record["requests"] > bench.args.max_error_ratio:
            failed.append(
                f"{record['system']} {record['scenario']} c{record['connections']}: "
                f"{errors} errors in {record['requests']} requests"
            )
    if failed:
        print("\nFAILED:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
