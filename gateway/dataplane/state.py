"""The data plane's state records: `GatewayState`, the one mutable reference a reload
swaps, and `Exchange`, what happened to one request.

A leaf of the data plane: it imports none of its modules, so the ops side (status page,
admin app) can read these records without importing the request path. The runtime it
holds is whatever the server built (`Runtime`, seen by the data plane as `view.RuntimeView`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from gateway.ops.board import StatusBoard
from gateway.ops.logs import AccessLog
from gateway.ops.metrics import Metrics
from gateway.types import Headers

__all__ = ["NO_TRACE", "Exchange", "GatewayState", "TraceIds"]


R = TypeVar("R", covariant=True)  # the runtime: `Runtime`, or a view of one


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


class TraceIds(Protocol):
    """What the logging phase reads of a request's trace (`tracing/spans.py`'s
    `RequestTrace`): the ids of its SERVER span and whether it is sampled."""

    @property
    def trace_id(self) -> str | None: ...

    @property
    def span_id(self) -> str | None: ...

    @property
    def sampled(self) -> bool: ...


class _NoTrace:
    """The trace of an answer no trace was started for (one the HTTP protocol made
    itself), with tracing on: its access-log line has null ids."""

    __slots__ = ()
    trace_id = span_id = None
    sampled = False


NO_TRACE = _NoTrace()


@dataclass(slots=True)
class Exchange:
    """What happened to one request; filled as it goes, read once in the logging phase."""

    started: float
    method: str
    path: str
    request_id: str
    # The request's trace, with tracing on (its ids go in the access log, a sampled
    # one's SERVER span ends in the logging phase); None with tracing off.
    trace: TraceIds | None = None
    route: str | None = None
    upstream: str | None = None
    target: str | None = None
    status: int = 0
    bytes_out: int = 0
    error: str | None = None
    detail: str | None = None  # set when the gateway answered with its own problem+json
    response_started: bool = False
    extra_headers: Headers | None = None  # from edge filters, on every answer
    protocol: str = "HTTP/1.1"  # the client's protocol, as the access log names it
    tls: str | None = None  # the connection's TLS version ("TLSv1.3"), None in cleartext
    grpc: bool = False  # a gRPC call: the gateway's own errors are gRPC answers
    grpc_status: int | None = None  # a gRPC call's status, once known
    caller: bytes | str | None = None  # who auth says is calling (API key hash, JWT sub)
    idempotency: str | None = None  # what Idempotency-Key handling did (`stored`, ...)
    fallback: bool = False  # sent to the route's fallback upstream (now `upstream`)
    hedges: int = 0  # hedges sent (routes with `hedge`)
    hedge_won: bool = False  # one of them gave the answer
