"""The data plane's state records: `GatewayState`, the one mutable reference a reload
swaps, and `Exchange`, what happened to one request.

The data plane sees the compiled config through `RuntimeView` (what `Runtime` in
`gateway/build/runtime.py` offers it), never the settings models: a reload builds a new
runtime, and requests keep the one they started with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from gateway.dataplane.routes import Route
from gateway.dataplane.routing import Router
from gateway.ops.board import StatusBoard
from gateway.ops.logs import AccessLog
from gateway.ops.metrics import Metrics, UpstreamStats
from gateway.policies.breaker import CircuitBreaker
from gateway.policies.bulkhead import Bulkhead
from gateway.types import Headers
from gateway.upstream.target import Target

__all__ = ["Exchange", "GatewayState", "RuntimeView", "UpgradeUpstream"]


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


R = TypeVar("R", bound=RuntimeView, covariant=True)


class GatewayState(Generic[R]):
    """The one mutable reference a reload swaps, plus the drain flag and what every
    request reports to (metrics, access log, the status page's board)."""

    def __init__(
        self,
        runtime: R | None = None,
        metrics: Metrics | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.runtime = runtime
        self.draining = False
        self.metrics = metrics or Metrics()
        self.access_log = access_log
        self.status = StatusBoard()

    def __repr__(self) -> str:
        return f"GatewayState(runtime={self.runtime!r}, draining={self.draining})"


@dataclass(slots=True)
class Exchange:
    """What happened to one request; filled as it goes, read once in the logging phase."""

    started: float
    method: str
    path: str
    request_id: str
    route: str | None = None
    upstream: str | None = None
    target: str | None = None
    status: int = 0
    bytes_out: int = 0
    error: str | None = None
    detail: str | None = None  # set when the gateway answered with its own problem+json
    response_started: bool = False
    extra_headers: Headers | None = None  # from edge filters, on every answer
