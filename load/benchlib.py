"""The rig under `make bench` and `make profile`: processes, configs, wrk, memory.

`bench.py` decides what to measure; this module knows how: free loopback ports,
readiness waits with deadlines, processes started in their own sessions (pinned with
`taskset`, recorded in a pid file the shell trap also reads), RSS of a process tree,
wrk runs parsed from `wrk_stats.lua`'s JSON line, and the nginx and gateway configs.
Standard library plus PyYAML (a gateway dependency), so it runs in the project venv.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "LOAD_DIR",
    "ROOT",
    "Procs",
    "RssSampler",
    "WrkResult",
    "check_gateway_config",
    "free_ports",
    "gateway_config",
    "machine_facts",
    "nginx_proxy_conf",
    "nginx_upstream_conf",
    "parse_wrk",
    "rss_kib",
    "run_wrk",
    "set_tree_affinity",
    "tree_pids",
    "wait_http",
]

ROOT = Path(__file__).resolve().parent.parent
LOAD_DIR = ROOT / "load"
WRK_SCRIPT = LOAD_DIR / "wrk_stats.lua"

# Payloads the upstream serves; the scenarios and the report share them.
BLOB_BYTES = 1 << 20
FANOUT_BODIES = {
    "users": '{"id":"1","name":"Ada Lovelace","plan":"pro"}',
    "orders": '{"user":"1","orders":[{"id":"o-1-1","total":42.5}]}',
    "recs": '{"items":["book","lamp"]}',
}


# --- ports and readiness ----------------------------------------------------------


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that were free a moment ago (all held open together)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) is not alive for our purposes.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def http_status(
    url: str, *, method: str = "GET", body: bytes | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(url: str, timeout: float, pid: int | None = None, status: int = 200) -> str | None:
    """Poll `url` until it answers `status`; None on success, else why not.

    Gives up early when `pid` has exited: a server that crashed at start should not
    cost the whole timeout.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if pid is not None and not alive(pid):
            return f"process {pid} exited before {url} answered {status} (last: {last})"
        try:
            code, _ = http_status(url, timeout=2)
            if code == status:
                return None
            last = f"HTTP {code}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(0.1)
    return f"{url} did not answer {status} within {timeout:g}s (last: {last})"


# --- processes ---------------------------------------------------------------------


class Procs:
    """Processes started in their own sessions, so stopping one stops what it forked.

    Each process group is also appended to `pidfile`, which the shell wrapper's EXIT
    trap reads: whatever happens to this Python process, nothing is left running.
    """

    def __init__(self, work: Path) -> None:
        self.work = work
        self.pidfile = work / "pids"
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: str | None = None,
        env: Mapping[str, str] | None = None,
        stdout: Path | None = None,
        stderr: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        cmd = [*(["taskset", "-c", cpus] if cpus else []), *argv]
        out = open(stdout or self.work / f"{name}.out", "ab")
        err = open(stderr or self.work / f"{name}.err", "ab")
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        finally:
            out.close()
            err.close()
        with self.pidfile.open("a") as fh:
            fh.write(f"{proc.pid}\n")
        self.started.append((name, proc))
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        # Whatever is left in the group (a forked worker), and the leader if it hung.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)

    def stop_all(self) -> None:
        for _, proc in reversed(self.started):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in reversed(self.started):
            self.stop(proc)
        self.started.clear()

    def log_tail(self, name: str, lines: int = 15) -> str:
        out = []
        for suffix in ("err", "out"):
            path = self.work / f"{name}.{suffix}"
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out += [f"    [{name}.{suffix}] {line}" for line in text]
        return "\n".join(out)


def tree_pids(pid: int) -> list[int]:
    """`pid` and every descendant (through /proc/PID/task/*/children)."""
    seen: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError):
                    text = Path(f"/proc/{current}/task/{task}/children").read_text()
                    todo += [int(c) for c in text.split()]
    return seen


def rss_kib(pid: int) -> int:
    """Resident memory of `pid` and its descendants, in KiB (0 when gone)."""
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def set_tree_affinity(pid: int, cpus: set[int]) -> None:
    """Move every thread of `pid` and its descendants onto `cpus`."""
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task), cpus)


def cpu_ticks(pid: int) -> dict[int, int]:
    """utime + stime (clock ticks) of `pid` and each descendant."""
    out = {}
    for p in tree_pids(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            out[p] = int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return out


def wait_idle(pid: int, limit: float = 15.0, busy_pct: float = 10.0, window: float = 0.25) -> float:
    """Wait until `pid`'s tree uses less than `busy_pct` of a CPU over `window` seconds
    (a proxy still working through a backlog after wrk stopped would otherwise steal
    the CPU from the next system measured); returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = sum(cpu_ticks(pid).values())
        time.sleep(window)
        used = sum(cpu_ticks(pid).values()) - before
        if 100 * used / RssSampler.TICKS / window < busy_pct:
            break
    return time.monotonic() - started


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, all CPUs (the first line of /proc/stat)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]) - idle, sum(values[:8])
    return 0, 0


class RssSampler:
    """A process tree during a run: RSS before / at peak (sampled every `interval` s in
    a thread) / after, and the CPU it used, in % of one CPU, in total and per process
    (`cpu_split`: how the work spread over a supervisor's workers)."""

    TICKS = os.sysconf("SC_CLK_TCK")

    def __init__(self, pid: int | None, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.before = self.peak = self.after = 0
        self.cpu_pct: float | None = None
        self.cpu_split: list[float] = []
        self.host_busy_pct: float | None = None  # the whole machine, % of one CPU
        self._host = (0, 0)
        self._ticks: dict[int, int] = {}
        self._started = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        if self.pid is not None:
            self.before = self.peak = rss_kib(self.pid)
            self._ticks = cpu_ticks(self.pid)
            self._host = host_cpu()
            self._started = time.monotonic()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        assert self.pid is not None
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_kib(self.pid))

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None and self.pid is not None:
            self._thread.join()
            wall = time.monotonic() - self._started
            ticks = cpu_ticks(self.pid)
            busy, total = host_cpu()
            if total > self._host[1]:
                cpus = os.cpu_count() or 1
                share = (busy - self._host[0]) / (total - self._host[1])
                self.host_busy_pct = round(100 * cpus * share, 1)
            used = {p: t - self._ticks.get(p, 0) for p, t in ticks.items()}
            if wall > 0:
                pct = {p: 100 * t / self.TICKS / wall for p, t in used.items()}
                self.cpu_pct = round(sum(pct.values()), 1)
                self.cpu_split = sorted((round(v, 1) for v in pct.values() if v >= 1), reverse=True)
            self.after = rss_kib(self.pid)
            self.peak = max(self.peak, self.after)


# --- wrk -----------------------------------------------------------------------------

_WRK_JSON = re.compile(r"^WRK_JSON (\{.*\})\s*$", re.M)


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run's figures (latencies in ms), or why there are none (`failure`)."""

    requests: int = 0
    seconds: float = 0.0
    bytes: int = 0
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0
    non_2xx: int = 0
    mean_ms: float | None = None
    max_ms: float | None = None
    p50_ms: float | None = None
    p75_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    failure: str | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def socket_errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rps": self.rps, "socket_errors": self.socket_errors}


def parse_wrk(output: str) -> WrkResult:
    """Read the JSON line `wrk_stats.lua` prints; output without it is a failure."""
    match = _WRK_JSON.search(output)
    if match is None:
        first = next((line for line in output.splitlines() if line.strip()), "no output")
        return WrkResult(failure=first.strip()[:200])
    doc = json.loads(match.group(1))
    requests = int(doc["requests"])
    # No request completed within the run is a figure (0 req/s: a collapse), not a
    # failure of the rig; latencies are then unknown.

    def ms(key: str) -> float | None:
        return doc[key] / 1000 if requests else None

    return WrkResult(
        requests=requests,
        seconds=doc["duration_us"] / 1e6,
        bytes=int(doc["bytes"]),
        connect=int(doc["connect"]),
        read=int(doc["read"]),
        write=int(doc["write"]),
        timeout=int(doc["timeout"]),
        non_2xx=int(doc["status"]),
        mean_ms=ms("mean_us"),
        max_ms=ms("max_us"),
        p50_ms=ms("p50_us"),
        p75_ms=ms("p75_us"),
        p90_ms=ms("p90_us"),
        p99_ms=ms("p99_us"),
        p999_ms=ms("p999_us"),
    )


def wrk_argv(
    url: str,
    connections: int,
    seconds: int,
    *,
    method: str | None = None,
    body_bytes: int | None = None,
    threads: int = 1,
    timeout_s: int = 10,
) -> list[str]:
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(WRK_SCRIPT),
        url,
    ]
    if method or body_bytes:
        argv += ["--", method or "GET"]
        if body_bytes:
            argv.append(str(body_bytes))
    return argv


def run_wrk(
    url: str,
    connections: int,
    seconds: int,
    *,
    cpus: str | None,
    method: str | None = None,
    body_bytes: int | None = None,
) -> tuple[WrkResult, str]:
    """One bounded wrk run; returns the parsed figures and wrk's whole output."""
    argv = wrk_argv(url, connections, seconds, method=method, body_bytes=body_bytes)
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return WrkResult(failure=f"wrk did not finish within {seconds + 30}s"), ""
    output = done.stdout + done.stderr
    result = parse_wrk(output)
    if done.returncode != 0 and result.failure is None:
        result = WrkResult(failure=f"wrk exited with status {done.returncode}")
    return result, output


# --- nginx ---------------------------------------------------------------------------


def _nginx_main(work: Path, name: str) -> str:
    return f"""worker_processes 1;
daemon off;
pid {work}/{name}.pid;
error_log {work}/{name}-error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
"""


def _nginx_http(work: Path, name: str) -> str:
    temp = work / f"{name}-temp"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (temp / sub).mkdir(parents=True, exist_ok=True)
    return f"""    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    client_max_body_size 8m;
    client_body_buffer_size 2m;
"""


def nginx_upstream_conf(work: Path, port: int, sink_port: int) -> str:
    """The upstream every proxy talks to: tiny answers from memory, a 1 MiB file, an
    upload sink, and the three JSON backends of the fan-out.

    `/upload` reads the whole body before it answers (nginx buffers it to proxy it,
    without the body, to a sink on `sink_port`): a plain `return 200` would answer
    first and discard the body afterwards, and a proxy streaming the body would then
    see its upload cut short instead of measuring it.
    """
    blob = work / "blob.bin"
    if not blob.exists():
        blob.write_bytes(b"x" * BLOB_BYTES)
    json_locations = "\n".join(
        f"""        location ~ ^/{name}(/|$) {{
            default_type application/json;
            return 200 '{body}';
        }}"""
        for name, body in FANOUT_BODIES.items()
    )
    return (
        _nginx_main(work, "upstream")
        + f"""http {{
{_nginx_http(work, "upstream")}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /hello {{
            default_type text/plain;
            return 200 "hello\\n";
        }}
        location = /healthz {{
            default_type text/plain;
            return 200 "ok\\n";
        }}
        location = /blob {{
            default_type application/octet-stream;
            alias {blob};
        }}
        location = /upload {{
            proxy_pass http://127.0.0.1:{sink_port}/sink;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
{json_locations}
    }}
    server {{
        listen 127.0.0.1:{sink_port};
        location = /sink {{
            default_type text/plain;
            return 200 "ok\\n";
        }}
    }}
}}
"""
    )


def nginx_proxy_conf(work: Path, port: int, upstream_port: int) -> str:
    """nginx as the reverse proxy to beat: upstream keep-alive, bodies streamed
    (no request buffering, response buffers in memory, never on disk)."""
    return (
        _nginx_main(work, "proxy")
        + f"""http {{
{_nginx_http(work, "proxy")}
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffers 16 64k;
            proxy_busy_buffers_size 128k;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""
    )


# --- the gateway -----------------------------------------------------------------------

# Policy keys the bench turns on; a gateway build that refuses one runs without it
# (and the report says so) rather than not at all.
POLICY_KEYS = ("circuit_breaker", "retries", "max_concurrency", "max_queue", "queue_timeout")


def gateway_config(
    *,
    port: int,
    admin_port: int,
    upstream_port: int,
    workers: int = 1,
    access_log: bool = True,
    dropped: Sequence[str] = (),
) -> dict[str, Any]:
    """The bench's gateway config: every policy on (bulkhead, breaker, retries on connect
    errors, deadline), metrics and access log on, one plain route per scenario and an
    aggregate route over three upstreams for the fan-out."""
    target = f"http://127.0.0.1:{upstream_port}"
    policies: dict[str, Any] = {
        "max_connections": 512,
        "max_keepalive": 256,
        "keepalive_expiry": "60s",
        "max_concurrency": 512,
        "max_queue": 1024,
        "queue_timeout": "2s",
        "connect_timeout": "1s",
        "read_timeout": "30s",
        "retries": {"attempts": 2, "backoff": "25ms", "on": ["connect_error"]},
        "circuit_breaker": {
            "failure_ratio": 0.5,
            "min_requests": 20,
            "window": "10s",
            "open_for": "5s",
        },
    }
    for key in dropped:
        policies.pop(key, None)
    upstream = {"targets": [target], **policies}
    return {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "admin_host": "127.0.0.1",
            "admin_port": admin_port,
            "workers": workers,
            "access_log": access_log,
            "log_level": "warning",
            "drain_timeout": "1s",
        },
        "upstreams": {name: dict(upstream) for name in ("backend", "users", "orders", "recs")},
        "routes": [
            {"name": "hello", "path": "/hello", "methods": ["GET"], "upstream": "backend"},
            {"name": "blob", "path": "/blob", "methods": ["GET"], "upstream": "backend"},
            {"name": "upload", "path": "/upload", "methods": ["POST"], "upstream": "backend"},
            {
                "name": "profile",
                "path": "/profile/{user_id}",
                "methods": ["GET"],
                "timeout": "5s",
                "aggregate": {
                    "backends": [
                        {"upstream": "users", "path": "/users/{user_id}", "key": "user"},
                        {"upstream": "orders", "path": "/orders?user={user_id}", "key": "orders"},
                        {"upstream": "recs", "path": "/recs/{user_id}", "key": "recs"},
                    ]
                },
            },
        ],
    }


def gateway_executable() -> str:
    exe = os.environ.get("BENCH_GATEWAY") or str(ROOT / ".venv" / "bin" / "gateway")
    return exe if Path(exe).exists() else (shutil.which("gateway") or exe)


def check_gateway_config(path: Path, build: Any) -> tuple[list[str], str | None]:
    """Write `build(dropped)` to `path` until `gateway check` accepts it, dropping the
    policy keys it refuses. Returns (dropped keys, error if it never passed)."""
    dropped: list[str] = []
    while True:
        path.write_text(yaml.safe_dump(build(dropped), sort_keys=False))
        done = subprocess.run(
            [gateway_executable(), "check", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
        )
        if done.returncode == 0:
            return dropped, None
        text = done.stdout + done.stderr
        refused = [k for k in POLICY_KEYS if k not in dropped and k in text]
        if not refused:
            return dropped, text.strip()[-2000:]
        dropped += refused


# --- machine facts --------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        text = (done.stdout + done.stderr).strip().splitlines()
        return text[0] if text else ""
    return "not found"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@contextlib.contextmanager
def _suppress_all() -> Iterator[None]:
    with contextlib.suppress(Exception):
        yield


def loadavg() -> float | None:
    """The 1-minute load average: above ~0.5 before the bench, something else is busy."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return float(Path("/proc/loadavg").read_text().split()[0])
    return None


def machine_facts() -> dict[str, Any]:
    cpu = "unknown"
    with _suppress_all():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with _suppress_all():
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "gateway"],
        capture_output=True,
        check=False,
    ).returncode
    untracked = _first_line(
        ["git", "-C", str(ROOT), "ls-files", "--others", "--exclude-standard", "gateway"]
    )
    import resource

    return {
        "cpu_model": cpu,
        "cpus": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": sys.version.split()[0],
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "loadavg_start": loadavg(),
        "gateway_commit": commit + (" + uncommitted changes" if dirty or untracked.strip() else ""),
        "tools": {
            "nginx": _first_line(["nginx", "-v"]).replace("nginx version: ", ""),
            "wrk": " ".join(_first_line(["wrk", "-v"]).split()[:2]),
        },
        "packages": {
            name: _version(name)
            for name in (
                "gateway",
                "uvicorn",
                "uvloop",
                "httptools",
                "starlette",
                "httpx",
                "aiohttp",
                "granian",
                "pyreqwest",
                "prometheus-client",
            )
        },
    }


@dataclass
class Timer:
    """Elapsed wall time, for progress lines."""

    start: float = field(default_factory=time.monotonic)

    def __str__(self) -> str:
        seconds = int(time.monotonic() - self.start)
        return f"{seconds // 60}:{seconds % 60:02d}"
