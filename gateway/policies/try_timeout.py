"""One try's time limit: `min(read_timeout, time left of the route deadline)`.

It is composed innermost, around the upstream call itself and inside the bulkhead, so
time spent queueing for a slot is not charged to the upstream's `read_timeout`, and a
try that runs out of `read_timeout` fails with an `UpstreamTimeout` (outcome `timeout`)
that the breaker counts as a failure and the retry policy may retry. When the route
deadline is the tighter limit, the deadline policy's own timer ends the try; the
breaker sees that cancellation with the deadline passed and counts it as a failure too.
"""

from __future__ import annotations

from gateway.errors import UpstreamTimeout
from gateway.policies.expiry import Expiry
from gateway.types import GatewayRequest, GatewayResponse, Handler, Policy

__all__ = ["try_timeout"]


def try_timeout(read_timeout: float, upstream: str | None = None) -> Policy:
    """Bound each try (up to its response headers) by `read_timeout` and the deadline."""

    def wrap(inner: Handler) -> Handler:
        async def handle(request: GatewayRequest) -> GatewayResponse:
            remaining = request.deadline.remaining()
            if remaining <= 0:
                raise UpstreamTimeout(
                    "the route deadline passed before the try could start",
                    route=request.route,
                    upstream=upstream,
                )
            if read_timeout >= remaining:
                # The deadline policy's timer already ends this try in time; a second
                # timer per request would only cost. The breaker counts that cut too.
                return await inner(request)
            try:
                with Expiry(read_timeout):
                    return await inner(request)
            except TimeoutError as exc:
                raise UpstreamTimeout(
                    f"no response headers within read_timeout ({read_timeout:g}s)",
                    route=request.route,
                    upstream=upstream,
                ) from exc

        return handle

    return wrap
