"""Response compression without sockets: Accept-Encoding negotiation (RFC 9110 12.5.3),
the streaming encoders (every piece decodable the moment it arrives), which answers are
compressed and what that does to their headers, and the settings that build the rules."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import brotli  # type: ignore[import-untyped]
import pytest
import zstandard
from pydantic import ValidationError

from gateway.build.factory import build_runtime
from gateway.config.models import CompressionSettings, GatewaySettings
from gateway.dataplane import compression as compression_module
from gateway.dataplane.bodies import send_problem
from gateway.dataplane.compression import (
    ALGORITHMS,
    CompressionRules,
    accept_encoding,
    compress_whole,
    negotiate,
    new_encoder,
)
from gateway.errors import InternalError, UpstreamTimeout
from gateway.types import GatewayResponse, Headers, Message, WholeBody, closed

CODINGS = (b"zstd", b"br", b"gzip")

# --- negotiation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, None),  # no Accept-Encoding: identity
        (b"", None),  # an empty one: only identity is acceptable
        (b"gzip", b"gzip"),
        (b"gzip, br", b"br"),  # equal q: the gateway's order
        (b"gzip, deflate, br, zstd", b"zstd"),  # what a browser sends
        (b"br;q=0.5, gzip;q=0.8", b"gzip"),  # the client's q first
        (b"zstd;q=0.1, br;q=0.2, gzip;q=0.3", b"gzip"),
        (b"gzip;q=0", None),  # q=0 refuses: not an acceptance (Starlette's GZip bug)
        (b"gzip;q=0.000", None),
        (b"gzip;q=0, br;q=0", None),
        (b"gzip;q=0, br", b"br"),
        (b"*", b"zstd"),  # every coding not named
        (b"*;q=0.5, zstd;q=0", b"br"),  # named refusal beats the wildcard
        (b"*;q=0", None),
        (b"*;q=0, gzip", b"gzip"),
        (b"*;q=0.2, gzip;q=0.9", b"gzip"),
        (b"deflate", None),  # nothing the gateway offers
        (b"identity", None),
        (b"identity;q=0", None),  # refuses everything it could get: identity anyway
        (b"gzip, identity;q=0", b"gzip"),
        (b"gzip;q=0.5, identity", None),  # the client prefers identity
        (b"gzip;q=0.5, identity;q=0.5", b"gzip"),  # a tie goes to compression
        (b"gzip;q=0.5", b"gzip"),  # identity unnamed: acceptable, least preferred
        (b"*;q=1, zstd;q=0.5, br;q=0.5, gzip;q=0.5", None),  # `*` speaks for identity
        (b"GZIP", b"gzip"),  # case-insensitive
        (b"Br;Q=1", b"br"),
        (b"x-gzip", b"gzip"),  # RFC 9110 8.4.1.3
        (b"  gzip ;  q=0.7 ,\tbr ; q=0.6 ", b"gzip"),  # whitespace around everything
        (b",, gzip ,", b"gzip"),  # empty list elements are ignored
        (b"gzip;q=1.0, br;q=1.000", b"br"),
        (b"gzip;q=2", None),  # not a qvalue: the element is left out
        (b"gzip;q=0.1234", None),  # more than three decimals
        (b"gzip;q=abc, br", b"br"),
        (b"gzip;q=", None),
        (b"gzip;level=9", b"gzip"),  # parameters other than q are ignored
        (b"gzip, gzip;q=0", None),  # named twice: the refusal stands
    ],
)
def test_negotiation(accept: bytes | None, chosen: bytes | None) -> None:
    assert negotiate(accept, CODINGS) == chosen


def test_ties_follow_the_configured_order() -> None:
    assert negotiate(b"gzip, br, zstd", (b"gzip", b"br")) == b"gzip"
    assert negotiate(b"gzip, br, zstd", (b"br", b"gzip")) == b"br"
    assert negotiate(b"zstd", (b"br", b"gzip")) is None  # not offered


def test_accept_encoding_joins_repeated_fields() -> None:
    assert accept_encoding([(b"accept", b"*/*")]) is None
    assert accept_encoding([(b"accept-encoding", b"gzip")]) == b"gzip"
    joined = accept_encoding([(b"accept-encoding", b"gzip;q=0"), (b"accept-encoding", b"br")])
    assert joined == b"gzip;q=0,br"
    assert negotiate(joined, CODINGS) == b"br"


# --- encoders -------------------------------------------------------------------------


class Decoder:
    """A streaming decoder of one coding: `feed` returns what the bytes so far decode to."""

    def __init__(self, coding: bytes) -> None:
        self.coding = coding
        if coding == b"gzip":
            self._z = zlib.decompressobj(31)
        elif coding == b"br":
            self._b = brotli.Decompressor()
        else:
            self._s = zstandard.ZstdDecompressor().decompressobj()

    def feed(self, data: bytes) -> bytes:
        if self.coding == b"gzip":
            return self._z.decompress(data)
        if self.coding == b"br":
            out: bytes = self._b.process(data)
            return out
        return self._s.decompress(data)


def decode(coding: bytes, data: bytes) -> bytes:
    if coding == b"gzip":
        return zlib.decompress(data, 31)
    if coding == b"br":
        out: bytes = brotli.decompress(data)
        return out
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)  # size unknown too


EVENTS = [f'id: {i}\nevent: tick\ndata: {{"n": {i}}}\n\n'.encode() for i in range(20)]


@pytest.mark.parametrize("coding", CODINGS)
def test_every_streamed_piece_decodes_as_it_arrives(coding: bytes) -> None:
    encoder = new_encoder(coding)
    decoder = Decoder(coding)
    for event in EVENTS:
        piece = encoder.chunk(event)
        assert piece
        assert decoder.feed(piece) == event  # nothing held back for later
    tail = encoder.finish()
    assert decoder.feed(tail) == b""


@pytest.mark.parametrize("coding", CODINGS)
def test_a_finished_stream_decodes_whole(coding: bytes) -> None:
    encoder = new_encoder(coding)
    data = b"".join(encoder.chunk(e) for e in EVENTS) + encoder.finish()
    assert decode(coding, data) == b"".join(EVENTS)


@pytest.mark.parametrize("coding", CODINGS)
def test_one_shot_round_trips(coding: bytes) -> None:
    body = b'{"items": [' + b", ".join(b'{"id": %d}' % i for i in range(500)) + b"]}"
    encoded = compress_whole(coding, body)
    assert len(encoded) < len(body) // 4
    assert decode(coding, encoded) == body


def test_unknown_coding_is_refused() -> None:
    with pytest.raises(ValueError):
        new_encoder(b"deflate")
    with pytest.raises(ValueError):
        compress_whole(b"deflate", b"x")


# --- which answers, and their headers ---------------------------------------------------

BIG = b'{"data": "' + b"abcdefgh" * 512 + b'"}'  # 4 KiB of JSON


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def answer(
    headers: Headers,
    body: bytes = BIG,
    *,
    status: int = 200,
    whole: bool = True,
    length: bool = True,
) -> GatewayResponse:
    if length:
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    if whole:
        return GatewayResponse(status, headers, WholeBody(body), closed, whole=body)
    half = len(body) // 2
    return GatewayResponse(status, headers, chunks(body[:half], body[half:]), closed)


def values(response: GatewayResponse, name: bytes) -> list[bytes]:
    return [v for n, v in response.headers if n.lower() == name]


JSON: Headers = [(b"content-type", b"application/json")]
RULES = CompressionRules()


async def body_of(response: GatewayResponse) -> bytes:
    if response.whole is not None:
        return response.whole
    return b"".join([chunk async for chunk in response.body])


@pytest.mark.parametrize("coding", CODINGS)
async def test_a_whole_answer_is_compressed_in_one_shot(coding: bytes) -> None:
    response = answer(JSON)
    RULES.apply(response, coding)
    assert values(response, b"content-encoding") == [coding]
    assert values(response, b"vary") == [b"Accept-Encoding"]
    assert response.whole is not None
    assert values(response, b"content-length") == [str(len(response.whole)).encode()]
    assert decode(coding, response.whole) == BIG
    assert [chunk async for chunk in response.body] == [response.whole]


@pytest.mark.parametrize("coding", CODINGS)
async def test_a_streamed_answer_is_compressed_piece_by_piece(coding: bytes) -> None:
    response = answer(JSON, whole=False)
    RULES.apply(response, coding)
    assert values(response, b"content-encoding") == [coding]
    assert values(response, b"content-length") == []  # unknown once encoded
    decoder = Decoder(coding)
    pieces = [chunk async for chunk in response.body]
    assert len(pieces) == 3  # one per upstream chunk, then the stream's end
    half = len(BIG) // 2
    assert decoder.feed(pieces[0]) == BIG[:half]
    assert decoder.feed(pieces[1]) == BIG[half:]
    assert decoder.feed(pieces[2]) == b""


async def test_a_streamed_answer_of_unknown_length_is_compressed_whatever_its_size() -> None:
    response = answer(JSON, b"{}", whole=False, length=False)
    RULES.apply(response, b"gzip")
    assert values(response, b"content-encoding") == [b"gzip"]
    assert decode(b"gzip", await body_of(response)) == b"{}"


async def test_an_empty_streamed_answer_is_still_a_valid_stream() -> None:
    response = GatewayResponse(200, [(b"content-type", b"text/plain")], chunks(), closed)
    RULES.apply(response, b"br")
    assert decode(b"br", await body_of(response)) == b""


def test_no_accept_encoding_gets_identity_with_vary() -> None:
    response = answer(JSON)
    RULES.apply(response, None)
    assert values(response, b"content-encoding") == []
    assert values(response, b"vary") == [b"Accept-Encoding"]
    assert response.whole == BIG
    assert values(response, b"content-length") == [str(len(BIG)).encode()]


def test_a_refused_coding_gets_identity() -> None:
    response = answer(JSON)
    RULES.apply(response, b"gzip;q=0")
    assert values(response, b"content-encoding") == []
    assert response.whole == BIG


@pytest.mark.parametrize(
    "content_type",
    [
        b"text/html; charset=utf-8",
        b"text/event-stream",
        b"TEXT/CSV",
        b"application/json",
        b"application/problem+json",
        b"application/javascript",
        b"application/xml",
        b"image/svg+xml",
    ],
)
def test_listed_types_are_compressed(content_type: bytes) -> None:
    response = answer([(b"content-type", content_type)])
    RULES.apply(response, b"gzip")
    assert values(response, b"content-encoding") == [b"gzip"]


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-type", b"image/png")],
        [(b"content-type", b"application/octet-stream")],
        [(b"content-type", b"application/grpc")],
        [(b"content-type", b"application/grpc-web+proto")],
        [],  # no type at all
    ],
)
def test_other_types_are_untouched(headers: Headers) -> None:
    response = answer(headers)
    before = list(response.headers)
    RULES.apply(response, b"gzip")
    assert response.headers == before  # not even Vary
    assert response.whole == BIG


def test_grpc_is_never_compressed_even_when_listed() -> None:
    rules = CompressionRules(types=("application/*",))
    response = answer([(b"content-type", b"application/grpc+proto")])
    rules.apply(response, b"gzip")
    assert values(response, b"content-encoding") == []
    response = answer([(b"content-type", b"application/wasm")])
    rules.apply(response, b"gzip")
    assert values(response, b"content-encoding") == [b"gzip"]


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ([(b"content-encoding", b"gzip")], 200),  # already encoded
        ([(b"content-encoding", b"identity")], 200),
        ([(b"cache-control", b"public, No-Transform")], 200),
        ([(b"content-range", b"bytes 0-4095/9000")], 206),
        ([], 206),
        ([(b"content-range", b"bytes */9000")], 416),
        ([], 204),
        ([], 304),
    ],
)
def test_never_compressed_but_still_varied(extra: Headers, status: int) -> None:
    response = answer([*JSON, *extra], status=status)
    RULES.apply(response, b"gzip")
    upstreams_own = [v for n, v in extra if n == b"content-encoding"]
    assert values(response, b"content-encoding") == upstreams_own
    assert values(response, b"vary") == [b"Accept-Encoding"]
    assert response.whole == BIG


def test_a_body_known_to_be_small_is_not_compressed() -> None:
    small = b'{"ok": true}'
    response = answer(JSON, small)
    RULES.apply(response, b"gzip")
    assert values(response, b"content-encoding") == []
    assert values(response, b"vary") == [b"Accept-Encoding"]
    # Streamed, but its Content-Length says it is small.
    response = answer(JSON, small, whole=False)
    RULES.apply(response, b"gzip")
    assert values(response, b"content-encoding") == []


def test_min_size_is_inclusive_and_configurable() -> None:
    exact = CompressionRules(min_size=len(BIG))
    response = answer(JSON)
    exact.apply(response, b"gzip")
    assert values(response, b"content-encoding") == [b"gzip"]
    above = CompressionRules(min_size=len(BIG) + 1)
    response = answer(JSON)
    above.apply(response, b"gzip")
    assert values(response, b"content-encoding") == []


@pytest.mark.parametrize(
    ("etag", "sent"),
    [(b'"v1"', b'W/"v1"'), (b'W/"v1"', b'W/"v1"')],
)
def test_a_strong_etag_turns_weak_when_compressed(etag: bytes, sent: bytes) -> None:
    response = answer([*JSON, (b"etag", etag)])
    RULES.apply(response, b"br")
    assert values(response, b"etag") == [sent]
    identity = answer([*JSON, (b"etag", etag)])
    RULES.apply(identity, None)
    assert values(identity, b"etag") == [etag]  # not compressed: untouched


def test_vary_is_merged_never_duplicated() -> None:
    response = answer([*JSON, (b"Vary", b"Origin")])
    RULES.apply(response, b"gzip")
    assert values(response, b"vary") == [b"Origin, Accept-Encoding"]
    for already in (b"accept-encoding", b"Origin, Accept-Encoding", b"*"):
        response = answer([*JSON, (b"vary", already)])
        RULES.apply(response, b"gzip")
        assert values(response, b"vary") == [already]
    response = answer([*JSON, (b"vary", b"Origin"), (b"vary", b"Cookie")])
    RULES.apply(response, None)
    assert values(response, b"vary") == [b"Origin, Accept-Encoding", b"Cookie"]
    response = answer([*JSON, (b"vary", b"")])
    RULES.apply(response, None)
    assert values(response, b"vary") == [b"", b"Accept-Encoding"]


def test_fields_about_the_identity_bytes_are_dropped_when_compressed() -> None:
    response = answer([*JSON, (b"accept-ranges", b"bytes"), (b"content-digest", b"sha-256=:x:")])
    RULES.apply(response, b"zstd")
    assert values(response, b"accept-ranges") == []
    assert values(response, b"content-digest") == []


async def test_head_gets_the_headers_of_get_and_no_body() -> None:
    headers = [*JSON, (b"etag", b'"v1"'), (b"content-length", str(len(BIG)).encode())]
    response = GatewayResponse(200, headers, WholeBody(b""), closed, whole=b"")
    RULES.apply(response, b"gzip", head=True)
    assert values(response, b"content-encoding") == [b"gzip"]
    assert values(response, b"vary") == [b"Accept-Encoding"]
    assert values(response, b"etag") == [b'W/"v1"']
    assert values(response, b"content-length") == []  # known only by compressing
    assert response.whole == b""
    # A HEAD answer of a small body: what GET would get, identity.
    small = [*JSON, (b"content-length", b"10")]
    response = GatewayResponse(200, small, WholeBody(b""), closed, whole=b"")
    RULES.apply(response, b"gzip", head=True)
    assert values(response, b"content-encoding") == []
    assert values(response, b"content-length") == [b"10"]


def test_a_failing_one_shot_leaves_the_answer_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any) -> bytes:
        raise zlib.error("out of memory")

    monkeypatch.setattr(compression_module, "compress_whole", broken)
    response = answer(JSON)
    RULES.apply(response, b"gzip")
    assert values(response, b"content-encoding") == []
    assert values(response, b"vary") == [b"Accept-Encoding"]
    assert response.whole == BIG


def test_anything_unexpected_leaves_the_answer_as_it_came(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*_: Any) -> bytes:
        raise RuntimeError("bug")

    monkeypatch.setattr(compression_module, "negotiate", broken)
    response = answer(JSON)
    before = list(response.headers)
    RULES.apply(response, b"gzip")
    assert response.headers == before
    assert response.whole == BIG


async def test_a_stream_that_fails_to_encode_ends_as_a_gateway_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Broken:
        def chunk(self, data: bytes) -> bytes:
            raise zlib.error("stream state corrupted")

        def finish(self) -> bytes:
            return b""

    monkeypatch.setattr(compression_module, "new_encoder", lambda coding: Broken())
    response = answer(JSON, whole=False)
    RULES.apply(response, b"gzip")
    with pytest.raises(InternalError, match="compressing the answer"):
        await body_of(response)


async def test_an_upstream_failure_midway_passes_through() -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield BIG
        raise UpstreamTimeout("read timed out")

    response = GatewayResponse(200, list(JSON), failing(), closed)
    RULES.apply(response, b"gzip")
    iterator = response.body.__aiter__()
    assert Decoder(b"gzip").feed(await iterator.__anext__()) == BIG
    with pytest.raises(UpstreamTimeout):
        await iterator.__anext__()


# --- problem answers --------------------------------------------------------------------


async def sent_problem(rules: CompressionRules | None, accept: bytes | None) -> list[Message]:
    messages: list[Message] = []

    async def send(message: Message) -> None:
        messages.append(message)

    await send_problem(send, UpstreamTimeout("slow"), "rid", None, rules, accept)
    return messages


async def test_problem_answers_vary_and_stay_small() -> None:
    start, body = await sent_problem(RULES, b"gzip")
    headers = start["headers"]
    assert (b"vary", b"Accept-Encoding") in headers
    assert b"content-encoding" not in [n for n, _ in headers]
    assert body["body"].startswith(b"{")


async def test_problem_answers_above_min_size_are_compressed() -> None:
    start, body = await sent_problem(CompressionRules(min_size=0), b"br")
    headers = dict(start["headers"])
    assert headers[b"content-encoding"] == b"br"
    assert headers[b"content-length"] == str(len(body["body"])).encode()
    assert b"upstream_timeout" in decode(b"br", body["body"])


async def test_problem_answers_without_compression_are_unchanged() -> None:
    start, _ = await sent_problem(None, b"gzip")
    assert b"vary" not in [n for n, _ in start["headers"]]


# --- settings -----------------------------------------------------------------------------


def test_defaults_are_the_contracts() -> None:
    settings = CompressionSettings()
    assert settings.algorithms == ("zstd", "br", "gzip") == ALGORITHMS
    assert settings.min_size == 1024
    assert settings.types == compression_module.DEFAULT_TYPES


@pytest.mark.parametrize(
    "block",
    [
        {"algorithms": []},
        {"algorithms": ["gzip", "gzip"]},
        {"algorithms": ["deflate"]},
        {"types": ["json"]},
        {"types": ["text/*/x"]},
        {"min_size": "-1"},
    ],
)
def test_bad_blocks_are_refused(block: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CompressionSettings.model_validate(block)


def test_a_block_with_sizes_and_case() -> None:
    settings = CompressionSettings.model_validate(
        {"algorithms": ["gzip"], "min_size": "2KiB", "types": ["Text/*", "application/JSON"]}
    )
    assert settings.min_size == 2048
    assert settings.types == ("text/*", "application/json")


def route_rules(config: dict[str, Any]) -> Callable[[str], CompressionRules | None]:
    runtime = build_runtime(GatewaySettings.model_validate(config))

    def rules(path: str) -> CompressionRules | None:
        return runtime.router.match("gw.test", "GET", path).route.compression

    return rules


ROUTES = {
    "upstreams": {"u": {"targets": ["http://127.0.0.1:9"]}},
    "routes": [
        {"name": "on", "path": "/on", "upstream": "u"},
        {"name": "off", "path": "/off", "upstream": "u", "compression": False},
        {
            "name": "agg",
            "path": "/agg",
            "aggregate": {"backends": [{"upstream": "u", "path": "/x"}]},
        },
    ],
}


def test_without_the_block_no_route_compresses() -> None:
    rules = route_rules(ROUTES)
    assert rules("/on") is None and rules("/off") is None and rules("/agg") is None


def test_the_block_reaches_every_route_but_those_that_opt_out() -> None:
    rules = route_rules({**ROUTES, "compression": {"algorithms": ["br", "gzip"], "min_size": 10}})
    on = rules("/on")
    assert on == CompressionRules(algorithms=("br", "gzip"), min_size=10)
    assert on is not None and on.codings == (b"br", b"gzip")
    assert rules("/agg") is on  # one rules object, shared
    assert rules("/off") is None
