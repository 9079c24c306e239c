"""Fake requests, responses, handlers and a clock for testing policies in isolation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from gateway.errors import UpstreamError, UpstreamUnavailable
from gateway.types import Deadline, GatewayRequest, GatewayResponse, empty_body

__all__ = ["FakeClock", "Outcome", "Recorder", "connect_error", "make_request", "make_response"]


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_request(
    method: str = "GET",
    timeout: float = 5.0,
    *,
    body: bytes | None = None,
    stream: AsyncIterator[bytes] | None = None,
) -> GatewayRequest:
    return GatewayRequest(
        method=method,
        path="/x",
        query=b"",
        headers=[],
        deadline=Deadline.after(timeout),
        request_id="rid",
        route="r",
        body=body,
        stream=stream,
    )


def make_response(status: int = 200, on_close: Callable[[], None] | None = None) -> GatewayResponse:
    async def close() -> None:
        if on_close is not None:
            on_close()

    return GatewayResponse(status=status, headers=[], body=empty_body(), close=close)


Outcome = int | UpstreamError | float
"""A scripted try: a status code, an error to raise, or a float: sleep that long, then 200."""


@dataclass
class Recorder:
    """A handler that plays a script of outcomes (the last one repeats) and records
    every call: the request's attempt number and the responses it handed out."""

    script: Sequence[Outcome] = (200,)
    calls: list[int] = field(default_factory=list)
    responses: list[GatewayResponse] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)  # indexes of closed responses
    concurrent: int = 0
    max_concurrent: int = 0

    async def __call__(self, request: GatewayRequest) -> GatewayResponse:
        index = len(self.calls)
        self.calls.append(request.attempt)
        outcome = self.script[min(index, len(self.script) - 1)]
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if isinstance(outcome, UpstreamError):
                raise outcome
            status = 200
            if isinstance(outcome, float):
                await asyncio.sleep(outcome)
            else:
                status = outcome
        finally:
            self.concurrent -= 1
        response = make_response(status, on_close=lambda: self.closed.append(index))
        self.responses.append(response)
        return response


def connect_error() -> UpstreamUnavailable:
    return UpstreamUnavailable("refused", upstream="u", outcome="connect_error")
