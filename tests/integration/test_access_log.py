"""The access log: one JSON line per request on the gateway's stdout."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.harness import GatewayProcess, UpstreamServer, free_port

FIELDS = {
    "time",
    "request_id",
    "client",
    "method",
    "path",
    "route",
    "upstream",
    "target",
    "status",
    "bytes_out",
    "duration_ms",
    "error",
    "protocol",
    "tls",
}
BODY = b"hello from the upstream\n" * 10


async def backend(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    if scope["path"].endswith("/slow"):
        await asyncio.sleep(1.5)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(BODY))],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def config(up: UpstreamServer, **server: Any) -> dict[str, Any]:
    return {
        "server": server,
        "upstreams": {
            "up": {"targets": [up.url]},
            "dead": {"targets": [f"http://127.0.0.1:{free_port()}"]},
        },
        "routes": [
            {"name": "items", "path": "/items/{id}", "upstream": "up"},
            {"name": "dead", "path": "/dead", "upstream": "dead"},
        ],
    }


def log_lines(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gw.stdout.splitlines() if line.strip()]


def wait_for_lines(gw: GatewayProcess, count: int, timeout: float = 2.0) -> list[dict[str, Any]]:
    """Lines are flushed in small batches: poll the stdout file."""
    deadline = time.monotonic() + timeout
    while True:
        lines = log_lines(gw)
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_one_json_line_per_request_with_every_field(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    up = upstream(backend)
    gw = gateway(config(up))
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        ok = client.get("/items/7?x=1", headers={"X-Request-ID": "req-ok-1"})
        posted = client.post("/items/8", content=b"abc", headers={"X-Request-ID": "req-post-2"})
        missing = client.get("/missing", headers={"X-Request-ID": "req-404-3"})
        dead = client.get("/dead", headers={"X-Request-ID": "req-502-4"})
    assert [ok.status_code, posted.status_code, missing.status_code, dead.status_code] == [
        200,
        200,
        404,
        502,
    ]

    lines = wait_for_lines(gw, 4)
    assert len(lines) == 4, lines
    by_id = {line["request_id"]: line for line in lines}
    assert set(by_id) == {"req-ok-1", "req-post-2", "req-404-3", "req-502-4"}
    for line in lines:
        assert set(line) == FIELDS, line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]), line
        assert line["client"] == "127.0.0.1"
        assert isinstance(line["duration_ms"], int | float)
        assert 0 <= line["duration_ms"] < 5000
        assert (line["protocol"], line["tls"]) == ("HTTP/1.1", None)  # cleartext HTTP/1.1

    first = by_id["req-ok-1"]
    assert first["method"] == "GET"
    assert first["path"] == "/items/7"
    assert first["route"] == "items"
    assert first["upstream"] == "up"
    assert first["target"] == up.url
    assert first["status"] == 200
    assert first["bytes_out"] == len(BODY)
    assert first["error"] is None

    post = by_id["req-post-2"]
    assert (post["method"], post["path"], post["status"]) == ("POST", "/items/8", 200)

    not_found = by_id["req-404-3"]
    assert not_found["route"] is None
    assert not_found["upstream"] is None
    assert not_found["target"] is None
    assert not_found["status"] == 404
    assert not_found["error"] == "route_not_found"
    assert not_found["bytes_out"] == len(missing.content)

    failed = by_id["req-502-4"]
    assert failed["route"] == "dead"
    assert failed["upstream"] == "dead"
    assert failed["status"] == 502
    assert failed["error"] == "upstream_unavailable"
    assert failed["bytes_out"] == len(dead.content)


def test_generated_request_id_is_logged(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)))
    r = httpx.get(gw.url + "/items/1", timeout=10)
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    lines = wait_for_lines(gw, 1)
    assert [line["request_id"] for line in lines] == [rid]


def test_many_requests_give_exactly_one_line_each(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)))
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        for i in range(30):
            assert client.get(f"/items/{i}", headers={"X-Request-ID": f"n-{i}"}).status_code == 200
    lines = wait_for_lines(gw, 30)
    time.sleep(0.2)  # nothing more may come
    lines = log_lines(gw)
    assert sorted(line["request_id"] for line in lines) == sorted(f"n-{i}" for i in range(30))


def test_access_log_false_writes_nothing(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend), access_log=False))
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        assert client.get("/items/1").status_code == 200
        assert client.get("/missing").status_code == 404
    time.sleep(0.5)  # well past the 50 ms batch
    assert gw.stdout == ""


def test_a_client_that_goes_away_is_logged_as_499(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)))
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(gw.url + "/items/slow", timeout=0.3, headers={"X-Request-ID": "gone-1"})
    lines = wait_for_lines(gw, 1, timeout=3.0)
    assert len(lines) == 1, lines
    (line,) = lines
    assert line["request_id"] == "gone-1"
    assert line["route"] == "items"
    assert line["status"] == 499
    assert line["error"] == "client_disconnected"
    assert line["duration_ms"] < 1500  # logged when the client left, not when upstream answered


def test_reload_switches_the_access_log_on_and_off(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend), access_log=False))

    def reload_with(access_log: bool) -> None:
        cfg = yaml.safe_load(gw.config_path.read_text())
        cfg["server"]["access_log"] = access_log
        gw.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        assert httpx.post(gw.admin_url + "/reload", timeout=10).status_code == 200

    def get(rid: str) -> int:
        headers = {"X-Request-ID": rid}
        return httpx.get(gw.url + "/items/1", headers=headers, timeout=5).status_code

    assert get("off-1") == 200
    reload_with(True)
    assert get("on-1") == 200
    assert [line["request_id"] for line in wait_for_lines(gw, 1)] == ["on-1"]
    reload_with(False)
    assert get("off-2") == 200
    time.sleep(0.5)
    assert [line["request_id"] for line in log_lines(gw)] == ["on-1"]
