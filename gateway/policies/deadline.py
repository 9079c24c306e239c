"""The route deadline: everything up to the response headers must fit in it."""

from __future__ import annotations

from gateway.errors import UpstreamTimeout
from gateway.policies.expiry import Expiry
from gateway.types import GatewayRequest, GatewayResponse, Handler, Policy

__all__ = ["deadline"]


def deadline(upstream: str | None = None) -> Policy:
    def wrap(inner: Handler) -> Handler:
        async def handle(request: GatewayRequest) -> GatewayResponse:
            remaining = request.deadline.remaining()
            if remaining <= 0:
                raise UpstreamTimeout(
                    "the route deadline passed before the upstream was called",
                    route=request.route,
                    upstream=upstream,
                )
            try:
                with Expiry(remaining):
                    return await inner(request)
            except TimeoutError as exc:
                raise UpstreamTimeout(
                    f"no answer within the route deadline ({remaining * 1000:.0f} ms left)",
                    route=request.route,
                    upstream=upstream,
                ) from exc

        return handle

    return wrap
