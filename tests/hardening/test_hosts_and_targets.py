"""No SSRF through the gateway: absolute-form targets, odd Host values and paths that
look like authorities never choose an upstream outside the config. A "victim" server
stands where an attacker would like the gateway to go; it must never see a request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.hardening.apps import RecordingApp
from tests.hardening.rawhttp import exchange, serves_normally
from tests.integration.harness import GatewayProcess, UpstreamServer


@dataclass
class Env:
    gw: GatewayProcess
    app: RecordingApp
    victim: RecordingApp
    victim_port: int


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    app, victim = RecordingApp(), RecordingApp()
    with UpstreamServer(app) as up, UpstreamServer(victim) as target:
        config = {
            "upstreams": {"app": {"targets": [up.url]}},
            "routes": [
                {
                    "name": "admin-host",
                    "path": "/{rest:path}",
                    "host": "admin.example.com",
                    "upstream": "app",
                    "rewrite": "/admin/{rest}",
                },
                {
                    "name": "kept-host",
                    "path": "/keep/{rest:path}",
                    "upstream": "app",
                    "preserve_host": True,
                },
                {
                    "name": "api",
                    "path": "/api/{rest:path}",
                    "upstream": "app",
                    "rewrite": "/v1/{rest}",
                },
            ],
        }
        with GatewayProcess(config, tmp_path_factory.mktemp("ssrf")) as gw:
            yield Env(gw, app, victim, target.port)


def raw(target: str, host: str | None = "gw.test", method: str = "GET") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\n"
    if host is not None:
        head += f"Host: {host}\r\n"
    return (head + "Connection: close\r\n\r\n").encode("latin-1")


def victim_cases(port: int) -> dict[str, bytes]:
    v = f"127.0.0.1:{port}"
    return {
        "absolute-form": raw(f"http://{v}/api/x"),
        "absolute-form-https": raw(f"https://{v}/api/x"),
        "absolute-form-userinfo": raw(f"http://gw.test@{v}/api/x"),
        "absolute-form-without-path": raw(f"http://{v}"),
        "host-is-the-victim": raw("/api/x", host=v),
        "host-with-userinfo": raw("/api/x", host=f"user@{v}"),
        "host-with-path": raw("/api/x", host=f"{v}/evil"),
        "host-empty": raw("/api/x", host=""),
        "no-host-http-1.1": raw("/api/x", host=None),
        "host-ipv6-literal": raw("/api/x", host="[::1]:1"),
        "double-slash-path": raw(f"//{v}/api/x"),
        "authority-in-path": raw(f"/api/@{v}/x"),
        "encoded-authority-in-path": raw(f"/api/%2F%2F{v}/x"),
        "backslash-path": raw(f"/api/\\\\{v}/x"),
        "dot-segments-to-root": raw("/api/../../../etc/passwd"),
        "encoded-dot-segments": raw("/api/%2e%2e/%2e%2e/admin"),
        "asterisk-form": raw("*", method="OPTIONS"),
        "connect-authority-form": raw(v, host=v, method="CONNECT"),
    }


CASE_NAMES = sorted(victim_cases(1))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_no_target_outside_the_config_is_ever_reached(env: Env, name: str) -> None:
    answer = exchange(env.gw.port, victim_cases(env.victim_port)[name], timeout=3)
    assert answer.status is None or answer.status < 500, answer
    assert env.victim.count == 0, "a request reached a server outside the config"
    if answer.status == 200:
        echoed = json.loads(answer.body)
        # Whatever was routed went to the configured upstream, under a configured prefix.
        assert echoed["path"].startswith(("/v1/", "/admin/", "/keep/")), echoed
    serves_normally(env.gw.url, "/api/ok")


def test_absolute_form_is_served_from_the_config_with_its_path_only(env: Env) -> None:
    answer = exchange(env.gw.port, raw(f"http://127.0.0.1:{env.victim_port}/api/users?q=1"))
    assert answer.status == 200
    echoed = json.loads(answer.body)
    assert echoed["path"] == "/v1/users" and echoed["query"] == "q=1"
    assert env.victim.count == 0


def test_host_routing_cannot_be_escaped_by_dot_segments(env: Env) -> None:
    answer = exchange(env.gw.port, raw("/x/../../secret", host="admin.example.com"))
    assert answer.status == 200
    assert json.loads(answer.body)["path"] == "/admin/secret"


def test_preserve_host_forwards_the_host_but_never_follows_it(env: Env) -> None:
    victim = f"127.0.0.1:{env.victim_port}"
    answer = exchange(env.gw.port, raw("/keep/x", host=victim))
    assert answer.status == 200
    headers = dict(json.loads(answer.body)["headers"])
    assert headers["host"] == victim
    assert env.victim.count == 0


def test_two_host_headers_are_refused(env: Env) -> None:
    request = b"GET /api/x HTTP/1.1\r\nHost: gw.test\r\nHost: admin.example.com\r\n\r\n"
    answer = exchange(env.gw.port, request)
    assert answer.status == 400
    assert answer.closed


@pytest.mark.parametrize(
    "host",
    [None, "", "gw.test/evil", "user@gw.test", "gw test", "gw.test:port"],
    ids=["missing", "empty", "with-path", "with-userinfo", "with-space", "bad-port"],
)
def test_http11_without_a_valid_host_is_400(env: Env, host: str | None) -> None:
    answer = exchange(env.gw.port, raw("/api/x", host=host))
    assert answer.status == 400
    assert answer.closed
    assert env.victim.count == 0
    serves_normally(env.gw.url, "/api/x")


def test_http10_without_host_is_served(env: Env) -> None:
    answer = exchange(env.gw.port, b"GET /api/x HTTP/1.0\r\n\r\n")
    assert answer.status == 200


def test_http09_is_not_served(env: Env) -> None:
    answer = exchange(env.gw.port, b"GET /api/x\r\n")
    assert answer.status in (None, 400)  # refused or closed, never proxied
    assert answer.status != 200
    serves_normally(env.gw.url, "/api/x")
