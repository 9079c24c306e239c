"""Compression through the real gateway process: a real upstream whose answers the
test shapes by query (`ct`, `size`, `status`, `h=Name:value`, `stream`), decoded with
`zstandard`, `brotli` and `gzip` on the client's side (httpx's own decoding is bypassed:
`iter_raw` gives the bytes as they came over the wire)."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import uuid
import zlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, quote

import brotli  # type: ignore[import-untyped]
import httpx
import pytest
import zstandard

from tests.integration.harness import GatewayProcess, UpstreamServer

# What an SSE stream waits for before its last event, by key: the test sets it only once
# it has decoded the first event, which proves that event arrived before the stream ended.
RELEASES: dict[str, threading.Event] = {}


def json_body(size: int) -> bytes:
    filler = (b"0123456789abcdef" * (size // 16 + 1))[: max(size - 12, 0)]
    return b'{"data": "' + filler + b'"}'


async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    while (await receive()).get("more_body"):
        pass
    query = parse_qs(scope["query_string"].decode(), keep_blank_values=True)
    if scope["path"] == "/sse":
        await sse(query["key"][0], send)
        return
    status = int(query.get("status", ["200"])[0])
    body = json_body(int(query.get("size", ["4096"])[0]))
    if "encoded" in query:  # the upstream compresses itself
        body = gzip.compress(body)
    headers: list[tuple[bytes, bytes]] = []
    content_type = query.get("ct", ["application/json"])[0]
    if content_type:
        headers.append((b"content-type", content_type.encode()))
    for field in query.get("h", []):
        name, _, value = field.partition(":")
        headers.append((name.strip().lower().encode(), value.strip().encode()))
    if "stream" in query:  # no Content-Length, two pieces apart: a streamed body
        await send({"type": "http.response.start", "status": status, "headers": headers})
        half = len(body) // 2
        await send({"type": "http.response.body", "body": body[:half], "more_body": True})
        await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": body[half:]})
        return
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def event(n: int) -> bytes:
    return f'id: {n}\nevent: tick\ndata: {{"n": {n}}}\n\n'.encode()


async def sse(key: str, send: Any) -> None:
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": event(1), "more_body": True})
    await send({"type": "http.response.body", "body": event(2), "more_body": True})
    await asyncio.to_thread(RELEASES[key].wait, 10)
    await send({"type": "http.response.body", "body": event(3)})


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    up = UpstreamServer(upstream_app).start()
    config = {
        "server": {"access_log": False},
        "upstreams": {
            "up": {"targets": [up.url]},
            "dead": {"targets": ["http://127.0.0.1:9"], "retries": {"attempts": 0}},
        },
        "compression": {},  # the contract's defaults
        "routes": [
            {"name": "on", "path": "/c/{rest:path}", "upstream": "up", "rewrite": "/{rest}"},
            {
                "name": "off",
                "path": "/off/{rest:path}",
                "upstream": "up",
                "rewrite": "/{rest}",
                "compression": False,
            },
            {
                "name": "agg",
                "path": "/agg",
                "methods": ["GET"],
                "aggregate": {"backends": [{"upstream": "up", "path": "/x?size=8000"}]},
            },
            {"name": "dead", "path": "/dead", "upstream": "dead"},
        ],
    }
    gateway = GatewayProcess(config, tmp_path_factory.mktemp("compression")).start()
    try:
        yield gateway
    finally:
        gateway.stop()
        up.stop()
    assert "Traceback" not in gateway.stderr, gateway.stderr


@pytest.fixture
def client(gw: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=5) as c:
        yield c


class Answer:
    def __init__(self, response: httpx.Response, raw: bytes) -> None:
        self.status = response.status_code
        self.headers = response.headers
        self.raw = raw

    @property
    def coding(self) -> str | None:
        coding: str | None = self.headers.get("content-encoding")
        return coding

    def decoded(self) -> bytes:
        return decode(self.coding, self.raw)


def decode(coding: str | None, raw: bytes) -> bytes:
    if coding is None:
        return raw
    if coding == "gzip":
        return gzip.decompress(raw)
    if coding == "br":
        out: bytes = brotli.decompress(raw)
        return out
    assert coding == "zstd", coding
    return zstandard.ZstdDecompressor().decompressobj().decompress(raw)


def fetch(
    client: httpx.Client,
    target: str,
    accept: str | None,
    method: str = "GET",
    **query: Any,
) -> Answer:
    """`target` with `query` (lists repeat a key), `Accept-Encoding: accept` (None: no
    such field at all), read raw."""
    parts = []
    for key, value in query.items():
        for item in value if isinstance(value, list) else [value]:
            parts.append(f"{key}={quote(str(item), safe='')}")
    url = target + ("?" + "&".join(parts) if parts else "")
    request = client.build_request(method, url)
    del request.headers["accept-encoding"]  # httpx's default
    if accept is not None:
        request.headers["accept-encoding"] = accept
    response = client.send(request, stream=True)
    try:
        raw = b"".join(response.iter_raw())
    finally:
        response.close()
    return Answer(response, raw)


BODY = json_body(4096)


@pytest.mark.parametrize("coding", ["zstd", "br", "gzip"])
def test_each_algorithm_is_negotiated(client: httpx.Client, coding: str) -> None:
    answer = fetch(client, "/c/x", coding)
    assert answer.status == 200
    assert answer.coding == coding
    assert answer.headers["vary"] == "Accept-Encoding"
    assert len(answer.raw) < len(BODY) // 4
    assert answer.decoded() == BODY
    # A whole answer carries the length of what was sent, not of the JSON.
    assert answer.headers.get("content-length") in (None, str(len(answer.raw)))


@pytest.mark.parametrize(
    ("accept", "coding"),
    [
        ("gzip, deflate, br, zstd", "zstd"),  # a browser: the gateway's order
        ("gzip, br", "br"),
        ("br;q=0.5, gzip", "gzip"),  # the client's q first
        ("*", "zstd"),
        ("GZIP ; Q=0.9", "gzip"),
        ("x-gzip", "gzip"),
    ],
)
def test_the_clients_preference_then_the_gateways(
    client: httpx.Client, accept: str, coding: str
) -> None:
    answer = fetch(client, "/c/x", accept)
    assert answer.coding == coding
    assert answer.decoded() == BODY


@pytest.mark.parametrize(
    "accept",
    [None, "", "gzip;q=0", "*;q=0", "zstd;q=0, br;q=0, gzip;q=0", "identity", "deflate"],
)
def test_refusals_and_no_accept_encoding_get_identity(
    client: httpx.Client, accept: str | None
) -> None:
    answer = fetch(client, "/c/x", accept)
    assert answer.coding is None
    assert answer.raw == BODY
    assert answer.headers["content-length"] == str(len(BODY))
    assert answer.headers["vary"] == "Accept-Encoding"  # a listed type varies all the same


def test_a_refusal_leaves_the_others_acceptable(client: httpx.Client) -> None:
    answer = fetch(client, "/c/x", "zstd;q=0, br;q=0, gzip")
    assert answer.coding == "gzip"
    assert answer.decoded() == BODY


def test_under_min_size_is_sent_as_it_is(client: httpx.Client) -> None:
    small = json_body(1000)
    answer = fetch(client, "/c/x", "gzip", size=1000)
    assert answer.coding is None
    assert answer.raw == small
    assert answer.headers["vary"] == "Accept-Encoding"
    assert fetch(client, "/c/x", "gzip", size=1024).coding == "gzip"  # min_size itself


def test_a_streamed_body_is_compressed(client: httpx.Client) -> None:
    body = json_body(200_000)
    answer = fetch(client, "/c/x", "br", size=200_000, stream=1)
    assert answer.coding == "br"
    assert "content-length" not in answer.headers
    assert answer.decoded() == body


@pytest.mark.parametrize(
    "content_type",
    ["image/png", "application/octet-stream", "application/grpc", ""],
)
def test_other_types_are_untouched(client: httpx.Client, content_type: str) -> None:
    answer = fetch(client, "/c/x", "gzip, br, zstd", ct=content_type)
    assert answer.coding is None
    assert answer.raw == BODY
    assert "vary" not in answer.headers


def test_listed_types(client: httpx.Client) -> None:
    for content_type in ["text/html; charset=utf-8", "text/csv", "image/svg+xml"]:
        answer = fetch(client, "/c/x", "gzip", ct=content_type)
        assert answer.coding == "gzip", content_type
        assert answer.decoded() == BODY


def test_an_encoded_answer_passes_as_it_came(client: httpx.Client) -> None:
    answer = fetch(client, "/c/x", "zstd, br", encoded=1, h="Content-Encoding: gzip")
    assert answer.coding == "gzip"  # the upstream's, not re-encoded
    assert gzip.decompress(answer.raw) == BODY
    assert answer.headers["vary"] == "Accept-Encoding"


def test_no_transform_is_respected(client: httpx.Client) -> None:
    answer = fetch(client, "/c/x", "gzip", h="Cache-Control: public, no-transform")
    assert answer.coding is None
    assert answer.raw == BODY


def test_partial_content_is_never_compressed(client: httpx.Client) -> None:
    answer = fetch(
        client, "/c/x", "gzip", status=206, h=f"Content-Range: bytes 0-4095/{len(BODY) * 2}"
    )
    assert answer.status == 206
    assert answer.coding is None
    assert answer.raw == BODY


def test_a_strong_etag_turns_weak(client: httpx.Client) -> None:
    answer = fetch(client, "/c/x", "gzip", h='ETag: "v7"')
    assert answer.coding == "gzip"
    assert answer.headers["etag"] == 'W/"v7"'
    weak = fetch(client, "/c/x", "gzip", h='ETag: W/"v7"')
    assert weak.headers["etag"] == 'W/"v7"'
    identity = fetch(client, "/c/x", None, h='ETag: "v7"')
    assert identity.headers["etag"] == '"v7"'


def test_vary_is_merged(client: httpx.Client) -> None:
    answer = fetch(client, "/c/x", "gzip", h="Vary: Origin")
    assert answer.headers.get_list("vary") == ["Origin, Accept-Encoding"]
    already = fetch(client, "/c/x", "gzip", h="Vary: accept-encoding, Origin")
    assert already.headers.get_list("vary") == ["accept-encoding, Origin"]
    small = fetch(client, "/c/x", None, size=10, h="Vary: Cookie")
    assert small.headers.get_list("vary") == ["Cookie, Accept-Encoding"]


@pytest.mark.parametrize("coding", ["zstd", "br", "gzip"])
def test_server_sent_events_arrive_as_sent(gw: GatewayProcess, coding: str) -> None:
    """The upstream holds its last event until the test has decoded the first two: each
    must have been sent, compressed and flushed, while the stream was still open."""
    key = uuid.uuid4().hex
    RELEASES[key] = threading.Event()
    decoder: Any
    if coding == "gzip":
        decoder = zlib.decompressobj(31)
        feed = decoder.decompress
    elif coding == "br":
        decoder = brotli.Decompressor()
        feed = decoder.process
    else:
        decoder = zstandard.ZstdDecompressor().decompressobj()
        feed = decoder.decompress
    seen = b""
    with (
        httpx.Client(base_url=gw.url, timeout=httpx.Timeout(5, read=3)) as client,
        client.stream("GET", f"/c/sse?key={key}", headers={"accept-encoding": coding}) as r,
    ):
        assert r.headers["content-encoding"] == coding
        assert r.headers["vary"] == "Accept-Encoding"
        raw = r.iter_raw()
        while seen != event(1) + event(2):
            seen += feed(next(raw))  # a read timeout here: an event held back
            assert len(seen) <= len(event(1) + event(2))
        RELEASES[key].set()
        for piece in raw:
            seen += feed(piece)
    assert seen == event(1) + event(2) + event(3)
    del RELEASES[key]


def test_a_route_that_opts_out_is_untouched(client: httpx.Client) -> None:
    answer = fetch(client, "/off/x", "gzip, br, zstd")
    assert answer.coding is None
    assert answer.raw == BODY
    assert "vary" not in answer.headers


def test_head_carries_the_headers_of_get(client: httpx.Client) -> None:
    head = fetch(client, "/c/x", "gzip", method="HEAD", h='ETag: "v1"')
    get = fetch(client, "/c/x", "gzip", h='ETag: "v1"')
    assert head.status == get.status == 200
    assert head.raw == b""
    for name in ("content-encoding", "vary", "etag", "content-type"):
        assert head.headers[name] == get.headers[name], name
    assert "content-length" not in head.headers  # only compressing would tell it
    identity = fetch(client, "/c/x", None, method="HEAD")
    assert identity.coding is None
    assert identity.headers["content-length"] == str(len(BODY))


def test_aggregate_answers_are_compressed(client: httpx.Client) -> None:
    answer = fetch(client, "/agg", "br")
    assert answer.coding == "br"
    assert answer.headers["vary"] == "Accept-Encoding"
    assert json.loads(answer.decoded()) == json.loads(json_body(8000))  # one backend, merged


def test_the_gateways_own_problem_answers_vary(client: httpx.Client) -> None:
    answer = fetch(client, "/dead", "gzip")
    assert answer.status == 502
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.coding is None  # far under min_size
    assert answer.headers["vary"] == "Accept-Encoding"


def test_without_the_block_nothing_changes(upstream: Any, gateway: Any) -> None:
    up = upstream(upstream_app)
    gw = gateway(
        {
            "server": {"access_log": False},
            "upstreams": {"up": {"targets": [up.url]}},
            "routes": [{"name": "on", "path": "/{rest:path}", "upstream": "up"}],
        }
    )
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        answer = fetch(client, "/x", "gzip, br, zstd")
    assert answer.coding is None
    assert answer.raw == BODY
    assert "vary" not in answer.headers
