"""The environment feeds the config: `${VAR}` / `${VAR:-default}` inside the YAML, and
`GATEWAY_SECTION__FIELD` overrides, checked against the real gateway process."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.harness import GatewayProcess, UpstreamServer, free_port, read_body

UNSET = "GW_TEST_SURELY_UNSET_VARIABLE_7F3A"


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await read_body(receive)  # drained, not used
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello from " + scope["path"].encode()})


def config_yaml(target: str) -> str:
    return f"""
server:
  access_log: false
upstreams:
  app:
    targets: ["{target}"]
routes:
  - name: app
    path: /app/{{rest:path}}
    upstream: app
    rewrite: /{{rest}}
"""


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def test_variable_in_targets_comes_from_the_environment(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    up = upstream(hello)
    gw = gateway(config_yaml("${UPSTREAM_URL}"), env={"UPSTREAM_URL": up.url})
    response = httpx.get(gw.url + "/app/ping", timeout=5)
    assert response.status_code == 200
    assert response.text == "hello from /ping"
    running = httpx.get(gw.admin_url + "/config", timeout=5).json()
    assert up.url in str(running)
    assert "${UPSTREAM_URL}" not in str(running)


def test_default_applies_when_the_variable_is_unset(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    assert UNSET not in os.environ
    up = upstream(hello)
    gw = gateway(config_yaml("${" + UNSET + ":-" + up.url + "}"))
    assert httpx.get(gw.url + "/app/x", timeout=5).text == "hello from /x"


def test_set_variable_wins_over_its_default(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    up = upstream(hello)
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway(config_yaml("${APP_URL:-" + dead + "}"), env={"APP_URL": up.url})
    assert httpx.get(gw.url + "/app/y", timeout=5).text == "hello from /y"


def test_unset_variable_without_default_stops_the_gateway(tmp_path: Path) -> None:
    assert UNSET not in os.environ
    proc = GatewayProcess(config_yaml("${" + UNSET + "}"), tmp_path)
    with pytest.raises(RuntimeError, match="exited"):
        proc.start(timeout=10)
    assert proc.proc is not None and proc.proc.returncode != 0
    assert UNSET in proc.stderr
    assert refused(proc.port)


def test_gateway_server_port_overrides_the_file(
    tmp_path: Path, upstream: Callable[..., UpstreamServer]
) -> None:
    up = upstream(hello)
    override = free_port()
    proc = GatewayProcess(
        config_yaml(up.url), tmp_path, env={"GATEWAY_SERVER__PORT": str(override)}
    )
    file_port = proc.port
    assert file_port != override
    proc.url = f"http://127.0.0.1:{override}"
    with proc:
        response = httpx.get(proc.url + "/app/over", timeout=5)
        assert response.status_code == 200
        assert response.text == "hello from /over"
        assert refused(file_port)
        running = httpx.get(proc.admin_url + "/config", timeout=5).json()
        assert running["server"]["port"] == override


def test_nested_override_of_a_size(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    up = upstream(hello)
    gw = gateway(config_yaml(up.url), env={"GATEWAY_SERVER__MAX_BODY_SIZE": "1KiB"})
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        assert client.post("/app/small", content=b"x" * 1024).status_code == 200
        response = client.post("/app/big", content=b"x" * 2048)
        assert response.status_code == 413
        assert response.json()["code"] == "body_too_large"


def test_bad_override_stops_the_gateway_naming_the_variable(
    tmp_path: Path, upstream: Callable[..., UpstreamServer]
) -> None:
    up = upstream(hello)
    proc = GatewayProcess(
        config_yaml(up.url), tmp_path, env={"GATEWAY_SERVER__MAX_BODY_SIZE": "lots"}
    )
    with pytest.raises(RuntimeError, match="exited"):
        proc.start(timeout=10)
    assert "GATEWAY_SERVER__MAX_BODY_SIZE" in proc.stderr
    assert "max_body_size" in proc.stderr
