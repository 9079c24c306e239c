"""HTTP/1.0 clients: keep-alive when they ask for it and the length is known, and never
a chunked body (RFC 9112, 6.1 and 9.3; what nginx does, and what `ab -k` expects)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.hardening.apps import RecordingEnv as Env
from tests.hardening.apps import recording_gateway
from tests.hardening.rawhttp import connect, exchange, read_answer, serves_normally

STREAMED = 100_000  # bytes the upstream streams without Content-Length


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with recording_gateway(tmp_path_factory.mktemp("http10"), methods=["GET", "HEAD"]) as env:
        yield env


def http10(path: str, *headers: str, method: str = "GET") -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.0", *headers, "", ""]).encode("latin-1")


def test_keep_alive_is_honoured_when_asked_for(env: Env) -> None:
    before = env.app.count
    leftover = bytearray()
    with connect(env.gw.port) as sock:
        for n in range(3):
            sock.sendall(http10(f"/fixed/{n}", "Connection: keep-alive"))
            answer = read_answer(sock, close_within=0.2, leftover=leftover)
            assert answer.status == 200
            assert answer.complete
            assert answer.headers["connection"] == "keep-alive"
            assert "transfer-encoding" not in answer.headers
            assert not answer.closed
    assert env.app.count - before == 3


def test_head_keeps_the_connection_too(env: Env) -> None:
    with connect(env.gw.port) as sock:
        sock.sendall(http10("/fixed", "Connection: keep-alive", method="HEAD"))
        # No body follows a HEAD answer's Content-Length: stop waiting for one early.
        answer = read_answer(sock, timeout=0.5, close_within=0.2)
        assert answer.status == 200
        assert answer.body == b""
        assert answer.headers["connection"] == "keep-alive"
        assert not answer.closed
        sock.sendall(http10("/fixed", "Connection: keep-alive"))
        assert read_answer(sock, close_within=0.2).status == 200


def test_without_keep_alive_the_connection_closes(env: Env) -> None:
    answer = exchange(env.gw.port, http10("/fixed"))
    assert answer.status == 200
    assert answer.complete
    assert answer.headers["connection"] == "close"
    assert answer.closed


def test_a_gateway_error_keeps_the_connection(env: Env) -> None:
    with connect(env.gw.port) as sock:
        sock.sendall(http10("/fixed", "Connection: keep-alive", "Content-Length: 0", method="POST"))
        answer = read_answer(sock, close_within=0.2)
        assert answer.status == 405
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.headers["connection"] == "keep-alive"
        assert not answer.closed
        sock.sendall(http10("/fixed", "Connection: keep-alive"))
        assert read_answer(sock, close_within=0.2).status == 200


def test_a_streamed_body_is_never_chunked_and_ends_with_the_connection(env: Env) -> None:
    answer = exchange(env.gw.port, http10(f"/stream?n={STREAMED}", "Connection: keep-alive"))
    assert answer.status == 200
    assert "transfer-encoding" not in answer.headers
    assert "content-length" not in answer.headers
    assert answer.headers["connection"] == "close"
    assert answer.closed
    assert answer.body == b"x" * STREAMED
    serves_normally(env.gw.url, "/fixed")


def test_http11_streams_stay_chunked(env: Env) -> None:
    request = f"GET /stream?n={STREAMED} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode()
    answer = exchange(env.gw.port, request, close_within=0.2)
    assert answer.status == 200
    assert answer.headers["transfer-encoding"] == "chunked"
    assert answer.complete
    assert not answer.closed
