"""Broken upstreams, through the fault proxy (tests/faultproxy.py) between the real
gateway and a real upstream: before any byte of the answer reached the client the
gateway answers 502/504 problem+json; once the body had started it aborts the client
connection, so a truncated response never looks complete. A broken upstream
connection is never put back in the pool: the next request through the same gateway
and the same proxy works, on a fresh connection."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.faultproxy import Fault, FaultProxy, wait_for
from tests.hardening.apps import RecordingApp
from tests.hardening.rawhttp import exchange
from tests.integration.harness import GatewayProcess, UpstreamServer

READ_TIMEOUT = 0.5
ROUTE_TIMEOUT = 1.5


@dataclass
class Env:
    gw: GatewayProcess
    proxy: FaultProxy
    closed_before: int = 0

    def closed_by_gateway(self) -> int:
        """Upstream connections the gateway hung up on during this test."""
        return self.proxy.stats.closed_by_gateway - self.closed_before

    def get(self, path: str = "/api/ok") -> Any:
        return exchange(
            self.gw.port,
            f"GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode(),
            timeout=5,
            close_within=0.05,
        )

    def recovers(self, fresh: bool = True) -> None:
        """The fault cleared, the very next request is served whole; after a broken
        connection (`fresh`) on a new upstream connection: the broken one was not
        reused. (A connection that was merely slow may be reused.)"""
        self.proxy.fault = None
        accepted = self.proxy.stats.accepted
        answer = self.get()
        assert answer.status == 200 and answer.complete, answer
        assert json.loads(answer.body)["path"] == "/ok"
        if fresh:
            assert self.proxy.stats.accepted == accepted + 1


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One upstream, proxy and gateway for the module; each test starts from a clean
    slate (`env`): no fault, and every pooled upstream connection dropped, so the
    test's first request opens a connection that carries the test's fault."""
    with UpstreamServer(RecordingApp()) as app_server, FaultProxy(app_server.port) as proxy:
        config = {
            "upstreams": {
                "app": {
                    "targets": [proxy.url],
                    "read_timeout": f"{READ_TIMEOUT}s",
                    "retries": {"attempts": 0},
                }
            },
            "routes": [
                {
                    "name": "api",
                    "path": "/api/{rest:path}",
                    "upstream": "app",
                    "rewrite": "/{rest}",
                    "timeout": f"{ROUTE_TIMEOUT}s",
                }
            ],
        }
        with GatewayProcess(config, tmp_path_factory.mktemp("faults")) as gw:
            yield Env(gw, proxy)


@pytest.fixture
def env(shared: Env) -> Env:
    shared.proxy.fault = None
    shared.proxy.drop_all()
    time.sleep(0.05)  # the gateway's pool sees the resets
    shared.closed_before = shared.proxy.stats.closed_by_gateway
    return shared


def problem_code(answer: Any) -> str:
    assert answer.headers["content-type"] == "application/problem+json", answer
    code: str = json.loads(answer.body)["code"]
    return code


def head(status: bytes = b"200 OK", *headers: bytes) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


# Nothing sent to the client yet: a clear 502 or 504


BAD_ANSWERS = {
    "ssh-banner": Fault.respond(b"SSH-2.0-OpenSSH_9.6\r\n"),
    "ssh-banner-then-hang": Fault.respond(b"SSH-2.0-OpenSSH_9.6\r\n", then="hang"),
    "binary": Fault.respond(bytes(range(256)) * 4),
    "http-0.9-body": Fault.respond(b"hello, no status line\r\n\r\n"),
    "empty-then-close": Fault.respond(b""),
    "bad-status-code": Fault.respond(b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n"),
    "headers-too-large": Fault.respond(head(b"200 OK", b"X-Big: " + b"b" * 200_000)),
    "too-many-headers": Fault.respond(
        head(b"200 OK", *(b"X-H%d: v" % i for i in range(2000)), b"Content-Length: 0")
    ),
    "cr-in-header-value": Fault.respond(
        head(b"200 OK", b"X-A: a\rSet-Cookie: injected=1", b"Content-Length: 2") + b"ok"
    ),
    "nul-in-header-value": Fault.respond(
        head(b"200 OK", b"X-A: a\x00b", b"Content-Length: 2") + b"ok"
    ),
    "cl-and-te": Fault.respond(
        head(b"200 OK", b"Content-Length: 2", b"Transfer-Encoding: chunked") + b"0\r\n\r\n"
    ),
    "differing-content-lengths": Fault.respond(
        head(b"200 OK", b"Content-Length: 2", b"Content-Length: 3") + b"okk"
    ),
    "negative-content-length": Fault.respond(head(b"200 OK", b"Content-Length: -2") + b"ok"),
    "truncated-head": Fault.respond(b"HTTP/1.1 200 OK\r\nContent-Le"),
    "reset-before-answer": Fault.reset(),
    "status-line-then-reset": Fault.respond(b"HTTP/1.1 200 OK\r\n", then="reset"),
}


@pytest.mark.parametrize("name", sorted(BAD_ANSWERS))
def test_a_broken_answer_before_the_body_is_502(env: Env, name: str) -> None:
    env.proxy.fault = BAD_ANSWERS[name]
    answer = env.get()
    assert answer.status == 502, answer
    assert problem_code(answer) == "upstream_unavailable"
    assert "injected" not in json.dumps(answer.headers)
    env.recovers()


LINE_BREAKS = {
    # A bare LF ends a header line (RFC 9112 2.2 lets a recipient read it so): the
    # upstream sent two fields, and the client gets two well-formed ones.
    "lf-in-header-value": b"HTTP/1.1 200 OK\r\nX-A: a\nX-B: b\r\nContent-Length: 2\r\n\r\nok",
    # obs-fold is replaced by a space (RFC 9112 5.2), never forwarded as a fold.
    "obs-fold-in-header": head(b"200 OK", b"X-A: a", b" folded", b"Content-Length: 2") + b"ok",
}


@pytest.mark.parametrize("name", sorted(LINE_BREAKS))
def test_line_breaks_in_upstream_header_values_never_reach_the_client(env: Env, name: str) -> None:
    env.proxy.fault = Fault.respond(LINE_BREAKS[name])
    answer = env.get()
    assert answer.status in (200, 502), answer
    head_lines = answer.raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    for line in head_lines:
        assert b"\r" not in line and b"\n" not in line
        assert not line[:1].isspace(), "a folded line was forwarded"
    if answer.status == 200:
        assert answer.headers["x-a"] in ("a", "a folded")
    env.recovers()


def test_an_upstream_that_accepts_and_never_answers_is_504(env: Env) -> None:
    env.proxy.fault = Fault.blackhole()
    started = time.monotonic()
    answer = env.get()
    assert answer.status == 504
    assert problem_code(answer) == "upstream_timeout"
    assert time.monotonic() - started < ROUTE_TIMEOUT + 0.5
    # The gateway hung up on the silent connection rather than keep it.
    assert wait_for(lambda: env.closed_by_gateway() >= 1)
    env.recovers()


def test_an_upstream_trickling_its_head_one_byte_a_second_is_504_at_the_deadline(
    env: Env,
) -> None:
    """Each byte resets an idle timeout; only the route deadline bounds it."""
    env.proxy.fault = Fault.trickle(1, every=0.2)
    started = time.monotonic()
    answer = env.get()
    elapsed = time.monotonic() - started
    assert answer.status == 504
    assert problem_code(answer) == "upstream_timeout"
    assert elapsed < ROUTE_TIMEOUT + 0.5
    env.recovers()


def test_latency_within_read_timeout_is_served(env: Env) -> None:
    env.proxy.fault = Fault.latency(READ_TIMEOUT / 3)
    answer = env.get()
    assert answer.status == 200 and answer.complete
    env.recovers(fresh=False)


def test_latency_beyond_read_timeout_is_504(env: Env) -> None:
    env.proxy.fault = Fault.latency(READ_TIMEOUT + 0.5)
    answer = env.get()
    assert answer.status == 504
    assert problem_code(answer) == "upstream_timeout"
    env.recovers()


# The body had started: the client connection is aborted, never completed


def test_a_body_shorter_than_its_content_length_aborts_the_client_connection(env: Env) -> None:
    env.proxy.fault = Fault.respond(head(b"200 OK", b"Content-Length: 100") + b"only forty" * 4)
    answer = env.get()
    assert answer.status == 200
    assert answer.headers["content-length"] == "100"
    assert not answer.complete and answer.closed
    env.recovers()


def test_a_short_body_from_an_upstream_that_then_hangs_is_aborted_and_discarded(
    env: Env,
) -> None:
    """The upstream keeps the connection open after a short body: the gateway gives up
    after read_timeout, aborts the client, and closes that upstream connection (were it
    pooled, the next request would hang on it)."""
    env.proxy.fault = Fault.respond(
        head(b"200 OK", b"Content-Length: 100") + b"x" * 10, then="hang"
    )
    started = time.monotonic()
    answer = env.get()
    assert answer.status == 200 and not answer.complete and answer.closed
    assert time.monotonic() - started < READ_TIMEOUT + 1.0
    assert wait_for(lambda: env.closed_by_gateway() >= 1)
    env.recovers()


def test_a_chunked_body_cut_before_its_last_chunk_is_aborted(env: Env) -> None:
    env.proxy.fault = Fault.respond(
        head(b"200 OK", b"Transfer-Encoding: chunked") + b"5\r\nhello\r\n"
    )
    answer = env.get()
    assert answer.status == 200 and not answer.complete and answer.closed
    assert not answer.body.endswith(b"0\r\n\r\n")
    env.recovers()


def test_a_bad_chunk_is_502_or_aborted_never_complete(env: Env) -> None:
    """Whether the bad chunk is seen before the response started (502) or after (an
    aborted connection) depends on how the bytes arrive; complete it never is."""
    env.proxy.fault = Fault.respond(
        head(b"200 OK", b"Transfer-Encoding: chunked") + b"5\r\nhello\r\nzz\r\n", then="hang"
    )
    answer = env.get()
    if answer.status == 502:
        assert problem_code(answer) == "upstream_unavailable"
    else:
        assert answer.status == 200 and not answer.complete and answer.closed
    env.recovers()


def test_a_reset_during_a_streamed_body_aborts_the_client_connection(env: Env) -> None:
    env.proxy.fault = Fault.reset_after(200_000)
    answer = env.get("/api/stream?n=2000000")
    assert answer.status == 200
    assert not answer.complete and answer.closed
    assert 0 < len(answer.body) < 2_000_000
    env.recovers()


def test_an_upstream_stalling_mid_body_is_aborted_after_read_timeout(env: Env) -> None:
    env.proxy.fault = Fault.respond(
        head(b"200 OK", b"Transfer-Encoding: chunked") + b"5\r\nhello\r\n", then="hang"
    )
    started = time.monotonic()
    answer = env.get()
    assert answer.status == 200 and not answer.complete and answer.closed
    assert time.monotonic() - started < READ_TIMEOUT + 1.0
    assert wait_for(lambda: env.closed_by_gateway() >= 1)
    env.recovers()


def test_a_trickling_body_still_streams_through(env: Env) -> None:
    """Slow is not broken: a body arriving a few bytes at a time within read_timeout
    is passed on whole."""
    env.proxy.fault = Fault.trickle(4096, every=0.05)
    answer = env.get("/api/stream?n=40000")
    assert answer.status == 200 and answer.complete
    assert len(answer.body) >= 40000
    env.recovers(fresh=False)
