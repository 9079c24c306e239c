"""API keys: listed or from the environment, refused with 401 and a challenge, and
removed from the upstream request unless the route forwards it."""

from __future__ import annotations

import pytest

from gateway.build.edge import config_problems
from gateway.config.models import ApiKeySettings, GatewaySettings
from gateway.edge import EdgeContext
from gateway.edge.apikey import api_key, configured_keys
from gateway.errors import Unauthorized

CHALLENGE = b'ApiKey realm="gateway", header="X-API-Key"'


def ctx(*headers: tuple[bytes, bytes]) -> EdgeContext:
    raw = list(headers)
    return EdgeContext(
        scope={"type": "http"},
        method="GET",
        route="r",
        client_ip="10.0.0.1",
        request_headers=raw,
        upstream_headers=[*raw, (b"accept", b"*/*")],
    )


async def test_a_listed_key_passes_and_is_removed_from_the_upstream_request() -> None:
    check = api_key(ApiKeySettings(keys=("k-one", "k-two")))
    c = ctx((b"x-api-key", b"k-two"))
    assert await check(c) is None
    assert c.upstream_headers == [(b"accept", b"*/*")]


async def test_the_route_may_forward_the_key() -> None:
    check = api_key(ApiKeySettings(keys=("k-one",)), forward=True)
    c = ctx((b"x-api-key", b"k-one"))
    await check(c)
    assert (b"x-api-key", b"k-one") in c.upstream_headers


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ((), "missing API key"),
        (((b"x-api-key", b""),), "missing API key"),
        (((b"x-api-key", b"k-onf"),), "invalid API key"),
        (((b"x-api-key", b"k-one-and-more"),), "invalid API key"),
        (((b"authorization", b"k-one"),), "missing API key"),
    ],
)
async def test_missing_or_wrong_keys_are_401_with_a_challenge(
    headers: tuple[tuple[bytes, bytes], ...], detail: str
) -> None:
    check = api_key(ApiKeySettings(keys=("k-one",)))
    with pytest.raises(Unauthorized) as info:
        await check(ctx(*headers))
    assert info.value.status == 401
    assert info.value.code == "unauthorized"
    assert detail in info.value.detail
    assert info.value.headers == [(b"www-authenticate", CHALLENGE)]


async def test_the_header_name_is_configurable_and_case_insensitive() -> None:
    check = api_key(ApiKeySettings(header="Api-Token", keys=("k",)))
    c = ctx((b"api-token", b"k"))
    await check(c)
    assert c.upstream_headers == [(b"accept", b"*/*")]
    with pytest.raises(Unauthorized) as info:
        await check(ctx((b"x-api-key", b"k")))
    assert info.value.headers == [
        (b"www-authenticate", b'ApiKey realm="gateway", header="Api-Token"')
    ]


async def test_keys_come_from_the_environment_comma_separated() -> None:
    settings = ApiKeySettings(keys_env="KEYS")
    env = {"KEYS": " env-one , env-two,, "}
    assert configured_keys(settings, env) == ["env-one", "env-two"]
    check = api_key(settings, environ=env)
    await check(ctx((b"x-api-key", b"env-two")))
    with pytest.raises(Unauthorized):
        await check(ctx((b"x-api-key", b"env-three")))


def test_no_keys_at_all_refuses_to_build() -> None:
    with pytest.raises(ValueError, match="no keys"):
        api_key(ApiKeySettings(keys_env="UNSET"), environ={})


def test_config_problems_name_an_empty_key_variable_and_a_missing_auth_block() -> None:
    settings = GatewaySettings.model_validate(
        {
            "upstreams": {"u": {"targets": ["http://127.0.0.1:1"]}},
            "routes": [
                {"name": "a", "path": "/a", "upstream": "u", "auth": "api_key"},
                {"name": "j", "path": "/j", "upstream": "u", "auth": "jwt"},
            ],
            "auth": {"api_keys": {"keys_env": "GW_TEST_KEYS"}},
        }
    )
    assert config_problems(settings, {}) == [
        "routes.1.auth: jwt needs the global auth.jwt block",
        "auth.api_keys: no keys: none listed in keys and GW_TEST_KEYS is unset or empty",
    ]
    assert config_problems(settings, {"GW_TEST_KEYS": "k"}) == [
        "routes.1.auth: jwt needs the global auth.jwt block"
    ]
