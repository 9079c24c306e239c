from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import GatewayProcess, UpstreamServer


@pytest.fixture
def upstream() -> Iterator[Callable[..., UpstreamServer]]:
    """Start ASGI apps as real upstream servers: `upstream(app)` returns a started server."""
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
    """Start the real gateway process: `gateway(config_dict_or_yaml, env=..., args=...)`."""
    started: list[GatewayProcess] = []

    def start(config: dict[str, Any] | str, **kw: Any) -> GatewayProcess:
        proc = GatewayProcess(config, tmp_path, **kw).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
