"""The gateway raises its open-file soft limit to the hard limit at start (each client
and upstream connection is a descriptor) and logs what it got."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.hardening.apps import RecordingApp
from tests.integration.harness import GatewayProcess, UpstreamServer


def soft_limit_of(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line")


def test_the_gateway_raises_its_soft_limit_to_the_hard_limit_and_logs_it(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    up = upstream(RecordingApp())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 512)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:  # the child inherits the lowered limit
        gw = gateway(
            {
                "upstreams": {"u": {"targets": [up.url]}},
                "routes": [{"name": "r", "path": "/", "upstream": "u"}],
            }
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert gw.proc is not None
    expected = hard if hard != resource.RLIM_INFINITY else None
    got_soft, got_hard = soft_limit_of(gw.proc.pid)
    if expected is not None:
        assert got_soft == expected
    records = [json.loads(line) for line in gw.stderr.splitlines() if "open-file" in line]
    assert records, gw.stderr
    assert records[0]["was"] == lowered
    assert records[0]["soft"] == got_soft and records[0]["hard"] == got_hard


def test_raise_open_file_limit_without_room_keeps_the_limit() -> None:
    """Soft already at hard: nothing to raise, the limit is only reported."""
    code = (
        "import resource\n"
        "from gateway.server.process import raise_open_file_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), min(hard, 4096)))\n"
        "print(raise_open_file_limit() == (min(hard, 4096), min(hard, 4096)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == "True", out.stderr
