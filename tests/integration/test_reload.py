"""Hot reload: POST /reload, SIGHUP and the file watch, against a real gateway process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import GatewayProcess, UpstreamServer

CHUNK = b"x" * 4096


async def backend(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Echoes its path. `.../slow`: headers after 1.5 s. `.../stream`: headers at once, then 8
    chunks over ~1.6 s."""
    path = scope["path"]
    if path.endswith("/stream"):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(8):
            await asyncio.sleep(0.2)
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if path.endswith("/slow"):
        await asyncio.sleep(1.5)
    body = f"upstream saw {path}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def base_config(up: UpstreamServer, **server: Any) -> dict[str, Any]:
    return {
        "server": server,
        "upstreams": {"up": {"targets": [up.url]}},
        "routes": [{"name": "old", "path": "/old/{rest:path}", "upstream": "up"}],
    }


def edit(gw: GatewayProcess, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the running gateway's config file (its ports are kept)."""
    cfg = yaml.safe_load(gw.config_path.read_text())
    change(cfg)
    gw.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def add_new_route(cfg: dict[str, Any]) -> None:
    cfg["routes"].append({"name": "new", "path": "/new/{rest:path}", "upstream": "up"})


def status(gw: GatewayProcess, path: str) -> int:
    return httpx.get(gw.url + path, timeout=5).status_code


def wait_for_status(gw: GatewayProcess, path: str, expected: int, timeout: float) -> float:
    """Poll until `path` answers `expected`; return how long it took."""
    start = time.monotonic()
    while True:
        got = status(gw, path)
        if got == expected:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            pytest.fail(f"{path} still answers {got}, not {expected}, after {timeout}s")
        time.sleep(0.05)


def reloads(gw: GatewayProcess) -> dict[str, float]:
    text = httpx.get(gw.admin_url + "/metrics", timeout=5).text
    return {
        s.labels["result"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gateway_config_reloads_total"
    }


def test_post_reload_serves_a_new_route(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(base_config(upstream(backend)))
    assert status(gw, "/new/a") == 404
    edit(gw, add_new_route)
    r = httpx.post(gw.admin_url + "/reload", timeout=10)
    assert r.status_code == 200
    assert r.json() == {"status": "reloaded"}
    new = httpx.get(gw.url + "/new/a", timeout=5)
    assert new.status_code == 200
    assert new.text == "upstream saw /new/a"
    assert status(gw, "/old/b") == 200
    names = [route["name"] for route in httpx.get(gw.admin_url + "/config").json()["routes"]]
    assert names == ["old", "new"]
    assert reloads(gw).get("ok") == 1.0


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        ("routes: [\n  {name: new, path: /new\n", r"YAML"),
        (None, r"server\.bogus"),  # an unknown key, added to the valid file
        (None, r"routes\.1\.upstream"),  # a route naming an upstream that does not exist
    ],
    ids=["invalid-yaml", "unknown-key", "unknown-upstream"],
)
def test_bad_reload_is_refused_with_located_errors_and_old_config_kept(
    broken: str | None,
    expected: str,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    gw = gateway(base_config(upstream(backend)))
    before = httpx.get(gw.admin_url + "/config", timeout=5).json()
    if broken is not None:
        gw.config_path.write_text(broken)
    elif expected.startswith("server"):
        edit(gw, lambda cfg: cfg["server"].update(bogus=1))
    else:
        edit(
            gw,
            lambda cfg: cfg["routes"].append({"name": "x", "path": "/x", "upstream": "nope"}),
        )
    r = httpx.post(gw.admin_url + "/reload", timeout=10)
    assert r.status_code == 400
    body = r.json()
    errors = body["errors"]
    assert isinstance(errors, list)
    assert errors
    location = re.compile(rf"^{re.escape(str(gw.config_path))}:\d+:\d+: ")
    for line in errors:
        assert location.match(line), line
    assert any(re.search(expected, line) for line in errors), errors
    # The old config is kept and still serves.
    assert status(gw, "/old/a") == 200
    assert status(gw, "/x") == 404
    assert httpx.get(gw.admin_url + "/config", timeout=5).json() == before
    assert httpx.get(gw.admin_url + "/readyz", timeout=5).status_code == 200
    assert reloads(gw).get("error") == 1.0


def test_reload_to_a_feature_this_build_refuses_keeps_the_old_config(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    # A route asking for auth the config cannot enforce (no global auth block) is refused
    # at startup; a reload must not let it in either (a route silently served without
    # the auth it asks for).
    gw = gateway(base_config(upstream(backend)))

    def add_unenforceable_auth(cfg: dict[str, Any]) -> None:
        add_new_route(cfg)
        cfg["routes"][-1]["auth"] = "jwt"
        cfg["cors"] = {"allow_origins": ["https://app.example"]}

    edit(gw, add_unenforceable_auth)
    r = httpx.post(gw.admin_url + "/reload", timeout=10)
    assert r.status_code == 400
    errors = r.json()["errors"]
    assert any("auth.jwt" in line for line in errors), errors
    assert all(line.startswith(str(gw.config_path)) for line in errors), errors
    assert status(gw, "/new/a") == 404
    assert status(gw, "/old/a") == 200
    assert httpx.get(gw.admin_url + "/config", timeout=5).json()["cors"] is None
    assert reloads(gw).get("error") == 1.0


def test_sighup_reloads(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(base_config(upstream(backend)))
    edit(gw, add_new_route)
    assert status(gw, "/new/a") == 404  # nothing happens without a signal
    gw.signal(signal.SIGHUP)
    assert wait_for_status(gw, "/new/a", 200, timeout=2.0) < 2.0
    assert status(gw, "/old/a") == 200
    assert gw.proc is not None
    assert gw.proc.poll() is None  # SIGHUP reloads; it does not stop the gateway


def test_sighup_with_a_bad_file_keeps_serving(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(base_config(upstream(backend)))
    gw.config_path.write_text("routes: [\n")
    gw.signal(signal.SIGHUP)
    deadline = time.monotonic() + 2
    while reloads(gw).get("error") != 1.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reloads(gw).get("error") == 1.0
    assert status(gw, "/old/a") == 200
    assert gw.proc is not None
    assert gw.proc.poll() is None


def test_file_watch_reloads_without_a_signal(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(base_config(upstream(backend), watch=True))
    edit(gw, add_new_route)
    assert wait_for_status(gw, "/new/a", 200, timeout=3.0) < 3.0
    assert status(gw, "/old/a") == 200


def test_file_watch_skips_a_bad_edit_then_takes_the_fix(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(base_config(upstream(backend), watch=True))
    good = gw.config_path.read_text()
    gw.config_path.write_text(good + "bogus_section: 1\n")
    deadline = time.monotonic() + 3
    while reloads(gw).get("error") != 1.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reloads(gw).get("error") == 1.0
    assert status(gw, "/old/a") == 200
    gw.config_path.write_text(good)
    edit(gw, add_new_route)
    assert wait_for_status(gw, "/new/a", 200, timeout=3.0) < 3.0


def test_file_watch_sees_an_atomic_symlink_swap(
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    # What a Kubernetes ConfigMap update looks like: the path is a symlink that is
    # atomically replaced to point at a new file.
    gw = gateway(base_config(upstream(backend), watch=True))
    cfg = yaml.safe_load(gw.config_path.read_text())
    add_new_route(cfg)
    data = tmp_path / "..2024_data"
    data.mkdir()
    (data / "gateway.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    link = tmp_path / "gateway.yaml.tmp-link"
    link.symlink_to(data / "gateway.yaml")
    os.replace(link, gw.config_path)
    assert wait_for_status(gw, "/new/a", 200, timeout=3.0) < 3.0


async def test_in_flight_requests_finish_on_the_config_they_started_with(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(base_config(upstream(backend)))
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        waiting = asyncio.create_task(client.get("/old/slow"))  # no headers yet at reload
        streaming = asyncio.create_task(client.get("/old/stream"))  # mid-body at reload
        await asyncio.sleep(0.4)
        assert not waiting.done()
        assert not streaming.done()

        def remove_route_and_upstream(cfg: dict[str, Any]) -> None:
            cfg["upstreams"] = {"other": cfg["upstreams"]["up"]}
            cfg["routes"] = [{"name": "other", "path": "/other", "upstream": "other"}]

        edit(gw, remove_route_and_upstream)
        async with httpx.AsyncClient(base_url=gw.admin_url, timeout=10) as admin:
            assert (await admin.post("/reload")).status_code == 200
        # New requests see the new config at once.
        gone = await client.get("/old/slow")
        assert gone.status_code == 404
        assert gone.json()["code"] == "route_not_found"
        assert not waiting.done()

        slow = await waiting
        assert slow.status_code == 200
        assert slow.text == "upstream saw /old/slow"
        stream = await streaming
        assert stream.status_code == 200
        assert stream.content == CHUNK * 8
        assert (await client.get("/other")).status_code == 200
