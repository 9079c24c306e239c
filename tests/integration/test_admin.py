"""The admin listener: health, readiness, the running config (redacted), the admin token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.integration.harness import GatewayProcess, UpstreamServer


async def backend(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def config(up: UpstreamServer, **server: Any) -> dict[str, Any]:
    host_port = up.url.removeprefix("http://")
    return {
        "server": server,
        "upstreams": {"up": {"targets": [f"http://user:s3cret@{host_port}"]}},
        "routes": [{"name": "r", "path": "/r", "upstream": "up"}],
    }


def test_healthz_and_readyz(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)))
    health = httpx.get(gw.admin_url + "/healthz", timeout=5)
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    ready = httpx.get(gw.admin_url + "/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}
    assert httpx.head(gw.admin_url + "/healthz", timeout=5).status_code == 200


def test_config_is_json_with_the_target_password_redacted(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    up = upstream(backend)
    gw = gateway(config(up))
    # A target with credentials in its URL serves; the password is never shown.
    assert httpx.get(gw.url + "/r", timeout=5).status_code == 200
    r = httpx.get(gw.admin_url + "/config", timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert "s3cret" not in r.text
    running = r.json()
    host_port = up.url.removeprefix("http://")
    assert running["upstreams"]["up"]["targets"][0]["url"] == f"http://user:***@{host_port}"
    assert running["server"]["port"] == gw.port
    assert running["server"]["admin_port"] == gw.admin_port
    assert [route["name"] for route in running["routes"]] == ["r"]


def test_admin_token_guards_config_and_reload_but_not_probes(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(
        config(upstream(backend), admin_token_env="ADMIN_TOKEN"), env={"ADMIN_TOKEN": "t0k"}
    )
    with httpx.Client(base_url=gw.admin_url, timeout=5) as admin:
        denied = admin.get("/config")
        assert denied.status_code == 401
        assert denied.headers["www-authenticate"].startswith("Bearer")
        assert "s3cret" not in denied.text
        assert admin.get("/config", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert admin.get("/config", headers={"Authorization": "t0k"}).status_code == 401
        assert admin.get("/config", headers={"Authorization": "Bearer t0k"}).status_code == 200
        assert admin.post("/reload").status_code == 401
        assert admin.post("/reload", headers={"Authorization": "Bearer t0k"}).status_code == 200
        for path in ("/healthz", "/readyz", "/metrics"):
            assert admin.get(path).status_code == 200, path
    # The token never shows up in the running config either.
    shown = httpx.get(gw.admin_url + "/config", headers={"Authorization": "Bearer t0k"}).json()
    assert shown["server"]["admin_token_env"] == "ADMIN_TOKEN"


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_admin_token_env_naming_a_missing_variable_fails_closed(
    value: str | None,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The contract: when admin_token_env is set, /config answers 401 without the bearer
    # token. A typo in the variable's name must not silently open the admin listener:
    # refusing to start is as good as refusing the request.
    monkeypatch.delenv("GATEWAY_TEST_ADMIN_TOKEN", raising=False)
    env = {} if value is None else {"GATEWAY_TEST_ADMIN_TOKEN": value}
    cfg = config(upstream(backend), admin_token_env="GATEWAY_TEST_ADMIN_TOKEN")
    try:
        gw = gateway(cfg, env=env)
    except RuntimeError as exc:
        assert "GATEWAY_TEST_ADMIN_TOKEN" in str(exc)
        return
    assert httpx.get(gw.admin_url + "/config", timeout=5).status_code == 401
    assert httpx.post(gw.admin_url + "/reload", timeout=5).status_code == 401


def test_admin_listener_is_separate_from_the_data_port(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)))
    assert gw.admin_port != gw.port
    # A data route is not served on the admin port.
    assert httpx.get(gw.admin_url + "/r", timeout=5).status_code == 404
    assert httpx.get(gw.url + "/r", timeout=5).status_code == 200
