"""Tracing's parts in one process: the `tracing` block, the exporter's batching and its
dropped-span count (with a fake OpenTelemetry exporter), the CLIENT-span policy, and
that with tracing unset OpenTelemetry is never imported."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode

from gateway.config.loader import ConfigError, load_config_text
from gateway.errors import UpstreamUnavailable
from gateway.ops.metrics import Metrics
from gateway.tracing.export import BatchExporter
from gateway.tracing.spans import (
    CLIENT,
    SERVER,
    SpanRecord,
    Tracer,
    TracingRules,
    client_spans,
)
from gateway.types import Deadline, GatewayRequest, GatewayResponse, WholeBody, closed
from tests.unit.test_trace_context import Sink

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = "00f067aa0ba902b7"
RULES = TracingRules("http://127.0.0.1:4318/", 1.0, ("tracecontext",), "svc", 0.5)


# --- the `tracing` block ----------------------------------------------------------------


def load(text: str) -> object:
    return load_config_text(textwrap.dedent(text), "cfg.yaml")


def test_tracing_is_off_unless_set() -> None:
    assert load_config_text("", "cfg.yaml").tracing is None


def test_tracing_block_with_defaults_and_percent() -> None:
    settings = load_config_text(
        "tracing: {endpoint: 'http://collector:4318', sample_ratio: 5%}\n", "cfg.yaml"
    )
    tracing = settings.tracing
    assert tracing is not None
    assert tracing.sample_ratio == pytest.approx(0.05)
    assert tracing.propagation == ("tracecontext",)
    assert tracing.service_name == "gateway"
    assert tracing.export_timeout == 3.0


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("{sample_ratio: 0.1}", "endpoint"),
        ("{endpoint: 'collector:4318'}", "invalid endpoint"),
        ("{endpoint: 'http://c:4318', sample_ratio: 1.5}", "between 0 and 1"),
        ("{endpoint: 'http://c:4318', propagation: [jaeger]}", "propagation"),
        ("{endpoint: 'http://c:4318', propagation: [b3, b3]}", "twice"),
        ("{endpoint: 'http://c:4318', propagation: []}", "at least one"),
        ("{endpoint: 'http://c:4318', export_timeout: 0s}", "greater than zero"),
        ("{endpoint: 'http://c:4318', sampler: always}", "sampler"),
    ],
)
def test_bad_tracing_blocks_are_errors(block: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(f"tracing: {block}\n", "cfg.yaml")
    assert any(message in e for e in info.value.errors), info.value.errors


def test_traces_url_appends_the_path_less_a_trailing_slash() -> None:
    assert RULES.traces_url == "http://127.0.0.1:4318/v1/traces"
    assert TracingRules("http://c:4318/otlp").traces_url == "http://c:4318/otlp/v1/traces"


# --- the exporter -----------------------------------------------------------------------


class FakeExporter(SpanExporter):
    def __init__(self, result: SpanExportResult = SpanExportResult.SUCCESS) -> None:
        self.result = result
        self.batches: list[list[ReadableSpan]] = []
        self.delay = 0.0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        time.sleep(self.delay)
        self.batches.append(list(spans))
        return self.result

    def shutdown(self) -> None:
        pass


def record(span_id: str, parent: str | None, kind: str = SERVER) -> SpanRecord:
    return SpanRecord(
        kind,
        "GET items" if kind == SERVER else "GET",
        TRACE,
        span_id,
        parent,
        kind == SERVER,
        b"k=v",
        1_000,
        2_000,
        {"http.request.method": "GET"},
        "boom" if kind == CLIENT else None,
    )


def dropped_total(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("gateway_spans_dropped_total")
    assert value is not None
    return value


async def until(condition: object, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_exported_spans_keep_the_ids_sent_upstream() -> None:
    fake = FakeExporter()
    metrics = Metrics()
    exporter = BatchExporter(RULES, metrics.spans_dropped, exporter=fake, schedule_delay=0.05)
    exporter.start()
    try:
        exporter.submit(record("1111111111111111", CALLER))
        exporter.submit(record("2222222222222222", "1111111111111111", CLIENT))
        await until(lambda: exporter.exported == 2)
    finally:
        await asyncio.to_thread(exporter.close)
    (server, client) = [s for batch in fake.batches for s in batch]
    assert server.context is not None and client.context is not None
    assert f"{server.context.trace_id:032x}" == TRACE
    assert f"{server.context.span_id:016x}" == "1111111111111111"
    assert server.parent is not None and f"{server.parent.span_id:016x}" == CALLER
    assert server.parent.is_remote and server.kind is SpanKind.SERVER
    assert client.parent is not None and not client.parent.is_remote
    assert f"{client.parent.span_id:016x}" == "1111111111111111"
    assert client.kind is SpanKind.CLIENT and client.status.status_code is StatusCode.ERROR
    assert (server.start_time, server.end_time) == (1_000, 2_000)
    assert server.context.trace_state.get("k") == "v"
    assert server.resource.attributes["service.name"] == "svc"
    assert dropped_total(metrics) == 0
    # The resource hashes once (the encoder groups spans by it), as the SDK's would.
    sdk = Resource(server.resource.attributes, server.resource.schema_url)
    assert server.resource == sdk and hash(server.resource) == hash(sdk)
    assert type(server.resource).__hash__ is not Resource.__hash__


async def test_failed_export_drops_and_counts_its_spans() -> None:
    fake = FakeExporter(SpanExportResult.FAILURE)
    metrics = Metrics()
    exporter = BatchExporter(RULES, metrics.spans_dropped, exporter=fake, schedule_delay=0.05)
    exporter.start()
    try:
        for i in range(3):
            exporter.submit(record(f"{i + 1:016x}", None))
        await until(lambda: dropped_total(metrics) == 3)
    finally:
        await asyncio.to_thread(exporter.close)
    assert exporter.dropped == 3 and exporter.exported == 0


async def test_full_queue_drops_at_once_and_never_blocks() -> None:
    fake = FakeExporter()
    fake.delay = 0.3
    metrics = Metrics()
    exporter = BatchExporter(
        RULES, metrics.spans_dropped, exporter=fake, schedule_delay=0.05, max_queue=4
    )
    exporter.start()
    try:
        started = time.monotonic()
        for i in range(10):
            exporter.submit(record(f"{i + 1:016x}", None))
        assert time.monotonic() - started < 0.05
        assert dropped_total(metrics) == 6
        await until(lambda: exporter.exported == 4)
    finally:
        await asyncio.to_thread(exporter.close)


async def test_close_exports_what_is_queued() -> None:
    fake = FakeExporter()
    exporter = BatchExporter(RULES, Metrics().spans_dropped, exporter=fake, schedule_delay=60)
    exporter.start()
    exporter.submit(record("1111111111111111", None))
    await asyncio.to_thread(exporter.close)
    assert exporter.exported == 1


# --- the CLIENT span of a try -------------------------------------------------------------


def request() -> GatewayRequest:
    return GatewayRequest(
        method="GET",
        path="/v1/x",
        query=b"a=1",
        headers=[(b"x-request-id", b"r")],
        deadline=Deadline.after(5),
        request_id="r",
        route="r",
    )


async def test_try_span_headers_are_sent_then_taken_back() -> None:
    sink = Sink()
    trace, _ = Tracer(RULES, sink).begin([(b"traceparent", f"00-{TRACE}-{CALLER}-01".encode())])
    sent: list[list[tuple[bytes, bytes]]] = []

    async def upstream(req: GatewayRequest) -> GatewayResponse:
        sent.append(list(req.headers))
        req.exclude_targets.add("http://10.0.0.1:8080")
        return GatewayResponse(
            200, [], WholeBody(b""), closed, upstream="u", target="http://10.0.0.1:8080"
        )

    handler = client_spans("u")(upstream)
    req = request()
    req.trace = trace
    await handler(req)
    assert req.headers == [(b"x-request-id", b"r")]  # the next try gets its own
    (span,) = sink.spans
    assert sent[0][-1] == (b"traceparent", f"00-{TRACE}-{span.span_id}-01".encode())
    assert span.attributes["url.full"] == "http://10.0.0.1:8080/v1/x?a=1"
    assert span.attributes["server.address"] == "10.0.0.1"
    assert span.attributes["server.port"] == 8080
    assert span.error is None


async def test_failed_try_span_names_its_target_and_error_code() -> None:
    sink = Sink()
    trace, _ = Tracer(RULES, sink).begin([])

    async def upstream(req: GatewayRequest) -> GatewayResponse:
        req.exclude_targets.add("http://10.0.0.2")
        raise UpstreamUnavailable("refused", upstream="u", outcome="connect_error")

    req = request()
    req.attempt = 2
    req.trace = trace
    with pytest.raises(UpstreamUnavailable):
        await client_spans("u")(upstream)(req)
    (span,) = sink.spans
    assert span.attributes["error.type"] == "upstream_unavailable"
    assert span.attributes["http.request.resend_count"] == 2
    assert span.attributes["server.port"] == 80
    assert span.error == "refused"


async def test_unsampled_tries_each_send_one_traceparent_of_their_own() -> None:
    tracer = Tracer(TracingRules("http://c", 0.0), Sink())
    trace, _ = tracer.begin([(b"traceparent", f"00-{TRACE}-{CALLER}-00".encode())])
    sent: list[list[tuple[bytes, bytes]]] = []

    async def upstream(req: GatewayRequest) -> GatewayResponse:
        sent.append(list(req.headers))
        return GatewayResponse(200, [], WholeBody(b""), closed)

    handler = client_spans("u")(upstream)
    req, backend = request(), request()
    req.trace = backend.trace = trace
    await handler(req)
    req.attempt = 1  # a retry of the same request
    await handler(req)
    await handler(backend)  # another backend of the same request
    ids = []
    for headers in sent:
        assert headers[0] == (b"x-request-id", b"r")
        (value,) = [v for n, v in headers if n == b"traceparent"]
        _, trace_id, span_id, flags = value.decode().split("-")
        assert (trace_id, flags) == (TRACE, "00")
        ids.append(span_id)
    assert ids[0] == trace.first_id  # drawn with the trace, built once
    assert len({*ids, trace.span_id, CALLER}) == 5


async def test_untraced_request_passes_through() -> None:
    async def upstream(req: GatewayRequest) -> GatewayResponse:
        assert req.headers == [(b"x-request-id", b"r")]
        return GatewayResponse(200, [], WholeBody(b""), closed)

    assert (await client_spans("u")(upstream)(request())).status == 200


# --- off means not imported ---------------------------------------------------------------


def test_tracing_unset_never_imports_opentelemetry(tmp_path: object) -> None:
    """Build the whole server (data plane, runtime, chains) from a config without
    `tracing`, in a fresh interpreter: no opentelemetry module may be loaded."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        from gateway.config.loader import load_config_text
        from gateway.server.process import GatewayServer
        from gateway.build.factory import build_runtime
        settings = load_config_text(
            "upstreams: {u: {targets: ['http://127.0.0.1:9']}}\\n"
            "routes: [{name: r, path: /r, upstream: u}]\\n", "x.yaml")
        server = GatewayServer(settings, "x.yaml", admin=False)
        assert type(server.data.config.app).__name__ == "DataPlane"
        build_runtime(settings)
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        assert not loaded, loaded
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_exporter_thread_is_not_started_before_serving() -> None:
    before = threading.active_count()
    BatchExporter(RULES, Metrics().spans_dropped, exporter=FakeExporter())
    assert threading.active_count() == before
