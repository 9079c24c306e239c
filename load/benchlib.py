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
import math
import os
import platform
import re
import shutil
import signal
import socket
import ssl
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
    "TlsFiles",
    "WrkResult",
    "check_gateway_config",
    "collector_argv",
    "collector_spans",
    "free_ports",
    "gateway_config",
    "h2load_argv",
    "handshake_argv",
    "machine_facts",
    "make_tls_files",
    "nginx_proxy_conf",
    "nginx_upstream_conf",
    "nginx_version",
    "parse_h2load",
    "parse_wrk",
    "percentiles",
    "probe_h2",
    "rss_kib",
    "run_h2load",
    "run_handshakes",
    "run_wrk",
    "set_tree_affinity",
    "settle_spans",
    "tracing_status",
    "tree_pids",
    "wait_http",
]

ROOT = Path(__file__).resolve().parent.parent
LOAD_DIR = ROOT / "load"
WRK_SCRIPT = LOAD_DIR / "wrk_stats.lua"
HANDSHAKE_CLIENT = LOAD_DIR / "handshake.py"
COLLECTOR = LOAD_DIR / "collector.py"
# `python -c CHECKOUT_LAUNCH run -c FILE`: the gateway's CLI from the source tree named by
# $GATEWAY_CHECKOUT (first on sys.path), whatever is installed in the virtualenv.
CHECKOUT_LAUNCH = (
    "import os, sys; sys.path.insert(0, os.environ['GATEWAY_CHECKOUT']); "
    "from gateway.cli import main; sys.argv[0] = 'gateway'; sys.exit(main())"
)
GRPC_ECHO = LOAD_DIR / "refs" / "grpc_echo.py"

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
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    timeout: float = 5.0,
    context: ssl.SSLContext | None = None,
) -> tuple[int, bytes]:
    """One request (`context` verifies an https:// server); (status, body)."""
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(
    url: str,
    timeout: float,
    pid: int | None = None,
    status: int = 200,
    context: ssl.SSLContext | None = None,
) -> str | None:
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
            code, _ = http_status(url, timeout=2, context=context)
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

    def retire(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop `proc` and forget it: `stop_all` must not signal a process group whose
        id the system may have handed to another process since."""
        self.stop(proc)
        self.started = [(n, p) for n, p in self.started if p is not proc]

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
    output, status = _bounded(argv, seconds + 30, cpus)
    if status is None:
        return WrkResult(failure=f"wrk did not finish within {seconds + 30}s"), ""
    result = parse_wrk(output)
    if status != 0 and result.failure is None:
        result = WrkResult(failure=f"wrk exited with status {status}")
    return result, output


# --- h2load (HTTP/2) ----------------------------------------------------------------

H2_STREAMS = 10  # h2load -m: concurrent streams per connection

_H2_FINISHED = re.compile(r"^finished in ([\d.]+)(s|ms|us)\b", re.M)
_H2_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout",
    re.M,
)
_H2_STATUS = re.compile(r"^status codes: (\d+) 2xx", re.M)
_H2_TRAFFIC = re.compile(r"^traffic: \S+ \((\d+)\) total", re.M)
_H2_TLS = re.compile(r"^(TLS Protocol|Cipher|Application protocol): (.+)$", re.M)
_H2_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def h2load_argv(
    url: str,
    connections: int,
    *,
    seconds: int | None = None,
    requests: int | None = None,
    streams: int = H2_STREAMS,
    log_file: Path | None = None,
    data: Path | None = None,
    headers: Sequence[str] = (),
) -> list[str]:
    """h2load over TLS, HTTP/2 by ALPN (its default list offers h2 first, then
    http/1.1: the output says which one the server chose), or, for an http:// URL, h2c
    by prior knowledge. `seconds`: a timed run (`-D`); else `requests` in all. `data`:
    a file each request POSTs (`-d`); `headers`: extra request headers (`-H`)."""
    argv = ["h2load", "-t1", f"-c{connections}", f"-m{streams}"]
    argv += [f"-D{seconds}"] if seconds else [f"-n{requests or connections}"]
    if data is not None:
        argv.append(f"--data={data}")
    for header in headers:
        argv.append(f"--header={header}")
    if log_file is not None:
        argv.append(f"--log-file={log_file}")
    return [*argv, url]


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """mean, max and p50..p99.9 (nearest rank) of `values`, keyed as wrk_stats.lua's."""
    ordered = sorted(values)
    if not ordered:
        return {}

    def rank(q: float) -> float:
        return ordered[min(max(1, math.ceil(len(ordered) * q / 100)), len(ordered)) - 1]

    return {
        "mean": sum(ordered) / len(ordered),
        "max": ordered[-1],
        "p50": rank(50),
        "p75": rank(75),
        "p90": rank(90),
        "p99": rank(99),
        "p999": rank(99.9),
    }


def parse_h2load(output: str, log_file: Path | None = None) -> tuple[WrkResult, dict[str, Any]]:
    """h2load's summary (and latency percentiles from its per-request `--log-file`:
    its own summary has only min / max / mean / sd). A run where the server did not
    choose h2 (or h2c, cleartext by prior knowledge), or where no request succeeded, is
    a failure with the reason."""
    tls = dict(_H2_TLS.findall(output))
    extras = {
        "tls": " ".join(
            tls[k] for k in ("TLS Protocol", "Cipher", "Application protocol") if k in tls
        )
    }
    protocol = tls.get("Application protocol")
    requests = _H2_REQUESTS.search(output)
    finished = _H2_FINISHED.search(output)
    if "TLS Protocol" not in tls and protocol != "h2c":
        counts = f" ({requests.group(0)[len('requests: ') :]})" if requests else ""
        why = f"h2load: no connection was made (neither TLS nor h2c){counts}"
        return WrkResult(failure=why), extras
    if protocol not in ("h2", "h2c"):
        chosen = f"the server chose {protocol}" if protocol else "no protocol was negotiated"
        return WrkResult(failure=f"h2load: {chosen} (ALPN), not h2"), extras
    if requests is None or finished is None:
        lines = [ln for ln in output.splitlines() if ln.strip() and "progress" not in ln]
        return WrkResult(failure=f"h2load: {(lines or ['no output'])[-1].strip()[:200]}"), extras
    _total, _started, done, succeeded, failed, _errored, timeout = map(int, requests.groups())
    if not succeeded:
        errors = [
            ln.strip()
            for ln in output.splitlines()
            if "could not" in ln or ln.lower().startswith("error")
        ]
        why = errors[0][:160] if errors else f"{failed} failed, {timeout} timed out"
        return WrkResult(failure=f"h2load: no request succeeded ({why})"), extras
    status = _H2_STATUS.search(output)
    traffic = _H2_TRAFFIC.search(output)
    durations: list[float] = []
    if log_file is not None:
        with contextlib.suppress(OSError):
            for line in log_file.read_text().splitlines():
                fields = line.split("\t")
                if len(fields) >= 3 and fields[1].lstrip("-").isdigit() and int(fields[1]) > 0:
                    durations.append(int(fields[2]) / 1000)
    stats = percentiles(durations)
    return WrkResult(
        requests=done,
        seconds=float(finished.group(1)) * _H2_UNITS[finished.group(2)],
        bytes=int(traffic.group(1)) if traffic else 0,
        read=max(failed - timeout, 0),
        timeout=timeout,
        # h2load's timed mode can count one more 2xx answer than requests done.
        non_2xx=max(done - (int(status.group(1)) if status else done), 0),
        mean_ms=stats.get("mean"),
        max_ms=stats.get("max"),
        p50_ms=stats.get("p50"),
        p75_ms=stats.get("p75"),
        p90_ms=stats.get("p90"),
        p99_ms=stats.get("p99"),
        p999_ms=stats.get("p999"),
    ), extras


def _bounded(argv: list[str], limit: float, cpus: str | None) -> tuple[str, int | None]:
    """Run `argv` (pinned to `cpus`) for at most `limit` seconds: (output, exit status,
    None when it had to be killed)."""
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=limit,
            check=False,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
    except OSError as exc:  # the tool is not installed
        return f"{argv[0]}: {exc}", 127
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        return (out.decode(errors="replace") if isinstance(out, bytes) else out), None
    return done.stdout + done.stderr, done.returncode


def run_h2load(
    url: str,
    connections: int,
    seconds: int,
    *,
    cpus: str | None,
    streams: int = H2_STREAMS,
    work: Path,
    data: Path | None = None,
    headers: Sequence[str] = (),
) -> tuple[WrkResult, dict[str, Any], str]:
    """One bounded, timed h2load run; (figures, TLS facts, h2load's output)."""
    log_file = work / "h2load.log"
    log_file.unlink(missing_ok=True)
    argv = h2load_argv(
        url,
        connections,
        seconds=seconds,
        streams=streams,
        log_file=log_file,
        data=data,
        headers=headers,
    )
    limit = seconds + 15
    output, code = _bounded(argv, limit, cpus)
    try:
        if code is None:
            # h2load's timed mode (1.52) never ends when a connection is still in its
            # handshake as the time runs out: seen only on a CPU shared with much else.
            why = f"h2load did not finish within {limit}s (connections too slow to open?)"
            return WrkResult(failure=why), {}, output
        result, extras = parse_h2load(output, log_file)
    finally:
        log_file.unlink(missing_ok=True)
    if code != 0 and result.failure is None:
        result = WrkResult(failure=f"h2load exited with status {code}")
    return result, extras, _drop_progress(output)


def probe_h2(
    url: str,
    *,
    cpus: str | None = None,
    data: Path | None = None,
    headers: Sequence[str] = (),
    limit: float = 30,
) -> str | None:
    """One HTTP/2 request with h2load: None when it was h2 and succeeded, else why not."""
    if shutil.which("h2load") is None:
        return "h2load is not installed (Debian: apt-get install nghttp2-client)"
    argv = h2load_argv(url, 1, requests=1, streams=1, data=data, headers=headers)
    output, code = _bounded(argv, limit, cpus)
    if code is None:
        return "h2load did not finish one request within 30 s"
    result, _ = parse_h2load(output)
    return result.failure


def _drop_progress(output: str) -> str:
    return "\n".join(ln for ln in output.splitlines() if not ln.startswith("progress: "))


# --- new TLS connections (load/handshake.py) -------------------------------------------


def handshake_argv(port: int, connections: int, seconds: int) -> list[str]:
    return [
        sys.executable,
        str(HANDSHAKE_CLIENT),
        "--port",
        str(port),
        "--connections",
        str(connections),
        "--seconds",
        str(seconds),
    ]


def run_handshakes(
    port: int, connections: int, seconds: int, *, cpus: str | None
) -> tuple[WrkResult, dict[str, Any], str]:
    """One bounded run of `load/handshake.py`: a full TLS handshake and one request
    per connection. (figures, {resumed, tls}, its output)."""
    argv = handshake_argv(port, connections, seconds)
    output, code = _bounded(argv, seconds + 30, cpus)
    if code is None:
        why = f"the handshake client did not finish within {seconds + 30}s"
        return WrkResult(failure=why), {}, output
    result = parse_wrk(output)
    extras: dict[str, Any] = {}
    match = _WRK_JSON.search(output)
    if match is not None:
        doc = json.loads(match.group(1))
        extras = {"resumed": doc.get("resumed", 0), "tls": doc.get("tls", "")}
    if code != 0 and result.failure is None:
        result = WrkResult(failure=f"handshake client exited with status {code}")
    return result, extras, output


# --- TLS ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost (PEM)."""

    ca: Path  # the CA certificate, to verify the servers with
    cert: Path  # the server certificate, then the chain
    key: Path  # the server's private key
    key_type: str

    def client_context(self) -> ssl.SSLContext:
        """Verifies a server against this CA (hostname included)."""
        return ssl.create_default_context(cafile=str(self.ca))


def make_tls_files(folder: Path) -> TlsFiles:
    """Generate the bench's certificates into `folder` with trustme (a dev dependency):
    made at every run, never committed. ECDSA P-256 (trustme's default, named here so
    it stays the same): a full handshake signs with it once."""
    import trustme

    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    issued = ca.issue_cert("127.0.0.1", "localhost", key_type=trustme.KeyType.ECDSA)
    files = TlsFiles(
        ca=folder / "ca.pem",
        cert=folder / "server.pem",
        key=folder / "server.key",
        key_type="ECDSA P-256",
    )
    ca.cert_pem.write_to_path(str(files.ca))
    files.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(files.key))
    files.key.chmod(0o600)
    return files


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


def nginx_version() -> tuple[int, ...] | None:
    """The installed nginx's version (`nginx -v` prints it on stderr), None if unknown."""
    match = re.search(r"nginx/(\d+(?:\.\d+)*)", _first_line(["nginx", "-v"]))
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def _nginx_tls_listen(port: int, tls: TlsFiles, version: tuple[int, ...] | None) -> str:
    """An ssl + HTTP/2 listener in the installed nginx's syntax: `http2 on;` from
    1.25.1, `listen ... ssl http2` before. TLS 1.2 and 1.3 (1.22's default stops at
    1.2; the gateway offers 1.3), nginx's own defaults for everything else."""
    if version is not None and version >= (1, 25, 1):
        listen = f"listen 127.0.0.1:{port} ssl backlog=4096;\n        http2 on;"
    else:
        listen = f"listen 127.0.0.1:{port} ssl http2 backlog=4096;"
    return f"""{listen}
        ssl_certificate {tls.cert};
        ssl_certificate_key {tls.key};
        ssl_protocols TLSv1.2 TLSv1.3;"""


def nginx_proxy_conf(
    work: Path,
    port: int,
    upstream_port: int,
    *,
    tls: TlsFiles | None = None,
    version: tuple[int, ...] | None = None,
    name: str = "proxy",
) -> str:
    """nginx as the reverse proxy to beat: upstream keep-alive, bodies streamed
    (no request buffering, response buffers in memory, never on disk). With `tls`, its
    listener is TLS with HTTP/2 beside HTTP/1.1 (ALPN), the rest the same."""
    listen = (
        _nginx_tls_listen(port, tls, version)
        if tls is not None
        else f"listen 127.0.0.1:{port} backlog=4096;"
    )
    return (
        _nginx_main(work, name)
        + f"""http {{
{_nginx_http(work, name)}
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        {listen}
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


def grpc_frame(size: int) -> bytes:
    """One gRPC length-prefixed message of `size` bytes (uncompressed)."""
    return b"\0" + size.to_bytes(4, "big") + b"x" * size


def grpc_echo_argv(port: int, size: int) -> list[str]:
    """The bench's gRPC upstream (load/refs/grpc_echo.py): grpcio, 8 worker threads."""
    return [sys.executable, str(GRPC_ECHO), "--port", str(port), "--size", str(size)]


def nginx_grpc_conf(
    work: Path,
    port: int,
    grpc_port: int,
    upstream_port: int,
    *,
    version: tuple[int, ...] | None = None,
) -> str:
    """nginx in front of the gRPC upstream: a cleartext HTTP/2 (h2c, prior knowledge)
    listener, `grpc_pass` with upstream keep-alive for `/test.Echo/`, and everything
    else proxied to the nginx upstream as nginx-proxy does (the plain POST beside)."""
    if version is not None and version >= (1, 25, 1):
        listen = f"listen 127.0.0.1:{port} backlog=4096;\n        http2 on;"
    else:
        listen = f"listen 127.0.0.1:{port} http2 backlog=4096;"
    return (
        _nginx_main(work, "grpc")
        + f"""http {{
{_nginx_http(work, "grpc")}
    upstream grpc_backend {{
        server 127.0.0.1:{grpc_port};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        {listen}
        http2_max_concurrent_streams 128;
        location /test.Echo/ {{
            grpc_pass grpc://grpc_backend;
        }}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
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
    tls: TlsFiles | None = None,
    tracing: Mapping[str, Any] | None = None,
    grpc_port: int | None = None,
) -> dict[str, Any]:
    """The bench's gateway config: every policy on (bulkhead, breaker, retries on connect
    errors, deadline), metrics and access log on, one plain route per scenario and an
    aggregate route over three upstreams for the fan-out. With `tls`, the data listener
    is TLS (`server.tls`), HTTP/2 by ALPN beside HTTP/1.1 (`server.http2`, on by
    default). With `tracing`, that block as the `tracing:` section (docs/tracing.md);
    without it there is none, and tracing is off. With `grpc_port`, an upstream `grpc`
    (`protocol: http2`, h2c) there and a route `/test.Echo/{method}` to it (docs/grpc.md).
    """
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
    server: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "admin_host": "127.0.0.1",
        "admin_port": admin_port,
        "workers": workers,
        "access_log": access_log,
        "log_level": "warning",
        "drain_timeout": "1s",
    }
    if tls is not None:
        server["tls"] = {"certificates": [{"cert": str(tls.cert), "key": str(tls.key)}]}
    config: dict[str, Any] = {
        "server": server,
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
    if tracing is not None:
        config["tracing"] = dict(tracing)
    if grpc_port is not None:
        config["upstreams"]["grpc"] = {
            **policies,
            "targets": [f"http://127.0.0.1:{grpc_port}"],
            "protocol": "http2",
        }
        config["routes"].append(
            {
                "name": "grpc",
                "path": "/test.Echo/{method}",
                "methods": ["POST"],
                "upstream": "grpc",
            }
        )
    return config


def tracing_status(admin_port: int) -> dict[str, Any] | None:
    """The gateway's `/status.json` `process.tracing` (spans exported, dropped, queued,
    summed over its workers); None when tracing is off or the admin does not answer."""
    try:
        code, body = http_status(f"http://127.0.0.1:{admin_port}/status.json", timeout=5)
        found = json.loads(body)["process"]["tracing"] if code == 200 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return found if isinstance(found, dict) else None


# --- the OTLP collector ----------------------------------------------------------------


def collector_argv(port: int) -> list[str]:
    """`load/collector.py` on `port`: accepts OTLP/HTTP exports, counts their spans."""
    return [sys.executable, str(COLLECTOR), "--host", "127.0.0.1", "--port", str(port)]


def collector_spans(port: int, prefix: str) -> tuple[int | None, int]:
    """(spans, exports) the collector on `port` received under `prefix` (the endpoint's
    path, `/gateway-trace-all`); spans is None when it could not decode them."""
    try:
        _, body = http_status(f"http://127.0.0.1:{port}/stats", timeout=5)
        entry = json.loads(body).get(prefix) or {"spans": 0, "exports": 0}
    except (OSError, ValueError, AttributeError):
        return None, 0
    return entry["spans"], int(entry["exports"])


def settle_spans(
    port: int, prefix: str, admin_port: int | None, quiet: float = 1.3, limit: float = 8.0
) -> tuple[int | None, int]:
    """Wait until the gateway has nothing queued for export and the collector's count
    for `prefix` has not moved for `quiet` seconds (the export thread wakes every
    second), at most `limit` seconds; then (spans, exports) as `collector_spans`."""
    deadline = time.monotonic() + limit
    last = collector_spans(port, prefix)
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = collector_spans(port, prefix)
        status = tracing_status(admin_port) if admin_port is not None else None
        if now != last or (status and status.get("spans_queued")):
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            break
    return last


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
            "h2load": _first_line(["h2load", "--version"]),
            "openssl": _first_line(["openssl", "version"]),
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
                "trustme",
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
