"""make soak [SOAK=10m]: a bounded soak of the real gateway on loopback.

Steady mixed load (small GETs, GETs through a fault proxy, an aggregate route, 1 MiB
downloads that half the clients abandon mid-stream, streamed uploads, and a trickle of
hostile clients: slowloris heads and garbage bytes) while the fault proxy in front of
one upstream switches between healthy, latency, mid-body resets, a blackhole, a
non-HTTP answer and trickling every few seconds.

Every `--every` seconds it samples the gateway process: RSS and open descriptors
(/proc), the event loop's task count (the gateway's opt-in `GATEWAY_DEBUG_STATS_EVERY`
log line), and upstream pool connections (ESTABLISHED sockets of the gateway to the
upstream and proxy ports, from /proc/net/tcp). It writes `samples.csv`, `soak.png` and
`summary.md` to `load/results/soak-<timestamp>/`, and exits 1 if any of them keeps
growing after the warm-up, or if tasks, descriptors and upstream connections do not
come back down once the load stops.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.faultproxy import Fault, FaultProxy  # noqa: E402
from tests.integration.harness import GatewayProcess, UpstreamServer  # noqa: E402

METRICS = ("rss_mib", "fds", "tasks", "upstream_conns")
# How much a metric may rise between the first and last third of the run after warm-up
# (absolute, or relative to the first third, whichever is larger) before it "grows".
SLACK_ABS = {"rss_mib": 12.0, "fds": 40.0, "tasks": 80.0, "upstream_conns": 40.0}
SLACK_REL = {"rss_mib": 0.15, "fds": 0.25, "tasks": 0.25, "upstream_conns": 0.25}
# Once the load stops and pools expire, how far above the idle baseline they may stay.
SETTLE_SLACK = {"fds": 12, "tasks": 12, "upstream_conns": 4}


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: expected 60s, 10m, 1h")
    scale = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]
    return float(m.group(1)) * scale


# The upstream


async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    path = scope["path"]
    query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if "=" in p)
    if path.startswith("/stream"):
        total = int(query.get("n", str(1 << 20)))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        piece, sent = b"s" * 32768, 0
        while sent < total:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            sent += len(piece)
        await send({"type": "http.response.body", "body": b""})
        return
    if path.startswith("/slow"):
        await asyncio.sleep(float(query.get("s", "0.05")))
    body = json.dumps({"path": path, "received": size, "id": 1, "name": "soak"}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def gateway_config(upstream_url: str, proxy_url: str) -> dict[str, Any]:
    return {
        "server": {"header_timeout": "2s", "body_timeout": "2s", "keepalive_timeout": "5s"},
        "upstreams": {
            "direct": {
                "targets": [upstream_url],
                "health_check": {"path": "/healthz", "interval": "1s", "timeout": "500ms"},
            },
            "faulty": {
                "targets": [proxy_url],
                "read_timeout": "1s",
                "retries": {"attempts": 1, "on": ["connect_error", "timeout", 502]},
                "circuit_breaker": {"min_requests": 20, "window": "5s", "open_for": "1s"},
            },
        },
        "routes": [
            {"name": "fast", "path": "/fast/{p:path}", "upstream": "direct", "rewrite": "/{p}"},
            {
                "name": "faulty",
                "path": "/faulty/{p:path}",
                "upstream": "faulty",
                "rewrite": "/{p}",
                "timeout": "2s",
            },
            {"name": "stream", "path": "/stream", "upstream": "direct"},
            {"name": "upload", "path": "/upload", "upstream": "direct", "methods": ["POST"]},
            {
                "name": "agg",
                "path": "/agg/{id}",
                "timeout": "1500ms",
                "aggregate": {
                    "backends": [
                        {"upstream": "direct", "path": "/users/{id}", "required": True},
                        {"upstream": "faulty", "path": "/recs/{id}", "key": "recs"},
                    ]
                },
            },
        ],
    }


FAULTS: list[tuple[str, Fault | None]] = [
    ("healthy", None),
    ("latency", Fault.latency(0.2)),
    ("reset-mid-body", Fault.reset_after(3000)),
    ("healthy", None),
    ("blackhole", Fault.blackhole()),
    ("non-http", Fault.respond(b"SSH-2.0-OpenSSH_9.6\r\n")),
    ("healthy", None),
    ("trickle", Fault.trickle(512, every=0.01)),
]


# The load


@dataclass
class Tally:
    """What the clients saw since the last sample."""

    counts: Counter[str] = field(default_factory=Counter)

    def take(self) -> Counter[str]:
        counts, self.counts = self.counts, Counter()
        return counts


class Load:
    def __init__(self, gw: GatewayProcess, rate: float, workers: int, tally: Tally) -> None:
        self.gw = gw
        self.rate = rate
        self.workers = workers
        self.tally = tally
        self.stop = asyncio.Event()

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.workers * 2, force_close=False)
        timeout = aiohttp.ClientTimeout(total=6)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._worker(session, i) for i in range(self.workers)))

    async def _worker(self, session: aiohttp.ClientSession, index: int) -> None:
        rng = random.Random(index)
        pause = self.workers / self.rate
        while not self.stop.is_set():
            started = time.monotonic()
            kind = rng.choices(
                ["fast", "faulty", "agg", "stream", "abandon", "upload", "hostile"],
                weights=[40, 20, 10, 6, 6, 10, 3],
            )[0]
            try:
                outcome = await self._one(session, kind, rng)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                outcome = f"client_error:{type(exc).__name__}"
            self.tally.counts[outcome] += 1
            self.tally.counts["requests"] += 1
            await asyncio.sleep(max(0.0, pause - (time.monotonic() - started)))

    async def _one(self, session: aiohttp.ClientSession, kind: str, rng: random.Random) -> str:
        url = self.gw.url
        if kind == "hostile":
            return await self._hostile(rng)
        if kind == "upload":
            body = os.urandom(128 * 1024)

            async def chunks() -> Any:
                for i in range(0, len(body), 16384):
                    yield body[i : i + 16384]

            async with session.post(url + "/upload", data=chunks()) as resp:
                await resp.read()
                return f"{resp.status}"
        if kind in ("stream", "abandon"):
            async with session.get(url + "/stream?n=1048576") as resp:
                if kind == "abandon":
                    await resp.content.readexactly(65536)
                    resp.close()  # the client goes away mid-stream
                    return "abandoned"
                data = await resp.read()
                return f"{resp.status}" if len(data) == 1 << 20 else "short"
        path = {"fast": "/fast/users/1", "faulty": "/faulty/slow?s=0.02", "agg": "/agg/7"}[kind]
        async with session.get(url + path) as resp:
            await resp.read()
            return f"{resp.status}"

    async def _hostile(self, rng: random.Random) -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.gw.port)
        try:
            if rng.random() < 0.5:  # slowloris: half a head, then give up after a while
                writer.write(b"GET /fast/x HTTP/1.1\r\nHost: soak\r\nX-Slow: ")
                await writer.drain()
                await asyncio.sleep(rng.uniform(0.2, 1.0))
                return "hostile:slowloris"
            writer.write(bytes(rng.getrandbits(8) for _ in range(64)))
            await writer.drain()
            await asyncio.wait_for(reader.read(), 2)
            return "hostile:garbage"
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


# Sampling the gateway


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def established(pid: int, remote_ports: set[int], local_ports: set[int]) -> tuple[int, int]:
    """(sockets to any of `remote_ports`, sockets on any of `local_ports`) of `pid`."""
    inodes = socket_inodes(pid)
    upstream = clients = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != "01" or cols[9] not in inodes:
                continue
            local_port = int(cols[1].rsplit(":", 1)[1], 16)
            remote_port = int(cols[2].rsplit(":", 1)[1], 16)
            if remote_port in remote_ports:
                upstream += 1
            elif local_port in local_ports:
                clients += 1
    return upstream, clients


class StatsTail:
    """The last `debug stats` line the gateway wrote to its stderr."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.tasks: int | None = None

    def read(self) -> int | None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return self.tasks
        end = data.rfind(b"\n")
        if end < 0:
            return self.tasks
        self.offset += end + 1
        for line in data[: end + 1].splitlines():
            if b'"debug stats"' in line:
                try:
                    self.tasks = int(json.loads(line)["tasks"])
                except (ValueError, KeyError):
                    pass
        return self.tasks


def sample(
    gw: GatewayProcess, tail: StatsTail, upstream_ports: set[int]
) -> dict[str, float | int | None]:
    assert gw.proc is not None
    pid = gw.proc.pid
    rss_kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    upstream, clients = established(pid, upstream_ports, {gw.port})
    return {
        "rss_mib": round(rss_kib / 1024, 2),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "tasks": tail.read(),
        "upstream_conns": upstream,
        "client_conns": clients,
    }


# Verdict and report


def growth(rows: list[dict[str, Any]], warmup: float) -> dict[str, dict[str, float]]:
    after = [r for r in rows if r["elapsed_s"] >= warmup]
    third = max(1, len(after) // 3)
    verdict: dict[str, dict[str, float]] = {}
    for metric in METRICS:
        values = [float(r[metric]) for r in after if r[metric] not in (None, "")]
        if len(values) < 3:
            continue
        first = statistics.median(values[:third])
        last = statistics.median(values[-third:])
        slack = max(SLACK_ABS[metric], SLACK_REL[metric] * first)
        verdict[metric] = {
            "first": first,
            "last": last,
            "max": max(values),
            "slack": slack,
            "grows": float(last - first > slack),
        }
    return verdict


def plot(rows: list[dict[str, Any]], warmup: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(5, 1, figsize=(10, 12), sharex=True)
    t = [r["elapsed_s"] for r in rows]
    titles = {
        "rss_mib": "RSS (MiB)",
        "fds": "open descriptors",
        "tasks": "asyncio tasks",
        "upstream_conns": "upstream connections (ESTABLISHED)",
    }
    for ax, metric in zip(axes, METRICS, strict=False):
        values = [r[metric] if r[metric] not in (None, "") else float("nan") for r in rows]
        ax.plot(t, values, lw=1.2)
        ax.set_ylabel(titles[metric], fontsize=8)
        ax.axvspan(0, warmup, color="0.9", label="warm-up")
    rate = [r["requests"] / r["interval_s"] if r["interval_s"] else 0 for r in rows]
    errors = [r["errors"] / r["interval_s"] if r["interval_s"] else 0 for r in rows]
    axes[4].plot(t, rate, lw=1.2, label="requests/s")
    axes[4].plot(t, errors, lw=1.0, label="5xx + client errors /s")
    axes[4].legend(fontsize=8, loc="upper right")
    axes[4].set_xlabel("seconds")
    for ax in axes:
        for r in rows:
            if r["phase"] != "healthy":  # the interval that ended with this sample
                start = r["elapsed_s"] - r["interval_s"]
                ax.axvspan(start, r["elapsed_s"], color="tab:red", alpha=0.08, lw=0)
    fig.suptitle("gateway soak (red: upstream fault on)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_summary(
    out: Path,
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    verdict: dict[str, dict[str, float]],
    baseline: dict[str, Any],
    settled: dict[str, Any],
    settle_fail: list[str],
    totals: Counter[str],
    warmup: float,
) -> str:
    lines = [
        f"# Soak {out.name}",
        "",
        f"{args.duration:g} s of load at ~{args.rate:g} req/s from {args.workers} clients, "
        f"warm-up {warmup:g} s, a sample every {args.every:g} s ({len(rows)} samples).",
        "",
        "| metric | idle before | first third after warm-up | last third | max | "
        "idle after | verdict |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for metric in METRICS:
        v = verdict.get(metric)
        if v is None:
            lines.append(f"| {metric} | {baseline.get(metric)} | n/a | n/a | n/a | | no data |")
            continue
        bad = v["grows"] or metric in settle_fail
        lines.append(
            f"| {metric} | {baseline.get(metric)} | {v['first']:g} | {v['last']:g} | "
            f"{v['max']:g} | {settled.get(metric)} | {'GROWS' if bad else 'flat'} |"
        )
    lines += ["", "Client outcomes over the run:", ""]
    for name, count in sorted(totals.items()):
        lines.append(f"- {name}: {count}")
    return "\n".join(lines) + "\n"


# Main


async def soak(args: argparse.Namespace, gw: GatewayProcess, proxy: FaultProxy) -> int:
    out = args.out / f"soak-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    tail = StatsTail(gw.stderr_path)
    ports = {args.upstream_port, proxy.port}
    await asyncio.sleep(args.every + 0.5)
    baseline = sample(gw, tail, ports)
    print(f"idle baseline: {baseline}", flush=True)

    tally = Tally()
    load = Load(gw, args.rate, args.workers, tally)
    load_task = asyncio.create_task(load.run())
    phase_len = max(3.0, min(15.0, args.duration / 24))
    warmup = max(10.0, 0.15 * args.duration)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    totals: Counter[str] = Counter()
    phase_index = 0
    next_phase = started + phase_len
    last = started
    proxy.fault = FAULTS[0][1]
    try:
        while (now := time.monotonic()) - started < args.duration:
            if now >= next_phase:
                phase_index = (phase_index + 1) % len(FAULTS)
                proxy.fault = FAULTS[phase_index][1]
                await asyncio.to_thread(proxy.drop_all)  # in-flight ones break mid-way
                next_phase += phase_len
            now = time.monotonic()
            await asyncio.sleep(max(0.05, min(last + args.every, next_phase) - now))
            if time.monotonic() - last < args.every - 0.01:
                continue
            now = time.monotonic()
            counts = tally.take()
            totals.update(counts)
            errors = sum(
                n for k, n in counts.items() if k.startswith(("5", "client_error", "short"))
            )
            row = {
                "elapsed_s": round(now - started, 2),
                "interval_s": round(now - last, 2),
                "phase": FAULTS[phase_index][0],
                **sample(gw, tail, ports),
                "requests": counts["requests"],
                "ok": counts["200"],
                "errors": errors,
                "abandoned": counts["abandoned"],
            }
            last = now
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        load.stop.set()
        await load_task
        proxy.fault = None
    if gw.proc is None or gw.proc.poll() is not None:
        print("the gateway died during the soak", file=sys.stderr)
        return 1

    # Idle again: pooled connections expire (keepalive_expiry 4 s), tasks finish.
    settle_fail: list[str] = []
    settled: dict[str, Any] = {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        await asyncio.sleep(args.every)
        settled = sample(gw, tail, ports)
        settle_fail = [
            m
            for m, slack in SETTLE_SLACK.items()
            if settled.get(m) is not None
            and baseline.get(m) is not None
            and settled[m] > baseline[m] + slack
        ]
        if not settle_fail:
            break
    print(f"idle after the load: {settled}", flush=True)

    with (out / "samples.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    verdict = growth(rows, warmup)
    plot(rows, warmup, out / "soak.png")
    summary = write_summary(
        out, args, rows, verdict, baseline, settled, settle_fail, totals, warmup
    )
    (out / "summary.md").write_text(summary)
    print(summary)
    print(f"results: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    growing = [m for m, v in verdict.items() if v["grows"]]
    if growing or settle_fail:
        print(f"FAIL: growing after warm-up: {growing}; not back to idle: {settle_fail}")
        return 1
    if totals["200"] == 0:
        print("FAIL: no request succeeded")
        return 1
    print("OK: nothing keeps growing")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("10m"))
    parser.add_argument("--every", type=parse_duration, default=2.0, help="sample interval")
    parser.add_argument("--rate", type=float, default=150.0, help="requests/s, all clients")
    parser.add_argument("--workers", type=int, default=12, help="concurrent clients")
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 4 * 3600:
        parser.error("--duration must be between 1s and 4h")

    work = Path(tempfile.mkdtemp(prefix="gateway-soak."))
    try:
        with UpstreamServer(upstream_app) as up, FaultProxy(up.port) as proxy:
            args.upstream_port = up.port
            env = {"GATEWAY_DEBUG_STATS_EVERY": str(args.every)}
            with GatewayProcess(gateway_config(up.url, proxy.url), work, env=env) as gw:
                print(f"gateway pid {gw.proc.pid if gw.proc else '?'} on {gw.url}", flush=True)
                return asyncio.run(soak(args, gw, proxy))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
