"""Spans: the process's `Tracer`, one request's `RequestTrace` (its SERVER span and the
ids every try is sent with) and one try's `TrySpan` (a CLIENT span), plus the policy and
the context manager that give every upstream try and WebSocket handshake its span.

Everything here is built only while the `tracing` block is set: the server makes the
`Tracer`, the factory composes `client_spans` into each chain, and the traced data plane
(`gateway/dataplane/traced.py`) starts a `RequestTrace` per request and hands it on
with the request: on its `GatewayRequest` (`request.trace`) for every try, on its
`Exchange` for the logging phase; a WebSocket session's is in `CURRENT`, a context
variable, for the handshake. A request that is not sampled only gets
ids: what its tries send upstream and what its access log line says. A sampled one also
gets timestamps and attributes, handed as a plain `SpanRecord` to the sink (the
exporter, `export.py`), which builds the SDK spans on its own thread.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections.abc import Awaitable
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit

from gateway.errors import GatewayError
from gateway.ops.logs import AccessLog, scrub
from gateway.tracing.propagation import (
    HEADER_NAME,
    ID_BATCH,
    ID_SLICES,
    NO_TRACE_HEADER_IN,
    TRACE_HEADERS,
    TRACEPARENT,
    TRACESTATE,
    b3_headers,
    b3_single,
    draw_ids,
    extract,
    format_traceparent,
)
from gateway.types import GatewayRequest, GatewayResponse, Handler, Headers, Policy

__all__ = [
    "CLIENT",
    "CURRENT",
    "SERVER",
    "ContinuedTrace",
    "RequestTrace",
    "SpanRecord",
    "SpanSink",
    "TracedAccessLog",
    "Tracer",
    "TracingRules",
    "TrySpan",
    "client_spans",
    "error_type",
    "handshake_span",
]

SERVER = "server"
CLIENT = "client"
Attributes = dict[str, str | int]


@dataclass(frozen=True, slots=True)
class TracingRules:
    """The `tracing` block's values (docs/tracing.md)."""

    endpoint: str  # the collector's base URL; spans go to `{endpoint}/v1/traces`
    sample_ratio: float = 0.01  # share of requests without a parent that are sampled
    propagation: tuple[str, ...] = ("tracecontext",)  # read in this order, all written
    service_name: str = "gateway"  # the resource's service.name
    export_timeout: float = 3.0  # seconds one export may take, retries included

    @property
    def traces_url(self) -> str:
        return self.endpoint.rstrip("/") + "/v1/traces"


@dataclass(slots=True)
class SpanRecord:
    """One finished span of a sampled request, as plain values: ids in lowercase hex,
    times in Unix nanoseconds, `error` the status description of a failed span (None:
    status unset)."""

    kind: str  # SERVER or CLIENT
    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    remote_parent: bool  # the parent is the caller's span, not one of ours
    tracestate: bytes | None
    start_ns: int
    end_ns: int
    attributes: Attributes
    error: str | None = None


class SpanSink(Protocol):
    """Where finished spans go (`export.BatchExporter`): `submit` is called on the event
    loop and must never block."""

    def submit(self, span: SpanRecord) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    def start(self) -> None:
        """Start exporting (in the serving process, its event loop running)."""

    def close(self, timeout: float | None = None) -> None:
        """Export what is left, bounded, and stop; blocking (call it off the loop)."""


class Tracer:
    """The process's tracer: the rules, where finished spans go, and the sampling dice.
    `begin` starts one request's trace from its headers."""

    __slots__ = (
        "_countdown",
        "_data",
        "_next",
        "_plain",
        "_random",
        "_ratio",
        "_text",
        "b3",
        "rules",
        "sink",
        "tracecontext",
    )

    def __init__(
        self, rules: TracingRules, sink: SpanSink, rng: random.Random | None = None
    ) -> None:
        self.rules = rules
        self.sink = sink
        self._ratio = rules.sample_ratio
        self._random = (rng or random.Random()).random
        self.tracecontext = "tracecontext" in rules.propagation  # tries get `traceparent`
        self.b3 = "b3" in rules.propagation  # tries get the X-B3-* headers
        self._plain = rules.propagation == ("tracecontext",)  # `traceparent` alone
        # `ID_BATCH` requests' ids (`propagation.draw_ids`), the next one's at index
        # `_next`: drawn from the OS on first use (in the serving process: a worker never
        # shares its parent's).
        self._text = ""
        self._data = b""
        self._next = ID_BATCH
        # Roots not sampled before the next one is: a geometric draw, the same odds as
        # one draw per request, for a decrement per request.
        self._countdown = self._gap()

    def begin(self, raw: Headers) -> tuple[RequestTrace, bool]:
        """A request's trace from its headers (`continued` when some trace header is
        present, else `root`), and whether one was: the trace headers must then not
        be forwarded as they came (the HTTP path drops them in `parse_incoming`)."""
        if NO_TRACE_HEADER_IN(map(HEADER_NAME, raw)):
            return self.root(), False
        return self.continued(raw), True

    def root(self) -> RequestTrace:
        """The trace of a request that sent no trace header: new ids, the first try's
        among them, the sampling decision by `sample_ratio`, and the first try's
        headers.

        Most requests carry no trace header, and most of those are not sampled: that
        path is written for the fewest instructions (the ids sliced from one random
        string, no call of `__init__`, the first try's `traceparent` built here, once),
        as it is the whole cost of tracing for them."""
        k = self._next  # `_take`, inlined: a call less per request
        if k == ID_BATCH:
            self._text, self._data = draw_ids()
            k = 0
        self._next = k + 1
        text = self._text
        trace_id, span_id, traceparent, first_id = ID_SLICES[k]
        trace = _new(RequestTrace)
        trace.tracer = self
        trace.trace_id = text[trace_id]
        trace.span_id = text[span_id]
        countdown = self._countdown
        if countdown and self._plain:  # not sampled, `traceparent` alone: the usual case
            self._countdown = countdown - 1
            trace.sampled = False
            trace.first = [(TRACEPARENT, self._data[traceparent])]
            return trace  # `first_id` unset: it is in the header (`start_try`)
        trace.first_id = text[first_id]
        trace.sampled = sampled = self._sample_root()
        if sampled:
            trace.server = None
            trace.start_ns = time.time_ns()
        trace.first = trace.headers_for(trace.first_id)
        return trace

    def continued(self, raw: Headers) -> RequestTrace:
        """The trace of a request that sent some trace header: the parent is the first
        listed format that is present and valid (none: a root, as `root` makes), the
        sampling decision the parent's when it made one, else `sample_ratio`'s."""
        extracted = extract(raw, self.rules.propagation)
        parent = extracted.parent
        trace_id, span_id, _, first_id = ID_SLICES[self._take()]
        text = self._text
        if parent is None or parent.trace_id is None:
            tid, parent_id = text[trace_id], None
        else:
            tid, parent_id = parent.trace_id, parent.span_id
        if parent is not None and parent.sampled is not None:
            sampled = parent.sampled
        else:
            sampled = self._sample_root()
        return ContinuedTrace(
            self,
            tid,
            text[span_id],
            parent_id,
            sampled,
            text[first_id],
            extracted.tracestate,
            extracted.single,
        )

    def new_span_id(self) -> str:
        """A span id for a try after a request's first."""
        k = self._take()
        return self._text[ID_SLICES[k][3]]

    def _take(self) -> int:
        """The index of the next request's ids in `_text` (a new draw when used up)."""
        k = self._next
        if k == ID_BATCH:
            self._text, self._data = draw_ids()
            k = 0
        self._next = k + 1
        return k

    def _sample_root(self) -> bool:
        """The decision for a request the caller left it to: a step of the countdown
        (`begin` inlines it for the usual, unsampled case)."""
        countdown = self._countdown
        if countdown:
            self._countdown = countdown - 1
            return False
        self._countdown = self._gap()
        return True

    def _gap(self) -> int:
        """How many roots go unsampled before the next sampled one, drawn at random:
        P(gap >= k) = (1 - sample_ratio) ** k, so each root is sampled with
        `sample_ratio`'s odds, independently."""
        ratio = self._ratio
        if ratio >= 1.0:
            return 0
        if ratio <= 0.0:
            return _NEVER
        gap = math.log(1.0 - self._random()) / math.log1p(-ratio)
        return _NEVER if gap >= _NEVER else int(gap)  # a ratio near 0 can make it inf

    def describe(self) -> dict[str, Any]:
        """What the status page shows: where spans go, how many, and how many were lost."""
        rules = self.rules
        return {
            "endpoint": rules.traces_url,
            "sample_ratio": rules.sample_ratio,
            "propagation": list(rules.propagation),
            "service_name": rules.service_name,
            **self.sink.describe(),
        }

    def __repr__(self) -> str:
        return f"Tracer({self.rules.traces_url}, sample_ratio={self._ratio})"


_new = object.__new__
_NEVER = sys.maxsize  # the countdown of `sample_ratio: 0`: no root is ever sampled


class RequestTrace:
    """One request's trace: its trace id, its SERVER span's id, the sampling decision
    and, when the caller sent a trace (`ContinuedTrace`), the caller's span (the
    parent) and `tracestate`. `first_id` and `first` are the span id of the request's
    first try and the headers naming it, drawn and built with the trace (a request has
    one try, most of the time); a try after it gets a new id. An unsampled root leaves
    `first_id` unset: it is in its `traceparent` (`first_span_id`). `server` is what the
    data plane noted at the start for the SERVER span's attributes and `start_ns` its
    start (sampled requests only). `Tracer.root` fills a root's slots without
    `__init__`."""

    __slots__ = (
        "first",
        "first_id",
        "sampled",
        "server",
        "span_id",
        "start_ns",
        "trace_id",
        "tracer",
    )

    # A root has no parent; `ContinuedTrace` has slots for these.
    parent_id: str | None = None
    tracestate: bytes | None = None
    b3_single: bool = False  # the caller sent the single `b3` header

    tracer: Tracer
    trace_id: str
    span_id: str
    first_id: str
    sampled: bool
    first: Headers | None  # the first try's headers; None once it took them
    server: Any
    start_ns: int

    def start_try(self) -> TrySpan:
        """A CLIENT span for one upstream try (or WebSocket handshake): a new span id
        (the one drawn with the trace, for the first), the headers that carry it
        upstream, and its start when sampled."""
        first = self.first
        if first is not None:
            self.first = None
            return TrySpan(self, self.first_span_id(first), first)
        span_id = self.tracer.new_span_id()
        return TrySpan(self, span_id, self.headers_for(span_id))

    def first_span_id(self, first: Headers) -> str:
        """The first try's span id: an unsampled root's is only in its `traceparent`
        (`Tracer.root` takes no slice it may not need)."""
        try:
            return self.first_id
        except AttributeError:
            return first[0][1][36:52].decode("ascii")

    def headers_for(self, span_id: str) -> Headers:
        """The trace headers a try sends: every listed format, naming `span_id` as the
        parent, and the caller's `tracestate` unchanged."""
        tracer = self.tracer
        out: Headers = []
        if tracer.tracecontext:
            out.append((TRACEPARENT, format_traceparent(self.trace_id, span_id, self.sampled)))
            if self.tracestate is not None:
                out.append((TRACESTATE, self.tracestate))
        if tracer.b3:
            out.extend(b3_headers(self.trace_id, span_id, self.sampled))
            if self.b3_single:
                out.append(b3_single(self.trace_id, span_id, self.sampled))
        return out

    def end(self, name: str, attributes: Attributes, error: str | None = None) -> None:
        """End the SERVER span now (sampled requests only; a no-op otherwise)."""
        if not self.sampled:
            return
        self.tracer.sink.submit(
            SpanRecord(
                SERVER,
                name,
                self.trace_id,
                self.span_id,
                self.parent_id,
                True,
                self.tracestate,
                self.start_ns,
                time.time_ns(),
                attributes,
                error,
            )
        )

    def __repr__(self) -> str:
        flags = "sampled" if self.sampled else "not sampled"
        return f"RequestTrace({self.trace_id}/{self.span_id}, parent={self.parent_id}, {flags})"


class ContinuedTrace(RequestTrace):
    """The trace of a request that sent trace headers: the caller's span is the parent
    (when valid), its `tracestate` is passed on."""

    __slots__ = ("b3_single", "parent_id", "tracestate")

    def __init__(
        self,
        tracer: Tracer,
        trace_id: str,
        span_id: str,
        parent_id: str | None,
        sampled: bool,
        first_id: str,
        tracestate: bytes | None = None,
        b3_single: bool = False,
    ) -> None:
        self.tracer = tracer
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.first_id = first_id
        self.tracestate = tracestate
        self.b3_single = b3_single
        self.first = self.headers_for(first_id)
        if sampled:
            self.server = None
            self.start_ns = time.time_ns()


class TrySpan:
    """The CLIENT span of one try: its id, the headers naming it, and its start."""

    __slots__ = ("headers", "span_id", "start_ns", "trace")

    def __init__(self, trace: RequestTrace, span_id: str, headers: Headers) -> None:
        self.trace = trace
        self.span_id = span_id
        self.headers = headers
        self.start_ns = time.time_ns() if trace.sampled else 0

    def end(self, name: str, attributes: Attributes, error: str | None = None) -> None:
        trace = self.trace
        if not trace.sampled:
            return
        trace.tracer.sink.submit(
            SpanRecord(
                CLIENT,
                name,
                trace.trace_id,
                self.span_id,
                trace.span_id,
                False,
                trace.tracestate,
                self.start_ns,
                time.time_ns(),
                attributes,
                error,
            )
        )

    def __repr__(self) -> str:
        return f"TrySpan({self.trace.trace_id}/{self.span_id})"


# The WebSocket session being served by the current task, while tracing is on.
CURRENT: ContextVar[RequestTrace | None] = ContextVar("gateway_trace", default=None)


def error_type(exc: BaseException, *, timed_out: bool = False) -> tuple[str, str]:
    """`error.type` and the status description of a failed try: the gateway's error
    code (`upstream_unavailable`...), `upstream_timeout` for a try cut by a deadline,
    `cancelled` when the request was cancelled otherwise (the client left), else the
    exception's class (OTel's rule)."""
    if isinstance(exc, GatewayError):
        return exc.code, exc.detail
    if isinstance(exc, asyncio.CancelledError | TimeoutError):
        if timed_out:
            return "upstream_timeout", "the try was cut by the deadline"
        return "cancelled", "the try was cancelled (the client left, or the gateway stopped)"
    return type(exc).__qualname__, str(exc) or type(exc).__qualname__


def _server(url: str) -> tuple[str, int]:
    """`server.address` and `server.port` of a target URL (parsed once per target)."""
    found = _SERVERS.get(url)
    if found is None:
        parts = urlsplit(url)
        found = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        if len(_SERVERS) < _MAX_SERVERS:
            _SERVERS[url] = found
    return found


_SERVERS: dict[str, tuple[str, int]] = {}  # target URL: (server.address, server.port)
_MAX_SERVERS = 4096  # targets come from config (and health changes): bounds a bug


def _try_attributes(
    request: GatewayRequest, target: str | None, upstream: str, protocol: str
) -> Attributes:
    attributes: Attributes = {
        "http.request.method": request.method,
        "network.protocol.version": protocol,
        "gateway.upstream": upstream,
    }
    if request.attempt:
        attributes["http.request.resend_count"] = request.attempt
    if target is not None:
        address, port = _server(target)
        attributes["server.address"] = address
        attributes["server.port"] = port
        url = target.rstrip("/") + request.path
        if request.query:
            url += "?" + request.query.decode("latin-1")
        attributes["url.full"] = scrub(url)
    return attributes


def client_spans(upstream: str, protocol: str = "1.1") -> Policy:
    """One CLIENT span per try, composed by the factory between the bulkhead and the
    try timeout (so queueing for a slot is not in it, and a try cut by `read_timeout`
    ends it as `upstream_timeout`). The try is sent with headers naming its span; the
    span ends when the answer's head is in (OTel's HTTP client instrumentations do the
    same for a streamed body), or with the try's failure. An unsampled request's try
    only gets its headers (and keeps them: the next try takes them out)."""

    def wrap(inner: Handler) -> Handler:
        def handle(request: GatewayRequest) -> Awaitable[GatewayResponse]:
            # A plain function, not a coroutine: an unsampled try (nearly all of them)
            # is handed to `inner` with its headers and no frame of ours around it.
            trace: RequestTrace | None = request.trace
            if trace is None:  # a backend call outside a traced request (none today)
                return inner(request)
            if trace.sampled:
                return traced(request, trace)
            first = trace.first
            if first is not None:  # the first try: its headers were built with the trace
                trace.first = None
                # In place: the list is this request's own (`parse_incoming` built it),
                # and a later try takes these out (below; a hedge's copy too).
                request.headers.extend(first)
            else:  # a retry, a hedge, another backend: the last try's headers out
                request.headers = [
                    h for h in request.headers if h[0] not in TRACE_HEADERS
                ] + trace.headers_for(trace.tracer.new_span_id())
            return inner(request)

        async def traced(request: GatewayRequest, trace: RequestTrace) -> GatewayResponse:
            headers = request.headers
            span = trace.start_try()
            request.headers = headers + span.headers
            tried = set(request.exclude_targets)
            try:
                response = await inner(request)
            except BaseException as exc:
                request.headers = headers
                # The pool adds the target it picked to `exclude_targets`.
                target = next(iter(request.exclude_targets - tried), None)
                attributes = _try_attributes(request, target, upstream, protocol)
                code, detail = error_type(exc, timed_out=request.deadline.expired())
                attributes["error.type"] = code
                span.end(request.method, attributes, detail)
                raise
            request.headers = headers
            attributes = _try_attributes(request, response.target, upstream, protocol)
            status = response.status
            attributes["http.response.status_code"] = status
            error = None
            if status >= 400:  # OTel: a CLIENT span fails on any 4xx or 5xx
                attributes["error.type"] = str(status)
                error = f"the upstream answered {status}"
            span.end(request.method, attributes, error)
            return response

        return handle

    return wrap


class handshake_span:
    """`with handshake_span(...) as headers:` around one WebSocket opening handshake:
    the CLIENT span of that try (when the request is traced), `headers` being the
    trace headers to send with it (text, as the `websockets` client takes them; empty
    when untraced). An exception with a `response` (the upstream refused the upgrade)
    ends the span with that status; any other ends it as a failure; none, with 101."""

    __slots__ = ("_attempt", "_span", "_target", "_upstream", "_url", "headers")

    def __init__(self, upstream: str, target: str, path: str, query: bytes, attempt: int) -> None:
        trace = CURRENT.get()
        self._span = span = trace.start_try() if trace is not None else None
        self.headers: list[tuple[str, str]] = (
            [(n.decode("latin-1"), v.decode("latin-1")) for n, v in span.headers]
            if span is not None
            else []
        )
        self._upstream = upstream
        self._target = target
        self._url = target.rstrip("/") + path + ("?" + query.decode("latin-1") if query else "")
        self._attempt = attempt

    def __enter__(self) -> list[tuple[str, str]]:
        return self.headers

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        if span is None or not span.trace.sampled:
            return
        address, port = _server(self._target)
        attributes: Attributes = {
            "http.request.method": "GET",
            "server.address": address,
            "server.port": port,
            "url.full": scrub(self._url),
            "network.protocol.version": "1.1",
            "gateway.upstream": self._upstream,
        }
        if self._attempt:
            attributes["http.request.resend_count"] = self._attempt
        error: str | None = None
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            attributes["http.response.status_code"] = status
            attributes["error.type"] = str(status)
            error = f"the upstream refused the upgrade with {status}"
        elif exc is not None:
            code, error = error_type(exc)
            attributes["error.type"] = code
        else:
            attributes["http.response.status_code"] = 101
        span.end("GET", attributes, error)


class TracedAccessLog(AccessLog):
    """The access log while tracing is on: every line carries `trace_id` and the SERVER
    span's `span_id`, sampled or not (the logging phase writes them from the request's
    trace); `null` for an answer the HTTP protocol made before any request reached the
    data plane (no trace was started for it)."""

    __slots__ = ()
    traced = True
