"""What the data plane needs of a compiled config (`RuntimeView`) and of an upstream
it upgrades a WebSocket to (`UpgradeUpstream`). `gateway/build/runtime.py`'s `Runtime`
offers both; the data plane never sees the settings models it was built from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from gateway.dataplane.routes import Route
from gateway.dataplane.routing import Router
from gateway.ops.metrics import UpstreamStats
from gateway.policies.breaker import CircuitBreaker
from gateway.policies.bulkhead import Bulkhead
from gateway.upstream.target import Target

__all__ = ["RuntimeView", "UpgradeUpstream"]


class UpgradeUpstream(Protocol):
    """What a WebSocket upgrade needs of an upstream: a target, its bulkhead and
    breaker, how many targets to try when connecting is refused, its outcome counters."""

    @property
    def name(self) -> str: ...
    @property
    def stats(self) -> UpstreamStats: ...
    @property
    def bulkhead(self) -> Bulkhead: ...
    @property
    def breaker(self) -> CircuitBreaker | None: ...
    @property
    def connect_tries(self) -> int: ...
    def pick(self, exclude: set[str]) -> Target: ...


class RuntimeView(Protocol):
    """What the data plane needs of a compiled config. `active` counts the requests
    that started on it (a reload closes what only it used once they are done)."""

    active: int

    @property
    def router(self) -> Router[Route]: ...
    @property
    def upstreams(self) -> Mapping[str, UpgradeUpstream]: ...
    @property
    def access_log(self) -> bool: ...
    def leave(self) -> None: ...
