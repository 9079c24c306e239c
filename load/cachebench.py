"""The cache, cache-stampede and compression scenarios of `make bench` (issue 22).

A rig of its own beside the rest of the bench, started and stopped here:

- `cache-upstream`: nginx, 1 worker, on the client CPU: `/item` (a small JSON answer
  with `Cache-Control: max-age=60`) and `/data.json` (a generated ~100 KiB JSON
  document, in the results folder, `application/json`, no caching headers);
- `slow-upstream`: `load/refs/slow_upstream.py` on the client CPU: every target
  answered after 300 ms with `max-age=60`, and counted;
- `gateway-cache`: the bench's gateway config plus `cache: {store: memory}`,
  `compression: {algorithms: [zstd, br, gzip]}`, `/item` and `/slow` with
  `cache: {default_ttl: 60s}`, `/data.json` proxied uncached;
- `gateway-nocache`: the same config without `cache:` on any route (the proxied rate);
- `nginx-cache`: nginx, 1 worker, `proxy_cache` (zone in the results folder's
  `nginx-cache/`), `proxy_cache_lock on`, `gzip on; gzip_comp_level 5` for JSON.

The proxies run on the proxy CPU, the upstreams and the clients on the client CPU.
`run()` returns a JSON-able dict (kept in results.json under `cachebench`);
`render()` turns it into the report's section.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import resource
import statistics
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import benchlib

SCENARIOS = ("cache", "cache-stampede", "compression")
CACHE_GOAL = 1.5  # cached hit rate over the same gateway's proxied rate
STAMPEDE_CLIENTS = 1000
SLOW_DELAY = 0.3
GZIP_LEVEL = 5
ALGORITHMS = ("zstd", "br", "gzip", "identity")
JSON_BYTES = 100 * 1024
SLOW_UPSTREAM = benchlib.LOAD_DIR / "refs" / "slow_upstream.py"


def make_json(path: Path, size: int = JSON_BYTES) -> int:
    """A realistic JSON document (orders with customers, items, addresses) of about
    `size` bytes, the same on every run (seeded)."""
    rng = random.Random(22)
    names = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Ken", "Margaret"]
    cities = ["Lyon", "Leeds", "Porto", "Gdansk", "Turin", "Ghent", "Bergen", "Cork"]
    skus = ["lamp", "book", "desk", "chair", "mug", "pen", "cable", "plant", "rug"]
    orders: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"page": 1, "per_page": 0, "orders": orders}
    text = ""
    while len(text) < size:
        n = len(orders) + 1
        orders.append(
            {
                "id": f"ord-{n:06d}",
                "created_at": f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
                f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z",
                "status": rng.choice(["paid", "shipped", "delivered", "refunded"]),
                "customer": {
                    "id": rng.randint(1000, 99999),
                    "name": f"{rng.choice(names)} {rng.choice(names)}son",
                    "email": f"user{rng.randint(1, 10**6)}@example.com",
                    "address": {
                        "street": f"{rng.randint(1, 250)} {rng.choice(names)} Street",
                        "city": rng.choice(cities),
                        "postcode": f"{rng.randint(10000, 99999)}",
                    },
                },
                "items": [
                    {
                        "sku": f"{rng.choice(skus)}-{rng.randint(1, 999):03d}",
                        "quantity": rng.randint(1, 5),
                        "unit_price": round(rng.uniform(1, 300), 2),
                    }
                    for _ in range(rng.randint(1, 4))
                ],
                "total": round(rng.uniform(5, 1500), 2),
                "currency": "EUR",
            }
        )
        doc["per_page"] = n
        text = json.dumps(doc, indent=1)
    path.write_text(text)
    return len(text.encode())


def upstream_conf(work: Path, port: int, data: Path) -> str:
    return (
        benchlib._nginx_main(work, "cache-upstream")
        + f"""http {{
{benchlib._nginx_http(work, "cache-upstream")}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /healthz {{
            default_type text/plain;
            return 200 "ok\\n";
        }}
        location = /item {{
            default_type application/json;
            add_header Cache-Control "max-age=60" always;
            return 200 '{{"id":"item-1","name":"Desk lamp","price":42.5,"stock":17}}';
        }}
        location = /data.json {{
            types {{ }}
            default_type application/json;
            alias {data};
        }}
    }}
}}
"""
    )


def nginx_cache_conf(work: Path, out: Path, port: int, up_port: int, slow_port: int) -> str:
    cache_dir = out / "nginx-cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.chmod(0o777)
    proxy = """proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 10s;
            proxy_cache_lock_age 10s;"""
    return (
        benchlib._nginx_main(work, "nginx-cache")
        + f"""http {{
{benchlib._nginx_http(work, "nginx-cache")}
    proxy_cache_path {cache_dir} levels=1:2 keys_zone=bench:10m max_size=256m inactive=10m;
    gzip on;
    gzip_comp_level {GZIP_LEVEL};
    gzip_min_length 1024;
    gzip_proxied any;
    gzip_types application/json;
    add_header X-Cache-Status $upstream_cache_status always;
    upstream backend {{
        server 127.0.0.1:{up_port};
        keepalive 256;
    }}
    upstream slow {{
        server 127.0.0.1:{slow_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /slow {{
            proxy_pass http://slow;
            {proxy}
        }}
        location / {{
            proxy_pass http://backend;
            {proxy}
            proxy_buffers 16 64k;
            proxy_busy_buffers_size 128k;
        }}
    }}
}}
"""
    )


def gateway_conf(
    port: int, admin: int, up_port: int, slow_port: int, cache: bool, dropped: list[str]
) -> dict[str, Any]:
    config = benchlib.gateway_config(
        port=port, admin_port=admin, upstream_port=up_port, dropped=dropped
    )
    slow = dict(config["upstreams"]["backend"])
    slow["targets"] = [f"http://127.0.0.1:{slow_port}"]
    config["upstreams"]["slow"] = slow
    routes = [
        {"name": "item", "path": "/item", "methods": ["GET"], "upstream": "backend"},
        {"name": "data", "path": "/data.json", "methods": ["GET"], "upstream": "backend"},
        {
            "name": "slow",
            "path": "/slow",
            "methods": ["GET"],
            "upstream": "slow",
            "timeout": "20s",
        },
    ]
    if cache:
        config["cache"] = {"store": "memory"}
        routes[0]["cache"] = {"default_ttl": "60s"}
        routes[2]["cache"] = {"default_ttl": "60s"}
    config["compression"] = {"algorithms": ["zstd", "br", "gzip"]}
    config["routes"] = routes + config["routes"]
    return config


def _fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            headers = {k.lower(): v for k, v in response.headers.items()}
            return response.status, headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def _wrk(
    bench: Any, url: str, header: str | None, cpus: str | None
) -> tuple[benchlib.WrkResult, str]:
    args = bench.args
    argv = benchlib.wrk_argv(url, args.connections, args.seconds)
    if header:
        argv[1:1] = ["-H", header]
    output, status = benchlib._bounded(argv, args.seconds + 30, cpus)
    if status is None:
        return benchlib.WrkResult(failure="wrk did not finish in time"), output
    result = benchlib.parse_wrk(output)
    if status != 0 and result.failure is None:
        result = benchlib.WrkResult(failure=f"wrk exited with status {status}")
    return result, output


async def _stampede(port: int, target: str, clients: int) -> dict[str, Any]:
    """`clients` connections opened first, then one GET each sent at once; statuses."""
    started = time.monotonic()

    async def one_connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | str:
        try:
            return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        except (TimeoutError, OSError) as exc:
            return f"connect: {exc!r}"

    conns = await asyncio.gather(*(one_connect() for _ in range(clients)))
    request = (f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").encode()

    async def one(conn: Any) -> str:
        if isinstance(conn, str):
            return conn
        reader, writer = conn
        try:
            writer.write(request)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(-1), 30)
            line = data.split(b"\r\n", 1)[0].decode("latin-1")
            return line.split(" ")[1] if line.startswith("HTTP/") else "no answer"
        except (TimeoutError, OSError) as exc:
            return f"error: {type(exc).__name__}"
        finally:
            writer.close()

    sent = time.monotonic()
    statuses = await asyncio.gather(*(one(c) for c in conns))
    done = time.monotonic()
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return {
        "statuses": counts,
        "connect_s": round(sent - started, 3),
        "answered_s": round(done - sent, 3),
    }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _record(result: benchlib.WrkResult) -> dict[str, Any]:
    record = result.as_dict()
    record["bytes_per_answer"] = round(result.bytes / result.requests) if result.requests else None
    return record


def run(bench: Any) -> dict[str, Any]:
    """Start the rig, run the wanted scenarios, stop the rig; never raises for a
    failure of the rig (it is reported as n/a with the reason)."""
    args = bench.args
    wanted = [s for s in SCENARIOS if s in args.scenarios]
    out: dict[str, Any] = {"scenarios": wanted, "failures": {}}
    if not wanted:
        return out
    procs = bench.procs
    proxy_cpu = str(args.proxy_cpu) if bench.pin else None
    client_cpu = str(args.client_cpu) if bench.pin else None
    work = bench.work
    up_port, slow_port, nginx_port, gw_port, gw_admin, nc_port, nc_admin = benchlib.free_ports(7)
    data = bench.out / "data.json"
    out["json_bytes"] = make_json(data)
    data.chmod(0o644)
    bench.out.chmod(0o755)
    out["gzip_comp_level"] = GZIP_LEVEL
    out["loadavg_start"] = benchlib.loadavg()

    (work / "cache-upstream.conf").write_text(upstream_conf(work, up_port, data))
    up = procs.start(
        "cache-upstream",
        [
            "nginx",
            "-p",
            str(work),
            "-e",
            str(work / "cache-upstream-error.log"),
            "-c",
            str(work / "cache-upstream.conf"),
        ],
        cpus=client_cpu,
    )
    slow = procs.start(
        "slow-upstream",
        [sys.executable, str(SLOW_UPSTREAM), "--port", str(slow_port), "--delay", str(SLOW_DELAY)],
        cpus=client_cpu,
    )
    (work / "nginx-cache.conf").write_text(
        nginx_cache_conf(work, bench.out, nginx_port, up_port, slow_port)
    )
    ngx = procs.start(
        "nginx-cache",
        [
            "nginx",
            "-p",
            str(work),
            "-e",
            str(work / "nginx-cache-error.log"),
            "-c",
            str(work / "nginx-cache.conf"),
        ],
        cpus=proxy_cpu,
    )
    gateways: dict[str, tuple[int, int, Any]] = {}
    for name, port, admin, cache in (
        ("gateway-cache", gw_port, gw_admin, True),
        ("gateway-nocache", nc_port, nc_admin, False),
    ):
        path = work / f"{name}.yaml"
        _dropped, problem = benchlib.check_gateway_config(
            path,
            lambda d, p=port, a=admin, c=cache: gateway_conf(p, a, up_port, slow_port, c, d),
        )
        if problem is not None:
            out["failures"][name] = f"gateway check refused the config: {problem[-300:]}"
            continue
        (bench.out / f"{name}.yaml").write_text(path.read_text())
        proc = procs.start(
            name,
            [benchlib.gateway_executable(), "run", "-c", str(path)],
            cpus=proxy_cpu,
            stdout=work / f"{name}.access.log",
        )
        gateways[name] = (port, admin, proc)

    ready: dict[str, str | None] = {
        "cache-upstream": benchlib.wait_http(
            f"http://127.0.0.1:{up_port}/healthz", args.ready_timeout, up.pid
        ),
        "slow-upstream": benchlib.wait_http(
            f"http://127.0.0.1:{slow_port}/healthz", args.ready_timeout, slow.pid
        ),
        "nginx-cache": benchlib.wait_http(
            f"http://127.0.0.1:{nginx_port}/item", args.ready_timeout, ngx.pid
        ),
    }
    for name, (port, _admin, proc) in gateways.items():
        ready[name] = benchlib.wait_http(
            f"http://127.0.0.1:{port}/item", args.ready_timeout, proc.pid
        )
    for name, problem in ready.items():
        if problem:
            out["failures"][name] = problem
            bench.log(f"cachebench: {name} not ready: {problem}")
    ports = {"nginx-cache": nginx_port, "gateway-cache": gw_port, "gateway-nocache": nc_port}
    pids = {"nginx-cache": ngx.pid, **{n: g[2].pid for n, g in gateways.items()}}
    usable = {n for n in ports if n in pids and not out["failures"].get(n)}
    upstreams_ok = not out["failures"].get("cache-upstream")

    try:
        if "cache" in wanted:
            out["cache"] = _cache(bench, ports, pids, usable if upstreams_ok else set(), client_cpu)
        if "cache-stampede" in wanted:
            ok = usable if not out["failures"].get("slow-upstream") else set()
            out["stampede"] = _stampede_all(bench, ports, ok, slow_port)
        if "compression" in wanted:
            ok = usable if upstreams_ok else set()
            out["compression"] = _compression(bench, ports, pids, ok, client_cpu)
    finally:
        out["loadavg_end"] = benchlib.loadavg()
        for _name, (_p, _a, proc) in gateways.items():
            procs.stop(proc)
        for proc in (ngx, slow, up):
            procs.stop(proc)
    return out


def _rows(
    bench: Any,
    jobs: list[tuple[str, str, str, str | None]],
    pids: dict[str, int],
    client_cpu: str | None,
) -> dict[str, dict[str, Any]]:
    """(key, system, url, header) wrk runs over the bench's rounds, order rotating;
    per key the median req/s and bytes per answer, and every run."""
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key, *_ in jobs}
    for rnd in range(bench.args.rounds):
        shift = rnd % len(jobs)
        for key, system, url, header in jobs[shift:] + jobs[:shift]:
            if bench.args.warmup:
                _wrk_short(url, header, bench.args.warmup, client_cpu)
            with benchlib.RssSampler(pids.get(system)) as sampler:
                result, output = _wrk(bench, url, header, client_cpu)
            record = _record(result)
            record["cpu_pct"] = sampler.cpu_pct
            runs[key].append(record)
            bench.raw.append(f"## cachebench {key} r{rnd + 1}\n\n```\n{output}\n```\n")
            shown = f"{result.rps:8.0f} req/s" if not result.failure else f"n/a ({result.failure})"
            bench.log(f"r{rnd + 1} {key:32s} {shown}")
            if system in pids:
                benchlib.wait_idle(pids[system])
    rows = {}
    for key, system, url, header in jobs:
        good = [r for r in runs[key] if not r.get("failure") and r["requests"]]
        rows[key] = {
            "system": system,
            "url_path": url.split("/", 3)[-1],
            "header": header,
            "rps": _median([r["rps"] for r in good]),
            "p99_ms": _median([r["p99_ms"] for r in good if r["p99_ms"] is not None]),
            "bytes_per_answer": _median([r["bytes_per_answer"] for r in good]),
            "errors": sum(r["non_2xx"] + r["socket_errors"] for r in runs[key]),
            "cpu_pct": _median([r["cpu_pct"] for r in good if r["cpu_pct"] is not None]),
            "failure": next((r["failure"] for r in runs[key] if r.get("failure")), None),
            "runs": runs[key],
        }
    return rows


def _wrk_short(url: str, header: str | None, seconds: int, cpus: str | None) -> None:
    argv = benchlib.wrk_argv(url, 64, seconds)
    if header:
        argv[1:1] = ["-H", header]
    benchlib._bounded(argv, seconds + 15, cpus)


def _cache(
    bench: Any, ports: dict[str, int], pids: dict[str, int], usable: set[str], cpu: str | None
) -> dict[str, Any]:
    checks = {}
    for name in sorted(usable):
        url = f"http://127.0.0.1:{ports[name]}/item"
        _fetch(url)
        status, headers, _ = _fetch(url)
        checks[name] = {
            "status": status,
            "cache_status": headers.get("cache-status") or headers.get("x-cache-status"),
            "age": headers.get("age"),
        }
    jobs = [
        (name, name, f"http://127.0.0.1:{ports[name]}/item", None)
        for name in ("gateway-nocache", "gateway-cache", "nginx-cache")
        if name in usable
    ]
    rows = _rows(bench, jobs, pids, cpu) if jobs else {}
    hit = (rows.get("gateway-cache") or {}).get("rps")
    proxied = (rows.get("gateway-nocache") or {}).get("rps")
    ratio = hit / proxied if hit and proxied else None
    return {
        "checks": checks,
        "rows": rows,
        "ratio": ratio,
        "goal": CACHE_GOAL,
        "verdict": None if ratio is None else ("met" if ratio >= CACHE_GOAL else "missed"),
    }


def _stampede_all(
    bench: Any, ports: dict[str, int], usable: set[str], slow_port: int
) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    results: dict[str, Any] = {}
    stamp = int(time.time())
    for name in ("gateway-cache", "nginx-cache"):
        if name not in usable:
            results[name] = {"failure": "not running"}
            continue
        target = f"/slow?key={name}-{stamp}"
        try:
            got = asyncio.run(_stampede(ports[name], target, STAMPEDE_CLIENTS))
        except Exception as exc:
            results[name] = {"failure": f"client: {exc!r}"}
            continue
        time.sleep(0.5)
        try:
            _, _, body = _fetch(
                f"http://127.0.0.1:{slow_port}/count?{urllib.parse.quote(target, safe='')}"
            )
            count = json.loads(body)["count"]
        except (OSError, ValueError, KeyError) as exc:
            results[name] = {**got, "failure": f"count: {exc!r}"}
            continue
        results[name] = {**got, "target": target, "upstream_requests": count}
        bench.log(
            f"cache-stampede {name}: {STAMPEDE_CLIENTS} GETs -> {count} upstream request(s); "
            f"statuses {got['statuses']}, answered in {got['answered_s']} s"
        )
    gw = results.get("gateway-cache", {}).get("upstream_requests")
    return {
        "clients": STAMPEDE_CLIENTS,
        "delay_s": SLOW_DELAY,
        "results": results,
        "verdict": None if gw is None else ("met" if gw == 1 else "missed"),
    }


def _compression(
    bench: Any, ports: dict[str, int], pids: dict[str, int], usable: set[str], cpu: str | None
) -> dict[str, Any]:
    jobs = []
    bodies: dict[str, dict[str, Any]] = {}
    plan = [("gateway-cache", alg) for alg in ALGORITHMS] + [
        ("nginx-cache", "gzip"),
        ("nginx-cache", "identity"),
    ]
    for system, alg in plan:
        if system not in usable:
            continue
        key = f"{system} {alg}"
        url = f"http://127.0.0.1:{ports[system]}/data.json"
        header = f"Accept-Encoding: {alg}"
        try:
            status, headers, body = _fetch(url, {"Accept-Encoding": alg})
            coding = headers.get("content-encoding") or "identity"
            bodies[key] = {"status": status, "coding": coding, "body_bytes": len(body)}
        except OSError as exc:
            bodies[key] = {"failure": repr(exc)}
        jobs.append((key, system, url, header))
    rows = _rows(bench, jobs, pids, cpu) if jobs else {}
    for key, row in rows.items():
        row.update(bodies.get(key, {}))
    return {"rows": rows, "gzip_comp_level": GZIP_LEVEL}


# --- report ---------------------------------------------------------------------------


def _f(value: float | None, fmt: str = "{:,.0f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def render(data: dict[str, Any]) -> str:
    """The report's section for the cache, cache-stampede and compression scenarios."""
    if not data or not data.get("scenarios"):
        return ""
    lines = ["", "## Cache and compression (issue 22)", ""]
    lines.append(
        f"Load average {_f(data.get('loadavg_start'), '{:.2f}')} at the start of these "
        f"scenarios, {_f(data.get('loadavg_end'), '{:.2f}')} at their end."
    )
    for name, why in (data.get("failures") or {}).items():
        lines.append(f"- **{name} n/a**: {why}")
    cache = data.get("cache")
    if cache:
        lines += [
            "",
            "### cache: `GET /item` (upstream `Cache-Control: max-age=60`)",
            "",
            "| system | req/s | p99 ms | errors | CPU % | check |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for name in ("gateway-nocache", "gateway-cache", "nginx-cache"):
            row = cache["rows"].get(name)
            check = cache["checks"].get(name, {})
            mark = check.get("cache_status") or (f"Age: {check['age']}" if check.get("age") else "")
            if row is None:
                lines.append(f"| {name} | n/a | n/a | n/a | n/a | |")
                continue
            lines.append(
                f"| {name} | {_f(row['rps'])} | {_f(row['p99_ms'], '{:.1f}')} | "
                f"{row['errors']} | {_f(row['cpu_pct'], '{:.0f}')} | {mark} |"
            )
        lines += [
            "",
            f"Goal: cache hit rate >= {cache['goal']}x the proxied rate: "
            f"**{_f(cache['ratio'], '{:.2f}x')}, {cache['verdict'] or 'n/a'}**.",
        ]
    stampede = data.get("stampede")
    if stampede:
        lines += [
            "",
            f"### cache-stampede: {stampede['clients']:,} concurrent misses of one key, "
            f"upstream answers after {stampede['delay_s'] * 1000:.0f} ms",
            "",
            "| system | upstream requests | statuses | seconds to answer all |",
            "|---|---:|---|---:|",
        ]
        for name, res in stampede["results"].items():
            if res.get("failure"):
                lines.append(f"| {name} | n/a ({res['failure']}) | | |")
                continue
            lines.append(
                f"| {name} | {res['upstream_requests']} | {res['statuses']} | {res['answered_s']} |"
            )
        lines += [
            "",
            "Goal: exactly 1 upstream request for the gateway: "
            f"**{stampede['verdict'] or 'n/a'}** (nginx: `proxy_cache_lock on`).",
        ]
    comp = data.get("compression")
    if comp:
        lines += [
            "",
            f"### compression: `GET /data.json`, {data.get('json_bytes', 0):,} bytes of JSON "
            f"(nginx: `gzip on; gzip_comp_level {comp['gzip_comp_level']}`)",
            "",
            "| system | Accept-Encoding | got | req/s | p99 ms | body bytes | bytes/answer on "
            "the wire | CPU % |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for key, row in comp["rows"].items():
            system, alg = key.split(" ", 1)
            lines.append(
                f"| {system} | {alg} | {row.get('coding', 'n/a')} | {_f(row['rps'])} | "
                f"{_f(row['p99_ms'], '{:.1f}')} | {_f(row.get('body_bytes'))} | "
                f"{_f(row['bytes_per_answer'])} | {_f(row['cpu_pct'], '{:.0f}')} |"
            )
    return "\n".join(lines) + "\n"
