"""gRPC through the gateway (contract: "gRPC"): a real grpcio server behind an upstream
with `protocol: http2`, a real grpcio client in front of the real gateway process
(h2c). Messages are raw bytes (no generated code): the generic handlers pass them
through unserialized."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from h2.errors import ErrorCodes

from tests.integration.harness import GatewayProcess, free_port
from tests.integration.test_access_log import wait_for_lines
from tests.integration.test_h2 import RawH2


class Echo:
    """The upstream's service `test.Echo`; `seen` keeps what each call received."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.fail_next = 0  # answer UNAVAILABLE this many times first
        self.cancelled = threading.Event()

    def _note(self, context: grpc.ServicerContext) -> None:
        seen = dict(context.invocation_metadata())
        seen["time_remaining"] = context.time_remaining()  # from the grpc-timeout it got
        self.seen.append(seen)

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._note(context)
        if self.fail_next:
            self.fail_next -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        context.set_trailing_metadata((("x-trailer", "t1"), ("x-trace-bin", b"\x00\x01\xff")))
        return b"echo:" + request

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._note(context)
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "nope: caf\u00e9")

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._note(context)
        time.sleep(float(request or b"1"))
        return b"late"

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._note(context)
        for i in range(int(request)):
            yield b"item-%d" % i

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._note(context)
        return b"+".join(requests)

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._note(context)
        for message in requests:
            yield message.upper()

    def endless(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._note(context)
        while context.is_active():
            yield b"tick"
            time.sleep(0.02)
        self.cancelled.set()


def serve(echo: Echo) -> tuple[grpc.Server, int, health.HealthServicer]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(echo.unary),
        "Fail": grpc.unary_unary_rpc_method_handler(echo.fail),
        "Slow": grpc.unary_unary_rpc_method_handler(echo.slow),
        "ServerStream": grpc.unary_stream_rpc_method_handler(echo.server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(echo.client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(echo.bidi),
        "Endless": grpc.unary_stream_rpc_method_handler(echo.endless),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    checks = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port, checks


@pytest.fixture
def echo() -> Iterator[tuple[Echo, int, health.HealthServicer]]:
    service = Echo()
    server, port, checks = serve(service)
    yield service, port, checks
    server.stop(0)


def config(port: int, **upstream: Any) -> dict[str, Any]:
    return {
        "upstreams": {
            "grpc": {"targets": [f"http://127.0.0.1:{port}"], "protocol": "http2", **upstream}
        },
        "routes": [
            {"name": "echo", "path": "/test.Echo/{method}", "upstream": "grpc", "timeout": "2s"},
        ],
    }


def channel(gw: GatewayProcess) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{gw.port}")


def call(ch: grpc.Channel, method: str, kind: str = "unary_unary") -> Any:
    return getattr(ch, kind)(f"/test.Echo/{method}")


def test_the_four_call_kinds_with_metadata_and_trailers(
    echo: tuple[Echo, int, health.HealthServicer], gateway: Callable[..., GatewayProcess]
) -> None:
    service, port, _ = echo
    gw = gateway(config(port))
    with channel(gw) as ch:
        reply, state = call(ch, "Unary").with_call(
            b"hi", metadata=(("x-client", "c1"), ("x-client-bin", b"\x00\xfe")), timeout=5
        )
        assert reply == b"echo:hi"
        trailers = dict(state.trailing_metadata())
        assert trailers["x-trailer"] == "t1"
        assert trailers["x-trace-bin"] == b"\x00\x01\xff"
        assert service.seen[-1]["x-client"] == "c1"
        assert service.seen[-1]["x-client-bin"] == b"\x00\xfe"
        assert list(call(ch, "ServerStream", "unary_stream")(b"3", timeout=5)) == [
            b"item-0",
            b"item-1",
            b"item-2",
        ]
        assert call(ch, "ClientStream", "stream_unary")(iter([b"a", b"b", b"c"]), timeout=5) == (
            b"a+b+c"
        )
        assert list(call(ch, "Bidi", "stream_stream")(iter([b"x", b"y"]), timeout=5)) == [
            b"X",
            b"Y",
        ]
    lines = wait_for_lines(gw, 4)
    assert [line["grpc_status"] for line in lines] == [0, 0, 0, 0]
    assert {line["protocol"] for line in lines} == {"HTTP/2"}


def test_bidirectional_messages_flow_before_the_client_is_done(
    echo: tuple[Echo, int, health.HealthServicer], gateway: Callable[..., GatewayProcess]
) -> None:
    _, port, _ = echo
    gw = gateway(config(port))
    sent: list[bytes] = []
    answered = threading.Event()

    def requests() -> Iterator[bytes]:
        sent.append(b"first")
        yield b"first"
        assert answered.wait(5), "the first answer did not come before the second message"
        sent.append(b"second")
        yield b"second"

    with channel(gw) as ch:
        replies = call(ch, "Bidi", "stream_stream")(requests(), timeout=5)
        assert next(replies) == b"FIRST"
        answered.set()
        assert next(replies) == b"SECOND"
    assert sent == [b"first", b"second"]


def test_upstream_statuses_pass_through_and_gateway_errors_are_grpc(
    echo: tuple[Echo, int, health.HealthServicer], gateway: Callable[..., GatewayProcess]
) -> None:
    _, port, _ = echo
    cfg = config(port)
    cfg["upstreams"]["dead"] = {"targets": [f"http://127.0.0.1:{free_port()}"], "protocol": "http2"}
    cfg["routes"].append({"name": "dead", "path": "/test.Dead/{method}", "upstream": "dead"})
    gw = gateway(cfg)
    with channel(gw) as ch:
        with pytest.raises(grpc.RpcError) as failed:
            call(ch, "Fail")(b"", timeout=5)
        assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert failed.value.details() == "nope: caf\u00e9"
        with pytest.raises(grpc.RpcError) as missing:
            ch.unary_unary("/other.Service/Call")(b"", timeout=5)
        assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert missing.value.details().startswith("route_not_found: ")
        with pytest.raises(grpc.RpcError) as down:
            ch.unary_unary("/test.Dead/Call")(b"", timeout=5)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        assert down.value.details().startswith("upstream_unavailable: ")
        request_id = dict(down.value.initial_metadata()).get("x-request-id") or dict(
            down.value.trailing_metadata()
        ).get("x-request-id")
        assert request_id
    lines = wait_for_lines(gw, 3)
    assert [line["grpc_status"] for line in lines] == [7, 12, 14]
    assert all(line["status"] == 200 for line in lines)
    metrics = httpx.get(gw.admin_url + "/metrics", timeout=5).text
    assert 'gateway_grpc_requests_total{grpc_status="14",route="dead"} 1.0' in metrics
    assert 'gateway_grpc_requests_total{grpc_status="7",route="echo"} 1.0' in metrics


def test_deadlines_both_ways(
    echo: tuple[Echo, int, health.HealthServicer], gateway: Callable[..., GatewayProcess]
) -> None:
    service, port, _ = echo
    gw = gateway(config(port))
    with channel(gw) as ch:
        call(ch, "Unary")(b"x", timeout=0.8)
        assert 0 < service.seen[-1]["time_remaining"] <= 0.8
        call(ch, "Unary")(b"x", timeout=30)  # longer than the route's 2s: never lengthens
        assert 1 < service.seen[-1]["time_remaining"] <= 2.0
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as late:
            call(ch, "Slow")(b"3", timeout=10)  # the route's 2s deadline ends it
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2.9


def test_a_trailers_only_unavailable_is_retried_when_listed(
    echo: tuple[Echo, int, health.HealthServicer], gateway: Callable[..., GatewayProcess]
) -> None:
    service, port, _ = echo
    gw = gateway(config(port, retries={"attempts": 2, "on": ["unavailable"], "budget": 1.0}))
    service.fail_next = 2
    with channel(gw) as ch:
        assert call(ch, "Unary")(b"again", timeout=5) == b"echo:again"
    assert len(service.seen) == 3


def test_a_client_cancelling_mid_stream_cancels_the_upstream(
    echo: tuple[Echo, int, health.HealthServicer], gateway: Callable[..., GatewayProcess]
) -> None:
    service, port, _ = echo
    gw = gateway(config(port))
    with channel(gw) as ch:
        stream = call(ch, "Endless", "unary_stream")(b"", timeout=10)
        assert next(stream) == b"tick"
        stream.cancel()
    assert service.cancelled.wait(5)


def test_grpc_health_checks_take_a_not_serving_target_out(
    echo: tuple[Echo, int, health.HealthServicer], gateway: Callable[..., GatewayProcess]
) -> None:
    _, port, checks = echo
    checks.set("test.Echo", health_pb2.HealthCheckResponse.SERVING)
    gw = gateway(
        config(
            port,
            health_check={
                "grpc": True,
                "service": "test.Echo",
                "interval": "0.1s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
            },
        )
    )

    def healthy() -> bool:
        status = httpx.get(gw.admin_url + "/status.json", timeout=5).json()
        (upstream,) = [u for u in status["upstreams"] if u["name"] == "grpc"]
        assert upstream["health_check"]["grpc"] is True
        return bool(upstream["targets"][0]["health"] == "healthy")

    deadline = time.monotonic() + 5
    while not healthy() and time.monotonic() < deadline:  # the first probe
        time.sleep(0.05)
    assert healthy()
    checks.set("test.Echo", health_pb2.HealthCheckResponse.NOT_SERVING)
    deadline = time.monotonic() + 5
    while healthy() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not healthy()
    with channel(gw) as ch, pytest.raises(grpc.RpcError) as down:
        call(ch, "Unary")(b"", timeout=5)
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    checks.set("test.Echo", health_pb2.HealthCheckResponse.SERVING)
    deadline = time.monotonic() + 5
    while not healthy() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert healthy()


class ResettingUpstream:
    """An h2c upstream that answers each stream's headers and one DATA frame, then
    resets the stream with ENHANCE_YOUR_CALM (0xb): an error code nothing else uses."""

    def __init__(self) -> None:
        self.port = free_port()
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        h2conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        h2conn.initiate_connection()
        conn.sendall(h2conn.data_to_send())
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for event in h2conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        sid = event.stream_id
                        h2conn.send_headers(
                            sid, [(b":status", b"200"), (b"content-type", b"application/grpc")]
                        )
                        h2conn.send_data(sid, b"\x00\x00\x00\x00\x01z")
                        h2conn.reset_stream(sid, ErrorCodes.ENHANCE_YOUR_CALM)
                conn.sendall(h2conn.data_to_send())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()


def test_an_upstream_reset_resets_the_clients_stream_with_its_code(
    gateway: Callable[..., GatewayProcess],
) -> None:
    upstream = ResettingUpstream()
    try:
        gw = gateway(config(upstream.port))
        raw = RawH2(gw.port)
        sid = raw.request(
            "/test.Echo/Unary",
            end=False,
            extra=[(b"content-type", b"application/grpc"), (b"te", b"trailers")],
        )
        raw.conn.send_data(sid, b"\x00\x00\x00\x00\x01a", end_stream=True)
        raw.flush()
        assert raw.read_until(lambda: bool(raw.of(h2.events.StreamReset, sid)))
        assert raw.of(h2.events.StreamReset, sid)[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        upstream.stop()
