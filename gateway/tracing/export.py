"""Export: the spans of sampled requests, in batches, to an OTLP/HTTP (protobuf)
collector, on a thread of its own. The only module that imports OpenTelemetry, and it
is imported only when the `tracing` block is set (`gateway/server/process.py`).

The event loop only appends a plain `SpanRecord` to a bounded queue (`submit`); the
export thread wakes every `SCHEDULE_DELAY` (or as soon as a full batch is waiting),
turns the records into the SDK's finished spans (`ReadableSpan`, with the ids the
gateway already sent upstream) and hands the batch to `OTLPSpanExporter`, whose whole
try, retries included, is bounded by `export_timeout`. The spans are built directly
rather than started and ended through an SDK `Tracer`: the same objects for a
twentieth of the work (1 µs a span instead of 20), and this thread holds the
interpreter's lock while it works. A collector that is slow or
down therefore costs a request nothing: spans that find the queue full, and batches
whose export failed, are dropped and counted in `gateway_spans_dropped_total` (within
`export_timeout` of the failed export), and a warning says so at most once a minute.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import requests
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from gateway import __version__
from gateway.tracing.spans import SERVER, SpanRecord, TracingRules

__all__ = ["MAX_BATCH", "MAX_QUEUE", "SCHEDULE_DELAY", "BatchExporter", "Count"]

log = logging.getLogger("gateway.tracing")

SCHEDULE_DELAY = 1.0  # seconds between exports: spans reach the collector within ~2 s
MAX_BATCH = 512  # spans per export request
MAX_QUEUE = 8192  # spans waiting for export; more are dropped (and counted)
WARN_EVERY = 60.0  # seconds between two warnings about dropped spans
# OpenTelemetry's exporter logs every failed export; a dead collector would make that
# a line a second. The gateway's own warning says it once a minute instead.
_EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)


class _HashedResource(Resource):
    """A `Resource` that hashes once. OpenTelemetry's encoder groups every span of a
    batch by its resource, and `Resource.__hash__` serialises the attributes to JSON
    each time: about 8 µs a span, a tenth of what exporting one costs. The attributes
    of this one never change."""

    _hash: int

    @classmethod
    def of(cls, resource: Resource) -> _HashedResource:
        fixed = cls(resource.attributes, resource.schema_url)
        fixed._hash = Resource.__hash__(fixed)
        return fixed

    def __hash__(self) -> int:
        return self._hash


class Count(Protocol):
    """What counts dropped spans: a prometheus-client counter."""

    def inc(self, amount: float = 1) -> None: ...


class _OnceAMinute(logging.Filter):
    """Lets one record through per `WARN_EVERY` seconds."""

    def __init__(self) -> None:
        super().__init__()
        self._next = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + WARN_EVERY
        return True


class BatchExporter:
    """The span sink of a `Tracer`: a bounded queue the event loop appends to and a
    thread that exports it in batches (see the module's docstring). `start` must be
    called in the process that serves (after the supervisor started it) with the event
    loop running; `close` exports what is left, bounded, and stops the thread."""

    def __init__(
        self,
        rules: TracingRules,
        dropped: Count,
        *,
        exporter: SpanExporter | None = None,
        schedule_delay: float = SCHEDULE_DELAY,
        max_queue: int = MAX_QUEUE,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.rules = rules
        self._dropped_metric = dropped
        if exporter is None:
            session = requests.Session()
            session.trust_env = False  # never through $HTTPS_PROXY and friends
            exporter = OTLPSpanExporter(
                endpoint=rules.traces_url, timeout=rules.export_timeout, session=session
            )
            logging.getLogger(_EXPORTER_LOGGER).addFilter(_OnceAMinute())
        self._exporter = exporter
        self._delay = schedule_delay
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._queue: collections.deque[SpanRecord] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warn_after = 0.0
        self.exported = 0  # spans the collector accepted
        self.dropped = 0  # spans dropped: queue full, or their export failed
        # The SDK's resource (with OTEL_RESOURCE_ATTRIBUTES and the SDK's own fields).
        self._resource = _HashedResource.of(
            Resource.create({"service.name": rules.service_name, "service.version": __version__})
        )
        self._scope = InstrumentationScope("gateway", __version__)

    # -- the event loop's side ------------------------------------------------------

    def start(self) -> None:
        """Start the export thread; call it with the serving event loop running."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="gateway-span-export", daemon=True)
        self._thread.start()

    def submit(self, span: SpanRecord) -> None:
        """Queue a finished span; never blocks. A full queue drops it (and counts it)."""
        queue = self._queue
        if len(queue) >= self._max_queue:
            self._count_dropped(1, "the export queue is full")
            return
        queue.append(span)
        if len(queue) == self._max_batch:
            self._wake.set()

    def describe(self) -> dict[str, Any]:
        return {
            "spans_exported": self.exported,
            "spans_dropped": self.dropped,
            "spans_queued": len(self._queue),
        }

    def _count_dropped(self, count: int, why: str) -> None:
        """On the event loop's thread (the metric is counted there, as every other)."""
        self.dropped += count
        self._dropped_metric.inc(count)
        now = time.monotonic()
        if now >= self._warn_after:
            self._warn_after = now + WARN_EVERY
            log.warning(
                "spans dropped: %s",
                why,
                extra={
                    "dropped": count,
                    "dropped_total": self.dropped,
                    "endpoint": self.rules.traces_url,
                },
            )

    # -- the export thread ----------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay)
            self._wake.clear()
            self._export_batches()
        self._export_batches()  # what was queued before `close`

    def _export_batches(self) -> None:
        queue = self._queue
        while queue:
            batch = [queue.popleft() for _ in range(min(len(queue), self._max_batch))]
            try:
                spans = self._sdk_spans(batch)
                result = self._exporter.export(spans)
            except Exception:  # an exporter bug must not end the thread
                log.exception("span export failed")
                result = SpanExportResult.FAILURE
            if result is SpanExportResult.SUCCESS:
                self.exported += len(batch)
            else:
                self._dropped_from_thread(len(batch))
            if len(queue) < self._max_batch and not self._stopping:
                return  # the rest waits for the next round

    def _dropped_from_thread(self, count: int) -> None:
        why = f"the collector at {self.rules.traces_url} did not take a batch"
        loop = self._loop
        try:
            if loop is None:
                raise RuntimeError("not started")
            loop.call_soon_threadsafe(self._count_dropped, count, why)
        except RuntimeError:  # the loop is closed: the process is stopping
            self._count_dropped(count, why)

    def _sdk_spans(self, batch: Sequence[SpanRecord]) -> list[ReadableSpan]:
        """The SDK's finished spans for `batch`: the gateway's ids, times, attributes."""
        resource, scope = self._resource, self._scope
        spans = []
        states: dict[bytes, TraceState] = {}  # a request's spans share its tracestate
        for record in batch:
            trace_id = int(record.trace_id, 16)
            state = None
            if record.tracestate:
                state = states.get(record.tracestate)
                if state is None:
                    header = record.tracestate.decode("latin-1")
                    state = states[record.tracestate] = TraceState.from_header([header])
            parent = None
            if record.parent_id is not None:
                parent = SpanContext(
                    trace_id,
                    int(record.parent_id, 16),
                    is_remote=record.remote_parent,
                    trace_flags=_SAMPLED,
                    trace_state=state,
                )
            status = _UNSET if record.error is None else Status(StatusCode.ERROR, record.error)
            spans.append(
                ReadableSpan(
                    name=record.name,
                    context=SpanContext(
                        trace_id,
                        int(record.span_id, 16),
                        is_remote=False,
                        trace_flags=_SAMPLED,
                        trace_state=state,
                    ),
                    parent=parent,
                    resource=resource,
                    attributes=record.attributes,
                    kind=SpanKind.SERVER if record.kind == SERVER else SpanKind.CLIENT,
                    instrumentation_scope=scope,
                    status=status,
                    start_time=record.start_ns,
                    end_time=record.end_ns,
                )
            )
        return spans

    def close(self, timeout: float | None = None) -> None:
        """Export what is queued (within `timeout`, by default `export_timeout` and a
        second) and stop the thread. Blocking: call it off the event loop."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.rules.export_timeout + 1.0 if timeout is None else timeout)
        self._exporter.shutdown()

    def __repr__(self) -> str:
        return (
            f"BatchExporter({self.rules.traces_url}, queued={len(self._queue)}, "
            f"exported={self.exported}, dropped={self.dropped})"
        )
