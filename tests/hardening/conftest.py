"""Fixtures for the hardening tests: real upstreams, the real gateway process, and the
fault proxy between them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faultproxy import Fault, FaultProxy
from tests.integration.harness import GatewayProcess, UpstreamServer


@pytest.fixture
def upstream() -> Iterator[Callable[..., UpstreamServer]]:
    started: list[UpstreamServer] = []

    def start(app: Any, **kw: Any) -> UpstreamServer:
        server = UpstreamServer(app, **kw).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(config: dict[str, Any] | str, **kw: Any) -> GatewayProcess:
        proc = GatewayProcess(config, tmp_path, **kw).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    started: list[FaultProxy] = []

    def start(upstream_port: int | None = None, fault: Fault | None = None) -> FaultProxy:
        proxy = FaultProxy(upstream_port, fault).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
