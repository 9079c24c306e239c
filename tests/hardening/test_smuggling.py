"""Request smuggling and framing, over raw sockets against the real gateway: every
ambiguous request is refused (400) and its connection closed, never forwarded; and the
request the upstream receives is always framed by the gateway itself.

Most cases are refused by httptools (llhttp, strict mode) with uvicorn's plain 400;
the rest (an unknown coding llhttp still parses, Transfer-Encoding on HTTP/1.0, two
Host headers) by the gateway's own check with `400 bad_request` problem+json. Either
way the connection is closed, so no byte of it can become a second request."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.hardening.apps import RecordingEnv as Env
from tests.hardening.apps import recording_gateway
from tests.hardening.rawhttp import connect, exchange, read_answer, serves_normally


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with recording_gateway(tmp_path_factory.mktemp("smuggling")) as env:
        yield env


SMUGGLE = b"GET /smuggled HTTP/1.1\r\nHost: gw.test\r\n\r\n"


def post(*headers: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    head = (
        b"POST /target HTTP/"
        + version
        + b"\r\nHost: gw.test\r\n"
        + b"".join(h + b"\r\n" for h in headers)
    )
    return head + b"\r\n" + body


CASES = {
    # CL.TE and TE.CL: both framings at once, in either order
    "cl-then-te": post(
        b"Content-Length: 6", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLE
    ),
    "te-then-cl": post(
        b"Transfer-Encoding: chunked", b"Content-Length: 40", body=b"0\r\n\r\n" + SMUGGLE
    ),
    "differing-content-lengths": post(
        b"Content-Length: 5", b"Content-Length: 44", body=b"hello" + SMUGGLE
    ),
    "repeated-equal-content-lengths": post(
        b"Content-Length: 5", b"Content-Length: 5", body=b"hello"
    ),
    "content-length-list": post(b"Content-Length: 5, 5", body=b"hello"),
    "negative-content-length": post(b"Content-Length: -1", body=SMUGGLE),
    "signed-content-length": post(b"Content-Length: +5", body=b"hello"),
    "non-numeric-content-length": post(b"Content-Length: five", body=b"hello"),
    "hex-content-length": post(b"Content-Length: 0x05", body=b"hello"),
    "underscore-content-length": post(b"Content-Length: 1_0", body=b"helloworld"),
    "overflowing-content-length": post(b"Content-Length: 99999999999999999999999"),
    "unknown-transfer-coding": post(b"Transfer-Encoding: gzip", body=SMUGGLE),
    "identity-transfer-coding": post(b"Transfer-Encoding: identity", body=SMUGGLE),
    "gzip-then-chunked": post(b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"),
    "chunked-then-gzip": post(b"Transfer-Encoding: chunked, gzip", body=b"0\r\n\r\n"),
    "xchunked": post(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n"),
    "repeated-transfer-encoding": post(
        b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"
    ),
    "space-before-colon": post(b"Transfer-Encoding : chunked", body=b"0\r\n\r\n" + SMUGGLE),
    "vertical-tab-in-coding": post(b"Transfer-Encoding: \x0bchunked", body=b"0\r\n\r\n"),
    "te-on-http-1.0": post(
        b"Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLE, version=b"1.0"
    ),
    "obs-fold": post(b"X-A: b", b" folded", b"Content-Length: 0"),
    "obs-fold-tab": post(b"X-A: b", b"\tfolded", b"Content-Length: 0"),
    "control-char-in-value": post(b"X-A: a\x01b", b"Content-Length: 0"),
    "nul-in-value": post(b"X-A: a\x00b", b"Content-Length: 0"),
    "bare-cr-in-value": post(b"X-A: a\rTransfer-Encoding: chunked", b"Content-Length: 0"),
    "control-char-in-name": post(b"X-\x01A: b", b"Content-Length: 0"),
    "header-without-colon": post(b"Transfer-Encoding chunked", b"Content-Length: 0"),
    "bad-chunk-size": post(b"Transfer-Encoding: chunked", body=b"5x\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-overflow": post(b"Transfer-Encoding: chunked", body=b"ffffffffffffffffff\r\n"),
    "chunk-lf-only": post(b"Transfer-Encoding: chunked", body=b"5\nhello\n0\n\n"),
    "two-host-headers": post(b"Host: other.test", b"Content-Length: 0"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_ambiguous_framing_is_refused_and_closed_never_forwarded(env: Env, name: str) -> None:
    before = env.app.paths()
    answer = exchange(env.gw.port, CASES[name], timeout=3)
    assert answer.status == 400, answer
    assert answer.closed, "the connection must not be used for another request"
    if answer.headers.get("content-type") == "application/problem+json":
        assert json.loads(answer.body)["code"] == "bad_request"
    assert env.app.paths() == before, "nothing may reach the upstream"
    serves_normally(env.gw.url)
    assert "/smuggled" not in env.app.paths()


def _seen(env: Env, marker: str) -> dict[str, object]:
    [record] = [r for r in env.app.seen if r["query"] == marker]
    return record


def headers_of(record: dict[str, object]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in record["headers"]]  # type: ignore[attr-defined]


def test_the_upstream_gets_a_canonical_content_length(env: Env) -> None:
    """`Content-Length: 005 ` (leading zeros, trailing space) is valid; the upstream
    receives the gateway's own `content-length: 5`, and the body whole."""
    request = (
        b"POST /cl?m=canonical HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 005 \r\n"
        b"Connection: close\r\n\r\nhello"
    )
    answer = exchange(env.gw.port, request)
    assert answer.status == 200
    record = _seen(env, "m=canonical")
    lengths = [v for k, v in headers_of(record) if k == "content-length"]
    assert lengths == ["5"]
    assert record["body"] == "hello"


def test_a_chunked_upload_is_re_framed_by_the_gateway(env: Env) -> None:
    request = (
        b"POST /te?m=chunked HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: CHUNKED\r\n"
        b"Connection: close\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    answer = exchange(env.gw.port, request)
    assert answer.status == 200
    record = _seen(env, "m=chunked")
    names = [k for k, _ in headers_of(record)]
    assert record["body"] == "hello world"
    assert "x-trailer" not in names
    # Framed by the gateway's transport (chunked, lower case), not the client's bytes.
    assert ("transfer-encoding", "CHUNKED") not in headers_of(record)
    assert names.count("transfer-encoding") + names.count("content-length") == 1


def test_connection_header_cannot_strip_the_framing(env: Env) -> None:
    request = (
        b"POST /conn?m=strip HTTP/1.1\r\nHost: gw.test\r\nConnection: close, content-length\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    answer = exchange(env.gw.port, request)
    assert answer.status == 200
    record = _seen(env, "m=strip")
    assert record["body"] == "hello"
    assert ("content-length", "5") in headers_of(record)


def test_pipelined_requests_are_answered_in_order_each_once(env: Env) -> None:
    """Two complete requests in one packet are two requests, not one smuggled in the
    other's body."""
    with connect(env.gw.port) as sock:
        sock.sendall(
            b"POST /p?m=first HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /p?m=second HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n"
        )
        rest = bytearray()
        first = read_answer(sock, close_within=0.01, leftover=rest)
        second = read_answer(sock, leftover=rest)
    assert first.status == 200 and second.status == 200
    assert json.loads(first.body)["query"] == "m=first"
    assert json.loads(second.body)["query"] == "m=second"
    assert second.closed
