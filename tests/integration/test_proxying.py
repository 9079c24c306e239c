"""Proxying over real sockets: rewrite and query, methods, pass-through of the upstream's
own answers, headers both ways, and paths that try to climb out of their prefix."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.integration.harness import GatewayProcess, UpstreamServer, read_body


class Recorder:
    """What the echo upstream saw, keyed by the X-Request-ID it was sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.seen.append(record)

    def by_rid(self, rid: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.seen if r["headers"].get("x-request-id") == rid]

    def paths(self) -> list[str]:
        with self._lock:
            return [r["path"] for r in self.seen]


def make_echo(recorder: Recorder) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = await read_body(receive)
        path = scope["raw_path"].decode("latin-1")
        header_list = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
        record = {
            "method": scope["method"],
            "path": path,
            "query": scope["query_string"].decode("latin-1"),
            "header_list": header_list,
            "headers": {k: v for k, v in header_list},
            "body": body.decode("latin-1"),
        }
        recorder.add(record)
        status = 200
        headers = [(b"content-type", b"application/json")]
        payload = json.dumps(record).encode()
        if path.startswith("/v1/status/"):
            status = int(path.rsplit("/", 1)[1])
            headers = [(b"content-type", b"application/json"), (b"x-upstream-own", b"1")]
            payload = json.dumps({"upstream_says": status, "detail": "mine"}).encode()
        elif path == "/v1/hop":
            headers += [
                (b"connection", b"x-secret"),
                (b"x-secret", b"1"),
                (b"keep-alive", b"timeout=5"),
                (b"proxy-authenticate", b"Basic"),
                (b"x-kept", b"yes"),
            ]
        elif path == "/v1/docs":
            payload = b"x" * 1234
            headers = [(b"content-type", b"text/plain")]
        if status in (204, 304):
            payload = b""
        else:
            headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        body_out = b"" if scope["method"] == "HEAD" else payload
        await send({"type": "http.response.body", "body": body_out})

    return app


class Env:
    def __init__(self, gw: GatewayProcess, up: UpstreamServer, recorder: Recorder) -> None:
        self.gw = gw
        self.up = up
        self.recorder = recorder


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    recorder = Recorder()
    up = UpstreamServer(make_echo(recorder)).start()
    config = {
        "server": {"access_log": False},
        "upstreams": {"echo": {"targets": [up.url]}},
        "routes": [
            {
                "name": "users",
                "path": "/api/users/{rest:path}",
                "methods": ["GET", "POST", "PUT", "DELETE"],
                "upstream": "echo",
                "rewrite": "/v1/users/{rest}",
            },
            {
                "name": "status",
                "path": "/api/status/{code}",
                "upstream": "echo",
                "rewrite": "/v1/status/{code}",
            },
            {"name": "hop", "path": "/api/hop", "upstream": "echo", "rewrite": "/v1/hop"},
            {
                "name": "docs",
                "path": "/api/docs",
                "methods": ["GET"],
                "upstream": "echo",
                "rewrite": "/v1/docs",
            },
            {
                "name": "preserved",
                "path": "/preserved/{rest:path}",
                "upstream": "echo",
                "rewrite": "/v1/preserved/{rest}",
                "preserve_host": True,
            },
            {"name": "plain", "path": "/plain/{rest:path}", "upstream": "echo"},
            {
                "name": "wild-host",
                "path": "/hosted",
                "host": "*.example.com",
                "upstream": "echo",
                "rewrite": "/v1/hosted/wild",
            },
            {
                "name": "any-host",
                "path": "/hosted",
                "upstream": "echo",
                "rewrite": "/v1/hosted/any",
            },
            {
                "name": "partial",
                "path": "/files/x{name}",
                "upstream": "echo",
                "rewrite": "/v1/files/{name}",
            },
        ],
    }
    gw = GatewayProcess(config, tmp_path_factory.mktemp("proxying")).start()
    try:
        yield Env(gw, up, recorder)
    finally:
        gw.stop()
        up.stop()
    assert "Traceback" not in gw.stderr, gw.stderr


@pytest.fixture
def client(env: Env) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=env.gw.url, timeout=5) as c:
        yield c


def rid() -> str:
    return "test-" + uuid.uuid4().hex


def only(env: Env, request_id: str) -> dict[str, Any]:
    records = env.recorder.by_rid(request_id)
    assert len(records) == 1, records
    return records[0]


def raw_http(port: int, request: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client-side normalisation) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def raw_get(env: Env, path: str, request_id: str) -> tuple[int, dict[str, str], bytes]:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: gw.test\r\nX-Request-ID: {request_id}\r\n"
        "Connection: close\r\n\r\n"
    )
    return raw_http(env.gw.port, request.encode("latin-1"))


# --- rewrite, query, methods ----------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
def test_rewrite_and_verbatim_query_for_each_method(
    env: Env, client: httpx.Client, method: str
) -> None:
    request_id = rid()
    query = "b=2&a=1&a=%2Fx%20y&empty=&flag&sort=-name"
    body = b'{"name":"ada"}' if method in ("POST", "PUT") else b""
    response = client.request(
        method,
        f"/api/users/42/profile?{query}",
        content=body,
        headers={"x-request-id": request_id},
    )
    assert response.status_code == 200
    seen = only(env, request_id)
    assert seen["method"] == method
    assert seen["path"] == "/v1/users/42/profile"
    assert seen["query"] == query
    assert seen["body"] == body.decode()
    assert response.json()["path"] == "/v1/users/42/profile"


def test_percent_encoded_parameters_are_forwarded_byte_for_byte(
    env: Env, client: httpx.Client
) -> None:
    request_id = rid()
    response = client.get("/api/users/a%20b/c%3Fd", headers={"x-request-id": request_id})
    assert response.status_code == 200
    assert only(env, request_id)["path"] == "/v1/users/a%20b/c%3Fd"


def test_route_without_rewrite_forwards_the_normalised_path(env: Env, client: httpx.Client) -> None:
    request_id = rid()
    response = client.get("/plain/x/%7Euser/y?z=1", headers={"x-request-id": request_id})
    assert response.status_code == 200
    seen = only(env, request_id)
    assert seen["path"] == "/plain/x/~user/y"
    assert seen["query"] == "z=1"


def test_method_outside_the_route_is_405_and_not_forwarded(env: Env, client: httpx.Client) -> None:
    request_id = rid()
    response = client.patch("/api/users/1", headers={"x-request-id": request_id})
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"
    allow = {m.strip() for m in response.headers["allow"].split(",")}
    assert {"GET", "POST", "PUT", "DELETE"} <= allow
    assert "PATCH" not in allow
    assert env.recorder.by_rid(request_id) == []


def test_head_reaches_the_upstream_where_get_is_allowed(env: Env, client: httpx.Client) -> None:
    request_id = rid()
    response = client.head("/api/docs", headers={"x-request-id": request_id})
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-length"] == "1234"
    assert only(env, request_id)["method"] == "HEAD"
    assert client.get("/api/docs").content == b"x" * 1234


def test_large_request_body_is_forwarded_exactly(env: Env, client: httpx.Client) -> None:
    request_id = rid()
    body = bytes(range(256)) * 1024  # 256 KiB: over the replay buffer, streamed
    response = client.post("/api/users/upload", content=body, headers={"x-request-id": request_id})
    assert response.status_code == 200
    assert only(env, request_id)["body"] == body.decode("latin-1")


def test_body_is_forwarded_when_connection_names_content_length(env: Env) -> None:
    request_id = rid()
    request = (
        "POST /api/users/cl HTTP/1.1\r\nHost: gw.test\r\nConnection: content-length, close\r\n"
        f"X-Request-ID: {request_id}\r\nX-Request-Timeout-Ms: 1000\r\n"
        "Content-Length: 5\r\n\r\nhello"
    )
    status, _, _ = raw_http(env.gw.port, request.encode())
    assert status == 200
    assert only(env, request_id)["body"] == "hello"


def test_expect_100_continue_is_honoured_and_not_forwarded(env: Env) -> None:
    request_id = rid()
    with socket.create_connection(("127.0.0.1", env.gw.port), timeout=5) as sock:
        sock.sendall(
            b"POST /api/users/expect HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\n"
            + f"X-Request-ID: {request_id}\r\n".encode()
            + b"Content-Length: 5\r\nConnection: close\r\n\r\n"
        )
        interim = sock.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
        sock.sendall(b"hello")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert b"HTTP/1.1 200 " in answer
    seen = only(env, request_id)
    assert seen["body"] == "hello"
    assert "expect" not in seen["headers"]


# --- upstream answers pass through untouched ------------------------------------------


@pytest.mark.parametrize("code", [201, 404, 418, 429, 500, 502, 503, 504])
def test_upstream_status_and_body_pass_through_untouched(client: httpx.Client, code: int) -> None:
    response = client.get(f"/api/status/{code}")
    assert response.status_code == code
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-upstream-own"] == "1"
    assert response.json() == {"upstream_says": code, "detail": "mine"}
    assert "x-request-id" in response.headers


def test_upstream_204_has_no_body(client: httpx.Client) -> None:
    response = client.delete("/api/status/204")
    assert response.status_code == 204
    assert response.content == b""


# --- headers both ways ----------------------------------------------------------------


def test_hop_by_hop_headers_are_dropped_upstream(env: Env, client: httpx.Client) -> None:
    request_id = rid()
    response = client.get(
        "/api/users/1",
        headers={
            "x-request-id": request_id,
            "connection": "foo",
            "foo": "bar",
            "te": "trailers",
            "keep-alive": "timeout=300",
            "proxy-authorization": "Basic c2VjcmV0",
            "trailer": "x-sum",
            "x-end-to-end": "kept",
        },
    )
    assert response.status_code == 200
    headers = only(env, request_id)["headers"]
    for name in ("foo", "te", "keep-alive", "proxy-authorization", "trailer"):
        assert name not in headers, name
    assert "foo" not in headers.get("connection", "").lower()
    assert headers["x-end-to-end"] == "kept"


def test_hop_by_hop_headers_are_dropped_downstream(client: httpx.Client) -> None:
    response = client.get("/api/hop")
    assert response.status_code == 200
    assert "x-secret" not in response.headers
    assert "keep-alive" not in response.headers
    assert "proxy-authenticate" not in response.headers
    assert "x-secret" not in response.headers.get("connection", "").lower()
    assert response.headers["x-kept"] == "yes"


def test_x_forwarded_proto_and_host_are_set(env: Env, client: httpx.Client) -> None:
    request_id = rid()
    response = client.get("/api/users/1", headers={"x-request-id": request_id})
    assert response.status_code == 200
    headers = only(env, request_id)["headers"]
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{env.gw.port}"


def test_x_forwarded_for_is_appended_with_the_peer_address(env: Env, client: httpx.Client) -> None:
    request_id = rid()
    response = client.get(
        "/api/users/1", headers={"x-request-id": request_id, "x-forwarded-for": "1.2.3.4"}
    )
    assert response.status_code == 200
    headers = only(env, request_id)["headers"]
    assert headers["x-forwarded-for"] == "1.2.3.4, 127.0.0.1"


def test_x_forwarded_for_is_set_when_the_client_sent_none(env: Env, client: httpx.Client) -> None:
    request_id = rid()
    client.get("/api/users/1", headers={"x-request-id": request_id})
    seen = only(env, request_id)
    assert [v for k, v in seen["header_list"] if k == "x-forwarded-for"] == ["127.0.0.1"]


def test_request_id_is_generated_sent_upstream_and_echoed(env: Env, client: httpx.Client) -> None:
    marker = rid()
    response = client.get(f"/api/users/{marker}")
    assert response.status_code == 200
    generated = response.headers["x-request-id"]
    assert 0 < len(generated) <= 128
    assert generated.isascii() and " " not in generated
    seen = [r for r in env.recorder.seen if r["path"] == f"/v1/users/{marker}"]
    assert len(seen) == 1
    assert seen[0]["headers"]["x-request-id"] == generated
    assert client.get(f"/api/users/{marker}").headers["x-request-id"] != generated


def test_a_sane_client_request_id_is_kept_end_to_end(env: Env, client: httpx.Client) -> None:
    request_id = "Req-" + "a" * 100 + "!~._"
    response = client.get("/api/users/1", headers={"x-request-id": request_id})
    assert response.headers["x-request-id"] == request_id
    assert only(env, request_id)["headers"]["x-request-id"] == request_id


@pytest.mark.parametrize("bad", ["has spaces in it", "x" * 129])
def test_an_insane_client_request_id_is_replaced(env: Env, client: httpx.Client, bad: str) -> None:
    marker = rid()
    response = client.get(f"/api/users/{marker}", headers={"x-request-id": bad})
    assert response.status_code == 200
    echoed = response.headers["x-request-id"]
    assert echoed != bad
    assert 0 < len(echoed) <= 128 and " " not in echoed
    seen = [r for r in env.recorder.seen if r["path"] == f"/v1/users/{marker}"]
    assert seen[0]["headers"]["x-request-id"] == echoed


def test_gateway_errors_carry_the_request_id_too(client: httpx.Client) -> None:
    response = client.get("/nowhere", headers={"x-request-id": "mine-123"})
    assert response.status_code == 404
    assert response.headers["x-request-id"] == "mine-123"
    assert response.json()["request_id"] == "mine-123"


def test_default_host_is_the_targets(env: Env, client: httpx.Client) -> None:
    request_id = rid()
    client.get("/api/users/1", headers={"x-request-id": request_id, "host": "api.example.com"})
    headers = only(env, request_id)["header_list"]
    assert [v for k, v in headers if k == "host"] == [f"127.0.0.1:{env.up.port}"]


def test_preserve_host_passes_the_clients_host(env: Env, client: httpx.Client) -> None:
    request_id = rid()
    response = client.get(
        "/preserved/x", headers={"x-request-id": request_id, "host": "api.example.com"}
    )
    assert response.status_code == 200
    seen = only(env, request_id)
    assert seen["path"] == "/v1/preserved/x"
    assert [v for k, v in seen["header_list"] if k == "host"] == ["api.example.com"]
    assert seen["headers"]["x-forwarded-host"] == "api.example.com"


@pytest.mark.parametrize(
    ("host", "upstream_path"),
    [
        ("a.example.com", "/v1/hosted/wild"),
        ("A.B.Example.com:8443", "/v1/hosted/wild"),
        ("example.com", "/v1/hosted/any"),
        ("evil-example.com", "/v1/hosted/any"),
    ],
)
def test_routes_match_on_host(
    env: Env, client: httpx.Client, host: str, upstream_path: str
) -> None:
    request_id = rid()
    response = client.get("/hosted", headers={"host": host, "x-request-id": request_id})
    assert response.status_code == 200
    assert only(env, request_id)["path"] == upstream_path


# --- paths that try to leave their prefix ---------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/users/../../admin",
        "/api/users/../../v1/admin",
        "/api/users/%2e%2e/%2e%2e/admin",
        "/api/users/%2E%2E/%2E%2E/admin",
        "/api/users/.%2e/.%2e/admin",
        "/api/users/x/../../../admin",
    ],
)
def test_dot_segments_never_reach_the_upstream_outside_the_prefix(env: Env, path: str) -> None:
    request_id = rid()
    status, headers, body = raw_get(env, path, request_id)
    # normalised to a path outside /api/users/, so no route and no upstream call at all
    assert env.recorder.by_rid(request_id) == []
    assert status == 404
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(body)["code"] == "route_not_found"


@pytest.mark.parametrize(
    ("path", "upstream_path"),
    [
        ("/api/users/a/../b", "/v1/users/b"),
        ("/api/users/a/%2e%2e/b", "/v1/users/b"),
        ("/api/users/./a/./b", "/v1/users/a/b"),
    ],
)
def test_dot_segments_inside_the_prefix_are_resolved(
    env: Env, path: str, upstream_path: str
) -> None:
    request_id = rid()
    status, _, _ = raw_get(env, path, request_id)
    assert status == 200
    assert only(env, request_id)["path"] == upstream_path


@pytest.mark.parametrize(
    "path",
    [
        "/api/users/..%2F..%2Fadmin",
        "/api/users/..%2f..%2fadmin",
        "/api/users/a%2Fb",
        "/api/users/..%5C..%5Cadmin",
        "/api/users/a%00b",
        "/api/users/a%zzb",
    ],
)
def test_encoded_separators_are_400_problem_json(env: Env, path: str) -> None:
    request_id = rid()
    status, headers, body = raw_get(env, path, request_id)
    assert status == 400
    assert headers["content-type"] == "application/problem+json"
    doc = json.loads(body)
    assert doc["code"] == "bad_request"
    assert doc["status"] == 400
    assert doc["request_id"] == request_id == headers["x-request-id"]
    assert env.recorder.by_rid(request_id) == []


def test_upstream_never_saw_a_path_outside_its_routes(env: Env, client: httpx.Client) -> None:
    # A last sweep over everything any test in this module sent to the upstream.
    client.get("/api/users/final")
    for path in env.recorder.paths():
        assert path.startswith(
            ("/v1/users/", "/v1/status/", "/v1/hop", "/v1/docs", "/v1/pre", "/v1/hosted/")
        ) or path.startswith(("/plain/", "/v1/files/")), path
        assert "/../" not in path and not path.endswith("/..")


def test_partial_segment_parameter_cannot_become_a_dot_segment(env: Env) -> None:
    request_id = rid()
    status, headers, body = raw_get(env, "/files/x..", request_id)
    assert status == 400
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(body)["code"] == "bad_request"
    assert env.recorder.by_rid(request_id) == []
    request_id = rid()
    status, _, _ = raw_get(env, "/files/xreport", request_id)
    assert status == 200
    assert only(env, request_id)["path"] == "/v1/files/report"


@pytest.mark.parametrize(
    ("rewrite", "expected_query"),
    [("/v1/{rest}?fixed=1", "fixed=1&q=1"), ("/v1/{rest}#frag", "q=1")],
)
def test_a_rewrite_with_query_or_fragment_is_refused_or_merged(
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
    rewrite: str,
    expected_query: str,
) -> None:
    recorder = Recorder()
    up = upstream(make_echo(recorder))
    config = {
        "server": {"access_log": False},
        "upstreams": {"echo": {"targets": [up.url]}},
        "routes": [{"name": "q", "path": "/q/{rest:path}", "upstream": "echo", "rewrite": rewrite}],
    }
    try:
        gw = gateway(config)
    except RuntimeError as exc:  # refusing the config is a fine answer
        assert "rewrite" in str(exc)
        return
    response = httpx.get(gw.url + "/q/x?q=1", timeout=5)
    assert response.status_code == 200
    seen = recorder.seen[-1]
    assert seen["path"] == "/v1/x"
    assert seen["query"] == expected_query
