"""Request bodies in, response bodies out: reading the client's body under its limits,
and streaming an answer back through ASGI `send`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from gateway.dataplane.compression import CompressionRules
from gateway.dataplane.headers import http_date, response_headers
from gateway.errors import (
    BodyTooLarge,
    ClientClosedRequest,
    GatewayError,
    RequestTimeout,
    problem_response,
)
from gateway.policies.expiry import Expiry
from gateway.types import GatewayResponse, Headers, Receive, Scope, Send, WholeBody, closed

__all__ = ["REPLAY_LIMIT", "BodyReader", "send_problem", "send_response"]

# Request bodies up to this size are read whole before the first try, so retries can
# replay them; larger or unknown-length bodies stream once and are never retried.
REPLAY_LIMIT = 64 * 1024


class BodyReader:
    """Reads the client's body from ASGI `receive`, enforcing `max_body_size` as it goes.

    Once the body is complete, `watch_disconnect` takes over `receive` to notice a client
    that goes away, so the upstream request can be cancelled and its connection freed.
    """

    __slots__ = (
        "_complete",
        "_receive",
        "done",
        "error",
        "finished",
        "idle_timeout",
        "limit",
        "received",
    )

    def __init__(self, receive: Receive, limit: int, idle_timeout: float | None = None) -> None:
        self._receive = receive
        self.limit = limit
        self.idle_timeout = idle_timeout  # the longest pause between two body chunks
        self.received = 0
        self.done = False  # the whole request body has been read
        self.finished = False  # the response is complete: a disconnect now is normal
        # Why reading stopped early, if it did: the client left, or sent too much. The
        # transport may wrap this in its own error; the gateway reports this one.
        self.error: GatewayError | None = None
        self._complete: asyncio.Event | None = None

    async def _next(self) -> bytes:
        try:
            if self.idle_timeout is None:
                message = await self._receive()
            else:
                with Expiry(self.idle_timeout):
                    message = await self._receive()
        except TimeoutError:
            self.error = RequestTimeout(
                f"the request body stalled for {self.idle_timeout:g}s",
                headers=[(b"connection", b"close")],
            )
            raise self.error from None
        except GatewayError as exc:  # a translation layer's refusal (gRPC-Web's base64)
            self.error = exc
            raise
        if message["type"] == "http.disconnect":
            self.error = ClientClosedRequest("the client went away while sending the body")
            raise self.error
        chunk: bytes = message.get("body", b"")
        self.received += len(chunk)
        if self.received > self.limit:
            self.error = BodyTooLarge(
                f"the request body exceeds max_body_size ({self.limit} bytes)"
            )
            raise self.error
        if not message.get("more_body", False):
            self.done = True
            if self._complete is not None:
                self._complete.set()
        return chunk

    async def read_all(self) -> bytes:
        parts = []
        while not self.done:
            chunk = await self._next()
            if chunk:
                parts.append(chunk)
        return b"".join(parts)

    async def stream(self) -> AsyncIterator[bytes]:
        while not self.done:
            chunk = await self._next()
            if chunk:
                yield chunk

    async def watch_disconnect(self, victim: asyncio.Task[None]) -> None:
        """Cancel `victim` when the client disconnects before the response is complete."""
        if not self.done:  # the body is still streaming upstream; `receive` is busy
            self._complete = asyncio.Event()
            await self._complete.wait()
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                if not self.finished:
                    victim.cancel("client disconnected")
                return


async def send_response(
    send: Send,
    response: GatewayResponse,
    request_id: bytes,
    reader: BodyReader,
    extra: Headers | None = None,
    scope: Scope | None = None,
) -> int:
    """Stream the upstream's response to the client; returns the body bytes sent.

    An answer with trailers (an HTTP/2 upstream's, gRPC's status) passes them on to a
    client whose server offers the ASGI `http.response.trailers` extension (HTTP/2);
    an HTTP/1.1 client gets the body without them."""
    headers = response_headers(response.headers, request_id)
    if extra:
        headers.extend(extra)
    trailers = response.trailers
    whole = response.whole
    if trailers is not None and (
        (not trailers and whole is not None) or scope is None or not trailing(scope)
    ):
        trailers = None  # none came (a trailers-only answer stays one), or nowhere to go
    start = {"type": "http.response.start", "status": response.status, "headers": headers}
    if trailers is not None:
        start["trailers"] = True
    await send(start)
    if whole is not None:  # the common small answer: one body message, nothing to iterate
        reader.finished = True
        await send({"type": "http.response.body", "body": whole, "more_body": False})
        sent = len(whole)
    else:
        sent = 0
        async for chunk in response.body:
            if chunk:
                sent += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        reader.finished = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    if trailers is not None:
        await send({"type": "http.response.trailers", "headers": trailers, "more_trailers": False})
    return sent


def trailing(scope: Scope) -> bool:
    """The client's server can send trailers (the ASGI extension)."""
    extensions = scope.get("extensions")
    return extensions is not None and "http.response.trailers" in extensions


async def send_problem(
    send: Send,
    error: GatewayError,
    request_id: str,
    extra: Headers | None = None,
    compression: CompressionRules | None = None,
    accept: bytes | None = None,
) -> int:
    """Answer with the problem+json document for `error`; returns the body's length.
    With the route's `compression` (and the client's `accept`), it is an answer like any
    other: `Vary: Accept-Encoding`, and compressed when above `min_size` (rarely)."""
    headers, body = problem_response(error, request_id, extra, date=http_date())
    if compression is not None:
        answer = GatewayResponse(error.status, headers, WholeBody(body), closed, whole=body)
        compression.apply(answer, accept)
        headers, body = answer.headers, answer.whole or b""
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return len(body)
