"""Hostile or broken clients against the real gateway process, over raw sockets: the
head limits (414/431), the head timeout (slowloris), the body timeout (408), the
keep-alive idle timeout, the connection cap (503 at once), and garbage on the port.
Every case also checks that the gateway then serves a normal request."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.hardening.apps import RecordingApp
from tests.hardening.rawhttp import connect, exchange, read_answer, serves_normally
from tests.integration.harness import GatewayProcess, UpstreamServer

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 0.5
KEEPALIVE = 0.5


@dataclass
class Env:
    gw: GatewayProcess
    app: RecordingApp


def config(upstream_url: str, **server: Any) -> dict[str, Any]:
    return {
        "server": {
            "max_request_line": "1KiB",
            "max_header_size": "4KiB",
            "max_header_count": 20,
            "header_timeout": f"{HEADER_TIMEOUT}s",
            "body_timeout": f"{BODY_TIMEOUT}s",
            "keepalive_timeout": f"{KEEPALIVE}s",
            **server,
        },
        "upstreams": {"app": {"targets": [upstream_url]}},
        "routes": [{"name": "all", "path": "/{rest:path}", "upstream": "app"}],
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    app = RecordingApp()
    with UpstreamServer(app) as up:
        tmp = tmp_path_factory.mktemp("hostile")
        with GatewayProcess(config(up.url), tmp) as gw:
            yield Env(gw, app)


def request(path: str = "/ok", extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: gw.test\r\n" + extra + b"\r\n"


def problem(answer: Any) -> dict[str, Any]:
    assert answer.headers["content-type"] == "application/problem+json"
    doc: dict[str, Any] = json.loads(answer.body)
    return doc


# Head limits


def test_request_target_over_max_request_line_is_414_and_closed(env: Env) -> None:
    before = env.app.count
    answer = exchange(env.gw.port, request("/" + "a" * 2000))
    assert answer.status == 414
    assert problem(answer)["code"] == "uri_too_long"
    assert answer.closed
    assert env.app.count == before
    serves_normally(env.gw.url)


def test_a_target_just_under_the_limit_is_served(env: Env) -> None:
    answer = exchange(env.gw.port, request("/" + "a" * 900, b"Connection: close\r\n"))
    assert answer.status == 200


def test_more_headers_than_max_header_count_is_431(env: Env) -> None:
    extra = b"".join(b"X-H%d: v\r\n" % i for i in range(30))
    answer = exchange(env.gw.port, request(extra=extra))
    assert answer.status == 431
    assert problem(answer)["code"] == "headers_too_large"
    assert answer.closed
    serves_normally(env.gw.url)


def test_header_section_over_max_header_size_is_431(env: Env) -> None:
    answer = exchange(env.gw.port, request(extra=b"X-Big: " + b"b" * 5000 + b"\r\n"))
    assert answer.status == 431
    assert answer.closed
    serves_normally(env.gw.url)


def test_a_header_that_never_ends_is_cut_off_at_the_size_limit(env: Env) -> None:
    """One header value sent in pieces and never finished: httptools buffers it without
    calling back, so the raw byte count of the head is what stops it."""
    with connect(env.gw.port) as sock:
        sock.sendall(b"GET /ok HTTP/1.1\r\nHost: gw.test\r\nX-Endless: ")
        sent = 0
        answer = None
        try:
            while sent < 64 * 1024:
                sock.sendall(b"e" * 1024)
                sent += 1024
                time.sleep(0.001)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_answer(sock)
    assert sent < 64 * 1024 or answer.status == 431
    assert answer.status in (431, None)
    assert answer.closed
    serves_normally(env.gw.url)


# Trailer limits (the trailer section of a chunked body is bounded like a head)

CHUNKED_HEAD = b"POST /upload HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_a_trailer_that_never_ends_is_cut_off_with_431(env: Env) -> None:
    """One trailer field sent in pieces, never finished, faster than body_timeout could
    notice: refused at max_header_size + 4KiB raw bytes, not held until a timeout."""
    before = env.app.count
    with connect(env.gw.port) as sock:
        sock.sendall(CHUNKED_HEAD + b"5\r\nhello\r\n0\r\nX-Endless: ")
        started = time.monotonic()
        sent = 0
        try:
            while sent < 256 * 1024:
                sock.sendall(b"t" * 1024)
                sent += 1024
                time.sleep(0.0005)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_answer(sock)
        elapsed = time.monotonic() - started
    assert answer.status == 431, answer
    assert problem(answer)["code"] == "headers_too_large"
    assert answer.closed
    assert sent < 64 * 1024
    assert elapsed < BODY_TIMEOUT
    assert env.app.count == before  # the request never completed upstream
    serves_normally(env.gw.url)


def test_more_trailer_fields_than_max_header_count_is_431(env: Env) -> None:
    trailers = b"".join(b"X-T%d: v\r\n" % i for i in range(30))
    answer = exchange(env.gw.port, CHUNKED_HEAD + b"5\r\nhello\r\n0\r\n" + trailers + b"\r\n")
    assert answer.status == 431
    assert "trailer" in problem(answer)["detail"]
    assert answer.closed
    serves_normally(env.gw.url)


def test_trailer_fields_over_max_header_size_is_431(env: Env) -> None:
    trailer = b"X-Big: " + b"b" * 5000 + b"\r\n"
    answer = exchange(env.gw.port, CHUNKED_HEAD + b"5\r\nhello\r\n0\r\n" + trailer + b"\r\n")
    assert answer.status == 431
    assert answer.closed
    serves_normally(env.gw.url)


def test_trailers_within_the_limits_are_dropped_and_the_request_served(env: Env) -> None:
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 150) for i in range(19))
    answer = exchange(
        env.gw.port,
        CHUNKED_HEAD.replace(b"/upload", b"/upload?m=trailers")
        + b"5\r\nhello\r\n0\r\n"
        + trailers
        + b"\r\n",
    )
    assert answer.status == 200
    [record] = [r for r in env.app.seen if r["query"] == "m=trailers"]
    assert record["body"] == "hello"
    assert not [name for name, _ in record["headers"] if name.startswith("x-t")]


def test_large_chunks_split_across_reads_are_never_taken_for_a_trailer(env: Env) -> None:
    """Chunk headers at the end of a read, their data in the next ones: body, not trailer."""
    with connect(env.gw.port) as sock:
        sock.sendall(CHUNKED_HEAD.replace(b"/upload", b"/upload?m=big-chunks"))
        for _ in range(3):
            sock.sendall(b"%x\r\n" % (100 * 1024))
            time.sleep(0.02)
            for _ in range(10):
                sock.sendall(b"d" * (10 * 1024))
            sock.sendall(b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        answer = read_answer(sock, close_within=0.05)
    assert answer.status == 200, answer
    assert json.loads(answer.body)["body_length"] == 300 * 1024


# Timeouts


def test_slowloris_head_gets_408_after_header_timeout_and_is_closed(env: Env) -> None:
    with connect(env.gw.port) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /ok HTTP/1.1\r\nHost: gw.test\r\n")
        for _ in range(3):  # a header line now and then, never the blank line
            time.sleep(0.25)
            sock.sendall(b"X-Slow: 1\r\n")
        answer = read_answer(sock, timeout=3)
        elapsed = time.monotonic() - started
    assert answer.status == 408
    assert problem(answer)["code"] == "request_timeout"
    assert answer.closed
    assert HEADER_TIMEOUT * 0.9 <= elapsed < HEADER_TIMEOUT + 1.0
    serves_normally(env.gw.url)


def test_a_connection_that_sends_nothing_is_closed_quietly_after_header_timeout(
    env: Env,
) -> None:
    with connect(env.gw.port) as sock:
        started = time.monotonic()
        answer = read_answer(sock, timeout=3)
        elapsed = time.monotonic() - started
    assert answer.status is None and answer.closed and answer.raw == b""
    assert HEADER_TIMEOUT * 0.9 <= elapsed < HEADER_TIMEOUT + 1.0


def test_blank_lines_trickled_between_requests_do_not_hold_a_connection(env: Env) -> None:
    with connect(env.gw.port) as sock:
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < HEADER_TIMEOUT + 1.5:
            try:
                sock.sendall(b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sock.settimeout(0.2)
            try:
                if sock.recv(65536) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed = True
                break
    assert closed
    assert time.monotonic() - started < HEADER_TIMEOUT + 1.0


def test_stalled_small_body_is_408_request_timeout(env: Env) -> None:
    before = env.app.count
    with connect(env.gw.port) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 100\r\n\r\n" + b"x" * 40
        )
        started = time.monotonic()
        answer = read_answer(sock, timeout=3)
        elapsed = time.monotonic() - started
    assert answer.status == 408
    doc = problem(answer)
    assert doc["code"] == "request_timeout"
    assert answer.headers.get("connection") == "close" and answer.closed
    assert elapsed < BODY_TIMEOUT + 1.0
    assert env.app.count == before  # a body read first is never forwarded half
    serves_normally(env.gw.url)


def test_stalled_streamed_body_is_408(env: Env) -> None:
    with connect(env.gw.port) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 300000\r\n\r\n"
            + b"x" * 100_000
        )
        started = time.monotonic()
        answer = read_answer(sock, timeout=4)
        elapsed = time.monotonic() - started
    assert answer.status == 408
    assert problem(answer)["code"] == "request_timeout"
    assert answer.closed
    assert elapsed < BODY_TIMEOUT + 1.5
    serves_normally(env.gw.url)


def test_stalled_chunked_body_is_408(env: Env) -> None:
    with connect(env.gw.port) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n"
        )
        answer = read_answer(sock, timeout=4)
    assert answer.status == 408
    assert answer.closed
    serves_normally(env.gw.url)


def test_idle_keepalive_connection_is_closed_after_keepalive_timeout(env: Env) -> None:
    with connect(env.gw.port) as sock:
        sock.sendall(request())
        first = read_answer(sock, close_within=0.05)
        assert first.status == 200 and not first.closed
        started = time.monotonic()
        sock.settimeout(3)
        assert sock.recv(1) == b""
        elapsed = time.monotonic() - started
    assert KEEPALIVE * 0.8 <= elapsed < KEEPALIVE + 0.8


def test_keepalive_connection_serves_several_requests_in_time(env: Env) -> None:
    with connect(env.gw.port) as sock:
        for _ in range(3):
            sock.sendall(request())
            answer = read_answer(sock, close_within=0.05)
            assert answer.status == 200 and not answer.closed
            time.sleep(KEEPALIVE / 3)


def test_many_slow_connections_never_delay_a_normal_request(env: Env) -> None:
    """200 slowloris connections, each holding a half-sent head: a normal request on a
    new connection is still answered at once, and all 200 are closed by header_timeout."""
    socks: list[socket.socket] = []
    try:
        for i in range(200):
            sock = connect(env.gw.port)
            sock.sendall(b"GET /ok HTTP/1.1\r\nHost: gw.test\r\nX-Slow-%d: " % i)
            socks.append(sock)
        elapsed = max(serves_normally(env.gw.url, within=1.0) for _ in range(5))
        assert elapsed < 0.5
        deadline = time.monotonic() + HEADER_TIMEOUT + 2
        closed = 0
        for sock in socks:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = sock.recv(65536)
                while data:
                    data = sock.recv(65536)
                closed += 1
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass
        assert closed == len(socks)
    finally:
        for sock in socks:
            sock.close()
    serves_normally(env.gw.url)


# Garbage on the HTTP port


GARBAGE = {
    "tls-client-hello": bytes.fromhex(
        "16030100f4010000f00303" + "11" * 32 + "20" + "22" * 32 + "0008130213031301c02f0100"
    ),
    "ssh-banner": b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n",
    "binary": bytes(range(256)),
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "lowercase-method": b"get / HTTP/1.1\r\nHost: gw.test\r\n\r\n",
    "no-version": b"GET / FOO/1.1\r\nHost: gw.test\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: gw.test\n\n",
    "space-in-target": b"GET /a b HTTP/1.1\r\nHost: gw.test\r\n\r\n",
    "control-in-target": b"GET /a\x01b HTTP/1.1\r\nHost: gw.test\r\n\r\n",
    "connect-method": b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
    "nul-bytes": b"\x00" * 64,
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_is_refused_or_closed_never_5xx(env: Env, name: str) -> None:
    before = env.app.count
    answer = exchange(env.gw.port, GARBAGE[name], timeout=3)
    assert answer.status in (None, 400), answer
    assert answer.closed
    assert env.app.count == before
    serves_normally(env.gw.url)


def test_the_log_never_carries_the_garbage_itself(env: Env) -> None:
    exchange(env.gw.port, GARBAGE["ssh-banner"], timeout=3)
    time.sleep(0.1)
    assert "OpenSSH" not in env.gw.stderr + env.gw.stdout


# The connection cap


def test_connections_over_the_cap_get_503_at_once(
    upstream: Any, gateway: Any, tmp_path: Any
) -> None:
    up = upstream(RecordingApp())
    gw = gateway(config(up.url, max_client_connections=10, header_timeout="5s"))
    idle = [connect(gw.port) for _ in range(10)]
    try:
        time.sleep(0.2)
        started = time.monotonic()
        answer = exchange(gw.port, request())
        assert time.monotonic() - started < 0.5
        assert answer.status == 503
        doc = problem(answer)
        assert doc["code"] == "too_many_connections"
        assert answer.headers["retry-after"] == "1"
        assert answer.closed
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    serves_normally(gw.url)
    assert "client connection limit reached" in gw.stderr
