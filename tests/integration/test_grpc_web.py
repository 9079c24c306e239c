"""gRPC-Web through the gateway (contract: "gRPC", `routes[].grpc_web`): a real grpcio
server behind an upstream with `protocol: http2` (test_grpc.py's `Echo`), and httpx
speaking gRPC-Web by hand in front, over HTTP/1.1 and h2c: binary and base64 text,
server streaming, the upstream's statuses and the gateway's own, CORS."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest

from tests.integration.harness import GatewayProcess, free_port
from tests.integration.test_access_log import wait_for_lines
from tests.integration.test_grpc import Echo, config, serve

APP = "https://app.example"
WEB = "application/grpc-web+proto"
TEXT = "application/grpc-web-text+proto"


@pytest.fixture
def echo() -> Iterator[tuple[Echo, int]]:
    service = Echo()
    server, port, _ = serve(service)
    yield service, port
    server.stop(0)


def web_config(port: int) -> dict[str, Any]:
    cfg = config(port)
    cfg["routes"][0]["grpc_web"] = True
    cfg["routes"][0]["cors"] = {
        "allow_origins": [APP],
        "allow_methods": ["POST"],
        "allow_headers": ["x-grpc-web", "x-user-agent", "grpc-timeout"],
    }
    cfg["upstreams"]["dead"] = {"targets": [f"http://127.0.0.1:{free_port()}"], "protocol": "http2"}
    cfg["routes"].append(
        {"name": "dead", "path": "/test.Dead/{method}", "upstream": "dead", "grpc_web": True}
    )
    return cfg


def frame(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def frames(body: bytes) -> list[tuple[int, bytes]]:
    """The body's frames as (flag, payload); the whole body must be frames."""
    out = []
    while body:
        length = int.from_bytes(body[1:5], "big")
        out.append((body[0], body[5 : 5 + length]))
        assert len(body) >= 5 + length, "a truncated frame"
        body = body[5 + length :]
    return out


def answer(response: httpx.Response) -> tuple[list[bytes], dict[str, str]]:
    """The messages and the trailers (from the trailer frame, which must come last)."""
    assert response.status_code == 200
    body = response.content
    if response.headers["content-type"] == TEXT:
        body = b"".join(base64.b64decode(piece, validate=True) for piece in _padded(body))
    *messages, (flag, block) = frames(body)
    assert flag == 0x80 and all(f == 0 for f, _ in messages)
    lines = block.decode().split("\r\n")
    assert lines[-1] == ""
    trailers = dict(line.split(":", 1) for line in lines[:-1])
    return [m for _, m in messages], trailers


def _padded(body: bytes) -> Iterator[bytes]:
    """Base64 pieces each ending at its padding (each chunk may be encoded on its own)."""
    piece = b""
    for i in range(0, len(body), 4):
        piece += body[i : i + 4]
        if piece.endswith(b"="):
            yield piece
            piece = b""
    if piece:
        yield piece


def web_call(
    client: httpx.Client, method: str, message: bytes, *, text: bool = False, **headers: str
) -> httpx.Response:
    body = frame(message)
    content_type = "application/grpc-web-text" if text else "application/grpc-web+proto"
    return client.post(
        f"/test.Echo/{method}",
        content=base64.b64encode(body) if text else body,
        headers={"content-type": content_type, "x-grpc-web": "1", **headers},
    )


def clients(gw: GatewayProcess) -> Iterator[tuple[httpx.Client, str]]:
    """An HTTP/1.1 client, then an h2c one (prior knowledge), with their versions."""
    base = f"http://127.0.0.1:{gw.port}"
    with httpx.Client(base_url=base, timeout=5) as client:
        yield client, "HTTP/1.1"
    with httpx.Client(base_url=base, timeout=5, http1=False, http2=True) as client:
        yield client, "HTTP/2"


def test_unary_and_server_streaming_over_http1_and_h2(
    echo: tuple[Echo, int], gateway: Callable[..., GatewayProcess]
) -> None:
    service, port = echo
    gw = gateway(web_config(port))
    for client, version in clients(gw):
        r = web_call(client, "Unary", b"hi", **{"grpc-timeout": "900m"})
        assert r.http_version == version
        assert r.headers["content-type"] == WEB
        assert "grpc-status" not in r.headers  # the status is in the trailer frame
        messages, trailers = answer(r)
        assert messages == [b"echo:hi"]
        assert trailers["grpc-status"] == "0"
        assert trailers["x-trailer"] == "t1"
        assert base64.b64decode(trailers["x-trace-bin"] + "==") == b"\x00\x01\xff"
        seen = service.seen[-1]
        assert seen["x-grpc-web"] == "1"
        assert 0 < seen["time_remaining"] <= 0.9  # grpc-timeout applies as for gRPC

        r = web_call(client, "ServerStream", b"3")
        messages, trailers = answer(r)
        assert messages == [b"item-0", b"item-1", b"item-2"]
        assert trailers["grpc-status"] == "0"

        r = web_call(client, "Fail", b"")  # the upstream's error status, after no message
        messages, trailers = answer(r)
        assert messages == []
        assert trailers["grpc-status"] == "7"
        assert trailers["grpc-message"] == "nope: caf%C3%A9"
        assert r.headers["grpc-status"] == "7"  # a trailers-only answer: headers too
    lines = wait_for_lines(gw, 6)
    assert [line["grpc_status"] for line in lines] == [0, 0, 7] * 2
    assert [line["protocol"] for line in lines] == ["HTTP/1.1"] * 3 + ["HTTP/2"] * 3

    # Plain gRPC on the same route passes as it always did.
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        assert ch.unary_unary("/test.Echo/Unary")(b"g", timeout=5) == b"echo:g"


def test_text_mode_decodes_in_pieces_and_answers_base64(
    echo: tuple[Echo, int], gateway: Callable[..., GatewayProcess]
) -> None:
    service, port = echo
    gw = gateway(web_config(port))
    # Two messages for a client stream, each encoded on its own (padding in the middle),
    # sent in pieces whose boundaries are not 4-aligned.
    encoded = base64.b64encode(frame(b"ab")) + base64.b64encode(frame(b"cde"))
    assert b"=" in encoded[:-2]
    pieces = [encoded[:3], encoded[3:10], encoded[10:11], encoded[11:]]
    for client, _ in clients(gw):
        r = client.post(
            "/test.Echo/ClientStream",
            content=iter(pieces),
            headers={"content-type": "application/grpc-web-text"},
        )
        assert r.headers["content-type"] == TEXT
        messages, trailers = answer(r)
        assert messages == [b"ab+cde"]
        assert trailers["grpc-status"] == "0"

        r = web_call(client, "ServerStream", b"2", text=True)
        messages, trailers = answer(r)
        assert messages == [b"item-0", b"item-1"]
        assert service.seen[-1]["x-grpc-web"] == "1"

        r = web_call(client, "Unary", b"small", text=True)  # buffered: a known length
        assert answer(r)[0] == [b"echo:small"]

        bad = client.post(
            "/test.Echo/Unary",
            content=b"!!!!",
            headers={"content-type": "application/grpc-web-text"},
        )
        assert bad.status_code == 200
        assert bad.headers["grpc-status"] == "13"  # bad_request, as gRPC maps it
        assert answer(bad)[1]["grpc-message"].startswith("bad_request: ")


def test_gateway_errors_and_cors(
    echo: tuple[Echo, int], gateway: Callable[..., GatewayProcess]
) -> None:
    _, port = echo
    gw = gateway(web_config(port))
    for client, _ in clients(gw):
        r = client.post(
            "/test.Dead/Call",
            content=frame(b""),
            headers={"content-type": "application/grpc-web"},
        )
        assert r.headers["content-type"] == WEB
        assert r.headers["grpc-status"] == "14"
        assert r.headers["x-request-id"]
        messages, trailers = answer(r)
        assert messages == []
        assert trailers["grpc-status"] == "14"
        assert trailers["grpc-message"].startswith("upstream_unavailable: ")

        pre = client.options(
            "/test.Echo/Unary",
            headers={
                "origin": APP,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type,x-grpc-web,x-user-agent",
            },
        )
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == APP
        allowed = pre.headers["access-control-allow-headers"]
        assert {"content-type", "x-grpc-web", "x-user-agent"} <= set(allowed.split(", "))

        r = web_call(client, "Unary", b"cors", origin=APP, **{"x-user-agent": "grpc-web-js"})
        assert r.headers["access-control-allow-origin"] == APP
        exposed = r.headers["access-control-expose-headers"].split(", ")
        assert {"grpc-status", "grpc-message"} <= set(exposed)
        assert answer(r)[0] == [b"echo:cors"]

        r = web_call(client, "Fail", b"", origin="https://evil.example")
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-expose-headers" not in r.headers
        assert answer(r)[1]["grpc-status"] == "7"
