"""gRPC-Web's pieces (dataplane/grpcweb.py): incremental base64, the trailer frame, the
content types both ways, and the ASGI adapter around a gRPC answer."""

from __future__ import annotations

import base64
import binascii
import random
from typing import Any

import pytest

from gateway.build.factory import build_runtime, unsupported
from gateway.config.loader import load_config_text
from gateway.dataplane.grpcweb import (
    Base64Decoder,
    GrpcWeb,
    grpc_web,
    trailer_frame,
    web_content_type,
)
from gateway.dataplane.headers import parse_incoming
from gateway.errors import BadRequest
from gateway.types import Message


def frame(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


# Base64, incrementally


def decode_in_chunks(encoded: bytes, cuts: list[int]) -> bytes:
    decoder = Base64Decoder()
    out = []
    start = 0
    for cut in [*cuts, len(encoded)]:
        out.append(decoder.feed(encoded[start:cut]))
        start = cut
    out.append(decoder.end())
    return b"".join(out)


def test_chunks_cut_anywhere_decode_to_the_same_bytes() -> None:
    data = bytes(range(256)) * 3
    encoded = base64.b64encode(data)
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(encoded)), rng.randint(1, 12)))
        assert decode_in_chunks(encoded, cuts) == data
    assert decode_in_chunks(encoded, list(range(1, len(encoded)))) == data  # byte by byte


def test_padding_may_end_any_quantum_each_message_encoded_on_its_own() -> None:
    messages = [frame(b"a"), frame(b"bc"), frame(b"def"), frame(b"")]
    encoded = b"".join(base64.b64encode(m) for m in messages)
    assert encoded.count(b"=") >= 2  # padding in the middle of the stream
    for cuts in ([], [1], [3, 9], list(range(1, len(encoded), 5))):
        assert decode_in_chunks(encoded, cuts) == b"".join(messages)


def test_an_unpadded_tail_is_accepted_at_the_end() -> None:
    assert decode_in_chunks(base64.b64encode(b"ab").rstrip(b"="), [1]) == b"ab"
    assert decode_in_chunks(base64.b64encode(b"a").rstrip(b"="), []) == b"a"


@pytest.mark.parametrize("bad", [b"YQ=a", b"Y===", b"????", b"YW J", b"YWJj\nYWJj", b"YWJjY"])
def test_anything_but_base64_is_refused(bad: bytes) -> None:
    with pytest.raises(binascii.Error):
        decode_in_chunks(bad, [])


def test_the_decoder_holds_at_most_three_characters() -> None:
    decoder = Base64Decoder()
    assert decoder.feed(b"YWJ") == b""
    assert repr(decoder) == "Base64Decoder(pending=3)"
    assert decoder.feed(b"jZA") == b"abc"
    assert decoder.end() == b"d"


# Framing and content types


def test_the_trailer_frame_is_flag_length_and_header_lines() -> None:
    got = trailer_frame([(b"grpc-status", b"0"), (b"Grpc-Message", b"ok"), (b"x-t-bin", b"AAE")])
    block = b"grpc-status:0\r\ngrpc-message:ok\r\nx-t-bin:AAE\r\n"
    assert got == b"\x80" + len(block).to_bytes(4, "big") + block
    assert trailer_frame([]) == b"\x80\x00\x00\x00\x00"


def test_answer_content_types_keep_the_format() -> None:
    assert web_content_type(b"application/grpc", False) == b"application/grpc-web+proto"
    assert web_content_type(b"application/grpc+proto", True) == b"application/grpc-web-text+proto"
    assert web_content_type(b"application/grpc+json", False) == b"application/grpc-web+json"


def incoming_with(*headers: tuple[bytes, bytes]) -> Any:
    return parse_incoming([(b"host", b"gw"), *headers])


async def no_receive() -> Message:
    raise AssertionError("not read")


async def no_send(message: Message) -> None:
    raise AssertionError("not sent")


@pytest.mark.parametrize(
    ("content_type", "upstream", "text"),
    [
        (b"application/grpc-web", b"application/grpc", False),
        (b"application/grpc-web+proto", b"application/grpc+proto", False),
        (b"Application/gRPC-Web-Text", b"application/grpc", True),
        (b"application/grpc-web-text+proto", b"application/grpc+proto", True),
    ],
)
def test_the_request_becomes_grpc(content_type: bytes, upstream: bytes, text: bool) -> None:
    incoming = incoming_with((b"content-type", content_type), (b"content-length", b"12"))
    assert incoming.grpc
    web = grpc_web({"type": "http"}, no_receive, no_send, incoming)
    assert web is not None and web.text is text
    headers = dict(incoming.upstream)
    assert headers[b"content-type"] == upstream
    # A text body is shorter decoded: the transport frames it; binary keeps its length.
    assert (b"content-length" in headers) is not text
    assert incoming.content_length == 12  # still the bound for size checks and replay
    assert "http.response.trailers" in web.scope["extensions"]


def test_plain_grpc_and_other_types_are_left_alone() -> None:
    for content_type in (b"application/grpc", b"application/grpc+proto", b"application/grpc-webx"):
        incoming = incoming_with((b"content-type", content_type))
        assert grpc_web({"type": "http"}, no_receive, no_send, incoming) is None
        assert dict(incoming.upstream)[b"content-type"] == content_type


def test_a_binary_call_may_ask_for_a_text_answer() -> None:
    incoming = incoming_with(
        (b"content-type", b"application/grpc-web"), (b"accept", b"application/grpc-web-text")
    )
    web = grpc_web({"type": "http"}, no_receive, no_send, incoming)
    assert web is not None and web.text


# The adapter


def adapter(
    content_type: bytes = b"application/grpc-web", **scope: Any
) -> tuple[GrpcWeb, list[Message]]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    incoming = incoming_with((b"content-type", content_type))
    web = grpc_web({"type": "http", **scope}, no_receive, send, incoming)
    assert web is not None
    return web, sent


def body_of(sent: list[Message]) -> bytes:
    assert all(m["more_body"] for m in sent[1:-1]) and not sent[-1]["more_body"]
    return b"".join(m["body"] for m in sent if m["type"] == "http.response.body")


GRPC_HEAD = [(b"content-type", b"application/grpc"), (b"x-request-id", b"r")]


async def test_messages_stream_and_the_trailers_become_the_last_frame() -> None:
    web, sent = adapter()
    await web.send(
        {"type": "http.response.start", "status": 200, "headers": GRPC_HEAD, "trailers": True}
    )
    await web.send({"type": "http.response.body", "body": frame(b"one"), "more_body": True})
    assert sent[-1] == {"type": "http.response.body", "body": frame(b"one"), "more_body": True}
    await web.send({"type": "http.response.body", "body": frame(b"two"), "more_body": True})
    await web.send({"type": "http.response.body", "body": b"", "more_body": False})
    trailers = [(b"grpc-status", b"0"), (b"x-trailer", b"t1")]
    await web.send({"type": "http.response.trailers", "headers": trailers, "more_trailers": False})
    start = sent[0]
    assert "trailers" not in start  # the client's server never sees trailers
    assert dict(start["headers"])[b"content-type"] == b"application/grpc-web+proto"
    assert body_of(sent) == frame(b"one") + frame(b"two") + trailer_frame(trailers)
    assert all(m["type"] != "http.response.trailers" for m in sent)


async def test_a_trailers_only_answer_keeps_its_headers_and_gets_the_frame() -> None:
    web, sent = adapter()
    head = [
        *GRPC_HEAD,
        (b"grpc-status", b"14"),
        (b"grpc-message", b"down"),
        (b"content-length", b"0"),
    ]
    await web.send({"type": "http.response.start", "status": 200, "headers": head})
    await web.send({"type": "http.response.body", "body": b""})
    headers = dict(sent[0]["headers"])
    assert headers[b"grpc-status"] == b"14" and headers[b"grpc-message"] == b"down"
    assert b"content-length" not in headers
    assert body_of(sent) == trailer_frame([(b"grpc-status", b"14"), (b"grpc-message", b"down")])


async def test_text_answers_are_base64_chunk_by_chunk() -> None:
    web, sent = adapter(b"application/grpc-web-text")
    await web.send(
        {"type": "http.response.start", "status": 200, "headers": GRPC_HEAD, "trailers": True}
    )
    await web.send({"type": "http.response.body", "body": frame(b"hello"), "more_body": False})
    await web.send({"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")]})
    assert dict(sent[0]["headers"])[b"content-type"] == b"application/grpc-web-text+proto"
    assert [base64.b64decode(m["body"]) for m in sent[1:]] == [
        frame(b"hello"),
        trailer_frame([(b"grpc-status", b"0")]),
    ]
    decoder = Base64Decoder()
    assert decoder.feed(body_of(sent)) + decoder.end() == frame(b"hello") + trailer_frame(
        [(b"grpc-status", b"0")]
    )


async def test_the_text_request_body_is_decoded_as_it_arrives() -> None:
    encoded = base64.b64encode(frame(b"a")) + base64.b64encode(frame(b"bcd"))
    messages: list[Message] = [
        {"type": "http.request", "body": encoded[:5], "more_body": True},
        {"type": "http.request", "body": encoded[5:11], "more_body": True},
        {"type": "http.request", "body": encoded[11:], "more_body": False},
        {"type": "http.disconnect"},
    ]

    async def receive() -> Message:
        return messages.pop(0)

    incoming = incoming_with((b"content-type", b"application/grpc-web-text"))
    web = grpc_web({"type": "http"}, receive, no_send, incoming)
    assert web is not None
    got = [await web.receive() for _ in range(4)]
    assert b"".join(m.get("body", b"") for m in got) == frame(b"a") + frame(b"bcd")
    assert [m.get("more_body") for m in got] == [True, True, False, None]
    assert got[-1] == {"type": "http.disconnect"}


async def test_a_bad_base64_body_is_a_bad_request() -> None:
    async def receive() -> Message:
        return {"type": "http.request", "body": b"!!!!", "more_body": False}

    incoming = incoming_with((b"content-type", b"application/grpc-web-text"))
    web = grpc_web({"type": "http"}, receive, no_send, incoming)
    assert web is not None
    with pytest.raises(BadRequest):
        await web.receive()


async def test_cors_answers_expose_the_status_headers() -> None:
    web, sent = adapter()
    head = [*GRPC_HEAD, (b"access-control-allow-origin", b"https://app.example")]
    await web.send({"type": "http.response.start", "status": 200, "headers": head})
    assert (
        dict(sent[0]["headers"])[b"access-control-expose-headers"] == b"grpc-status, grpc-message"
    )

    web, sent = adapter()
    head = [
        *GRPC_HEAD,
        (b"access-control-allow-origin", b"*"),
        (b"access-control-expose-headers", b"X-Request-ID, Grpc-Status"),
    ]
    await web.send({"type": "http.response.start", "status": 200, "headers": head})
    exposed = [v for n, v in sent[0]["headers"] if n == b"access-control-expose-headers"]
    assert exposed == [b"X-Request-ID, Grpc-Status, grpc-message"]

    web, sent = adapter()  # no CORS on the answer: nothing added
    await web.send({"type": "http.response.start", "status": 200, "headers": GRPC_HEAD})
    assert b"access-control-expose-headers" not in dict(sent[0]["headers"])


async def test_an_answer_that_is_not_grpc_passes_through() -> None:
    web, sent = adapter()
    head = [(b"content-type", b"text/html"), (b"content-length", b"2")]
    await web.send(
        {"type": "http.response.start", "status": 502, "headers": head, "trailers": True}
    )
    await web.send({"type": "http.response.body", "body": b"no", "more_body": False})
    await web.send({"type": "http.response.trailers", "headers": [(b"x", b"y")]})
    assert sent == [
        {"type": "http.response.start", "status": 502, "headers": head},
        {"type": "http.response.body", "body": b"no", "more_body": False},
    ]
    # Over HTTP/2 (its server takes trailers) everything is passed as it came.
    web, sent = adapter(extensions={"http.response.trailers": {}})
    await web.send(
        {"type": "http.response.start", "status": 502, "headers": head, "trailers": True}
    )
    await web.send({"type": "http.response.trailers", "headers": [(b"x", b"y")]})
    assert sent[0]["trailers"] is True and sent[1]["type"] == "http.response.trailers"


async def test_other_messages_pass_through_untouched() -> None:
    web, sent = adapter(extensions={"gateway.http.reset": {}})
    await web.send(
        {"type": "http.response.start", "status": 200, "headers": GRPC_HEAD, "trailers": True}
    )
    await web.send({"type": "gateway.http.reset", "code": 2})
    assert sent[-1] == {"type": "gateway.http.reset", "code": 2}
    assert "GrpcWeb(binary" in repr(web)


# Configuration


async def test_a_grpc_web_route_needs_an_http2_upstream_and_no_aggregate() -> None:
    settings = load_config_text(
        """
upstreams:
  h1: {targets: ["http://127.0.0.1:1"]}
  h2: {targets: ["http://127.0.0.1:2"], protocol: http2}
routes:
  - {name: ok, path: "/a.A/{m}", upstream: h2, grpc_web: true}
  - {name: plain, path: "/b.B/{m}", upstream: h1}
  - {name: web-h1, path: "/c.C/{m}", upstream: h1, grpc_web: true}
  - name: agg
    path: /agg
    grpc_web: true
    aggregate: {backends: [{upstream: h1, path: /x, key: x}]}
""",
        "x.yaml",
    )
    assert settings.routes[0].grpc_web and not settings.routes[1].grpc_web
    assert unsupported(settings) == [
        "routes.2.grpc_web: needs upstream h1 to have protocol: http2 (gRPC is HTTP/2)",
        "routes.3.grpc_web: does not apply to an aggregate route",
    ]
    runtime = build_runtime(settings.model_copy(update={"routes": settings.routes[:2]}))
    try:
        routes = {r.name: r for r in runtime.router}
        assert routes["ok"].grpc_web and not routes["plain"].grpc_web
    finally:
        await runtime.aclose()
