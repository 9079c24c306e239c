"""`make corun`: a few percent of CPU per request, measured side by side at the same time.

On a shared 2-core machine one wrk run's req/s moves by 10-15 % from the next (the
host's speed changes under a guest, second by second), so two gateways measured one
after the other differ by more than the few percent a hot-path change is worth, and
rounds of interleaved runs (`make bench`) need many rounds to settle. Here the gateways
under comparison run *at the same time*, all pinned to CPU 0, each loaded by its own
wrk on CPU 1 (with nginx, the upstream, and the OTLP collector). Whatever the machine
does, it does to all of them in the same seconds; each one's CPU time per request
(utime + stime of its whole process, export thread included, over the requests wrk
completed) is then compared with the first's in the same round. A round starts every
gateway afresh (two processes of one config differ by a percent or two for as long as
they live, hash seeds and memory layout), so the median over rounds is over processes.

    python load/corun.py off=off 1pct=0.01                 # tracing off vs 1% sampled
    python load/corun.py off=off r0=0 1pct=0.01 all=1       # several at once
    python load/corun.py off=off new=off@../other-checkout  # two checkouts, untraced
    make corun CORUN_ARGS="off=off 1pct=0.01"               # the same, tools ensured

Each argument is `NAME=RATIO[@CHECKOUT]`: RATIO `off` for no `tracing:` block, else
its `sample_ratio`; CHECKOUT a gateway source tree (default: this one), run with this
tree's virtualenv. Prints each round, then per gateway the median CPU per request and
its ratio to the first gateway's (`x first`, by CPU: above 1 is cheaper), with the
range over rounds. Sharing one CPU between N gateways makes each run at 1/N of it, so
what a gateway pays per second rather than per request (an export a second, say)
weighs N times more here than in `make bench`; compare two or three at once.

Everything on 127.0.0.1, bounded: `--rounds` x (`--warmup` + `--seconds`) of load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from benchlib import CHECKOUT_LAUNCH, ROOT, Procs

PROXY_CPU = "0"
CLIENT_CPU = "1"


class Variant:
    """One gateway of the comparison: a name, its sample ratio (None: no tracing
    block) and the source tree it runs."""

    def __init__(self, spec: str) -> None:
        name, sep, rest = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"corun: {spec!r} is not NAME=RATIO[@CHECKOUT]")
        ratio, _, checkout = rest.partition("@")
        self.name = name
        self.ratio: float | None = None if ratio == "off" else float(ratio)
        self.checkout = Path(checkout).resolve() if checkout else ROOT
        if not (self.checkout / "gateway").is_dir():
            raise SystemExit(f"corun: {self.checkout} has no gateway/ package")
        self.cpu_us: list[float] = []
        self.rps: list[float] = []


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "variants", nargs="+", help="NAME=RATIO[@CHECKOUT], the first the reference"
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=6, help="measured seconds per round")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before them")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections each")
    parser.add_argument("--work", type=Path, help="temp dir (default: a new one, removed)")
    args = parser.parse_args(argv)
    if len(args.variants) < 2:
        parser.error("give two variants at least")
    if min(args.rounds, args.seconds, args.connections) < 1 or args.warmup < 0:
        parser.error("--rounds, --seconds, --connections must be >= 1, --warmup >= 0")
    return args


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid`'s process tree, every thread of it."""
    return sum(benchlib.cpu_ticks(pid).values()) / benchlib.RssSampler.TICKS


def load_all(urls: list[str], connections: int, seconds: int) -> list[benchlib.WrkResult]:
    """One wrk per URL, all at once on the client CPU; their figures in order."""
    runs = [
        subprocess.Popen(
            ["taskset", "-c", CLIENT_CPU, *benchlib.wrk_argv(url, connections, seconds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for url in urls
    ]
    results = []
    for proc in runs:
        try:
            output, _ = proc.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        results.append(benchlib.parse_wrk(output))
    return results


def start_upstream(work: Path, procs: Procs) -> tuple[int, int]:
    """nginx (the bench's upstream) and the OTLP collector on the client CPU, for every
    round: (the upstream's port, the collector's)."""
    up, sink, collector = benchlib.free_ports(3)
    (work / "upstream.conf").write_text(benchlib.nginx_upstream_conf(work, up, sink))
    procs.start("upstream", ["nginx", "-c", str(work / "upstream.conf")], cpus=CLIENT_CPU)
    sink_proc = procs.start("collector", benchlib.collector_argv(collector), cpus=CLIENT_CPU)
    problem = benchlib.wait_http(f"http://127.0.0.1:{collector}/stats", 10, sink_proc.pid)
    if problem is not None:
        raise SystemExit(f"corun: the collector did not start: {problem}")
    return up, collector


def one_round(
    args: argparse.Namespace,
    work: Path,
    procs: Procs,
    variants: list[Variant],
    ports: tuple[int, int],
    rnd: int,
) -> str | None:
    """Start every gateway afresh, load them together, note CPU per request; None, or
    why the round has no figures. `ports`: the upstream's and the collector's."""
    up, collector = ports
    gateways = []
    try:
        urls = []
        for variant in variants:
            port, admin = benchlib.free_ports(2)
            tracing = None
            if variant.ratio is not None:
                tracing = {
                    "endpoint": f"http://127.0.0.1:{collector}/{variant.name}",
                    "sample_ratio": variant.ratio,
                }
            config = benchlib.gateway_config(
                port=port, admin_port=admin, upstream_port=up, tracing=tracing
            )
            path = work / f"{variant.name}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            python = str(ROOT / ".venv" / "bin" / "python")
            gateway = procs.start(
                variant.name,
                [python, "-c", CHECKOUT_LAUNCH, "run", "-c", str(path)],
                cpus=PROXY_CPU,
                env={"GATEWAY_CHECKOUT": str(variant.checkout)},
                stdout=work / f"{variant.name}.access.log",
            )
            gateways.append(gateway)
            urls.append(f"http://127.0.0.1:{port}/hello")
            problem = benchlib.wait_http(f"http://127.0.0.1:{admin}/readyz", 30, gateway.pid)
            if problem is not None:
                return f"{variant.name} did not start: {problem}"
        if args.warmup:
            load_all(urls, args.connections, args.warmup)
        before = [cpu_seconds(g.pid) for g in gateways]
        results = load_all(urls, args.connections, args.seconds)
        after = [cpu_seconds(g.pid) for g in gateways]
        for variant, result in zip(variants, results, strict=True):
            if result.failure or not result.requests:
                return f"{variant.name}: {result.failure or 'no requests completed'}"
            if result.non_2xx or result.socket_errors:
                return f"{variant.name}: errors under load ({result.non_2xx} non-2xx)"
        for variant, result, b, a in zip(variants, results, before, after, strict=True):
            variant.cpu_us.append((a - b) / result.requests * 1e6)
            variant.rps.append(result.rps)
        line = "  ".join(f"{v.name} {v.cpu_us[-1]:.1f} us ({v.rps[-1]:,.0f}/s)" for v in variants)
        print(f"round {rnd}: {line}", flush=True)
        return None
    finally:
        for gateway in gateways:
            procs.retire(gateway)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = [Variant(spec) for spec in args.variants]
    if len({v.name for v in variants}) != len(variants):
        raise SystemExit("corun: the variants' names must differ")
    with tempfile.TemporaryDirectory(prefix="gateway-corun.") as tmp:
        # corun.sh's: its trap stops what `procs` recorded there, whatever happens here.
        work = args.work or Path(tmp)
        work.chmod(0o755)  # nginx workers run as nobody
        procs = Procs(work)
        try:
            ports = start_upstream(work, procs)
            for rnd in range(1, args.rounds + 1):
                problem = one_round(args, work, procs, variants, ports, rnd)
                if problem is not None:
                    print(f"round {rnd}: no figures: {problem}", file=sys.stderr)
        finally:
            procs.stop_all()
    first = variants[0]
    if len(first.cpu_us) < 1:
        print("no round completed", file=sys.stderr)
        return 1
    print(
        f"\n{len(first.cpu_us)} rounds of {args.seconds} s, {len(variants)} gateways on CPU "
        f"{PROXY_CPU} at once, {args.connections} connections each; x {first.name} by CPU "
        "per request (above 1: cheaper)"
    )
    for variant in variants:
        ratios = [f / v for f, v in zip(first.cpu_us, variant.cpu_us, strict=True)]
        print(
            f"{variant.name:<12} {statistics.median(variant.cpu_us):7.1f} us per request  "
            f"x {first.name} {statistics.median(ratios):.3f} "
            f"({min(ratios):.3f}-{max(ratios):.3f})"
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
