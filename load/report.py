"""The bench's report: medians over rounds, ratios, the issue's goals, tables and plots.

`bench.py` calls `write(folder, data)`; it can also be rerun on a finished run:

    .venv/bin/python load/report.py load/results/20261125-130000

Writes results.json (the raw runs plus the summary and goals computed here), report.md,
summary.txt (what the terminal shows at the end) and PNG plots made with matplotlib
(skipped, with a line in the report, when matplotlib is not installed).
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["evaluate_goals", "main", "summarise", "write"]

ORDER = (
    "nginx-direct",
    "grpc-direct",
    "nginx-proxy",
    "nginx-proxy-tls",
    "nginx-grpc",
    "fast-pipe",
    "aiohttp-pipe",
    "gateway",
    "gateway-trace-off",
    "gateway-trace-1pct",
    "gateway-trace-all",
    "gateway-tls",
    "gateway-grpc",
    "naive",
    "gateway-1w",
    "gateway-2w",
)
REFERENCES = (
    ("nginx-proxy", "x nginx-proxy"),
    ("nginx-proxy-tls", "x nginx-proxy (TLS)"),
    ("fast-pipe", "x fast pipe"),
    ("aiohttp-pipe", "x aiohttp pipe"),
    ("naive", "x naive"),
)
METRICS = (
    "rps",
    "mib_s",
    "p50_ms",
    "p75_ms",
    "p90_ms",
    "p99_ms",
    "p999_ms",
    "mean_ms",
    "max_ms",
    "cpu_pct",
    "host_busy_pct",
)
PERCENTILES = (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))
# The TLS side-by-side table: (scenario, nginx's system, the gateway's, what it measures).
TLS_LINES = (
    ("simple", "nginx-proxy", "gateway", "cleartext HTTP/1.1, keep-alive (wrk)"),
    ("tls-keepalive", "nginx-proxy-tls", "gateway-tls", "HTTP/1.1 over TLS, keep-alive (wrk)"),
    ("h2", "nginx-proxy-tls", "gateway-tls", "HTTP/2 over TLS (h2load)"),
    ("tls-handshake", "nginx-proxy-tls", "gateway-tls", "new TLS connections, 1 request each"),
)
TLS_KEYS = ("tls-keepalive", "h2", "tls-handshake")
# The tracing scenario's gateways, untraced first, with their sample ratios.
TRACING = (
    ("gateway-trace-off", "off", None),
    ("gateway-trace-1pct", "1% sampled", 0.01),
    ("gateway-trace-all", "100% sampled", 1.0),
)
# `make instructions` for a simple GET on the tree just before tracing landed (issue 20):
# tracing off must stay within 1% of it.
PRE_TRACING_KILO_INSTRUCTIONS = 445.9
COLORS = {
    "nginx-direct": "#9e9e9e",
    "nginx-proxy": "#2e7d32",
    "fast-pipe": "#1565c0",
    "aiohttp-pipe": "#6a1b9a",
    "gateway": "#d84315",
    "gateway-tls": "#ff8a65",
    "gateway-trace-off": "#bf360c",
    "gateway-trace-1pct": "#f4511e",
    "gateway-trace-all": "#ffab91",
    "nginx-proxy-tls": "#81c784",
    "grpc-direct": "#bdbdbd",
    "nginx-grpc": "#1b5e20",
    "gateway-grpc": "#e64a19",
    "naive": "#795548",
    "gateway-1w": "#ef6c00",
    "gateway-2w": "#c62828",
}


def _order(name: str) -> tuple[float, str]:
    """Display order; gateway variants (gateway-httpx, ...) sit right after the gateway."""
    return (ORDER.index(name) if name in ORDER else ORDER.index("gateway") + 0.5, name)


# --- numbers --------------------------------------------------------------------------


def summarise(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (scenario, system, connections): medians over the rounds that
    produced figures, errors summed over all rounds."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for run in data["runs"]:
        groups.setdefault((run["scenario"], run["system"], run["connections"]), []).append(run)
    rows = []
    for (scenario, system, connections), runs in groups.items():
        good = [r for r in runs if not r.get("failure")]
        row: dict[str, Any] = {
            "scenario": scenario,
            "system": system,
            "connections": connections,
            "rounds": len(good),
        }
        if not good:
            row["failure"] = runs[-1].get("failure") or "no figures"
            rows.append(row)
            continue
        for metric in METRICS:
            values = [r[metric] for r in good if r.get(metric) is not None]
            row[metric] = statistics.median(values) if values else None
        row["rps_min"] = min(r["rps"] for r in good)
        row["rps_max"] = max(r["rps"] for r in good)
        row["requests"] = sum(r["requests"] for r in good)
        row["non_2xx"] = sum(r["non_2xx"] for r in good)
        row["socket_errors"] = sum(r["socket_errors"] for r in good)
        row["rss_before_kib"] = min(r["rss_before_kib"] for r in good)
        row["rss_peak_kib"] = max(r["rss_peak_kib"] for r in good)
        row["cpu_split"] = good[-1].get("cpu_split") or []
        if any("tls" in r for r in good):
            row["tls"] = good[-1].get("tls") or ""
        if any("resumed" in r for r in good):
            row["resumed"] = sum(r.get("resumed") or 0 for r in good)
        counted = [r for r in good if r.get("spans") is not None]
        if counted:
            # Spans the collector received in these runs, over the requests they served.
            row["spans"] = sum(r["spans"] for r in counted)
            served = sum(r["requests"] for r in counted)
            row["spans_per_request"] = row["spans"] / served if served else None
            row["spans_dropped"] = sum(r.get("spans_dropped") or 0 for r in counted)
        if len(good) < len(runs):
            row["failed_rounds"] = len(runs) - len(good)
        rows.append(row)
    rows.sort(key=lambda r: (r["scenario"], r["connections"], _order(r["system"])))
    return rows


class Table:
    """Summary rows indexed for lookups: (scenario, connections) -> system -> row."""

    def __init__(self, data: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        self.data = data
        self.rows = rows
        self.base = data["meta"]["connections"]
        self.index: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
        for row in rows:
            self.index.setdefault((row["scenario"], row["connections"]), {})[row["system"]] = row

    def at(self, scenario: str, connections: int) -> dict[str, dict[str, Any]]:
        found = dict(self.index.get((scenario, connections), {}))
        if scenario == "sweep" and connections == self.base:
            members = set(self.sweep_systems())
            for name, row in self.index.get(("simple", connections), {}).items():
                if name in members:
                    found.setdefault(name, row)
        return found

    def get(self, scenario: str, system: str, connections: int | None = None) -> dict[str, Any]:
        row = self.at(scenario, connections or self.base).get(system)
        return row if row and not row.get("failure") else {}

    def why(self, scenario: str, system: str) -> str:
        """Why `system` has no figures in `scenario` (its failure, or that it did not run)."""
        row = self.at(scenario, self.base).get(system)
        if row and row.get("failure"):
            return str(row["failure"])
        return "not run" if not row else ""

    def sweep_points(self) -> list[int]:
        points = {c for (s, c) in self.index if s == "sweep"}
        if points and ("simple", self.base) in self.index:
            points.add(self.base)
        return sorted(points)

    def cpus(self) -> int | None:
        cpus = (self.data.get("meta", {}).get("machine") or {}).get("cpus")
        return int(cpus) if cpus else None

    def sweep_systems(self) -> list[str]:
        spec = self.data["scenarios"].get("sweep")
        return list(spec["systems"]) if spec else []


def ratio(row: dict[str, Any], ref: dict[str, Any], key: str = "rps") -> float | None:
    if not row or not ref or not ref.get(key) or row.get(key) is None:
        return None
    return float(row[key]) / float(ref[key])


def _goal(
    name: str, measured: str, target: str, ok: bool | None, verdict: str | None = None
) -> dict[str, Any]:
    if verdict is None:
        verdict = "not measured" if ok is None else ("met" if ok else "NOT MET")
    return {"goal": name, "measured": measured, "target": target, "verdict": verdict}


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def workers_ceiling(
    w1: dict[str, Any], w2: dict[str, Any], cpus: int | None
) -> dict[str, Any] | None:
    """The best `--workers 2 / 1` this machine allows, from the CPU the runs used: with
    every CPU busy, two workers serve `cpus / (gateway + rest)` requests per second, where
    `rest` is what everything else on the machine (wrk, the upstream) spent per request.
    """
    needed = ("rps", "cpu_pct", "host_busy_pct")
    if not cpus or not w1 or not w2 or any(not row.get(k) for row in (w1, w2) for k in needed):
        return None
    gateway = w2["cpu_pct"] / 100 / w2["rps"]
    rest = max(w2["host_busy_pct"] - w2["cpu_pct"], 0) / 100 / w2["rps"]
    return {
        "cpus": cpus,
        "gateway_us": gateway * 1e6,
        "rest_us": rest * 1e6,
        "busy_pct": w2["host_busy_pct"] / cpus,
        "ceiling": cpus / (gateway + rest) / w1["rps"],
    }


def _errors(row: dict[str, Any]) -> str:
    errors = row["non_2xx"] + row["socket_errors"] if row else 0
    return f", {errors:,} errors" if errors else ""


def _versus(
    table: Table, scenario: str, system: str, base: str, base_system: str, limit: float
) -> tuple[str, bool | None]:
    """`system`'s req/s in `scenario` over `base_system`'s in `base`: (what to show,
    whether it reaches `limit`), or "n/a" and the reason."""
    row, ref = table.get(scenario, system), table.get(base, base_system)
    r = ratio(row, ref)
    if r is None:
        why = table.why(scenario, system) if not row else table.why(base, base_system)
        return f"n/a: {why or 'no figures'}"[:160], None
    text = f"{r:.2f}x ({row['rps']:,.0f} vs {ref['rps']:,.0f} req/s{_errors(row)}"
    cost, base_cost = _cpu_per_request(row), _cpu_per_request(ref)
    if cost and base_cost:
        # What the rate would be with the CPU all its own: steadier on a shared machine.
        text += f"; by CPU per request {base_cost / cost:.2f}x"
    return text + ")", r >= limit


def tls_goals(table: Table) -> list[dict[str, Any]]:
    """TLS and HTTP/2, judged on the gateway against its own cleartext HTTP/1.1 in this
    run, with nginx's same ratios beside them."""
    if not any(key in table.data["scenarios"] for key in TLS_KEYS):
        return []
    goals = []
    for key, label, limit in (
        ("tls-keepalive", "HTTP/1.1 over TLS (keep-alive)", 0.75),
        ("h2", "HTTP/2 over TLS", 0.5),
    ):
        if key not in table.data["scenarios"]:
            continue
        measured, ok = _versus(table, key, "gateway-tls", "simple", "gateway", limit)
        nginx = _x(ratio(table.get(key, "nginx-proxy-tls"), table.get("simple", "nginx-proxy")))
        goals.append(
            _goal(
                f"{label} vs the gateway's cleartext HTTP/1.1",
                f"{measured}; nginx: {nginx}",
                f">= {limit}x",
                ok,
            )
        )
    if "h2" in table.data["scenarios"]:
        # HTTP/1.1 over TLS is the like-for-like latency (same handshake, same
        # connections); the cleartext run stands in when the TLS one is missing.
        base = "tls-keepalive" if table.get("tls-keepalive", "gateway-tls") else "simple"
        streams = int(table.data["meta"].get("h2_streams") or 1)
        base_label = "HTTP/1.1 over TLS" if base == "tls-keepalive" else "cleartext HTTP/1.1"

        def p99s(system: str, base_system: str) -> tuple[str, float | None]:
            h2, h1 = table.get("h2", system), table.get(base, base_system)
            if not h2.get("p99_ms") or not h1.get("p99_ms"):
                why = table.why("h2", system) if not h2 else table.why(base, base_system)
                return f"n/a: {why or 'no latencies'}"[:160], None
            r = h2["p99_ms"] / h1["p99_ms"]
            # Little's law: h2 keeps `streams` times the requests in flight, so at the
            # same throughput its latency is that many times HTTP/1.1's.
            little = streams * h1["rps"] / h2["rps"] if h2.get("rps") else None
            hint = f"; in flight / throughput predict {little:.1f}x" if little else ""
            return f"{_ms(h2['p99_ms'])} vs {_ms(h1['p99_ms'])} ({r:.2f}x{hint})", r

        measured, r = p99s("gateway-tls", "gateway-tls" if base != "simple" else "gateway")
        nginx, _ = p99s("nginx-proxy-tls", "nginx-proxy-tls" if base != "simple" else "nginx-proxy")
        goals.append(
            _goal(
                f"HTTP/2 p99 vs {base_label}'s",
                f"{measured}; nginx: {nginx}",
                "<= 2x",
                None if r is None else r <= 2,
            )
        )
    if "tls-handshake" in table.data["scenarios"]:
        gw, ngx = (
            table.get("tls-handshake", "gateway-tls"),
            table.get("tls-handshake", "nginx-proxy-tls"),
        )
        parts = []
        for name, row, system in (
            ("gateway", gw, "gateway-tls"),
            ("nginx", ngx, "nginx-proxy-tls"),
        ):
            if row:
                per = _cpu_per_request(row)
                cpu = (
                    f" ({row['cpu_pct']:.0f}% CPU, {per:,.0f} us per connection)"
                    if per is not None
                    else ""
                )
                parts.append(f"{name} {row['rps']:,.0f}/s{cpu}{_errors(row)}")
            else:
                parts.append(f"{name} n/a: {table.why('tls-handshake', system)}"[:120])
        r = ratio(gw, ngx)
        goals.append(
            _goal(
                "new TLS connections per second (full handshakes)",
                "; ".join(parts) + (f"; gateway {r:.2f}x nginx" if r is not None else ""),
                "(no goal: reported)",
                None,
                verdict="-",
            )
        )
    return goals


# The grpc scenario: (system, label); each with its plain h2c POST of the same bytes.
GRPC_LINES = (
    ("grpc-direct", "gRPC upstream, direct (no proxy)"),
    ("nginx-grpc", "nginx grpc_pass"),
    ("gateway-grpc", "gateway"),
)


def grpc_rows(table: Table) -> tuple[list[str], list[list[str]], list[str]]:
    """Unary gRPC beside a plain POST of the same bytes, both h2c, per system:
    (header, rows, why each n/a is one)."""
    header = [
        "system",
        "gRPC req/s",
        "gRPC p50",
        "gRPC p99",
        "gRPC CPU",
        "plain POST req/s",
        "plain POST p99",
        "gRPC x plain POST",
        "gRPC x nginx",
    ]
    rows, notes = [], []
    nginx = table.get("grpc", "nginx-grpc")
    for system, label in GRPC_LINES:
        at = table.at("grpc", table.base).get(system)
        if at is None:
            continue
        row, post = table.get("grpc", system), table.get("grpc-post", system)
        cells = [label]
        if row:
            per = _cpu_per_request(row)
            cells += [
                _num(row["rps"]) + ("*" if _errors(row) else ""),
                _ms(row.get("p50_ms")),
                _ms(row.get("p99_ms")),
                _cpu(row) + (f", {per:,.0f} us each" if per else ""),
            ]
            if _errors(row):
                notes.append(f"{label}, gRPC: {_errors(row)[2:]} (* above)")
        else:
            cells += ["n/a", "-", "-", "-"]
            notes.append(f"{label}, gRPC: {table.why('grpc', system) or 'no figures'}")
        if system == "grpc-direct":
            cells += ["-", "-", "-"]
        elif post:
            cells += [_num(post["rps"]), _ms(post.get("p99_ms")), _x(ratio(row, post))]
        else:
            cells += ["n/a", "-", "-"]
            notes.append(f"{label}, plain POST: {table.why('grpc-post', system) or 'no figures'}")
        cells.append("-" if system == "nginx-grpc" else _x(ratio(row, nginx)))
        rows.append(cells)
    return header, rows, notes


def grpc_goals(table: Table) -> list[dict[str, Any]]:
    """Issue 21: unary gRPC through the gateway against the gateway's own HTTP/2 rate
    for a plain POST of the same bytes (both h2c, this run), nginx's grpc_pass beside."""
    if "grpc" not in table.data["scenarios"]:
        return []
    measured, ok = _versus(table, "grpc", "gateway-grpc", "grpc-post", "gateway-grpc", 0.5)
    nginx = _x(ratio(table.get("grpc", "nginx-grpc"), table.get("grpc-post", "nginx-grpc")))
    goals = [
        _goal(
            "unary gRPC vs the gateway's HTTP/2 plain POST (same bytes, h2c)",
            f"{measured}; nginx grpc_pass: {nginx}",
            ">= 0.5x",
            ok,
        )
    ]
    parts = []
    for system, label in GRPC_LINES:
        row = table.get("grpc", system)
        if row:
            parts.append(f"{label} {row['rps']:,.0f} req/s, p99 {_ms(row.get('p99_ms'))}")
        else:
            parts.append(f"{label} n/a: {table.why('grpc', system) or 'no figures'}"[:120])
    r = ratio(table.get("grpc", "gateway-grpc"), table.get("grpc", "nginx-grpc"))
    goals.append(
        _goal(
            "unary gRPC req/s and p99",
            "; ".join(parts) + (f"; gateway {r:.2f}x nginx" if r is not None else ""),
            "(no goal: reported)",
            None,
            verdict="-",
        )
    )
    return goals


def per_round_ratios(table: Table, scenario: str, system: str, base: str) -> list[float]:
    """`system`'s req/s over `base`'s in each round where both ran (at the bench's
    connection count), in round order: the pairs a run's interleaving makes."""
    by_round: dict[int, dict[str, float]] = {}
    for run in table.data["runs"]:
        if (
            run.get("scenario") == scenario
            and run.get("connections") == table.base
            and not run.get("failure")
            and run.get("rps")
        ):
            by_round.setdefault(run["round"], {})[run["system"]] = float(run["rps"])
    return [
        got[system] / got[base]
        for _, got in sorted(by_round.items())
        if system in got and base in got
    ]


def _spread(ratios: list[float]) -> tuple[float, float, float] | None:
    """Median, lowest and highest of per-round ratios (None under two rounds)."""
    if len(ratios) < 2:
        return None
    return statistics.median(ratios), min(ratios), max(ratios)


def _rounds_text(ratios: list[float]) -> str:
    """'median 0.95x, 0.91x-1.02x over 6 rounds' (empty under two rounds)."""
    spread = _spread(ratios)
    if spread is None:
        return ""
    median, low, high = spread
    return f"median {median:.2f}x, {low:.2f}x-{high:.2f}x over {len(ratios)} rounds"


def tracing_costs(table: Table) -> dict[str, dict[str, Any]]:
    """Per tracing variant: its row, CPU per request, ratios to tracing off (req/s, by
    CPU per request, and per round: each round's run over off's in that round), and the
    extra CPU per request over off per span exported."""
    off = table.get("tracing", "gateway-trace-off")
    off_cost = _cpu_per_request(off)
    out = {}
    for name, label, sample in TRACING:
        row = table.get("tracing", name)
        cost = _cpu_per_request(row)
        entry: dict[str, Any] = {"label": label, "sample_ratio": sample, "row": row}
        entry["cpu_us"] = cost
        entry["x_off"] = ratio(row, off)
        entry["x_off_rounds"] = per_round_ratios(table, "tracing", name, "gateway-trace-off")
        entry["x_off_cpu"] = off_cost / cost if cost and off_cost else None
        per_request = row.get("spans_per_request") if row else None
        entry["extra_us"] = cost - off_cost if cost and off_cost else None
        entry["us_per_span"] = (
            entry["extra_us"] / per_request if entry["extra_us"] and per_request else None
        )
        out[name] = entry
    return out


def tracing_goals(table: Table) -> list[dict[str, Any]]:
    """Issue 20: tracing off costs nothing measurable (instructions per request against
    the tree before tracing), 1% sampling within 5% of off in req/s, and what 100%
    sampling costs per span."""
    if "tracing" not in table.data["scenarios"]:
        return []
    goals = []
    counts = (table.data.get("tracing") or {}).get("instructions") or {}
    off = counts.get("gateway-trace-off") or {}
    baseline = counts.get("baseline") or {}
    before = baseline.get("kilo_per_request") or PRE_TRACING_KILO_INSTRUCTIONS
    against = (
        f"{baseline['checkout']}, counted in this run"
        if baseline.get("kilo_per_request")
        else "issue 20's figure for the tree before tracing; commits since move this tree's"
    )
    if off.get("kilo_per_request"):
        k = off["kilo_per_request"]
        change = k / before - 1
        goals.append(
            _goal(
                "tracing off: instructions per simple GET vs before tracing",
                f"{k:.1f}k vs {before:.1f}k ({change:+.1%}; {against})",
                "within 1%",
                abs(change) <= 0.01,
            )
        )
    else:
        why = off.get("failure") or "BENCH_TRACING_INSTRUCTIONS=1 (or make instructions)"
        goals.append(
            _goal(
                "tracing off: instructions per simple GET vs before tracing",
                f"not counted in this run: {why}"[:160],
                f"within 1% of {before:.1f}k",
                None,
            )
        )
    measured, ok = _versus(
        table, "tracing", "gateway-trace-1pct", "tracing", "gateway-trace-off", 0.95
    )
    off_row = table.get("tracing", "gateway-trace-off")
    if off_row.get("cpu_pct") is not None and off_row["cpu_pct"] < 90:
        # Not CPU-bound (a shared CPU, or the client side was the limit): req/s then
        # hides part of the cost, which CPU per request still shows.
        measured += (
            f"; off used {off_row['cpu_pct']:.0f}% of its CPU: read the ratio by CPU per request"
        )
    costs = tracing_costs(table)
    rounds = _rounds_text(costs["gateway-trace-1pct"]["x_off_rounds"])
    if rounds and not measured.startswith("n/a"):
        # Each round's pair ran minutes apart at most: how far the ratio moves with the
        # machine, beside the ratio of the medians the verdict reads.
        measured += f"; per round {rounds}"
    goals.append(_goal("tracing 1% sampled vs off, req/s", measured, ">= 0.95x", ok))
    full = costs["gateway-trace-all"]
    row = full["row"]
    if row:
        parts = [f"{row['rps']:,.0f} req/s, {_x(full['x_off'])} off"]
        if full["x_off_cpu"] is not None:
            parts[0] += f" (by CPU per request {_x(full['x_off_cpu'])})"
        if full["extra_us"] is not None:
            parts.append(f"+{full['extra_us']:.0f} us CPU per request over off")
        if row.get("spans_per_request") is not None:
            parts.append(f"{row['spans_per_request']:.2f} spans per request exported")
        if full["us_per_span"] is not None:
            parts.append(f"= {full['us_per_span']:.0f} us per span")
        if row.get("spans_dropped"):
            parts.append(f"{row['spans_dropped']:,} spans dropped")
        measured = "; ".join(parts)
    else:
        measured = f"n/a: {table.why('tracing', 'gateway-trace-all') or 'no figures'}"[:160]
    goals.append(
        _goal("tracing 100% sampled: cost per span", measured, "(reported)", None, verdict="-")
    )
    return goals


def evaluate_goals(table: Table) -> list[dict[str, Any]]:
    """The goals of issue 13, each judged on figures from this one run."""
    goals = []
    c = table.base
    gw = table.get("simple", "gateway")
    ngx = table.get("simple", "nginx-proxy")
    fast = table.get("simple", "fast-pipe")

    r = ratio(gw, ngx)
    goals.append(
        _goal("simple GET vs nginx-proxy", _x(r), ">= 0.15x", None if r is None else r >= 0.15)
    )
    r = ratio(gw, fast)
    goals.append(
        _goal("simple GET vs the fast pipe", _x(r), ">= 0.5x", None if r is None else r >= 0.5)
    )
    if gw.get("p99_ms") is not None:
        limit = max(20.0, 2 * fast["p99_ms"]) if fast.get("p99_ms") else 20.0
        goals.append(
            _goal(
                "simple GET p99",
                _ms(gw["p99_ms"]),
                f"<= {_ms(limit)} (20 ms or 2x the fast pipe's)",
                gw["p99_ms"] <= limit,
            )
        )
        errors = gw["non_2xx"] + gw["socket_errors"]
        goals.append(
            _goal(
                "simple GET errors",
                f"{gw['non_2xx']} non-2xx, {gw['socket_errors']} socket",
                "zero",
                errors == 0,
            )
        )
    else:
        goals.append(_goal("simple GET p99 and errors", "-", "", None))

    fan = table.get("fanout", "gateway")
    naive_fan = table.get("fanout", "naive")
    r = ratio(fan, naive_fan)
    goals.append(_goal("fan-out vs naive gather", _x(r), ">= 5x", None if r is None else r >= 5))
    r = ratio(fan, gw)
    goals.append(
        _goal(
            "fan-out vs the gateway's simple GET", _x(r), ">= 0.4x", None if r is None else r >= 0.4
        )
    )

    for key, label in (("stream", "1 MiB streamed response"), ("upload", "1 MiB POST body")):
        row = table.get(key, "gateway")
        ref = table.get(key, "nginx-proxy")
        r = ratio(row, ref, "mib_s")
        measured = (
            "-" if r is None else f"{row['mib_s']:.0f} vs {ref['mib_s']:.0f} MiB/s ({r:.2f}x)"
        )
        goals.append(
            _goal(
                f"{label} bytes/s",
                measured,
                ">= 1/3 of nginx-proxy",
                None if r is None else r >= 1 / 3,
            )
        )
        if row:
            growth = (row["rss_peak_kib"] - row["rss_before_kib"]) / 1024
            goals.append(
                _goal(
                    f"{label}: flat memory",
                    f"RSS +{growth:.1f} MiB at peak",
                    f"< {c / 2:.0f} MiB: half the {c} x 1 MiB in flight (streamed, not buffered)",
                    growth < c / 2,
                )
            )

    points = table.sweep_points()
    series = [(n, table.get("sweep", "gateway", n)) for n in points]
    series = [(n, row) for n, row in series if row]
    if len(series) >= 2:
        best = 0.0
        worst_drop = 1.0
        for n, row in series:
            if n >= 16 and best:
                worst_drop = min(worst_drop, row["rps"] / best)
            best = max(best, row["rps"])
        goals.append(
            _goal(
                "sweep: throughput does not fall",
                f"lowest point {worst_drop:.2f}x the best below it",
                ">= 0.9x (10% noise allowed)",
                worst_drop >= 0.9,
            )
        )
        worst_growth = 0.0
        for (n1, a), (n2, b) in itertools.pairwise(series):
            if a.get("p99_ms") and b.get("p99_ms") and a["rps"] and b["rps"]:
                little = (n2 / b["rps"]) / (n1 / a["rps"])
                worst_growth = max(worst_growth, (b["p99_ms"] / a["p99_ms"]) / little)
        goals.append(
            _goal(
                "sweep: p99 grows no faster than connections / throughput",
                f"worst step {worst_growth:.2f}x of connections/throughput growth",
                "<= 1.25x",
                worst_growth <= 1.25,
            )
        )
    else:
        goals.append(_goal("sweep", "-", "", None))

    w1 = table.get("workers", "gateway-1w")
    w2 = table.get("workers", "gateway-2w")
    r = ratio(w2, w1)
    goals.append(_goal("--workers 2 vs 1", _x(r), ">= 1.6x", None if r is None else r >= 1.6))
    bound = workers_ceiling(w1, w2, table.cpus())
    if bound is not None:
        goals.append(
            _goal(
                "--workers 2 vs 1: what this rig allows",
                f"{bound['ceiling']:.2f}x at most (gateway {bound['gateway_us']:.0f} us, "
                f"wrk + upstream {bound['rest_us']:.0f} us per request; machine "
                f"{bound['busy_pct']:.0f}% busy with 2 workers)",
                "(the ceiling the goal above is judged against)",
                None,
                verdict="-",
            )
        )

    goals += tls_goals(table)
    goals += grpc_goals(table)
    goals += tracing_goals(table)

    mem = table.data.get("memory") or {}
    if mem.get("rss_per_connection_kib") is not None:
        goals.append(
            _goal(
                "idle connections held",
                f"{mem['held_open']:,} of {mem['wanted']:,} ({mem['held']:,} after a request each)",
                "all of them",
                mem["held_open"] >= 0.99 * mem["wanted"],
            )
        )
        per = mem["rss_per_connection_kib"]
        goals.append(
            _goal(
                "RSS per idle connection (after one request each)",
                f"{per:.1f} KiB (opened, before any request: "
                f"{_num(mem.get('rss_per_open_connection_kib'), '.1f')} KiB)",
                "< 25 KiB",
                per < 25,
            )
        )
        grown = max(mem["rss_held_kib"] - mem["rss_start_kib"], 1)
        retained = mem["rss_retained_kib"]
        goals.append(
            _goal(
                "RSS after they close",
                f"+{retained / 1024:.1f} MiB over the start ({retained / grown:.0%} of the growth)",
                "near the start: <= 25% of the growth kept",
                retained <= 0.25 * grown,
            )
        )
    else:
        goals.append(_goal("idle connections", mem.get("failure", "-"), "", None))
    return goals


# --- text ------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    return f"{value:.2f} ms" if value < 100 else f"{value:.0f} ms"


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def _label(data: dict[str, Any], name: str) -> str:
    return data["systems"].get(name, {}).get("label", name)


def _md_table(header: list[str], rows: Iterable[list[str]], right_from: int = 1) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append(
        "|" + "|".join("---" if i < right_from else "---:" for i in range(len(header))) + "|"
    )
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _text_table(header: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(
            cell.rjust(widths[i]) if i >= right_from else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def _cpus(data: dict[str, Any]) -> int:
    return int(data["meta"].get("machine", {}).get("cpus") or 1)


def _cpu(row: dict[str, Any]) -> str:
    """The system's CPU use in % of one CPU; split per process when it has several."""
    cpu = row.get("cpu_pct")
    if cpu is None:
        return "-"
    split = row.get("cpu_split") or []
    parts = f" ({' + '.join(f'{v:.0f}' for v in split)})" if len(split) > 1 else ""
    return f"{cpu:.0f}%{parts}"


def scenario_rows(
    table: Table,
    scenario: str,
    connections: int,
    *,
    bytes_col: bool = False,
    rss: bool = False,
    host: bool = False,
) -> tuple[list[str], list[list[str]]]:
    data = table.data
    header = ["system", "req/s"]
    if data["meta"]["rounds"] > 1:
        header.append("req/s range")
    if bytes_col:
        header.append("MiB/s")
    header += ["p50", "p90", "p99", "p99.9", "non-2xx", "socket errors", "CPU"]
    if host:
        header.append("machine CPU")
    if rss:
        header.append("RSS before -> peak")
    found = table.at(scenario, connections)
    present_refs = [(ref, title) for ref, title in REFERENCES if ref in found]
    header += [title for _, title in present_refs]
    rows = []
    for name in sorted(found, key=_order):
        row = found[name]
        label = f"{_label(data, name)}"
        if row.get("failure"):
            rows.append([label, f"FAILED: {row['failure'][:120]}"] + [""] * (len(header) - 2))
            continue
        key = "mib_s" if bytes_col else "rps"
        cells = [label, _num(row["rps"])]
        if data["meta"]["rounds"] > 1:
            cells.append(f"{row['rps_min']:,.0f}-{row['rps_max']:,.0f}")
        if bytes_col:
            cells.append(_num(row.get("mib_s")))
        cells += [_ms(row.get(k)) for k, _ in PERCENTILES]
        cells += [str(row["non_2xx"]), str(row["socket_errors"]), _cpu(row)]
        if host:
            busy = row.get("host_busy_pct")
            cells.append("-" if busy is None else f"{busy:.0f}% of {100 * _cpus(data)}%")
        if rss:
            cells.append(
                f"{row['rss_before_kib'] / 1024:.0f} -> {row['rss_peak_kib'] / 1024:.0f} MiB"
            )
        for ref, _ in present_refs:
            cells.append(_x(ratio(row, found[ref] if not found[ref].get("failure") else {}, key)))
        rows.append(cells)
    return header, rows


def tls_rows(table: Table) -> tuple[list[str], list[list[str]], list[str]]:
    """nginx and the gateway side by side, cleartext, TLS keep-alive, HTTP/2 and new
    connections: (header, rows, why each n/a is one)."""
    header = [
        "load",
        "nginx req/s",
        "nginx p99",
        "nginx CPU",
        "gateway req/s",
        "gateway p99",
        "gateway CPU",
        "gateway x nginx",
        "gateway x its cleartext",
        "nginx x its cleartext",
    ]
    rows, notes = [], []
    scenarios = table.data["scenarios"]
    clear = {"nginx": table.get("simple", "nginx-proxy"), "gateway": table.get("simple", "gateway")}
    for key, nginx, gateway, label in TLS_LINES:
        if key not in scenarios:
            continue
        if key == "h2":
            label = label.replace("(h2load)", f"(h2load, {_streams(table)} streams each)")
        cells = [label]
        found = {}
        for who, system in (("nginx", nginx), ("gateway", gateway)):
            row = table.get(key, system)
            found[who] = row
            if not row:
                cells += ["n/a", "-", "-"]
                notes.append(f"{who}, {label}: {table.why(key, system) or 'no figures'}")
                continue
            cells += [_num(row["rps"]) + ("*" if _errors(row) else ""), _ms(row.get("p99_ms"))]
            per = _cpu_per_request(row)
            cells.append(_cpu(row) + (f", {per:,.0f} us each" if per and key != "simple" else ""))
            if _errors(row):
                notes.append(f"{who}, {label}: {_errors(row)[2:]} (* above)")
        cells.append(_x(ratio(found["gateway"], found["nginx"])))
        if key == "tls-handshake":
            cells += ["-", "-"]  # connections per second, not requests: no like to compare
        else:
            cells += [_x(ratio(found[who], clear[who])) for who in ("gateway", "nginx")]
        rows.append(cells)
    return header, rows, notes


def tracing_rows(table: Table) -> tuple[list[str], list[list[str]]]:
    """The three tracing variants side by side: rate, latency, CPU, spans, cost."""
    multi = table.data["meta"]["rounds"] > 1
    header = ["tracing", "req/s", *(["req/s range"] if multi else [])]
    header += ["p50", "p99", "errors", "CPU", "CPU per request", "x off", "x off by CPU"]
    if multi:
        header.append("x off per round")
    header += ["spans/s exported", "spans per request", "dropped", "extra CPU per request"]
    header.append("extra CPU per span")
    rows = []
    for name, entry in tracing_costs(table).items():
        row = entry["row"]
        if not row:
            why = table.why("tracing", name) or "no figures"
            rows.append([entry["label"], f"n/a: {why[:100]}"] + [""] * (len(header) - 2))
            continue
        per = row.get("spans_per_request")
        cells = [entry["label"], _num(row["rps"])]
        if multi:
            cells.append(f"{row['rps_min']:,.0f}-{row['rps_max']:,.0f}")
        cells += [_ms(row.get("p50_ms")), _ms(row.get("p99_ms"))]
        cells += [str(row["non_2xx"] + row["socket_errors"]), _cpu(row)]
        cells.append("-" if entry["cpu_us"] is None else f"{entry['cpu_us']:.0f} us")
        cells += [_x(entry["x_off"]), _x(entry["x_off_cpu"])]
        if multi:
            spread = _spread(entry["x_off_rounds"])
            cells.append(
                "-"
                if name == "gateway-trace-off" or spread is None
                else "{:.2f}x ({:.2f}-{:.2f}x)".format(*spread)
            )
        cells.append("-" if per is None else _num(per * row["rps"]))
        cells.append("-" if per is None else f"{per:.3f}")
        cells.append("-" if per is None else f"{row.get('spans_dropped', 0):,}")
        extra = entry["extra_us"]
        cells.append("-" if extra is None or name == "gateway-trace-off" else f"{extra:+.0f} us")
        # Per span only where spans are what the extra is made of: at 1% most of it is
        # the unsampled requests' ids and headers, which no span carries.
        per_span = entry["us_per_span"] if entry["sample_ratio"] == 1.0 else None
        cells.append("-" if per_span is None else f"{per_span:.0f} us")
        rows.append(cells)
    return header, rows


def tracing_section(data: dict[str, Any], table: Table) -> list[str]:
    """## Tracing: the variants, instruction counts, and where the time goes (py-spy)."""
    c = data["meta"]["connections"]
    extra = data.get("tracing") or {}
    lines = [f"## {data['scenarios']['tracing']['title']}", ""]
    lines += [
        "The `simple` request (`GET /hello`) on three gateways with the same config "
        "(`gateway.yaml`), interleaved in every round: no `tracing:` block, and one with "
        "`sample_ratio: 0.01` and `1.0` (`gateway-trace-all.yaml`), each exporting over "
        "OTLP/HTTP to `load/collector.py` (on the client CPU, with wrk and the upstream), "
        "which counts the spans it receives. Spans are counted per run once the export "
        "has settled; CPU per request is the gateway's process (event loop and export "
        "thread); extra CPU per span is (CPU per request - off's) / spans per request. "
        "`x off by CPU` is off's CPU per request over this one's: the steadier ratio on "
        "a shared machine. `x off per round` is each round's req/s over off's in the same "
        "round (its median and range): the pairs the interleaving makes, and how far "
        "the ratio moves from one round to the next.",
        "",
    ]
    if data["meta"].get("tracing_restart"):
        lines += [
            "Each tracing gateway is a new process in every round (`BENCH_TRACING_RESTART`): "
            "two processes of one gateway and config differ by a few percent for as long as "
            "they live, so the medians are over processes, not one process's luck.",
            "",
        ]
    lines += _md_table(*tracing_rows(table))
    same = table.get("simple", "gateway")
    off = table.get("tracing", "gateway-trace-off")
    if same and off:
        # The same config in another process, measured at another moment of the run: how
        # far two untraced gateways differ here, the noise the ratios above sit in.
        r, by_cpu = ratio(off, same), _cpu_per_request(same)
        cost = _cpu_per_request(off)
        lines += [
            f"For scale, the `simple` scenario's gateway (the same config, another process, "
            f"measured earlier in each round): {same['rps']:,.0f} req/s, "
            f"{_num(by_cpu, '.0f')} us CPU per request; tracing off here is {_x(r)} of it"
            + (f" ({by_cpu / cost:.2f}x by CPU per request)." if by_cpu and cost else ".")
            + " That is the spread between two untraced gateways in this run.",
            "",
        ]
    counts = extra.get("instructions") or {}
    if counts:
        lines += ["### Instructions per request (`load/instructions.py`, callgrind)", ""]
        base = (counts.get("gateway-trace-off") or {}).get("kilo_per_request")
        rows = []
        for name, label, _ in TRACING:
            got = counts.get(name) or {}
            k = got.get("kilo_per_request")
            if k is None:
                rows.append([label, f"n/a: {str(got.get('failure', 'not run'))[:100]}", "", ""])
                continue
            spans = got.get("spans")
            per = f"{spans / got['requests']:.3f}" if spans is not None else "-"
            rows.append([label, f"{k:,.1f}k", _x(k / base) if base else "-", per])
        baseline = counts.get("baseline") or {}
        if baseline.get("kilo_per_request"):
            k = baseline["kilo_per_request"]
            rows.append([f"`{baseline['checkout']}`, untraced", f"{k:,.1f}k", "", "-"])
        before = PRE_TRACING_KILO_INSTRUCTIONS
        rows.append(["before tracing existed (issue 20's figure)", f"{before:.1f}k", "", ""])
        lines += _md_table(["tracing", "instructions", "x off", "spans per request"], rows)
    profiles = extra.get("profiles") or {}
    full = profiles.get("gateway-trace-all") or {}
    if full:
        lines += ["### Where the time goes (py-spy)", ""]
    if full.get("failure"):
        lines += [f"py-spy failed on the 100% sampled gateway: {full['failure']}", ""]
    elif full:
        costs = tracing_costs(table)
        under = ", ".join(
            f"{label} {_num((profiles.get(name) or {}).get('rps_under_pyspy'))}"
            for name, label, _ in TRACING
            if profiles.get(name)
        )
        lines += [
            f"`py-spy record {full.get('flags', '--threads')} --rate {full['rate']}` for "
            f"{full['seconds']} s "
            f"on each gateway in turn under `wrk -c{c}` (req/s under py-spy: {under}; "
            "sampling slows the process). `--gil` samples the thread holding the "
            "interpreter's lock, so a thread waiting (the export thread between batches, "
            "the event loop in epoll) is not counted, nor is time in the kernel. Own time "
            "per package as a share of those samples, and that share of the CPU per request "
            "measured in the rounds above (an estimate: kernel time is spread in "
            f"proportion). Stacks: `{full['raw']}` and its neighbours; top frames: "
            f"`{full['raw'].removesuffix('.raw')}.txt`.",
            "",
        ]
        variants = [
            (label, profiles[name], costs[name]["cpu_us"])
            for name, label, _ in TRACING
            if profiles.get(name) and not profiles[name].get("failure")
        ]
        lines += _md_table(*_package_rows(variants))
        threads = full.get("threads") or {}
        if threads:
            n = sum(threads.values()) or 1
            lines += [
                "Samples by thread at 100%: "
                + ", ".join(f"`{t}` {v / n:.0%}" for t, v in threads.items())
                + " (the export thread builds, encodes and posts spans in Python, holding "
                "the interpreter's lock: its time is taken from the event loop's).",
                "",
            ]
        n = full["samples"] or 1
        lines += ["Top frames by own time at 100%:", ""]
        lines += _md_table(
            ["own", "total", "function (file)"],
            (
                [f"{own / n:.1%}", f"{total / n:.1%}", f"`{key}`"]
                for key, own, total in full["top"][:15]
            ),
            right_from=0,
        )
    return lines


def _package_rows(
    variants: list[tuple[str, dict[str, Any], float | None]],
) -> tuple[list[str], list[list[str]]]:
    """Own time per package, one pair of columns (share, us per request) per variant,
    and the last variant's us per request minus the first's."""

    def share(profile: dict[str, Any], package: str) -> float:
        return (profile.get("packages") or {}).get(package, 0) / (profile.get("samples") or 1)

    packages: list[str] = []
    for _, profile, _ in reversed(variants):
        packages += [p for p in list(profile.get("packages") or {})[:10] if p not in packages]
    rows = []
    for package in packages:
        cells = [f"`{package}`"]
        spent = []
        for _, profile, cpu_us in variants:
            part = share(profile, package)
            spent.append(part * cpu_us if cpu_us else None)
            cells += [f"{part:.1%}", _num(spent[-1], ".1f")]
        first, last = spent[0], spent[-1]
        cells.append("-" if first is None or last is None else f"{last - first:+.1f}")
        rows.append(cells)
    header = ["package"]
    for label, _, _ in variants:
        header += [f"{label}: share", f"{label}: us/request"]
    first, last = variants[0][0], variants[-1][0]
    return [*header, f"{last} - {first}, us/request"], rows


def _cpu_per_request(row: dict[str, Any]) -> float | None:
    """Microseconds of the proxy's CPU per request (per connection in the handshake
    scenario): what it costs, whichever side was the limit."""
    if not row or not row.get("rps") or row.get("cpu_pct") is None:
        return None
    return float(row["cpu_pct"]) / 100 / float(row["rps"]) * 1e6


def _streams(table: Table) -> str:
    return str(table.data["meta"].get("h2_streams", "?"))


def memory_rows(mem: dict[str, Any]) -> list[list[str]]:
    def mib(kib: int) -> str:
        return f"{kib / 1024:.1f} MiB"

    return [
        ["connections opened", f"{mem['opened']:,} of {mem['wanted']:,}"],
        ["held, opened before any request (server sockets)", f"{mem['held_open']:,}"],
        ["held after one request each (server sockets)", f"{mem['held']:,}"],
        [
            "answers to the one request each",
            ", ".join(f"{k}: {v:,}" for k, v in mem["statuses"].items()) or "-",
        ],
        ["failures", ", ".join(f"{k}: {v}" for k, v in mem["failures"].items()) or "none"],
        [
            "time to open them / to send one request on each",
            f"{mem['open_seconds']} s / {mem['request_seconds']} s",
        ],
        ["RSS at start (after 1 s of wrk)", mib(mem["rss_start_kib"])],
        [
            "RSS with all opened",
            f"{mib(mem['rss_open_kib'])} "
            f"({_num(mem.get('rss_per_open_connection_kib'), '.1f')} KiB per connection)",
        ],
        [
            "RSS after one request each",
            f"{mib(mem['rss_held_kib'])} "
            f"({_num(mem.get('rss_per_connection_kib'), '.1f')} KiB per connection)",
        ],
        [
            "RSS 2 s after they closed",
            f"{mib(mem['rss_after_kib'])} "
            f"(+{mem['rss_retained_kib'] / 1024:.1f} MiB over the start)",
        ],
    ]


def render_markdown(
    data: dict[str, Any],
    table: Table,
    goals: list[dict[str, Any]],
    plots: list[str],
    plot_note: str,
) -> str:
    meta = data["meta"]
    m = meta.get("machine", {})
    c = meta["connections"]
    lines = ["# Gateway benchmark", ""]
    if meta["quick"]:
        lines += [
            "> QUICK run: one round of short runs. Indicative only; a full `make bench` "
            "gives medians of three interleaved rounds.",
            "",
        ]
    pk = m.get("packages", {})
    tools = m.get("tools", {})
    lines += [
        f"- date: {meta['date']}",
        f"- machine: {m.get('cpus')} CPUs ({m.get('cpu_model')}), {m.get('memory')} RAM, "
        f"kernel {m.get('kernel')}, {m.get('os')}",
        f"- python {m.get('python')}; "
        + "; ".join(str(v) for k, v in tools.items() if v and v != "not found")
        + "; "
        + ", ".join(f"{k} {v}" for k, v in pk.items()),
        f"- gateway: commit {m.get('gateway_commit')}; config in `gateway.yaml` beside this "
        f"report; access log to {meta['gateway_access_log']}, metrics on",
        f"- load: {meta['load']}",
        f"- pinning: {meta['pinning']}",
        f"- open-files limit: {m.get('nofile_limit')}; load average (1 min) at start "
        f"{m.get('loadavg_start', '-')}, at end {meta.get('loadavg_end', '-')}",
    ]
    if meta.get("gateway_dropped_keys"):
        lines.append(
            "- policy keys this gateway refused, so left out: "
            + ", ".join(meta["gateway_dropped_keys"])
        )
    for note in meta.get("notes", []):
        lines.append(f"- note: {note}")
    lines += ["", "## Systems", ""]
    lines += _md_table(
        ["name", "what", "pinned"],
        (
            [f"`{name}`", s["description"], "yes" if s["pinned"] else "no"]
            for name, s in sorted(data["systems"].items(), key=lambda kv: _order(kv[0]))
            if any(r["system"] == name for r in data["runs"])
            or (name == "gateway-mem" and data.get("memory"))
        ),
        right_from=99,
    )

    lines += [
        "In the tables: figures are medians over the rounds (errors summed); `xNAME` is "
        "req/s (MiB/s for bodies) over NAME's in the same scenario; CPU is the system's "
        "process tree's CPU time during the run in % of one CPU (100% = its core "
        "saturated), per process in brackets when it has several.",
        "",
    ]
    scen = data["scenarios"]
    if "simple" in scen:
        lines += [f"## {scen['simple']['title']}", ""]
        lines += _md_table(*scenario_rows(table, "simple", c))
    if "fanout" in scen:
        lines += [f"## {scen['fanout']['title']}", ""]
        lines += [
            "The gateway's aggregate route (three upstreams, merged JSON) against the naive "
            "`asyncio.gather` over one httpx client (load/refs/naive.py).",
            "",
        ]
        lines += _md_table(*scenario_rows(table, "fanout", c))
        r = ratio(table.get("fanout", "gateway"), table.get("simple", "gateway"))
        if r is not None:
            lines += [f"Gateway fan-out rate / gateway simple GET rate: {r:.2f}x", ""]
    for key in ("stream", "upload"):
        if key in scen:
            lines += [f"## {scen[key]['title']}", ""]
            lines += [
                "MiB/s is payload moved (req/s x 1 MiB); RSS is the proxy's process tree.",
                "",
            ]
            lines += _md_table(*scenario_rows(table, key, c, bytes_col=True, rss=True))
    if "grpc" in scen:
        lines += [f"## gRPC (h2c), {c} connections x {_streams(table)} streams", ""]
        lines += [
            f"Unary gRPC: {meta.get('load_grpc', '')}. The plain POST is the same bytes to "
            "`/upload` on the nginx upstream, over h2c to the same proxy: the gateway's own "
            "HTTP/2 rate the gRPC goal is judged against. The gRPC upstream shares the "
            "client CPU with h2load and the nginx upstream.",
            "",
        ]
        header, rows, notes = grpc_rows(table)
        lines += _md_table(header, rows)
        if notes:
            lines += [f"- {note}" for note in notes] + [""]
        for key in ("grpc", "grpc-post"):
            if key in scen:
                lines += [f"### {scen[key]['title']}", ""]
                lines += _md_table(*scenario_rows(table, key, c))
    points = table.sweep_points()
    if "sweep" in scen and points:
        lines += ["## Concurrency sweep (simple GET)", ""]
        systems = sorted({n for p in points for n in table.at("sweep", p)}, key=_order)
        for title, fn in (
            ("req/s", lambda row: _num(row.get("rps"))),
            ("p99", lambda row: _ms(row.get("p99_ms"))),
            ("errors (non-2xx + socket)", lambda row: str(row["non_2xx"] + row["socket_errors"])),
        ):
            lines += [f"**{title}**", ""]
            rows = []
            for name in systems:
                cells = [_label(data, name)]
                for p in points:
                    row = table.at("sweep", p).get(name)
                    cells.append("-" if not row else ("FAILED" if row.get("failure") else fn(row)))
                rows.append(cells)
            lines += _md_table(["system", *[f"c={p}" for p in points]], rows)
    if any(key in scen for key in TLS_KEYS):
        lines += [f"## TLS and HTTP/2, {c} connections", ""]
        tls = meta.get("tls") or {}
        lines += [
            f"Over TLS: {meta.get('load_tls', '')}. Certificates: "
            f"{tls.get('certificates', 'none made')}. nginx: {tls.get('nginx_listener', '-')}. "
            "The gateway: `server.tls` with that certificate, `server.http2` at its "
            "default (on), the rest as `gateway.yaml` (`gateway-tls.yaml`). CPU is the "
            "proxy's; when it is well under 100%, the client on the other CPU was the limit.",
            "",
        ]
        header, rows, notes = tls_rows(table)
        lines += _md_table(header, rows)
        if notes:
            lines += [f"- {note}" for note in notes] + [""]
        for key in TLS_KEYS:
            if key not in scen:
                continue
            lines += [f"### {scen[key]['title']}", ""]
            lines += _md_table(*scenario_rows(table, key, c))
            negotiated = [
                f"{_label(data, name)}: {row['tls']}"
                for name, row in sorted(table.at(key, c).items(), key=lambda kv: _order(kv[0]))
                if row.get("tls")
            ]
            resumed = sum(row.get("resumed") or 0 for row in table.at(key, c).values())
            extra = []
            if negotiated:
                extra.append("Negotiated (version, cipher, ALPN): " + "; ".join(negotiated) + ".")
            if key == "tls-handshake":
                extra.append(
                    f"Sessions resumed: {resumed} (the client keeps no session: every "
                    "connection is a full handshake). Latencies are whole connections: "
                    "connect, handshake, request, answer."
                )
            if extra:
                lines += [" ".join(extra), ""]
    if "tracing" in scen:
        lines += tracing_section(data, table)
    if "workers" in scen:
        lines += [f"## {scen['workers']['title']}", ""]
        lines += [
            "Machine CPU: every process on the machine during the run (wrk, the upstream, "
            "anything else running): two workers can only gain what is left idle.",
            "",
        ]
        lines += _md_table(*scenario_rows(table, "workers", c, host=True))
        w1, w2 = table.get("workers", "gateway-1w"), table.get("workers", "gateway-2w")
        r = ratio(w2, w1)
        if r is not None:
            lines += [f"2 workers / 1 worker: {r:.2f}x", ""]
        bound = workers_ceiling(w1, w2, table.cpus())
        if bound is not None:
            lines += [
                f"What this rig allows: with every CPU busy, two workers can serve at most "
                f"{bound['cpus']} CPUs / (gateway {bound['gateway_us']:.0f} us + wrk and "
                f"upstream {bound['rest_us']:.0f} us per request, both measured in the "
                f"2-worker run) = {bound['ceiling']:.2f}x the 1-worker rate. The load "
                "generator and the upstream share the machine, so the more the gateway "
                "saves per request, the lower this ceiling falls.",
                "",
            ]
    mem = data.get("memory")
    if mem:
        lines += ["## Idle keep-alive connections (gateway)", ""]
        if mem.get("failure"):
            lines += [f"FAILED: {mem['failure']}", ""]
        else:
            lines += _md_table(["figure", "value"], memory_rows(mem), right_from=99)
    tls_too = "; TLS and HTTP/2" if any(key in scen for key in TLS_KEYS) else ""
    tls_too += "; tracing, issue 20" if "tracing" in scen else ""
    lines += [f"## Goals (issue 13{tls_too}), judged on this run", ""]
    lines += _md_table(
        ["goal", "measured", "target", "verdict"],
        (
            [
                g["goal"],
                g["measured"],
                g["target"],
                f"**{g['verdict']}**" if g["verdict"] == "NOT MET" else g["verdict"],
            ]
            for g in goals
        ),
        right_from=99,
    )
    if plots or plot_note:
        lines += ["## Plots", ""]
        if plot_note:
            lines += [plot_note, ""]
        lines += [f"![{p}]({p})" for p in plots]
        lines.append("")
    lines += ["## Every run", ""]
    lines += _md_table(
        ["round", "scenario", "connections", "system", "req/s", "p99", "non-2xx", "socket errors"],
        (
            [
                str(r["round"]),
                r["scenario"],
                str(r["connections"]),
                r["system"],
                f"FAILED: {r['failure'][:80]}" if r.get("failure") else _num(r["rps"]),
                _ms(r.get("p99_ms")),
                str(r.get("non_2xx", "-")),
                str(r.get("socket_errors", "-")),
            ]
            for r in data["runs"]
        ),
        right_from=4,
    )
    lines += ["The load generators' own output for every run: `wrk-output.md`.", ""]
    return "\n".join(lines)


def render_summary(data: dict[str, Any], table: Table, goals: list[dict[str, Any]]) -> str:
    c = data["meta"]["connections"]
    out = []
    if "simple" in data["scenarios"]:
        header, rows = scenario_rows(table, "simple", c)
        out += [f"simple GET, {c} connections", _text_table(header, rows), ""]
    if any(key in data["scenarios"] for key in TLS_KEYS):
        header, rows, notes = tls_rows(table)
        out += [f"TLS and HTTP/2, {c} connections", _text_table(header, rows)]
        out += [f"  {note}" for note in notes] + [""]
    if "grpc" in data["scenarios"]:
        header, rows, notes = grpc_rows(table)
        out += [f"unary gRPC and plain POST over h2c, {c} connections", _text_table(header, rows)]
        out += [f"  {note}" for note in notes] + [""]
    if "tracing" in data["scenarios"]:
        header, rows = tracing_rows(table)
        out += [f"tracing, simple GET, {c} connections", _text_table(header, rows), ""]
    out += [
        _text_table(
            ["goal", "measured", "target", "verdict"],
            [[g["goal"], g["measured"], g["target"], g["verdict"]] for g in goals],
            right_from=99,
        )
    ]
    return "\n".join(out) + "\n"


# --- plots ------------------------------------------------------------------------------


def render_plots(folder: Path, data: dict[str, Any], table: Table) -> tuple[list[str], str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator
    except ImportError:
        return [], "matplotlib is not installed (pip install -e '.[dev]'): no plots."
    made = []
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    title_suffix = " (QUICK)" if data["meta"]["quick"] else ""
    machine = data["meta"].get("machine", {})
    caption = f"{machine.get('cpus')} CPUs {machine.get('cpu_model')}, proxy on one core"

    points = table.sweep_points()
    if len(points) >= 2:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
        for name in sorted(table.sweep_systems(), key=_order):
            xs, rps, p99 = [], [], []
            for p in points:
                row = table.at("sweep", p).get(name)
                if row and not row.get("failure") and row["rps"] > 0:
                    xs.append(p)
                    rps.append(row["rps"])
                    p99.append(row.get("p99_ms") or float("nan"))
            if not xs:
                continue
            style = {"color": COLORS.get(name), "marker": "o", "label": _label(data, name)}
            if name == "gateway":
                style["linewidth"] = 3
            ax1.plot(xs, rps, **style)
            ax2.plot(xs, p99, **style)
        ax1.set(
            xscale="log",
            yscale="log",
            xlabel="connections",
            ylabel="req/s",
            title="Throughput vs connections",
        )
        ax2.set(
            xscale="log",
            yscale="log",
            xlabel="connections",
            ylabel="p99 latency (ms)",
            title="p99 vs connections",
        )
        for ax in (ax1, ax2):
            ax.xaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(points)
            ax.set_xticklabels([str(p) for p in points])
            ax.grid(True, which="both", alpha=0.3)
        ax1.legend(fontsize=8)
        fig.suptitle(f"Concurrency sweep, simple GET{title_suffix} - {caption}", fontsize=10)
        fig.tight_layout()
        fig.savefig(folder / "sweep.png", dpi=110)
        plt.close(fig)
        made.append("sweep.png")

    c = data["meta"]["connections"]
    simple = table.at("simple", c)
    good = {n: r for n, r in simple.items() if not r.get("failure") and r["rps"] > 0}
    if good:
        names = sorted(good, key=_order)
        ngx = good.get("nginx-proxy")
        fig, ax = plt.subplots(figsize=(9, 0.55 * len(names) + 1.5))
        values = [good[n]["rps"] for n in names]
        bars = ax.barh(
            [_label(data, n) for n in names], values, color=[COLORS.get(n, "#888") for n in names]
        )
        for bar, name in zip(bars, names, strict=True):
            r = ratio(good[name], ngx)
            text = f" {good[name]['rps']:,.0f}" + (
                f"  ({r:.2f}x nginx-proxy)" if r is not None and name != "nginx-proxy" else ""
            )
            ax.text(
                bar.get_width(), bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=8
            )
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("req/s (log scale)")
        ax.set_title(f"Simple GET, {c} connections{title_suffix} - {caption}", fontsize=10)
        ax.set_xlim(right=max(values) * 8)
        fig.tight_layout()
        fig.savefig(folder / "throughput.png", dpi=110)
        plt.close(fig)
        made.append("throughput.png")

    for key, spec in data["scenarios"].items():
        if key == "sweep":
            continue
        found = {n: r for n, r in table.at(key, c).items() if not r.get("failure")}
        if not found:
            continue
        names = sorted(found, key=_order)
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names) + 2), 4.5))
        width = 0.8 / len(PERCENTILES)
        for i, (metric, label) in enumerate(PERCENTILES):
            xs = [j + (i - (len(PERCENTILES) - 1) / 2) * width for j in range(len(names))]
            ys = [found[n].get(metric) or float("nan") for n in names]
            ax.bar(xs, ys, width, label=label)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([_label(data, n) for n in names], fontsize=8, rotation=15, ha="right")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(
            plain if ax.get_ylim()[1] / ax.get_ylim()[0] < 30 else NullFormatter()
        )
        ax.set_ylabel("latency (ms, log scale)")
        ax.set_title(f"Latency percentiles: {spec['title']}{title_suffix}", fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"latency-{key}.png"
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        made.append(name)
    return made, ""


# --- entry points ---------------------------------------------------------------------------


def write(folder: Path, data: dict[str, Any]) -> Path:
    """Summary, goals, results.json, report.md, summary.txt and plots into `folder`."""
    rows = summarise(data)
    table = Table(data, rows)
    goals = evaluate_goals(table)
    data = {**data, "summary": rows, "goals": goals}
    (folder / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    plots, note = render_plots(folder, data, table)
    report = folder / "report.md"
    import cachebench  # the cache, cache-stampede and compression scenarios (issue 22)
    import hedgebench  # the hedge scenario (issue 23)

    extra = cachebench.render(data.get("cachebench") or {})
    extra += hedgebench.render(data.get("hedgebench") or {})
    report.write_text(render_markdown(data, table, goals, plots, note) + extra)
    (folder / "summary.txt").write_text(render_summary(data, table, goals) + extra)
    return report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: report.py RESULTS_FOLDER", file=sys.stderr)
        return 2
    folder = Path(args[0])
    data = json.loads((folder / "results.json").read_text())
    data.pop("summary", None)
    data.pop("goals", None)
    print(write(folder, data))
    print((folder / "summary.txt").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
