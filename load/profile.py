"""`make profile`: py-spy on the gateway under the bench's simple-GET load.

Starts the nginx upstream and the gateway exactly as `make bench` does (every policy
on, access log to a file, gateway on CPU 0, wrk + upstream + py-spy on CPU 1), loads
`GET /hello` with wrk, and records two py-spy profiles one after the other under the
same load: `profile.raw` (collapsed stacks, for `flametop.py` and diffs) and
`flame.svg` (open it in a browser). Then prints the top frames by own time.

    python load/profile.py            # or: make profile
    PROFILE_NATIVE=1 make profile     # with native frames (Rust, C) as well
    PROFILE_SAMPLE_RATIO=1 make profile   # tracing on, every request sampled

With `PROFILE_SAMPLE_RATIO` (or `--sample-ratio`), the config gets a `tracing:` block
with that ratio, exporting to `load/collector.py` (a real OTLP/HTTP receiver, on the
client CPU), and py-spy records with `--threads --gil`: `top.txt` also splits the
samples between the event loop and the span-export thread, and only the thread holding
the interpreter's lock is sampled (py-spy counts the export thread's waits between
batches as busy otherwise; time in the kernel is then not sampled either).

Writes load/results/profile-<timestamp>/ (git-ignored). See load/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import flametop
from benchlib import LOAD_DIR, ROOT, Procs


def _env(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if value and not value.isdigit():
        raise SystemExit(f"profile: {name} must be a whole number, got {value!r}")
    return int(value) if value else default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="temp dir (default: a new one, removed)")
    parser.add_argument("--seconds", type=int, default=_env("PROFILE_SECONDS", 10))
    parser.add_argument("--connections", type=int, default=_env("PROFILE_CONNECTIONS", 64))
    parser.add_argument("--rate", type=int, default=_env("PROFILE_RATE", 200), help="samples/s")
    parser.add_argument("--top", type=int, default=_env("PROFILE_TOP", 30))
    parser.add_argument(
        "--native",
        action="store_true",
        default=os.environ.get("PROFILE_NATIVE", "") not in ("", "0"),
        help="py-spy --native: C and Rust frames too",
    )
    parser.add_argument("--path", default=os.environ.get("PROFILE_PATH", "/hello"))
    ratio = os.environ.get("PROFILE_SAMPLE_RATIO", "").strip()
    parser.add_argument(
        "--sample-ratio",
        type=float,
        default=float(ratio) if ratio else None,
        help="tracing on with this sample_ratio (0-1), exporting to load/collector.py",
    )
    args = parser.parse_args(argv)
    if args.sample_ratio is not None and not 0 <= args.sample_ratio <= 1:
        parser.error("the sample ratio is a share: between 0 and 1")
    return args


def pyspy() -> str:
    exe = ROOT / ".venv" / "bin" / "py-spy"
    found = str(exe) if exe.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("profile: py-spy is not installed (pip install -e '.[dev]')")
    return found


def record(
    args: argparse.Namespace, pid: int, fmt: str, out: Path, cpus: str | None
) -> tuple[bool, str]:
    argv = [
        pyspy(),
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(args.rate),
        "--duration",
        str(args.seconds),
        "--format",
        fmt,
        "--output",
        str(out),
        "--subprocesses",
    ]
    if args.native:
        argv.append("--native")
    if args.sample_ratio is not None:
        # The event loop apart from the span-export thread; only the thread holding the
        # interpreter's lock, or py-spy counts the export thread's waits as busy.
        argv += ["--threads", "--gil"]
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=args.seconds + 60, check=False
    )
    return done.returncode == 0 and out.exists(), (done.stdout + done.stderr).strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = LOAD_DIR / "results" / f"profile-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    own_work = args.work is None
    work = args.work or Path(tempfile.mkdtemp(prefix="gateway-profile."))
    work.chmod(0o755)
    procs = Procs(work)
    pin = (os.cpu_count() or 1) >= 2
    proxy_cpu, client_cpu = ("0", "1") if pin else (None, None)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    def log(message: str) -> None:
        print(f"==> {message}", file=sys.stderr, flush=True)

    try:
        up_port, sink, port, admin, collector = benchlib.free_ports(5)
        (work / "upstream.conf").write_text(benchlib.nginx_upstream_conf(work, up_port, sink))
        upstream = procs.start(
            "upstream",
            ["nginx", "-p", str(work), "-c", str(work / "upstream.conf")],
            cpus=client_cpu,
        )
        problem = benchlib.wait_http(f"http://127.0.0.1:{up_port}/hello", 10, pid=upstream.pid)
        if problem:
            raise SystemExit(f"profile: the nginx upstream did not start: {problem}")

        tracing = None
        if args.sample_ratio is not None:
            sink_proc = procs.start(
                "collector", benchlib.collector_argv(collector), cpus=client_cpu
            )
            problem = benchlib.wait_http(
                f"http://127.0.0.1:{collector}/stats", 10, pid=sink_proc.pid
            )
            if problem:
                raise SystemExit(f"profile: the OTLP collector did not start: {problem}")
            tracing = {
                "endpoint": f"http://127.0.0.1:{collector}/gateway",
                "sample_ratio": args.sample_ratio,
            }
            log(f"tracing on: sample_ratio {args.sample_ratio:g}, load/collector.py")

        def build(dropped: list[str]) -> dict[str, Any]:
            return benchlib.gateway_config(
                port=port,
                admin_port=admin,
                upstream_port=up_port,
                dropped=dropped,
                tracing=tracing,
            )

        dropped, problem = benchlib.check_gateway_config(work / "gateway.yaml", build)
        if problem:
            raise SystemExit(f"profile: gateway check refused the config:\n{problem}")
        if dropped:
            log(f"this gateway refused {', '.join(dropped)}: profiling without them")
        shutil.copy(work / "gateway.yaml", out / "gateway.yaml")
        gateway = procs.start(
            "gateway",
            [benchlib.gateway_executable(), "run", "-c", str(work / "gateway.yaml")],
            cpus=proxy_cpu,
            stdout=work / "gateway.access.log",
        )
        for url in (f"http://127.0.0.1:{admin}/readyz", f"http://127.0.0.1:{port}{args.path}"):
            problem = benchlib.wait_http(url, 30, pid=gateway.pid)
            if problem:
                print(procs.log_tail("gateway"), file=sys.stderr)
                raise SystemExit(f"profile: the gateway is not serving: {problem}")

        load_seconds = 2 * args.seconds + 4
        log(
            f"gateway pid {gateway.pid} on CPU {proxy_cpu}; wrk -c{args.connections} "
            f"GET {args.path} for {load_seconds}s on CPU {client_cpu}"
        )
        wrk_argv = benchlib.wrk_argv(
            f"http://127.0.0.1:{port}{args.path}", args.connections, load_seconds
        )
        if client_cpu:
            wrk_argv = ["taskset", "-c", client_cpu, *wrk_argv]
        wrk = subprocess.Popen(
            wrk_argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        time.sleep(1.5)  # past the first connections and the pool filling
        raw, svg = out / "profile.raw", out / "flame.svg"
        native = " --native" if args.native else ""
        log(f"py-spy record --rate {args.rate}{native} --format raw for {args.seconds}s")
        ok_raw, said_raw = record(args, gateway.pid, "raw", raw, client_cpu)
        log(f"py-spy record --rate {args.rate}{native} --format flamegraph for {args.seconds}s")
        ok_svg, said_svg = record(args, gateway.pid, "flamegraph", svg, client_cpu)
        try:
            output, _ = wrk.communicate(timeout=load_seconds + 30)
        except subprocess.TimeoutExpired:
            wrk.kill()
            output, _ = wrk.communicate()
        result = benchlib.parse_wrk(output)
        if tracing is not None:
            spans, _ = benchlib.settle_spans(collector, "/gateway", admin)
            log(f"the collector received {spans if spans is not None else '?'} spans")
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        procs.stop_all()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)

    if result.failure:
        log(f"wrk: {result.failure}")
    else:
        log(
            f"under py-spy: {result.rps:,.0f} req/s, p99 {result.p99_ms:.1f} ms, "
            f"{result.non_2xx} non-2xx, {result.socket_errors} socket errors "
            "(sampling costs some throughput)"
        )
    if not ok_raw:
        print(said_raw, file=sys.stderr)
        return 1
    with raw.open(errors="replace") as fh:
        summary = flametop.render(flametop.parse(fh), args.top)
    (out / "top.txt").write_text(summary)
    print(summary)
    rel = out.relative_to(ROOT)
    if ok_svg:
        print(f"flame graph: {rel}/flame.svg")
        print(f"raw stacks:  {rel}/profile.raw")
        print(f"top frames:  {rel}/top.txt")
    else:
        print(f"the flame graph failed: {said_svg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
