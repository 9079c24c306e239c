"""Requests the HTTP protocol refuses before the data plane sees them (llhttp's 400,
414, 431, the head timeout's 408, the connection cap's 503) are observed like any other
request: counted in `gateway_requests_total` under the unmatched-route label, written
as one access-log line on stdout, and listed in the status page's recent errors.
Against the real gateway process, over raw sockets."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.hardening.apps import RecordingApp
from tests.hardening.rawhttp import Answer, connect, exchange, read_answer, serves_normally
from tests.integration.harness import GatewayProcess, UpstreamServer

HEADER_TIMEOUT = 1.0
SSH = b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n"


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
            "body_timeout": "2s",
            **server,
        },
        "upstreams": {"app": {"targets": [upstream_url]}},
        "routes": [{"name": "all", "path": "/{rest:path}", "upstream": "app"}],
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    app = RecordingApp()
    with UpstreamServer(app) as up:
        with GatewayProcess(config(up.url), tmp_path_factory.mktemp("refusals")) as gw:
            yield Env(gw, app)


def requests_total(gw: GatewayProcess, route: str, method: str, status: int) -> float:
    text = httpx.get(gw.admin_url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "gateway_requests":
            for sample in family.samples:
                if sample.name == "gateway_requests_total" and sample.labels == {
                    "route": route,
                    "method": method,
                    "status": str(status),
                }:
                    return sample.value
    return 0.0


def access_line(gw: GatewayProcess, request_id: str, within: float = 2.0) -> dict[str, Any]:
    """The access-log line (stdout) of `request_id`; the log is flushed every 50 ms."""
    deadline = time.monotonic() + within
    while True:
        for line in gw.stdout.splitlines():
            record: dict[str, Any] = json.loads(line)
            if record.get("request_id") == request_id:
                return record
        assert time.monotonic() < deadline, f"no access-log line for {request_id}"
        time.sleep(0.05)


def recent_error(gw: GatewayProcess, request_id: str) -> dict[str, Any]:
    doc = httpx.get(gw.admin_url + "/status.json", timeout=5).json()
    [entry] = [e for e in doc["recent_errors"] if e["request_id"] == request_id]
    return entry  # type: ignore[no-any-return]


def request(path: str = "/ok", extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: gw.test\r\n" + extra + b"\r\n"


def slow_head(port: int) -> Answer:
    with connect(port) as sock:
        sock.sendall(b"PUT /slow/head?secret=1 HTTP/1.1\r\nHost: gw.test\r\nX-Part: ")
        return read_answer(sock, timeout=HEADER_TIMEOUT + 2)


# name: (what is sent, status, code, method label, path logged)
CASES: dict[str, tuple[bytes, int, str, str, str | None]] = {
    "request-line-too-long": (
        request("/" + "a" * 2000 + "?token=x"),
        414,
        "uri_too_long",
        "GET",
        "/" + "a" * 255 + "...",
    ),
    "too-many-headers": (
        request("/many?q=1", b"".join(b"X-H%d: v\r\n" % i for i in range(30))),
        431,
        "headers_too_large",
        "GET",
        "/many",
    ),
    "headers-too-large": (
        request("/big", b"X-Big: " + b"b" * 5000 + b"\r\n"),
        431,
        "headers_too_large",
        "GET",
        "/big",
    ),
    "smuggling-cl-te": (
        b"POST /target HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 6\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
        400,
        "bad_request",
        "POST",
        "/target",
    ),
    "garbage": (SSH, 400, "bad_request", "-", None),
    # Refused by the data plane, not the protocol: the same series and fields.
    "http11-without-host": (
        b"GET /no-host HTTP/1.1\r\n\r\n",
        400,
        "bad_request",
        "GET",
        "/no-host",
    ),
    "http09": (b"GET /old\r\n\r\n", 400, "bad_request", "GET", "/old"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_protocol_refusal_is_counted_logged_and_shown(env: Env, name: str) -> None:
    data, status, code, method, path = CASES[name]
    before = requests_total(env.gw, "(none)", method, status)
    answer = exchange(env.gw.port, data)
    assert answer.status == status and answer.closed
    request_id = answer.headers["x-request-id"]
    assert requests_total(env.gw, "(none)", method, status) == before + 1
    line = access_line(env.gw, request_id)
    assert line["status"] == status
    assert line["error"] == code
    assert line["method"] == (None if method == "-" else method)
    assert line["path"] == path
    assert line["route"] is None and line["upstream"] is None
    assert line["bytes_out"] == len(answer.body)
    assert line["client"] == "127.0.0.1"
    assert set(line) >= {"time", "duration_ms", "target"}
    shown = recent_error(env.gw, request_id)
    assert (shown["status"], shown["code"], shown["method"]) == (status, code, method)
    out = env.gw.stdout + env.gw.stderr
    assert "OpenSSH" not in out and "token=x" not in out and "smuggled" not in out
    serves_normally(env.gw.url)


def test_a_head_timeout_is_counted_logged_and_shown(env: Env) -> None:
    before = requests_total(env.gw, "(none)", "PUT", 408)
    answer = slow_head(env.gw.port)
    assert answer.status == 408
    request_id = answer.headers["x-request-id"]
    assert requests_total(env.gw, "(none)", "PUT", 408) == before + 1
    line = access_line(env.gw, request_id)
    assert (line["status"], line["error"], line["method"], line["path"]) == (
        408,
        "request_timeout",
        "PUT",
        "/slow/head",
    )
    assert line["duration_ms"] == pytest.approx(HEADER_TIMEOUT * 1000)
    assert recent_error(env.gw, request_id)["code"] == "request_timeout"


def test_a_bad_chunk_mid_body_is_recorded_as_a_400_refusal(env: Env) -> None:
    before = requests_total(env.gw, "(none)", "POST", 400)
    answer = exchange(
        env.gw.port,
        b"POST /upload HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\nzz\r\n",
    )
    assert answer.status == 400 and answer.closed
    line = access_line(env.gw, answer.headers["x-request-id"])
    assert (line["status"], line["method"], line["path"]) == (400, "POST", "/upload")
    assert requests_total(env.gw, "(none)", "POST", 400) == before + 1


def test_the_connection_cap_refusal_is_counted_logged_and_shown(
    upstream: Any, gateway: Any
) -> None:
    up = upstream(RecordingApp())
    gw = gateway(config(up.url, max_client_connections=3, header_timeout="5s"))
    idle = [connect(gw.port) for _ in range(3)]
    try:
        time.sleep(0.2)
        answer = exchange(gw.port, request("/capped?k=v"))
    finally:
        for sock in idle:
            sock.close()
    assert answer.status == 503
    request_id = answer.headers["x-request-id"]
    assert requests_total(gw, "(none)", "GET", 503) == 1
    line = access_line(gw, request_id)
    assert (line["status"], line["error"], line["path"]) == (503, "too_many_connections", "/capped")
    assert recent_error(gw, request_id)["code"] == "too_many_connections"
