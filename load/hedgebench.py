"""The hedge scenario of `make bench` (issue 23): hedged requests against a slow tail.

A rig of its own beside the rest of the bench, started and stopped here:

- `tail-upstream`: `load/refs/slow_upstream.py` on the client CPU, two listeners (the
  two targets of one upstream): a random `TAIL` share of answers (2 %) comes after
  `TAIL_DELAY` (500 ms), the others at once; it counts the requests per path, the
  hedges and the cancelled losers included (counted on arrival);
- `gateway-hedge`: the bench's gateway config (every policy on) plus upstream `tail`
  (both targets, round robin, the bench's policies) and two routes to it:
  `/plain/{rest}` without hedging and `/hedged/{rest}` with `hedge: {after: p95}`;
- the client: an open-loop asyncio client in this process (client CPU) sending `RATE`
  requests a second (300), alternating between the two routes, each request on an
  idle keep-alive connection (a new one when none is idle), so a slow answer never
  holds the next request back. First `WARMUP` seconds (3; the p95 record needs 20
  answers), then `SECONDS` (20) measured.

Why a 2 % tail and not 1 %: p99 is the 99th percentile; with exactly 1 % of slow
answers it sits on the boundary between the fast and the slow ones and flips between
them from run to run. With 2 %, the plain route's p99 is in the tail, and p95 (the
hedge's trigger) is still among the fast answers. `BENCH_HEDGE_TAIL=0.01` (or
`--tail 0.01`) runs the issue's 1 % as it is; then read p99.9 for the tail.

Goal: p99 falls >= 5x with hedging, while the hedged route's upstream requests per
client request rise <= 10 % over the plain route's.

`run()` returns a JSON-able dict (kept in results.json under `hedgebench`);
`render()` turns it into the report's section. `python load/hedgebench.py` runs the
scenario alone (`--seconds`, `--rate`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib

SCENARIOS = ("hedge",)
TAIL = 0.02
TAIL_DELAY = 0.5
RATE = 300
SECONDS = 20
WARMUP = 3
P99_GOAL = 5.0  # the plain route's p99 over the hedged route's
EXTRA_GOAL = 0.10  # the hedged route's extra upstream requests per request, at most
ROUTES = ("plain", "hedged")
IDLE_REUSE = 3.0  # seconds an idle client connection is reused (the gateway keeps 5)
SLOW_UPSTREAM = benchlib.LOAD_DIR / "refs" / "slow_upstream.py"


def gateway_conf(port: int, admin: int, targets: list[int]) -> dict[str, Any]:
    """The bench's config plus upstream `tail` over `targets` and its two routes."""
    config = benchlib.gateway_config(
        port=port, admin_port=admin, upstream_port=targets[0], access_log=False
    )
    tail = dict(config["upstreams"]["backend"])
    tail["targets"] = [f"http://127.0.0.1:{p}" for p in targets]
    config["upstreams"]["tail"] = tail
    for name in ROUTES:
        route: dict[str, Any] = {
            "name": name,
            "path": f"/{name}/{{rest:path}}",
            "methods": ["GET"],
            "upstream": "tail",
            "timeout": "5s",
        }
        if name == "hedged":
            route["hedge"] = {"after": "p95"}
        config["routes"].append(route)
    return config


# --- the open-loop client ------------------------------------------------------------


async def _exchange(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes) -> int:
    reader, writer = conn
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


async def drive(port: int, rate: float, seconds: float) -> dict[str, dict[str, Any]]:
    """`rate` requests a second for `seconds`, alternating between the routes; each
    route's latencies (seconds) and failures."""
    # Idle connections, with when each was last used: one idle past the gateway's
    # keepalive_timeout (5 s) may be closed under us, so it is dropped, not reused.
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
    results: dict[str, dict[str, Any]] = {r: {"latencies": [], "errors": 0} for r in ROUTES}
    requests = {
        r: f"GET /{r}/item HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode() for r in ROUTES
    }

    async def connection() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while idle:
            reader, writer, used = idle.pop()
            if time.monotonic() - used < IDLE_REUSE:
                return reader, writer
            writer.close()
        return await asyncio.open_connection("127.0.0.1", port)

    async def one(route: str) -> None:
        conn = await connection()
        started = time.perf_counter()
        try:
            status = await asyncio.wait_for(_exchange(conn, requests[route]), 10)
        except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError):
            results[route]["errors"] += 1
            conn[1].close()
            return
        elapsed = time.perf_counter() - started
        if status == 200:
            results[route]["latencies"].append(elapsed)
        else:
            results[route]["errors"] += 1
        idle.append((*conn, time.monotonic()))

    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    start = loop.time()
    total = int(rate * seconds)
    for i in range(total):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(ROUTES[i % len(ROUTES)])))
    await asyncio.gather(*tasks, return_exceptions=True)
    for _reader, writer, _used in idle:
        writer.close()
    return results


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _upstream_total(port: int, route: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/total?/{route}/", timeout=5) as r:
        return int(json.loads(r.read())["count"])


def _hedge_counters(admin: int) -> dict[str, float]:
    """gateway_hedges_total and the wins of the hedged route, from the admin listener."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    counters = {"hedges": 0.0, "first": 0.0, "hedge": 0.0}
    for line in text.splitlines():
        if 'route="hedged"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith("gateway_hedges_total{"):
            counters["hedges"] = value
        elif line.startswith("gateway_hedge_wins_total{"):
            counters["first" if 'winner="first"' in line else "hedge"] = value
    return counters


def measure(port: int, admin: int, up_port: int, rate: float, seconds: float) -> dict[str, Any]:
    """The measured phase: the client's figures, and the upstream's requests and the
    gateway's hedge counters over exactly that phase."""
    before = {r: _upstream_total(up_port, r) for r in ROUTES}
    hedges_before = _hedge_counters(admin)
    results = asyncio.run(drive(port, rate, seconds))
    time.sleep(0.5)  # cancelled losers and late hedges reach the upstream
    out: dict[str, Any] = {}
    for route in ROUTES:
        latencies = sorted(results[route]["latencies"])
        answered = len(latencies)
        upstream = _upstream_total(up_port, route) - before[route]
        out[route] = {
            "requests": answered,
            "errors": results[route]["errors"],
            **{
                f"p{name}_ms": None if (v := _percentile(latencies, q)) is None else v * 1000
                for name, q in (("50", 0.5), ("90", 0.9), ("99", 0.99), ("99.9", 0.999))
            },
            "max_ms": latencies[-1] * 1000 if latencies else None,
            "upstream_requests": upstream,
            "upstream_per_request": upstream / answered if answered else None,
        }
    after = _hedge_counters(admin)
    out["hedges"] = {k: after[k] - hedges_before[k] for k in after}
    plain, hedged = out["plain"], out["hedged"]
    if plain["p99_ms"] and hedged["p99_ms"]:
        out["p99_ratio"] = plain["p99_ms"] / hedged["p99_ms"]
    if plain["upstream_per_request"] and hedged["upstream_per_request"] is not None:
        out["extra_upstream"] = hedged["upstream_per_request"] / plain["upstream_per_request"] - 1
    return out


# --- the rig ---------------------------------------------------------------------------


def run(bench: Any) -> dict[str, Any]:
    """Start the rig, run the scenario, stop the rig; never raises for a failure of the
    rig (it is reported with the reason)."""
    args = bench.args
    out: dict[str, Any] = {"scenarios": [s for s in SCENARIOS if s in args.scenarios]}
    if not out["scenarios"]:
        return out
    seconds = int(os.environ.get("BENCH_HEDGE_SECONDS") or SECONDS)
    rate = float(os.environ.get("BENCH_HEDGE_RATE") or RATE)
    tail = float(os.environ.get("BENCH_HEDGE_TAIL") or TAIL)
    out.update(tail=tail, tail_delay_ms=TAIL_DELAY * 1000, rate=rate, seconds=seconds)
    procs = bench.procs
    proxy_cpu = str(args.proxy_cpu) if bench.pin else None
    client_cpu = str(args.client_cpu) if bench.pin else None
    up_a, up_b, port, admin = benchlib.free_ports(4)
    out["loadavg_start"] = benchlib.loadavg()
    upstream = procs.start(
        "tail-upstream",
        [
            sys.executable,
            str(SLOW_UPSTREAM),
            "--port",
            str(up_a),
            "--port",
            str(up_b),
            "--delay",
            str(TAIL_DELAY),
            "--tail",
            str(tail),
        ],
        cpus=client_cpu,
    )
    path = bench.work / "gateway-hedge.yaml"
    path.write_text(json.dumps(gateway_conf(port, admin, [up_a, up_b]), indent=1))
    (bench.out / "gateway-hedge.yaml").write_text(path.read_text())
    # This checkout's gateway: `-m gateway` from the checkout (Procs runs in ROOT).
    gateway = procs.start(
        "gateway-hedge", [sys.executable, "-m", "gateway", "run", "-c", str(path)], cpus=proxy_cpu
    )
    try:
        for name, url, pid in (
            ("tail-upstream", f"http://127.0.0.1:{up_a}/healthz", upstream.pid),
            ("gateway-hedge", f"http://127.0.0.1:{admin}/readyz", gateway.pid),
        ):
            problem = benchlib.wait_http(url, max(args.ready_timeout, 60), pid)
            if problem is not None:
                out["failure"] = f"{name}: {problem}"
                bench.log(f"hedgebench: {name} not ready: {problem}")
                bench.log(procs.log_tail(name))
                return out
        bench.log(f"hedgebench: warm-up {WARMUP} s, then {seconds} s at {rate:g} req/s")
        asyncio.run(drive(port, rate, WARMUP))
        out.update(measure(port, admin, up_a, rate, seconds))
        for route in ROUTES:
            r = out[route]
            bench.log(
                f"hedgebench {route:6s}: {r['requests']} ok, {r['errors']} errors, "
                f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                f"{r['upstream_requests']} upstream requests"
            )
    finally:
        out["loadavg_end"] = benchlib.loadavg()
        procs.stop(gateway)
        procs.stop(upstream)
    return out


def _f(value: float | None, fmt: str = "{:,.1f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def render(data: dict[str, Any]) -> str:
    """The report's section (markdown), empty when the scenario did not run."""
    if not data.get("scenarios"):
        return ""
    lines = [
        "",
        "## Hedged requests (issue 23)",
        "",
        f"Two targets, {data['tail']:.0%} of answers after {data['tail_delay_ms']:.0f} ms "
        f"(the others at once); {data['rate']:g} req/s open loop for {data['seconds']} s, "
        "alternating between `/plain` (no hedge) and `/hedged` (`hedge: {after: p95}`), "
        "same gateway, same upstream. Load average "
        f"{_f(data.get('loadavg_start'), '{:.2f}')} -> {_f(data.get('loadavg_end'), '{:.2f}')}.",
        "",
    ]
    if data.get("failure"):
        return "\n".join([*lines, f"n/a: {data['failure']}", ""])
    lines += [
        "| route | answers | errors | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms "
        "| upstream requests | per answer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for route in ROUTES:
        r = data[route]
        lines.append(
            f"| {route} | {r['requests']:,} | {r['errors']} | {_f(r['p50_ms'])} "
            f"| {_f(r['p90_ms'])} | {_f(r['p99_ms'])} | {_f(r['p99.9_ms'])} "
            f"| {_f(r['max_ms'])} | {r['upstream_requests']:,} "
            f"| {_f(r['upstream_per_request'], '{:.3f}')} |"
        )
    hedges = data.get("hedges", {})
    ratio, extra = data.get("p99_ratio"), data.get("extra_upstream")
    p99_ok = ratio is not None and ratio >= P99_GOAL
    extra_ok = extra is not None and extra <= EXTRA_GOAL
    lines += [
        "",
        f"Hedges sent: {hedges.get('hedges', 0):,.0f}; won by the first try "
        f"{hedges.get('first', 0):,.0f}, by the hedge {hedges.get('hedge', 0):,.0f}.",
        "",
        f"- goal p99 falls >= {P99_GOAL:g}x: {_f(ratio, '{:.1f}')}x "
        f"{'met' if p99_ok else 'NOT met'}",
        f"- goal upstream requests rise <= {EXTRA_GOAL:.0%}: "
        f"{_f(None if extra is None else extra * 100, '{:+.1f}')} % "
        f"{'met' if extra_ok else 'NOT met'}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the hedge scenario alone")
    parser.add_argument("--seconds", type=int, default=SECONDS)
    parser.add_argument("--rate", type=float, default=RATE)
    parser.add_argument("--tail", type=float, default=TAIL, help="share of slow answers")
    options = parser.parse_args(argv)
    os.environ["BENCH_HEDGE_TAIL"] = str(options.tail)
    os.environ["BENCH_HEDGE_SECONDS"] = str(options.seconds)
    os.environ["BENCH_HEDGE_RATE"] = str(options.rate)
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="gateway-hedgebench.") as tmp:
        work = Path(tmp)
        bench = SimpleNamespace(
            args=SimpleNamespace(scenarios=SCENARIOS, proxy_cpu=0, client_cpu=1, ready_timeout=60),
            pin=cpus >= 2,
            procs=benchlib.Procs(work),
            work=work,
            out=work,
            log=lambda message: print(message, file=sys.stderr, flush=True),
        )
        if bench.pin:
            os.sched_setaffinity(0, {1})
        try:
            data = run(bench)
        finally:
            bench.procs.stop_all()
    print(json.dumps(data, indent=1))
    print(render(data))
    return 0 if data.get("p99_ratio") else 1


if __name__ == "__main__":
    sys.exit(main())
