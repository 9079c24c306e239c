"""`gateway run` under jemalloc where it is installed (gateway/server/allocator.py), checked on
the real process: its log line, its memory map, and that it still serves."""

from __future__ import annotations

import ctypes.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.harness import GatewayProcess

Start = Callable[..., GatewayProcess]

CONFIG: dict[str, Any] = {
    "upstreams": {"u": {"targets": ["http://127.0.0.1:9"], "connect_timeout": "200ms"}},
    "routes": [{"name": "r", "path": "/r", "upstream": "u"}],
}


def allocator_logged(gw: GatewayProcess) -> str:
    for line in gw.stderr.splitlines():
        if '"memory allocator"' in line:
            return str(json.loads(line)["allocator"])
    raise AssertionError(f"no allocator line in: {gw.stderr}")


def maps(gw: GatewayProcess) -> str:
    assert gw.proc is not None
    return Path(f"/proc/{gw.proc.pid}/maps").read_text()


@pytest.mark.skipif(not ctypes.util.find_library("jemalloc"), reason="libjemalloc not installed")
def test_auto_serves_under_jemalloc_where_it_is_installed(gateway: Start) -> None:
    gw = gateway({**CONFIG, "server": {"allocator": "auto"}})
    assert allocator_logged(gw) == "jemalloc"
    assert "libjemalloc" in maps(gw)
    # The re-executed process is the one that serves (the same pid, its own answer).
    response = httpx.get(gw.url + "/r", timeout=5)
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"


def test_python_keeps_python_s_own_allocator(gateway: Start) -> None:
    gw = gateway({**CONFIG, "server": {"allocator": "python"}})
    assert allocator_logged(gw) == "python"
    assert "libjemalloc" not in maps(gw)
    assert httpx.get(gw.url + "/r", timeout=5).status_code == 502
