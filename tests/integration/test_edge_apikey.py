"""API keys over the wire: listed and from the environment, 401 with a challenge when
missing or wrong, the key kept from the upstream unless the route forwards it; and an
aggregate route guarded the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.integration.edge_support import EchoApp
from tests.integration.harness import GatewayProcess, UpstreamServer

CHALLENGE = 'ApiKey realm="gateway", header="X-API-Key"'


def test_api_keys_listed_or_from_env_guard_proxy_and_aggregate_routes(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    app = EchoApp()
    up = upstream(app)
    gw = gateway(
        {
            "auth": {"api_keys": {"keys": ["listed-key"], "keys_env": "EDGE_TEST_KEYS"}},
            "upstreams": {"up": {"targets": [up.url]}},
            "routes": [
                {"name": "open", "path": "/open", "upstream": "up"},
                {"name": "keyed", "path": "/keyed", "upstream": "up", "auth": "api_key"},
                {
                    "name": "forwarded",
                    "path": "/forwarded",
                    "upstream": "up",
                    "auth": "api_key",
                    "forward_api_key": True,
                },
                {
                    "name": "agg",
                    "path": "/agg",
                    "auth": "api_key",
                    "aggregate": {"backends": [{"upstream": "up", "path": "/b", "key": "b"}]},
                },
            ],
        },
        env={"EDGE_TEST_KEYS": "env-key-1, env-key-2"},
    )
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        assert client.get("/open").status_code == 200

        for key in ("listed-key", "env-key-1", "env-key-2"):
            r = client.get("/keyed", headers={"x-api-key": key})
            assert r.status_code == 200, key
            assert "x-api-key" not in r.json()["headers"]  # not forwarded by default

        missing = client.get("/keyed")
        assert missing.status_code == 401
        assert missing.headers["content-type"] == "application/problem+json"
        assert missing.json()["code"] == "unauthorized"
        assert "missing API key" in missing.json()["detail"]
        assert missing.headers["www-authenticate"] == CHALLENGE

        wrong = client.get("/keyed", headers={"x-api-key": "listed-kez"})
        assert wrong.status_code == 401
        assert "invalid API key" in wrong.json()["detail"]
        assert wrong.headers["www-authenticate"] == CHALLENGE
        assert "listed-kez" not in wrong.text

        r = client.get("/forwarded", headers={"x-api-key": "env-key-2"})
        assert r.status_code == 200
        assert r.json()["headers"]["x-api-key"] == "env-key-2"

        assert client.get("/agg").status_code == 401
        agg = client.get("/agg", headers={"x-api-key": "listed-key"})
        assert agg.status_code == 200
        assert agg.json()["b"]["path"] == "/b"
    assert app.requests == 1 + 3 + 1 + 1


def test_check_refuses_auth_it_cannot_enforce(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "auth: {api_keys: {keys_env: EDGE_TEST_UNSET_KEYS}}\n"
        "upstreams: {up: {targets: ['http://127.0.0.1:9']}}\n"
        "routes:\n"
        "  - {name: a, path: /a, upstream: up, auth: api_key}\n"
        "  - {name: j, path: /j, upstream: up, auth: jwt}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if k != "EDGE_TEST_UNSET_KEYS"},
    )
    assert result.returncode == 1
    assert "routes.1.auth: jwt needs the global auth.jwt block" in result.stderr
    assert "EDGE_TEST_UNSET_KEYS is unset or empty" in result.stderr
