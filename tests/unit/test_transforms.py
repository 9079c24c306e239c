"""Header transforms (`routes[].headers`) on their own: order, variables, what a
transform may not touch, the response `send` wrapper, what the factory compiles, and
identity headers reaching an aggregate route's backends."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gateway.build.factory import build_runtime, identity_headers
from gateway.cli import main
from gateway.config.loader import load_config_text
from gateway.dataplane.aggregate import Aggregation, Backend, BackendTemplate
from gateway.dataplane.headers import parse_incoming
from gateway.dataplane.state import Exchange
from gateway.dataplane.transforms import HeaderTransform, client_ip_of
from gateway.types import Deadline, GatewayRequest, GatewayResponse, Message, WholeBody, closed

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name]


# --- compiling and applying --------------------------------------------------------------


def test_remove_then_set_then_add_names_compared_without_case() -> None:
    t = HeaderTransform(
        remove=["X-Debug", "X-Both"],
        set={"X-Env": "prod", "X-Both": "set"},
        add={"X-Both": "added", "X-Tag": "b"},
    )
    out = t.apply(
        [
            (b"X-Debug", b"1"),
            (b"x-env", b"dev"),
            (b"X-ENV", b"staging"),
            (b"x-both", b"old"),
            (b"x-tag", b"a"),
            (b"accept", b"*/*"),
        ],
        "rid",
    )
    assert values(out, b"x-debug") == []
    assert values(out, b"x-env") == [b"prod"]  # set replaces every copy
    assert values(out, b"x-both") == [b"set", b"added"]  # removed, set, then added
    assert values(out, b"x-tag") == [b"a", b"b"]  # add keeps what was there
    assert values(out, b"accept") == [b"*/*"]
    assert all(n == n.lower() for n, _ in out[-4:])  # written lower-case (HTTP/2)


def test_route_and_upstream_are_filled_at_build_time() -> None:
    t = HeaderTransform(set={"X-Via": "{route}@{upstream}"}, route="users", upstream="users-v2")
    assert not t.needs_client_ip
    assert t.apply([], "") == [(b"x-via", b"users@users-v2")]


def test_client_ip_and_request_id_are_filled_per_request() -> None:
    t = HeaderTransform(add={"X-Trace": "{request_id}/{client_ip}/{route}"}, route="r")
    assert t.needs_client_ip
    assert t.apply([], "abc", "192.0.2.1") == [(b"x-trace", b"abc/192.0.2.1/r")]
    assert t.apply([], "def", "192.0.2.2") == [(b"x-trace", b"def/192.0.2.2/r")]
    only_id = HeaderTransform(set={"X-Id": "id={request_id}"})
    assert not only_id.needs_client_ip
    assert only_id.apply([], "xyz") == [(b"x-id", b"id=xyz")]


@pytest.mark.parametrize("name", ["Host", "Content-Length", "Transfer-Encoding", "Connection"])
def test_fields_the_gateway_frames_with_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="cannot change"):
        HeaderTransform(remove=[name])


def test_keep_leaves_named_fields_alone() -> None:
    t = HeaderTransform(remove=["Content-Type"], set={"X-A": "1"}, add={"Content-Type": "x/y"})
    headers = [(b"content-type", b"application/problem+json")]
    out = t.apply(headers, "r", keep=frozenset({b"content-type"}))
    assert out == [(b"content-type", b"application/problem+json"), (b"x-a", b"1")]
    assert values(t.apply(headers, "r"), b"content-type") == [b"x/y"]


def test_upstream_transform_uses_the_real_client_behind_a_trusted_proxy() -> None:
    incoming = parse_incoming([(b"host", b"h"), (b"x-forwarded-for", b"203.0.113.9")])
    t = HeaderTransform(set={"X-Client": "{client_ip}"})
    scope = {"client": ("10.1.2.3", 5000)}
    t.apply_upstream(incoming, scope, TRUSTED)
    assert values(incoming.upstream, b"x-client") == [b"203.0.113.9"]
    t.apply_upstream(incoming, scope, ())  # the peer is not trusted: the peer it is
    assert values(incoming.upstream, b"x-client") == [b"10.1.2.3"]


def test_client_ip_of_reads_the_gateways_own_x_forwarded_for() -> None:
    headers = [(b"x-forwarded-for", b"203.0.113.9, 10.1.2.3")]
    assert client_ip_of(headers, TRUSTED) == "203.0.113.9"
    assert client_ip_of(headers, ()) == "10.1.2.3"
    assert client_ip_of([], TRUSTED) == ""


async def test_wrapped_send_transforms_the_head_and_spares_a_problems_content_type() -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    incoming = parse_incoming([(b"host", b"h"), (b"x-request-id", b"req-1")])
    exchange = Exchange(0.0, "GET", "/", "req-1")
    t = HeaderTransform(
        remove=["Server"], set={"Content-Type": "text/plain", "X-Id": "{request_id}"}
    )
    wrapped = t.wrap_send(send, {"client": ("127.0.0.1", 1)}, incoming, (), exchange)
    head = [(b"Server", b"up/1"), (b"content-type", b"application/json")]
    await wrapped({"type": "http.response.start", "status": 200, "headers": head})
    await wrapped({"type": "http.response.body", "body": b"{}"})
    assert sent[0]["headers"] == [(b"content-type", b"text/plain"), (b"x-id", b"req-1")]
    assert sent[1] == {"type": "http.response.body", "body": b"{}"}

    sent.clear()
    exchange.detail = "the deadline passed"  # the gateway's own error answer
    problem = [(b"content-type", b"application/problem+json")]
    await wrapped({"type": "http.response.start", "status": 504, "headers": problem})
    assert sent[0]["headers"] == [
        (b"content-type", b"application/problem+json"),
        (b"x-id", b"req-1"),
    ]


# --- the factory ---------------------------------------------------------------------------

CONFIG = """\
auth:
  api_keys: {header: X-Key, keys: [k1]}
  jwt: {algorithms: [HS256], secret_env: TRANSFORM_TEST_SECRET, claims_to_headers: {sub: X-User}}
upstreams:
  a: {targets: ["http://127.0.0.1:9"]}
  b: {targets: ["http://127.0.0.1:9"]}
routes:
  - {name: plain, path: /plain, upstream: a}
  - name: proxied
    path: /proxied
    upstream: a
    headers:
      request: {set: {X-Up: "{upstream}"}}
      response: {remove: [Server]}
  - name: agg
    path: /agg
    auth: jwt
    aggregate:
      backends:
        - {upstream: a, path: /a, key: a}
        - {upstream: b, path: /b, key: b}
    headers:
      request: {set: {X-Up: "{upstream}"}}
      response: {add: {X-Route: "{route}"}}
  - {name: keyed, path: /keyed, auth: api_key, forward_api_key: true, upstream: a}
"""


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("TRANSFORM_TEST_SECRET", "s" * 40)
    return build_runtime(load_config_text(CONFIG, "gateway.yaml"))


def route_named(runtime: Any, name: str) -> Any:
    return runtime.router.match("h", "GET", f"/{name}").route


def test_a_route_without_headers_has_no_transform(runtime: Any) -> None:
    plain = route_named(runtime, "plain")
    assert plain.request_transform is None and plain.response_transform is None


def test_a_proxied_route_gets_both_directions(runtime: Any) -> None:
    proxied = route_named(runtime, "proxied")
    assert proxied.request_transform.apply([], "r") == [(b"x-up", b"a")]
    assert proxied.response_transform.apply([(b"server", b"x")], "r") == []


def test_an_aggregate_route_transforms_per_backend(runtime: Any) -> None:
    agg = route_named(runtime, "agg")
    assert agg.request_transform is None  # applied by each backend instead
    assert agg.response_transform.apply([], "r") == [(b"x-route", b"agg")]
    backends = agg.handler.backends
    assert [b.transform.apply([], "r") for b in backends] == [
        [(b"x-up", b"a")],
        [(b"x-up", b"b")],
    ]


def test_identity_headers_of_a_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFORM_TEST_SECRET", "s" * 40)
    settings = load_config_text(CONFIG, "gateway.yaml")
    by_name = {r.name: r for r in settings.routes}
    assert identity_headers(by_name["agg"], settings) == {b"x-user"}
    assert identity_headers(by_name["keyed"], settings) == {b"x-key"}
    assert identity_headers(by_name["plain"], settings) == frozenset()


# --- aggregate backends --------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.requests: list[GatewayRequest] = []

    async def __call__(self, request: GatewayRequest) -> GatewayResponse:
        self.requests.append(request)
        return GatewayResponse(200, [], WholeBody(b"{}"), closed, whole=b"{}")


async def test_backends_get_identity_headers_and_their_own_transform() -> None:
    a, b = Recorder(), Recorder()
    backends = [
        Backend(
            index=i,
            upstream=name,
            template=BackendTemplate(f"/{name}", frozenset()),
            handler=handler,
            key=name,
            required=False,
            timeout=None,
            fields=None,
            rename={},
            transform=HeaderTransform(set={"X-Up": "{upstream}:{client_ip}"}, upstream=name),
        )
        for i, (name, handler) in enumerate((("a", a), ("b", b)))
    ]
    aggregation = Aggregation(
        "agg",
        backends,
        partial="fail",
        timeout=1.0,
        max_response_size=1024,
        forward_authorization=True,
        identity=frozenset({b"x-user"}),
        trusted_proxies=TRUSTED,
    )
    headers = [
        (b"x-user", b"user-42"),
        (b"x-other", b"dropped"),
        (b"x-forwarded-for", b"203.0.113.9, 10.1.2.3"),
    ]
    request = GatewayRequest("GET", "/agg", b"", headers, Deadline.after(1), "rid", "agg")
    response = await aggregation(request)
    assert response.status == 200
    for recorder, name in ((a, b"a"), (b, b"b")):
        sent = recorder.requests[0].headers
        assert values(sent, b"x-user") == [b"user-42"]
        assert values(sent, b"x-other") == []
        assert values(sent, b"x-up") == [name + b":203.0.113.9"]


# --- gateway check -------------------------------------------------------------------------


def check(tmp_path: Path, headers: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            upstreams:
              a: {targets: ["http://127.0.0.1:9"]}
            routes:
              - name: r
                path: /r
                upstream: a
                headers:
            """
        )
        + textwrap.indent(textwrap.dedent(headers), " " * 6)
    )
    status = main(["check", str(path)])
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    ("headers", "line", "field"),
    [
        ("request:\n  set: {X-Forwarded-For: 1.2.3.4}\n", 9, "routes.0.headers.request"),
        ("response:\n  remove: [X-Request-ID]\n", 9, "routes.0.headers.response"),
        ("request:\n  add:\n    X-Request-Timeout-Ms: '5'\n", 9, "routes.0.headers.request"),
    ],
)
def test_check_refuses_the_gateways_own_headers_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], headers: str, line: int, field: str
) -> None:
    status, err = check(tmp_path, headers, capsys)
    assert status == 1
    assert err.startswith(f"{tmp_path / 'gateway.yaml'}:{line}:"), err
    assert f": {field}: " in err and "the gateway's own header" in err


def test_check_refuses_framing_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, err = check(tmp_path, "response:\n  remove: [Content-Length]\n", capsys)
    assert status == 1
    assert "routes.0.headers.response.remove: Content-Length" in err


def test_check_accepts_a_good_transform(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    headers = "request:\n  set: {X-Tenant: '{route}'}\nresponse:\n  remove: [Server]\n"
    status, err = check(tmp_path, headers, capsys)
    assert (status, err) == (0, "")
