"""Tracing end to end: the real gateway process between real upstreams that echo the
headers they got and a real OTLP/HTTP collector started here (a tiny ASGI app on
127.0.0.1 that decodes `/v1/traces` with opentelemetry-proto).

The chain checked is the one an operator's trace shows: the caller's span -> the
gateway's SERVER span -> one CLIENT span per try -> the upstream, whose `traceparent`
names that try's CLIENT span (never the caller's)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from websockets.asyncio.client import connect

from tests.integration.harness import GatewayProcess, UpstreamServer, free_port, read_body

# harness.py opens the gateway's stdout/stderr files for Popen and never closes them
# (as tests/integration/test_aggregation.py notes); ignore exactly that warning.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <_io.FileIO name='[^']*/gateway-[0-9]+[.](out|err)'"
    ":pytest.PytestUnraisableExceptionWarning"
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = "00f067aa0ba902b7"
SERVER, CLIENT = 2, 3  # OTLP's SpanKind values


def new_trace() -> str:
    """A trace id of the test's own (each test finds its spans by it)."""
    return os.urandom(16).hex()


# --- the collector ----------------------------------------------------------------------


class Collector:
    """An OTLP/HTTP receiver: every span it got, decoded. `delay` holds each export that
    long before answering (a slow collector)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.spans: list[dict[str, Any]] = []
        self.exports = 0  # export requests decoded
        self.received = 0  # export requests that arrived (a slow one is answered later)
        self._lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = await read_body(receive)
        with self._lock:
            self.received += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        ok = scope["path"] == "/v1/traces" and scope["method"] == "POST"
        if ok:
            self._record(ExportTraceServiceRequest.FromString(body))
        answer = ExportTraceServiceResponse().SerializeToString()
        await send(
            {
                "type": "http.response.start",
                "status": 200 if ok else 404,
                "headers": [(b"content-type", b"application/x-protobuf")],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    def _record(self, request: ExportTraceServiceRequest) -> None:
        with self._lock:
            self.exports += 1
            for resource_spans in request.resource_spans:
                resource = {
                    kv.key: kv.value.string_value for kv in resource_spans.resource.attributes
                }
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        attributes: dict[str, Any] = {}
                        for kv in span.attributes:
                            value = kv.value
                            attributes[kv.key] = (
                                value.int_value
                                if value.WhichOneof("value") == "int_value"
                                else value.string_value
                            )
                        self.spans.append(
                            {
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_id": span.parent_span_id.hex() or None,
                                "name": span.name,
                                "kind": span.kind,
                                "attributes": attributes,
                                "status": span.status.code,  # 0 unset, 2 error
                                "message": span.status.message,
                                "start": span.start_time_unix_nano,
                                "end": span.end_time_unix_nano,
                                "service": resource.get("service.name"),
                            }
                        )

    def of(self, trace_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def wait(self, trace_id: str, count: int, within: float = 5.0) -> list[dict[str, Any]]:
        """The trace's spans once `count` have arrived (spans reach a working collector
        within 5 s of the request's end)."""
        deadline = time.monotonic() + within
        while True:
            spans = self.of(trace_id)
            if len(spans) >= count or time.monotonic() > deadline:
                return spans
            time.sleep(0.05)


# --- the upstream: echoes the headers it got ---------------------------------------------


class Echo:
    """Answers every request with the headers it got, as JSON; `/flaky/<key>` answers
    503 the first time each key is asked. WebSockets: sends the headers of the upgrade
    as its first message."""

    def __init__(self) -> None:
        self.flaky: set[str] = set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers: dict[str, list[str]] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode(), []).append(value.decode())
        if scope["type"] == "websocket":
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": json.dumps(headers)})
            while (await receive())["type"] != "websocket.disconnect":
                pass
            return
        while (await receive()).get("more_body"):
            pass
        status = 200
        if scope["path"].startswith("/flaky/") and scope["path"] not in self.flaky:
            self.flaky.add(scope["path"])
            status = 503
        body = json.dumps({"headers": headers}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def gateway_config(up: UpstreamServer, endpoint: str | None, **tracing: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "upstreams": {
            "echo": {
                "targets": [up.url],
                "retries": {"attempts": 2, "backoff": "1ms", "on": ["connect_error", 503]},
            },
            "other": {"targets": [up.url]},
        },
        "routes": [
            {"name": "items", "path": "/items/{id}", "upstream": "echo"},
            {"name": "flaky", "path": "/flaky/{key}", "upstream": "echo"},
            {"name": "ws", "path": "/ws", "upstream": "echo"},
            {
                "name": "both",
                "path": "/both/{id}",
                "aggregate": {
                    "backends": [
                        {"upstream": "echo", "path": "/a/{id}", "key": "a"},
                        {"upstream": "other", "path": "/b/{id}", "key": "b"},
                    ]
                },
            },
        ],
    }
    if endpoint is not None:
        config["tracing"] = {"endpoint": endpoint, **tracing}
    return config


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Collector, GatewayProcess]]:
    """One collector, one echo upstream and one gateway (both formats, roots never
    sampled) for the tests that differ only in the headers they send."""
    collector = Collector()
    with UpstreamServer(collector) as sink, UpstreamServer(Echo()) as up:
        config = gateway_config(up, sink.url, sample_ratio=0, propagation=["tracecontext", "b3"])
        with GatewayProcess(config, tmp_path_factory.mktemp("tracing")) as gw:
            yield collector, gw


def got(response: httpx.Response) -> dict[str, list[str]]:
    """The headers the upstream received."""
    assert response.status_code == 200, response.text
    headers: dict[str, list[str]] = response.json()["headers"]
    return headers


def access_log(gw: GatewayProcess, request_id: str, within: float = 2.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        for line in gw.stdout.splitlines():
            if request_id in line:
                entry: dict[str, Any] = json.loads(line)
                if entry.get("request_id") == request_id:
                    return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"no access log line for {request_id}")
        time.sleep(0.05)


def one(spans: list[dict[str, Any]], kind: int) -> dict[str, Any]:
    found = [s for s in spans if s["kind"] == kind]
    assert len(found) == 1, spans
    return found[0]


# --- parents, children and the sampling decision -----------------------------------------


def test_sampled_parent_chain_caller_server_client_upstream(
    setup: tuple[Collector, GatewayProcess],
) -> None:
    collector, gw = setup
    trace = new_trace()
    r = httpx.get(
        gw.url + "/items/7?q=1",
        headers={
            "traceparent": f"00-{trace}-{CALLER}-01",
            "tracestate": "vendor=opaque,other=x",
            "x-request-id": "trace-chain-1",
        },
    )
    seen = got(r)
    version, trace_id, parent_id, flags = seen["traceparent"][0].split("-")
    assert (version, trace_id, flags) == ("00", trace, "01")
    assert parent_id != CALLER  # never the caller's span forwarded as it came
    assert seen["tracestate"] == ["vendor=opaque,other=x"]  # passed unchanged
    assert len(seen["traceparent"]) == 1
    spans = collector.wait(trace, 2)
    server, client = one(spans, SERVER), one(spans, CLIENT)
    assert client["span_id"] == parent_id
    assert client["parent_id"] == server["span_id"]
    assert server["parent_id"] == CALLER
    assert server["name"] == "GET items"
    assert server["service"] == "gateway"
    attrs = server["attributes"]
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.path"] == "/items/7"
    assert attrs["http.route"] == "/items/{id}"
    assert attrs["http.response.status_code"] == 200
    assert attrs["client.address"] == "127.0.0.1"
    assert attrs["network.protocol.version"] == "1.1"
    assert attrs["url.scheme"] == "http"
    assert server["status"] == 0
    cattrs = client["attributes"]
    assert cattrs["http.request.method"] == "GET"
    assert cattrs["server.address"] == "127.0.0.1"
    assert isinstance(cattrs["server.port"], int)
    assert cattrs["url.full"].endswith("/items/7?q=1")
    assert cattrs["http.response.status_code"] == 200
    assert "http.request.resend_count" not in cattrs
    # Times nest: the try inside the request.
    assert server["start"] <= client["start"] <= client["end"] <= server["end"]
    # The access log line names the trace and the SERVER span.
    line = access_log(gw, "trace-chain-1")
    assert (line["trace_id"], line["span_id"]) == (trace, server["span_id"])


def test_unsampled_parent_sends_fresh_span_id_with_flags_00_and_exports_nothing(
    setup: tuple[Collector, GatewayProcess],
) -> None:
    collector, gw = setup
    trace = new_trace()
    r = httpx.get(
        gw.url + "/items/1",
        headers={"traceparent": f"00-{trace}-{CALLER}-00", "x-request-id": "unsampled-1"},
    )
    _, trace_id, parent_id, flags = got(r)["traceparent"][0].split("-")
    assert (trace_id, flags) == (trace, "00")
    assert parent_id not in (CALLER, "0" * 16)
    line = access_log(gw, "unsampled-1")
    assert line["trace_id"] == trace and len(line["span_id"]) == 16
    assert line["span_id"] not in (CALLER, parent_id)
    time.sleep(1.5)  # a second export round has passed
    assert collector.of(trace) == []


def test_no_parent_with_sample_ratio_0_starts_an_unsampled_trace(
    setup: tuple[Collector, GatewayProcess],
) -> None:
    _, gw = setup
    seen = got(httpx.get(gw.url + "/items/2", headers={"x-request-id": "root-0"}))
    _, trace_id, span_id, flags = seen["traceparent"][0].split("-")
    assert flags == "00" and trace_id != "0" * 32 and span_id != "0" * 16
    assert "tracestate" not in seen
    assert access_log(gw, "root-0")["trace_id"] == trace_id


def test_a_new_trace_names_the_request_when_the_client_gave_no_id(
    setup: tuple[Collector, GatewayProcess],
) -> None:
    _, gw = setup
    r = httpx.get(gw.url + "/items/4")
    seen = got(r)
    trace_id = seen["traceparent"][0].split("-")[1]
    assert r.headers["x-request-id"] == trace_id  # the answer's id is the trace's
    assert seen["x-request-id"] == [trace_id]  # and so is the one sent upstream
    assert access_log(gw, trace_id)["trace_id"] == trace_id
    # A caller's trace spans many requests: each still gets an id of its own.
    trace = new_trace()
    r = httpx.get(gw.url + "/items/4", headers={"traceparent": f"00-{trace}-{CALLER}-00"})
    request_id = r.headers["x-request-id"]
    assert got(r)["traceparent"][0].split("-")[1] == trace
    assert len(request_id) == 32 and request_id != trace
    # A client's own id is kept.
    r = httpx.get(gw.url + "/items/4", headers={"x-request-id": "mine-4"})
    assert r.headers["x-request-id"] == "mine-4"


@pytest.mark.parametrize(
    "traceparent",
    [
        f"00-{TRACE.upper()}-{CALLER}-01",  # uppercase
        f"01-{TRACE}-{CALLER}-01",  # another version
        f"00-{'0' * 32}-{CALLER}-01",  # all-zero trace id
        "garbage",
    ],
)
def test_malformed_traceparent_is_replaced_and_its_tracestate_dropped(
    setup: tuple[Collector, GatewayProcess], traceparent: str
) -> None:
    _, gw = setup
    seen = got(
        httpx.get(gw.url + "/items/3", headers={"traceparent": traceparent, "tracestate": "k=v"})
    )
    assert len(seen["traceparent"]) == 1
    _, trace_id, span_id, flags = seen["traceparent"][0].split("-")
    assert seen["traceparent"][0] != traceparent
    assert trace_id.lower() != TRACE and span_id != CALLER and flags == "00"  # a new root
    assert "tracestate" not in seen


def test_retries_are_separate_client_spans_with_resend_count(
    setup: tuple[Collector, GatewayProcess],
) -> None:
    collector, gw = setup
    trace = new_trace()
    key = f"retry-{trace[-8:]}"
    r = httpx.get(gw.url + f"/flaky/{key}", headers={"traceparent": f"00-{trace}-{CALLER}-01"})
    assert r.status_code == 200
    spans = collector.wait(trace, 3)
    server = one(spans, SERVER)
    tries = sorted((s for s in spans if s["kind"] == CLIENT), key=lambda s: s["start"])
    assert len(tries) == 2
    first, second = tries
    assert first["attributes"]["http.response.status_code"] == 503
    assert first["attributes"]["error.type"] == "503" and first["status"] == 2
    assert "http.request.resend_count" not in first["attributes"]
    assert second["attributes"]["http.request.resend_count"] == 1
    assert second["attributes"]["http.response.status_code"] == 200
    assert {t["parent_id"] for t in tries} == {server["span_id"]}
    assert first["span_id"] != second["span_id"]
    # The upstream that answered was sent the second try's span.
    assert got(r)["traceparent"][0].split("-")[2] == second["span_id"]


def test_aggregate_has_one_client_span_per_backend(
    setup: tuple[Collector, GatewayProcess],
) -> None:
    collector, gw = setup
    trace = new_trace()
    r = httpx.get(gw.url + "/both/5", headers={"traceparent": f"00-{trace}-{CALLER}-01"})
    assert r.status_code == 200
    body = r.json()
    sent = {key: body[key]["headers"]["traceparent"] for key in ("a", "b")}
    assert all(len(v) == 1 for v in sent.values())
    spans = collector.wait(trace, 3)
    server = one(spans, SERVER)
    assert server["name"] == "GET both"
    assert server["attributes"]["http.route"] == "/both/{id}"
    clients = {s["span_id"]: s for s in spans if s["kind"] == CLIENT}
    assert len(clients) == 2
    for key, path in (("a", "/a/5"), ("b", "/b/5")):
        span = clients[sent[key][0].split("-")[2]]
        assert span["parent_id"] == server["span_id"]
        assert span["attributes"]["url.full"].endswith(path)
    assert {s["attributes"]["gateway.upstream"] for s in clients.values()} == {"echo", "other"}


def test_b3_multi_headers_give_the_parent_and_are_written(
    setup: tuple[Collector, GatewayProcess],
) -> None:
    collector, gw = setup
    trace = new_trace()
    seen = got(
        httpx.get(
            gw.url + "/items/8",
            headers={"X-B3-TraceId": trace, "X-B3-SpanId": CALLER, "X-B3-Sampled": "1"},
        )
    )
    span_id = seen["x-b3-spanid"][0]
    assert seen["x-b3-traceid"] == [trace] and seen["x-b3-sampled"] == ["1"]
    assert span_id != CALLER
    assert seen["traceparent"] == [f"00-{trace}-{span_id}-01"]  # every listed format
    assert "b3" not in seen
    spans = collector.wait(trace, 2)
    assert one(spans, SERVER)["parent_id"] == CALLER
    assert one(spans, CLIENT)["span_id"] == span_id


def test_b3_single_header_gives_the_parent_and_is_written_back(
    setup: tuple[Collector, GatewayProcess],
) -> None:
    collector, gw = setup
    trace = new_trace()[16:]  # a 64-bit B3 trace id
    seen = got(httpx.get(gw.url + "/items/9", headers={"b3": f"{trace}-{CALLER}-1"}))
    span_id = seen["x-b3-spanid"][0]
    assert seen["b3"] == [f"{trace}-{span_id}-1"]
    assert seen["x-b3-traceid"] == [trace]  # 64-bit in, 64-bit out
    assert seen["traceparent"] == [f"00-{'0' * 16}{trace}-{span_id}-01"]
    spans = collector.wait("0" * 16 + trace, 2)
    assert one(spans, SERVER)["parent_id"] == CALLER


def test_gateway_error_sets_status_and_error_type(
    setup: tuple[Collector, GatewayProcess],
) -> None:
    collector, gw = setup
    trace = new_trace()
    r = httpx.get(gw.url + "/nowhere", headers={"traceparent": f"00-{trace}-{CALLER}-01"})
    assert r.status_code == 404
    (server,) = collector.wait(trace, 1)
    assert server["name"] == "GET"
    assert server["attributes"]["error.type"] == "route_not_found"
    assert server["attributes"]["http.response.status_code"] == 404
    assert server["status"] == 2 and server["message"]
    assert "http.route" not in server["attributes"]


async def test_websocket_handshake_has_a_client_span(
    setup: tuple[Collector, GatewayProcess],
) -> None:
    collector, gw = setup
    trace = new_trace()
    url = gw.url.replace("http://", "ws://") + "/ws"
    async with connect(url, additional_headers={"traceparent": f"00-{trace}-{CALLER}-01"}) as ws:
        seen = json.loads(await ws.recv())
    assert len(seen["traceparent"]) == 1
    _, trace_id, parent_id, flags = seen["traceparent"][0].split("-")
    assert (trace_id, flags) == (trace, "01")
    spans = await asyncio.to_thread(collector.wait, trace, 2)
    server, client = one(spans, SERVER), one(spans, CLIENT)
    assert client["span_id"] == parent_id and client["parent_id"] == server["span_id"]
    assert server["parent_id"] == CALLER and server["name"] == "GET ws"
    assert client["attributes"]["http.response.status_code"] == 101
    assert server["attributes"]["http.response.status_code"] == 101


def test_refusal_by_the_http_layer_logs_null_ids(setup: tuple[Collector, GatewayProcess]) -> None:
    """No trace starts for a request the protocol refuses before the data plane sees
    it; its access log line still has both fields, null."""
    _, gw = setup
    headers = {f"x-h{i}": "v" for i in range(120)}  # over max_header_count (100)
    assert httpx.get(gw.url + "/items/1", headers=headers).status_code == 431
    deadline = time.monotonic() + 2
    while True:
        lines = [json.loads(line) for line in gw.stdout.splitlines() if '"status":431' in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert lines and lines[-1]["trace_id"] is None and lines[-1]["span_id"] is None


def test_status_page_shows_where_spans_go(setup: tuple[Collector, GatewayProcess]) -> None:
    _, gw = setup
    tracing = httpx.get(gw.admin_url + "/status.json").json()["process"]["tracing"]
    assert tracing["endpoint"].endswith("/v1/traces")
    assert tracing["sample_ratio"] == 0
    assert tracing["propagation"] == ["tracecontext", "b3"]
    assert tracing["service_name"] == "gateway"


# --- sampling of roots, and what tracing off leaves alone ---------------------------------


def test_no_parent_with_sample_ratio_1_is_sampled(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    collector = Collector()
    sink, up = upstream(collector), upstream(Echo())
    gw = gateway(gateway_config(up, sink.url + "/", sample_ratio=1, service_name="edge"))
    seen = got(httpx.get(gw.url + "/items/1"))
    _, trace_id, span_id, flags = seen["traceparent"][0].split("-")
    assert flags == "01"
    spans = collector.wait(trace_id, 2)
    server, client = one(spans, SERVER), one(spans, CLIENT)
    assert server["parent_id"] is None  # a root
    assert client["span_id"] == span_id and server["service"] == "edge"


def test_tracing_off_passes_trace_headers_untouched_and_logs_no_ids(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(gateway_config(upstream(Echo()), None))
    sent = {
        "traceparent": f"00-{TRACE}-{CALLER}-01",
        "tracestate": "k=v",
        "b3": f"{TRACE}-{CALLER}-1",
        "x-request-id": "off-1",
    }
    seen = got(httpx.get(gw.url + "/items/1", headers=sent))
    for name in ("traceparent", "tracestate", "b3"):
        assert seen[name] == [sent[name]]
    line = access_log(gw, "off-1")
    assert "trace_id" not in line and "span_id" not in line
    assert httpx.get(gw.admin_url + "/status.json").json()["process"]["tracing"] is None


# --- a collector that is down or slow ------------------------------------------------------


def dropped(gw: GatewayProcess) -> float:
    for line in httpx.get(gw.admin_url + "/metrics").text.splitlines():
        if line.startswith("gateway_spans_dropped_total "):
            return float(line.split()[1])
    raise AssertionError("gateway_spans_dropped_total is not exposed")


def timed_requests(gw: GatewayProcess, count: int) -> list[float]:
    took = []
    with httpx.Client() as client:
        for i in range(count):
            started = time.monotonic()
            r = client.get(
                gw.url + f"/items/{i}", headers={"traceparent": f"00-{TRACE}-{CALLER}-01"}
            )
            took.append(time.monotonic() - started)
            assert r.status_code == 200
    return took


def test_dead_collector_never_fails_a_request_and_drops_are_counted(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway(gateway_config(upstream(Echo()), dead, export_timeout="500ms"))
    assert dropped(gw) == 0
    took = timed_requests(gw, 20)
    assert max(took) < 0.5, took
    deadline = time.monotonic() + 10
    while dropped(gw) < 40:  # 20 SERVER + 20 CLIENT spans
        assert time.monotonic() < deadline, dropped(gw)
        time.sleep(0.1)
    assert "spans dropped" in gw.stderr


def test_slow_collector_never_delays_a_request(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    collector = Collector(delay=1.0)  # every export hangs past the export timeout
    sink = upstream(collector)
    gw = gateway(gateway_config(upstream(Echo()), sink.url, export_timeout="300ms"))
    took: list[float] = []
    until = time.monotonic() + 1.5  # across at least one export round and its timeout
    while time.monotonic() < until:
        took += timed_requests(gw, 5)
    assert max(took) < 0.5, took
    deadline = time.monotonic() + 5
    while dropped(gw) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert collector.received >= 1  # it was reached, and too slow


def test_each_worker_exports_and_drops_are_summed(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    """Under a supervisor every worker has its own exporter (started after the worker
    process was), and the dropped spans of all of them are summed on /metrics."""
    dead = f"http://127.0.0.1:{free_port()}"
    config = gateway_config(upstream(Echo()), dead, export_timeout="300ms")
    gw = gateway(config, args=["--workers", "2"])
    with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for i in range(20):  # new connections: both workers take some
            r = client.get(
                gw.url + f"/items/{i}", headers={"traceparent": f"00-{TRACE}-{CALLER}-01"}
            )
            assert r.status_code == 200
    deadline = time.monotonic() + 10
    while dropped(gw) < 40:
        assert time.monotonic() < deadline, dropped(gw)
        time.sleep(0.1)
    tracing = httpx.get(gw.admin_url + "/status.json").json()["process"]["tracing"]
    assert tracing["endpoint"] == dead + "/v1/traces"
