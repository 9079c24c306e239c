"""Retries: another try, on another target, when it is safe, useful and affordable.

Safe: the method is idempotent (or the route opted in with `retry_non_idempotent`, or the
request carries an Idempotency-Key the gateway holds: `request.keyed`) and
the request body can be replayed (a streamed body is sent once). Useful: the failure's
outcome (`connect_error`, `timeout`) or the response status is listed in `on`. A gRPC
call's trailers-only answer is retried when its status is listed by name (`unavailable`,
`resource-exhausted`, `deadline-exceeded`, `internal`): listing one is the opt-in, so
it applies whatever the method (gRPC calls are POSTs), the body still replayable.
Affordable: the backoff sleep ends before the route deadline and the upstream's retry
budget (`budget.py`) has room. Otherwise the last outcome stands: the last upstream
response is passed through (responses given up on are closed), or the last error raised.

Each try goes through the breaker and the bulkhead below this policy, and is bounded by
`try_timeout` (read_timeout and the deadline) innermost.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.policies.budget import RetryBudget
from gateway.types import GatewayRequest, GatewayResponse, Handler, Policy

__all__ = ["GRPC_STATUS_NAMES", "IDEMPOTENT_METHODS", "RetryRules", "backoff_delay", "retry"]

log = logging.getLogger("gateway.retry")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RetryRules:
    """When to try again (the `retries` block's fields, but the budget's ratio)."""

    attempts: int = 1  # tries after the first; 0 turns retries off
    backoff: float = 0.025  # seconds before the first retry, doubled for each next one
    # Outcomes (`connect_error`, `timeout`) and 5xx statuses that are worth a retry.
    on: tuple[str | int, ...] = ("connect_error",)


# `on` names for a gRPC call's status, read off a trailers-only answer.
GRPC_STATUS_NAMES = {
    "unavailable": 14,
    "resource-exhausted": 8,
    "deadline-exceeded": 4,
    "internal": 13,
}


def _trailers_only_status(response: GatewayResponse) -> int | None:
    """The grpc-status of a trailers-only answer: in its headers, or (as some servers
    send it) in trailers after an empty body, the whole answer in. Else None."""
    if response.status != 200:
        return None
    fields = response.headers
    if response.whole == b"" and response.trailers:
        fields = [*fields, *response.trailers]
    for name, value in fields:
        if name.lower() == b"grpc-status":
            return int(value) if value.isdigit() else None
    return None


def backoff_delay(base: float, retry_number: int, rng: random.Random) -> float:
    """The sleep before retry `retry_number` (1-based): `base` doubled per retry, times
    a random factor in [0.5, 1.5) so tries that failed together do not retry together."""
    return float(base * 2 ** (retry_number - 1) * rng.uniform(0.5, 1.5))


def retry(
    settings: RetryRules,
    budget: RetryBudget,
    *,
    retry_non_idempotent: bool = False,
    upstream: str | None = None,
    rng: random.Random | None = None,
    sleep: Sleep = asyncio.sleep,
) -> Policy:
    attempts = settings.attempts
    base = settings.backoff
    on_outcomes = frozenset(o for o in settings.on if isinstance(o, str))
    on_statuses = frozenset(o for o in settings.on if isinstance(o, int))
    on_grpc = frozenset(GRPC_STATUS_NAMES[o] for o in on_outcomes if o in GRPC_STATUS_NAMES)
    random_source = rng or random.Random()

    def wrap(inner: Handler) -> Handler:
        async def handle(request: GatewayRequest) -> GatewayResponse:
            budget.record_request()
            may_retry = attempts > 0 and (
                retry_non_idempotent or request.keyed or request.method in IDEMPOTENT_METHODS
            )
            retries = 0
            while True:
                request.attempt = retries
                response: GatewayResponse | None = None
                failure: UpstreamError | None = None
                try:
                    response = await inner(request)
                except UpstreamError as exc:
                    if not (may_retry and exc.outcome in on_outcomes):
                        raise
                    failure = exc
                else:
                    if not (may_retry and response.status in on_statuses) and not (
                        on_grpc
                        and request.grpc
                        and attempts > 0
                        and _trailers_only_status(response) in on_grpc
                    ):
                        return response

                # A retryable outcome: retry only if it is still safe and affordable.
                retries += 1
                delay = backoff_delay(base, retries, random_source)
                if (
                    retries > attempts
                    # the body went out once already (streamed), so a replay is impossible
                    or not request.replayable
                    or delay >= request.deadline.remaining()
                    or not budget.try_spend()
                ):
                    if response is not None:
                        return response
                    assert failure is not None
                    raise failure
                if response is not None:
                    outcome = str(response.status)
                    await response.close()  # given up on: free its connection and slot
                else:
                    outcome = failure.outcome if failure is not None else "error"
                log.debug(
                    "retrying after %s (retry %d of %d, in %.0f ms)",
                    outcome,
                    retries,
                    attempts,
                    delay * 1000,
                    extra={"request_id": request.request_id, "route": request.route},
                )
                await sleep(delay)
                if request.deadline.expired():
                    raise UpstreamTimeout(
                        "the route deadline passed before the next try could start",
                        route=request.route,
                        upstream=upstream,
                    ) from failure

        return handle

    return wrap
