"""Helpers for `load/bench.sh`: free ports, readiness waits, and wrk's report.

The shell script owns the processes; this module only does what is awkward in
bash: binding port 0, polling HTTP with a deadline, and turning wrk's text into
a table and an exit status. Standard library only, so it runs under any
Python 3.11 (the project's venv or the system one).

    python load/benchlib.py ports 4
    python load/benchlib.py wait-http http://127.0.0.1:9901/readyz --timeout 20 --pid 1234
    python load/benchlib.py report --out results.md --context "10 s per target" \\
        direct=/tmp/x/direct.txt "gateway (aiohttp transport)=/tmp/x/gw.txt"
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "WrkResult",
    "free_ports",
    "main",
    "parse_duration_ms",
    "parse_wrk",
    "render_markdown",
    "render_table",
    "wait_http",
]

# A target whose errors exceed this share of its requests fails the bench.
DEFAULT_MAX_ERROR_RATIO = 0.01

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_DURATION = re.compile(r"^([0-9.]+)(us|ms|s|m|h)$")
_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([0-9.]+\w+)", re.M)
_PERCENTILE = re.compile(r"^\s+(50|75|90|99)%\s+(\S+)", re.M)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One target's figures, or why there are none (`failure`)."""

    name: str
    requests: int = 0
    rps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    non_2xx: int = 0
    socket_errors: int = 0
    failure: str | None = None

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors

    @property
    def error_ratio(self) -> float:
        if self.failure is not None or self.requests == 0:
            return 1.0
        return self.errors / self.requests

    def ok(self, max_error_ratio: float = DEFAULT_MAX_ERROR_RATIO) -> bool:
        return self.failure is None and self.requests > 0 and self.error_ratio <= max_error_ratio


def parse_duration_ms(text: str) -> float:
    """wrk's `1.23ms`, `456.00us`, `1.02s`, `2.00m` as milliseconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNIT_MS[match.group(2)]


def parse_wrk(name: str, output: str) -> WrkResult:
    """Read wrk's `--latency` report; a report without figures is a failure."""
    rps = _RPS.search(output)
    total = _TOTAL.search(output)
    if rps is None or total is None:
        first = next((line for line in output.splitlines() if line.strip()), "no output")
        return WrkResult(name=name, failure=first.strip()[:200])
    percentiles = {m.group(1): parse_duration_ms(m.group(2)) for m in _PERCENTILE.finditer(output)}
    non_2xx = _NON_2XX.search(output)
    sock = _SOCKET.search(output)
    return WrkResult(
        name=name,
        requests=int(total.group(1)),
        rps=float(rps.group(1)),
        p50_ms=percentiles.get("50"),
        p99_ms=percentiles.get("99"),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
    )


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_http(url: str, timeout: float, pid: int | None = None, status: int = 200) -> str | None:
    """Poll `url` until it answers `status`; None on success, else why not.

    Gives up early when `pid` has exited: a gateway that crashed at start
    should not cost the whole timeout.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if pid is not None and not _alive(pid):
            return f"process {pid} exited before {url} answered {status} (last: {last})"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == status:
                    return None
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
            if exc.code == status:
                return None
        except (OSError, urllib.error.URLError) as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(0.1)
    return f"{url} did not answer {status} within {timeout:g}s (last: {last})"


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def _row(result: WrkResult, max_error_ratio: float) -> list[str]:
    if result.failure is not None:
        return [result.name, "-", "-", "-", "-", "-", f"FAILED: {result.failure}"]
    errors = f"{result.errors} ({result.error_ratio:.2%})"
    verdict = "ok" if result.ok(max_error_ratio) else "FAILED: too many errors"
    return [
        result.name,
        f"{result.rps:,.0f}",
        _fmt_ms(result.p50_ms),
        _fmt_ms(result.p99_ms),
        f"{result.requests:,}",
        errors,
        verdict,
    ]


_HEADER = ["target", "req/s", "p50", "p99", "requests", "errors", "verdict"]
_RIGHT = {1, 2, 3, 4, 5}


def render_table(results: Sequence[WrkResult], max_error_ratio: float) -> str:
    """A plain-text table for the terminal."""
    rows = [_HEADER, *(_row(r, max_error_ratio) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]

    def line(row: list[str]) -> str:
        cells = (
            cell.rjust(widths[i]) if i in _RIGHT else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        )
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


def render_markdown(
    results: Sequence[WrkResult], max_error_ratio: float, context: Sequence[str]
) -> str:
    """The same table as markdown, preceded by how it was measured."""
    lines = ["# Gateway benchmark", ""]
    lines += [f"- {item}" for item in context]
    lines += ["", "| " + " | ".join(_HEADER) + " |"]
    rule = ("---:" if i in _RIGHT else "---" for i in range(len(_HEADER)))
    lines.append("|" + "|".join(rule) + "|")
    for result in results:
        lines.append("| " + " | ".join(_row(result, max_error_ratio)) + " |")
    return "\n".join(lines) + "\n"


def _cmd_ports(args: argparse.Namespace) -> int:
    print(" ".join(str(p) for p in free_ports(args.count)))
    return 0


def _cmd_wait_http(args: argparse.Namespace) -> int:
    problem = wait_http(args.url, args.timeout, args.pid, args.status)
    if problem is None:
        return 0
    print(problem, file=sys.stderr)
    return 1


def _cmd_report(args: argparse.Namespace) -> int:
    results: list[WrkResult] = []
    raw: list[tuple[str, str]] = []
    for spec in args.targets:
        name, sep, path = spec.rpartition("=")
        if not sep or not name:
            raise SystemExit(f"target must be NAME=PATH, got {spec!r}")
        file = Path(path)
        output = file.read_text(errors="replace") if file.exists() else "did not run"
        results.append(parse_wrk(name, output))
        raw.append((name, output))

    print(render_table(results, args.max_error_ratio))
    if args.out:
        markdown = render_markdown(results, args.max_error_ratio, args.context)
        markdown += "\n## wrk output\n"
        for name, output in raw:
            markdown += f"\n### {name}\n\n```\n{output.rstrip()}\n```\n"
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown)
        print(f"\nwritten to {out}")

    failed = [r.name for r in results if not r.ok(args.max_error_ratio)]
    if failed:
        limit = f"{args.max_error_ratio:.0%}"
        print(f"\nFAILED (no figures, or errors above {limit}): {', '.join(failed)}")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchlib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ports = sub.add_parser("ports", help="print N free loopback ports")
    ports.add_argument("count", type=int)
    ports.set_defaults(func=_cmd_ports)

    wait = sub.add_parser("wait-http", help="wait until a URL answers a status")
    wait.add_argument("url")
    wait.add_argument("--timeout", type=float, default=20.0)
    wait.add_argument("--pid", type=int, default=None, help="give up if this process exits")
    wait.add_argument("--status", type=int, default=200)
    wait.set_defaults(func=_cmd_wait_http)

    report = sub.add_parser("report", help="table of wrk outputs; exit 1 on errors")
    report.add_argument("targets", nargs="+", metavar="NAME=PATH")
    report.add_argument("--out", help="also write the table as markdown here")
    report.add_argument("--context", action="append", default=[], help="a line for the markdown")
    report.add_argument("--max-error-ratio", type=float, default=DEFAULT_MAX_ERROR_RATIO)
    report.set_defaults(func=_cmd_report)

    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
