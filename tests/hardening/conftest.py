"""The fault proxy between gateway and upstream (`upstream` and `gateway` come from
tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.faultproxy import Fault, FaultProxy


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
