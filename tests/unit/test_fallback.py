"""The fallback policy with fake handlers (which failures fall back, for which methods,
what the answer and the error carry, what is counted), and the chain the factory
composes with it: the primary's retries first, the fallback's one try unretried, a
CLIENT span for it, its metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.build.factory import build_route_handler, unsupported
from gateway.build.upstreams import Upstream
from gateway.config.loader import load_config_text
from gateway.config.models import RouteSettings, UpstreamSettings
from gateway.errors import (
    UpstreamError,
    UpstreamSaturated,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnhealthy,
)
from gateway.ops.metrics import Metrics
from gateway.policies.fallback import fallback
from gateway.tracing.spans import CLIENT, Tracer, TracingRules
from gateway.types import GatewayRequest, GatewayResponse, Handler
from tests.unit.fakes import Recorder, connect_error, make_request
from tests.unit.test_trace_context import Sink

HEADER = (b"x-gateway-fallback", b"true")


class Counts:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, reason: str, result: str) -> None:
        self.seen.append((reason, result))


def chain(primary: Handler, backup: Handler, counts: Counts | None = None, **kw: bool) -> Handler:
    return fallback(backup, "backup", record=counts, **kw)(primary)


def timeout() -> UpstreamTimeout:
    return UpstreamTimeout("slow", upstream="u")


def reset() -> UpstreamUnavailable:
    return UpstreamUnavailable("closed", upstream="u", outcome="reset")


# --- which failures fall back ------------------------------------------------------------


async def test_an_answer_of_the_primary_is_returned_as_it_is() -> None:
    primary, backup, counts = Recorder([200]), Recorder([200]), Counts()
    request = make_request()
    response = await chain(primary, backup, counts)(request)
    assert response.status == 200 and HEADER not in response.headers
    assert backup.calls == [] and counts.seen == [] and request.fallback is None


@pytest.mark.parametrize("status", [500, 502, 503, 404])
async def test_the_primarys_own_error_answers_pass_through(status: int) -> None:
    primary, backup = Recorder([status]), Recorder([200])
    response = await chain(primary, backup)(make_request())
    assert response.status == status and HEADER not in response.headers
    assert backup.calls == []


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH"])
@pytest.mark.parametrize(
    "error",
    [
        connect_error,
        lambda: UpstreamUnhealthy("circuit open", upstream="u"),
        lambda: UpstreamSaturated("queue full", upstream="u"),
    ],
    ids=["connect_error", "unhealthy", "saturated"],
)
async def test_nothing_sent_falls_back_whatever_the_method(
    method: str, error: type[UpstreamError]
) -> None:
    failure = error()
    primary, backup, counts = Recorder([failure]), Recorder([201]), Counts()
    request = make_request(method, body=b"{}")
    response = await chain(primary, backup, counts)(request)
    assert response.status == 201
    assert response.headers[-1] == HEADER
    assert len(backup.calls) == 1
    assert request.fallback == "backup"
    assert counts.seen == [(failure.outcome, "answered")]


@pytest.mark.parametrize("error", [timeout, reset], ids=["timeout", "reset"])
@pytest.mark.parametrize(
    ("method", "keyed", "opted_in", "falls_back"),
    [
        ("GET", False, False, True),
        ("PUT", False, False, True),
        ("DELETE", False, False, True),
        ("POST", False, False, False),
        ("PATCH", False, False, False),
        ("POST", True, False, True),  # an Idempotency-Key the gateway holds
        ("POST", False, True, True),  # retry_non_idempotent
    ],
)
async def test_after_a_timeout_or_reset_only_a_retryable_request_falls_back(
    error: type[UpstreamError], method: str, keyed: bool, opted_in: bool, falls_back: bool
) -> None:
    failure = error()
    primary, backup, counts = Recorder([failure]), Recorder([200]), Counts()
    request = make_request(method)
    request.keyed = keyed
    handler = chain(primary, backup, counts, retry_non_idempotent=opted_in)
    if falls_back:
        assert (await handler(request)).headers == [HEADER]
        assert len(backup.calls) == 1
    else:
        with pytest.raises(type(failure)) as raised:
            await handler(request)
        assert raised.value is failure  # the primary's error stands, unmarked
        assert HEADER not in failure.headers
        assert backup.calls == [] and counts.seen == [] and request.fallback is None


async def test_other_upstream_errors_do_not_fall_back() -> None:
    odd = UpstreamError("something else", upstream="u")  # outcome "error"
    primary, backup = Recorder([odd]), Recorder([200])
    with pytest.raises(UpstreamError):
        await chain(primary, backup)(make_request())
    assert backup.calls == []


# --- the fallback try ---------------------------------------------------------------------


async def test_the_fallback_try_is_a_resend_on_fresh_targets() -> None:
    seen: list[tuple[int, set[str]]] = []

    async def primary(request: GatewayRequest) -> GatewayResponse:
        request.exclude_targets.add("http://primary:1")
        request.attempt = 2  # the retry policy's third try
        raise connect_error()

    async def backup(request: GatewayRequest) -> GatewayResponse:
        seen.append((request.attempt, set(request.exclude_targets)))
        return await Recorder([200])(request)

    await chain(primary, backup)(make_request())
    assert seen == [(3, set())]


async def test_when_the_fallback_fails_too_its_error_is_the_answer() -> None:
    fallback_error = UpstreamUnavailable("refused", upstream="backup", outcome="connect_error")
    primary = Recorder([UpstreamUnhealthy("circuit open", upstream="u")])
    backup, counts = Recorder([fallback_error]), Counts()
    request = make_request()
    with pytest.raises(UpstreamUnavailable) as raised:
        await chain(primary, backup, counts)(request)
    assert raised.value is fallback_error
    assert raised.value.upstream == "backup"
    assert HEADER in raised.value.headers  # the client is told a fallback was tried
    assert counts.seen == [("unhealthy", "failed")]
    assert request.fallback == "backup"
    assert len(backup.calls) == 1  # one try, never more


async def test_no_fallback_when_the_deadline_has_no_time_left() -> None:
    async def slow_then_timeout(request: GatewayRequest) -> GatewayResponse:
        await asyncio.sleep(0.03)
        raise timeout()

    backup, counts = Recorder([200]), Counts()
    with pytest.raises(UpstreamTimeout):
        await chain(slow_then_timeout, backup, counts)(make_request(timeout=0.02))
    assert backup.calls == []
    assert counts.seen == [("timeout", "skipped")]


async def chunks(sent: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in (b"a", b"b", b"c"):
        sent.append(chunk)
        yield chunk


async def test_an_unsent_streamed_body_goes_to_the_fallback_whole() -> None:
    read: list[bytes] = []

    async def backup(request: GatewayRequest) -> GatewayResponse:
        assert request.stream is not None
        read.extend([chunk async for chunk in request.stream])
        return await Recorder([200])(request)

    produced: list[bytes] = []
    request = make_request("POST", stream=chunks(produced))
    response = await chain(Recorder([connect_error()]), backup)(request)
    assert response.status == 200
    assert read == [b"a", b"b", b"c"]


async def test_a_partly_sent_streamed_body_cannot_fall_back() -> None:
    async def primary(request: GatewayRequest) -> GatewayResponse:
        assert request.stream is not None
        await anext(aiter(request.stream))  # the first chunk went out
        raise reset()

    backup, counts = Recorder([200]), Counts()
    request = make_request("PUT", stream=chunks([]))
    with pytest.raises(UpstreamUnavailable):
        await chain(primary, backup, counts)(request)
    assert backup.calls == []
    assert counts.seen == [("reset", "skipped")]


# --- composed by the factory --------------------------------------------------------------


class Script:
    """An httpx mock upstream: each answer in turn (the last repeats); an exception is
    raised, a status is answered."""

    def __init__(self, *answers: int | Exception) -> None:
        self.answers = answers
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        answer = self.answers[min(len(self.requests), len(self.answers) - 1)]
        self.requests.append(request)
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer, stream=httpx.ByteStream(b"ok"))


def upstream(name: str, script: Script, metrics: Metrics, **settings: object) -> Upstream:
    return Upstream(
        name,
        UpstreamSettings(targets=(f"http://{name}.test",), **settings),  # type: ignore[arg-type]
        transport=httpx.MockTransport(script),
        metrics=metrics,
    )


ROUTE = RouteSettings(name="api", path="/x", upstream="main", fallback="spare", timeout=2)
RETRIES = {"attempts": 2, "backoff": "1ms", "on": ["connect_error", 503]}


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_the_chain_retries_the_primary_then_tries_the_fallback_once() -> None:
    metrics = Metrics()
    main = Script(httpx.ConnectError("refused"))
    spare = Script(503)  # its own 503: an answer, passed through, not retried
    primary = upstream("main", main, metrics, retries=RETRIES)
    backup = upstream("spare", spare, metrics, retries=RETRIES)
    handler = build_route_handler(ROUTE, primary, fallback=backup, metrics=metrics)
    try:
        response = await handler(make_request())
        await response.close()
    finally:
        await primary.aclose()
        await backup.aclose()
    assert response.status == 503 and response.headers[-1] == HEADER
    assert response.upstream == "spare"
    assert (len(main.requests), len(spare.requests)) == (3, 1)
    labels = {"route": "api", "upstream": "spare", "reason": "connect_error"}
    assert sample(metrics, "gateway_fallback_requests_total", **labels, result="answered") == 1


async def test_a_refused_primary_counts_as_its_outcome_when_the_fallback_answers() -> None:
    metrics = Metrics()
    main, spare = Script(200), Script(200)
    primary = upstream("main", main, metrics, max_concurrency=1, max_queue=0)
    backup = upstream("spare", spare, metrics)
    handler = build_route_handler(ROUTE, primary, fallback=backup, metrics=metrics)
    assert primary.bulkhead.try_acquire()  # its one slot is taken, its queue is 0
    try:
        response = await handler(make_request("POST", body=b"x"))
    finally:
        primary.bulkhead.release()
        await primary.aclose()
        await backup.aclose()
    assert response.status == 200 and response.upstream == "spare"
    assert main.requests == []
    outcome = {"upstream": "main", "outcome": "saturated"}
    assert sample(metrics, "gateway_upstream_requests_total", **outcome) == 1


async def test_with_tracing_the_fallback_try_gets_its_client_span() -> None:
    metrics, sink = Metrics(), Sink()
    main, spare = Script(httpx.ConnectError("refused")), Script(200)
    primary = upstream("main", main, metrics, retries={"attempts": 0})
    backup = upstream("spare", spare, metrics)
    handler = build_route_handler(ROUTE, primary, fallback=backup, traced=True)
    trace, _ = Tracer(TracingRules("http://collector:4318", 1.0, ("tracecontext",)), sink).begin([])
    req = make_request()
    req.trace = trace
    try:
        response = await handler(req)
        await response.close()
    finally:
        await primary.aclose()
        await backup.aclose()
    spans = [s for s in sink.spans if s.kind == CLIENT]
    assert [s.attributes["gateway.upstream"] for s in spans] == ["main", "spare"]
    assert spans[1].attributes["http.request.resend_count"] == 1
    assert spans[1].attributes["server.address"] == "spare.test"
    # the fallback try was sent with its own span's id
    sent = spare.requests[0].headers["traceparent"]
    assert spans[1].span_id in sent


async def test_a_route_without_fallback_composes_no_fallback() -> None:
    metrics = Metrics()
    main = Script(httpx.ConnectError("refused"))
    primary = upstream("main", main, metrics)
    plain_route = RouteSettings(name="api", path="/x", upstream="main", timeout=2)
    handler = build_route_handler(plain_route, primary, metrics=metrics)
    try:
        with pytest.raises(UpstreamUnavailable) as raised:
            await handler(make_request())
    finally:
        await primary.aclose()
    assert raised.value.upstream == "main"
    assert HEADER not in raised.value.headers


def test_a_grpc_web_routes_fallback_must_speak_http2_too() -> None:
    settings = load_config_text(
        """
upstreams:
  h1: {targets: ["http://127.0.0.1:1"]}
  h2: {targets: ["http://127.0.0.1:2"], protocol: http2}
  h2b: {targets: ["http://127.0.0.1:3"], protocol: http2}
routes:
  - {name: ok, path: "/a.A/{m}", upstream: h2, fallback: h2b, grpc_web: true}
  - {name: web, path: "/c.C/{m}", upstream: h2, fallback: h1, grpc_web: true}
  - {name: plain, path: "/d", upstream: h2, fallback: h1}
""",
        "x.yaml",
    )
    assert unsupported(settings) == [
        "routes.1.grpc_web: needs upstream h1 to have protocol: http2 (gRPC is HTTP/2)"
    ]
