"""`gateway.admin.redact`: what /config shows of secrets."""

from __future__ import annotations

import json
import textwrap

from gateway.config.loader import load_config_text
from gateway.ops.admin import REDACTED, redact


def test_listed_api_keys_are_each_replaced() -> None:
    doc = {"auth": {"api_keys": {"header": "X-API-Key", "keys": ["a", "b"]}}}
    assert redact(doc) == {"auth": {"api_keys": {"header": "X-API-Key", "keys": ["***", "***"]}}}
    assert REDACTED == "***"


def test_environment_variable_names_are_kept() -> None:
    doc = {
        "auth": {
            "api_keys": {"keys_env": "GATEWAY_API_KEYS"},
            "jwt": {"secret_env": "JWT_SECRET", "jwks_file": "config/jwks.json"},
        },
        "server": {"admin_token_env": "ADMIN_TOKEN"},
    }
    assert redact(doc) == doc


def test_redis_url_password_is_redacted() -> None:
    assert redact({"rate_limit_store": {"redis": "redis://:pw0rd@cache:6379/0"}}) == {
        "rate_limit_store": {"redis": "redis://:***@cache:6379/0"}
    }
    assert redact({"redis": "rediss://app:pw0rd@cache:6380/1"}) == {
        "redis": "rediss://app:***@cache:6380/1"
    }


def test_url_without_password_is_unchanged() -> None:
    for url in (
        "http://127.0.0.1:9001",
        "redis://cache:6379/0",
        "http://user@host:80",
        "https://issuer.example/.well-known/jwks.json",
    ):
        assert redact({"url": url}) == {"url": url}


def test_target_url_passwords_in_lists_and_objects() -> None:
    doc = {
        "upstreams": {
            "users": {
                "targets": [
                    {"url": "http://svc:hunter2@10.0.0.1:9001", "weight": 2},
                    {"url": "HTTPS://svc:hunter2@10.0.0.2:9002", "weight": 1},
                ]
            }
        },
        "jwks_url": "https://u:hunter2@idp.example/jwks.json",
    }
    shown = redact(doc)
    assert "hunter2" not in json.dumps(shown)
    targets = shown["upstreams"]["users"]["targets"]
    assert targets[0] == {"url": "http://svc:***@10.0.0.1:9001", "weight": 2}
    assert targets[1]["url"] == "HTTPS://svc:***@10.0.0.2:9002"
    assert shown["jwks_url"] == "https://u:***@idp.example/jwks.json"


def test_secret_named_fields_are_redacted_whatever_their_case() -> None:
    doc = {"Password": "p", "client_secret": "s", "apiKey": "k", "api_key": "k2", "token": "t"}
    assert redact(doc) == dict.fromkeys(doc, "***")


def test_non_secret_values_are_untouched_and_input_not_mutated() -> None:
    doc = {"server": {"port": 8080, "access_log": True, "drain_timeout": 1.5, "host": None}}
    before = json.dumps(doc, sort_keys=True)
    assert redact(doc) == doc
    assert json.dumps(doc, sort_keys=True) == before
    keys = {"keys": ["a"]}
    redact(keys)
    assert keys == {"keys": ["a"]}


def test_a_whole_loaded_config_dump_leaks_no_secret() -> None:
    text = textwrap.dedent(
        """\
        rate_limit_store: {redis: "redis://default:r3dis-pw@cache:6379/0"}
        auth:
          api_keys:
            header: X-API-Key
            keys: [k3y-one, k3y-two]
          jwt:
            secret_env: JWT_SECRET
            jwks_url: https://reader:jwk-pw@idp.example/jwks.json
        upstreams:
          users:
            targets: ["http://svc:t4rget-pw@127.0.0.1:9001"]
        routes:
          - {name: users, path: /users, upstream: users}
        """
    )
    settings = load_config_text(text, "gateway.yaml")
    shown = redact(settings.model_dump(mode="json"))
    dumped = json.dumps(shown)
    for secret in ("r3dis-pw", "k3y-one", "k3y-two", "jwk-pw", "t4rget-pw"):
        assert secret not in dumped
    assert shown["auth"]["api_keys"]["keys"] == ["***", "***"]
    assert shown["auth"]["api_keys"]["header"] == "X-API-Key"
    assert shown["auth"]["jwt"]["secret_env"] == "JWT_SECRET"
    assert shown["rate_limit_store"]["redis"] == "redis://default:***@cache:6379/0"
    assert shown["upstreams"]["users"]["targets"][0]["url"] == "http://svc:***@127.0.0.1:9001"
