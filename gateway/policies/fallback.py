"""Fallback: one try through another upstream when the route's own cannot answer
(nginx's `backup` servers, Envoy's composite cluster).

The factory composes it inside the route deadline and around the primary's whole chain
(retry, breaker, bulkhead, try timeout), so the primary's retries come first. The
fallback try goes through the fallback upstream's own breaker, bulkhead and try
timeout, is never retried, and has no deadline of its own: what is left of the route's.

Which of the primary's failures mean "cannot answer" (`UpstreamError.outcome`):

- nothing reached the upstream, so any method may go: circuit open or no healthy target
  (`unhealthy`), queue full or `queue_timeout` passed (`saturated`), a connect error
  (`connect_error`: refused, connect timeout, a TLS handshake or certificate failure);
- the upstream may have seen the request, so only a request that may be retried goes
  (an idempotent method, `retry_non_idempotent`, or a keyed request; `attempts` does
  not matter): a timeout (`timeout`), and a connection closed or bad HTTP before the
  response head (`reset`).

The primary's own answers, 5xx included, pass through. There is no fallback try when
the route deadline has no time left, or when a streamed request body was partly sent
already (it cannot be replayed): the primary's error stands. When the fallback fails
too, its error is the answer (the last one, as Envoy's composite cluster returns), so
the problem's `upstream` names the fallback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from gateway.errors import UpstreamError
from gateway.policies.retry import IDEMPOTENT_METHODS
from gateway.types import GatewayRequest, GatewayResponse, Handler, Policy

__all__ = ["ANY_METHOD", "HEADER", "IF_RETRYABLE", "Record", "fallback"]

# Outcomes where the request never reached the primary: any method may fall back.
ANY_METHOD = frozenset({"connect_error", "unhealthy", "saturated"})
# Outcomes where the primary may have acted on it: only a retryable request falls back.
IF_RETRYABLE = frozenset({"timeout", "reset"})
log = logging.getLogger("gateway.fallback")

HEADER = (b"x-gateway-fallback", b"true")
# Less than this left of the deadline is no time for a try: the deadline would cut it.
_MIN_LEFT = 0.001

Record = Callable[[str, str], None]
"""Counts one fallback decision: (the primary's outcome, `answered` | `failed` | `skipped`)."""


def _no_record(reason: str, result: str) -> None:
    pass


class _Unsent:
    """A streamed request body that tells whether any of it was taken yet: until then a
    failed try has sent none of it, and the fallback may still send it all."""

    __slots__ = ("_stream", "started")

    def __init__(self, stream: AsyncIterator[bytes]) -> None:
        self._stream = stream
        self.started = False

    def __aiter__(self) -> _Unsent:
        return self

    async def __anext__(self) -> bytes:
        self.started = True
        return await self._stream.__anext__()


def fallback(
    to: Handler,
    upstream: str,
    *,
    retry_non_idempotent: bool = False,
    record: Record | None = None,
) -> Policy:
    """Send the request once through `to` (the chain of upstream `upstream`) when the
    wrapped chain cannot answer; its answer carries `X-Gateway-Fallback: true`, and so
    does the gateway error when the fallback failed too. `request.fallback` names the
    upstream once the fallback try starts (the data plane logs it)."""
    count = record or _no_record

    def wrap(primary: Handler) -> Handler:
        async def handle(request: GatewayRequest) -> GatewayResponse:
            body = request.stream
            unsent = None
            if body is not None:
                unsent = _Unsent(body)
                request.stream = unsent
            try:
                return await primary(request)
            except UpstreamError as exc:
                reason = exc.outcome
                if reason not in ANY_METHOD and not (
                    reason in IF_RETRYABLE
                    and (
                        retry_non_idempotent
                        or request.keyed
                        or request.method in IDEMPOTENT_METHODS
                    )
                ):
                    raise
                if request.deadline.remaining() < _MIN_LEFT or (
                    unsent is not None and unsent.started
                ):
                    count(reason, "skipped")
                    raise
            log.debug(
                "falling back to %s after %s",
                upstream,
                reason,
                extra={"request_id": request.request_id, "route": request.route},
            )
            request.fallback = upstream
            request.hedge_won = False  # the answer is the fallback's, never a hedge's
            request.attempt += 1  # a resend, for the try's span
            request.exclude_targets = set()  # another upstream: none of its targets tried
            try:
                response = await to(request)
            except UpstreamError as exc:
                exc.headers.append(HEADER)
                count(reason, "failed")
                raise
            response.headers = [*response.headers, HEADER]
            count(reason, "answered")
            return response

        return handle

    return wrap
