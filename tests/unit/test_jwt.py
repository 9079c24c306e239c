"""JWT verification: algorithms and key types pinned by the config (never by the token),
claims checked with leeway, the JWKS cache and its one rate-limited refresh on an
unknown kid, and verified claims sent upstream as headers nobody can spoof."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from gateway.build.edge import config_problems
from gateway.config.models import GatewaySettings, JwtSettings
from gateway.edge import EdgeContext
from gateway.edge import jwt as jwt_module
from gateway.edge.jwt import (
    TOKEN_CACHE_SIZE,
    InvalidToken,
    JwksKeys,
    JwtVerifier,
    bearer_token,
    claim_header_value,
    jwt_auth,
    parse_jwks,
)
from gateway.errors import Unauthorized
from tests.unit.fakes import FakeClock
from tests.unit.jwtkit import (
    AUDIENCE,
    ISSUER,
    SECRET,
    claims,
    ec_key,
    forge,
    jwks,
    public_jwk,
    public_pem,
    rsa_key,
    sign,
)

INVALID = [(b"www-authenticate", b'Bearer realm="gateway", error="invalid_token"')]


class Source:
    """A JWKS 'file' whose content the test changes; counts reads."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.reads = 0

    async def __call__(self) -> bytes:
        self.reads += 1
        return json.dumps(self.doc).encode()


def jwt_settings(**kw: Any) -> JwtSettings:
    base: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "algorithms": ["RS256", "ES256"],
        "jwks_file": "unused.json",
    }
    base.update(kw)
    return JwtSettings.model_validate(base)


async def verifier(
    settings: JwtSettings | None = None,
    source: Source | None = None,
    secret: bytes | None = None,
    clock: FakeClock | None = None,
    now: FakeClock | None = None,
) -> JwtVerifier:
    settings = settings or jwt_settings()
    keys = None
    if settings.jwks_file or settings.jwks_url:
        source = source or Source(jwks(public_jwk(rsa_key(), "k1"), public_jwk(ec_key(), "e1")))
        keys = JwksKeys(source, settings.jwks_refresh, clock=clock or FakeClock())
        await keys.start()
    return JwtVerifier(settings, keys, secret, now=now or time.time)


def ctx(*headers: tuple[bytes, bytes]) -> EdgeContext:
    raw = list(headers)
    return EdgeContext(
        scope={"type": "http"},
        method="GET",
        route="r",
        client_ip="10.0.0.1",
        request_headers=raw,
        upstream_headers=list(raw),
    )


def bearer(token: str) -> tuple[bytes, bytes]:
    return (b"authorization", f"Bearer {token}".encode())


async def test_rs256_and_es256_tokens_from_the_jwks_are_accepted() -> None:
    v = await verifier()
    assert (await v.verify(sign(rsa_key(), "RS256", "k1")))["sub"] == "user-42"
    assert (await v.verify(sign(ec_key(), "ES256", "e1")))["sub"] == "user-42"


async def test_hs256_with_the_configured_secret_is_accepted() -> None:
    v = await verifier(
        jwt_settings(algorithms=["HS256"], jwks_file=None, secret_env="S"), secret=SECRET.encode()
    )
    assert (await v.verify(sign(SECRET, "HS256", None)))["sub"] == "user-42"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"exp": int(time.time()) - 120}, "token expired"),
        ({"aud": "someone-else"}, "wrong audience"),
        ({"iss": "https://evil.test"}, "wrong issuer"),
        ({"exp": None}, "missing claim 'exp'"),
        ({"iss": None}, "missing claim 'iss'"),
        ({"aud": None}, "missing claim 'aud'"),
        ({"nbf": int(time.time()) + 600}, "token not valid yet"),
    ],
    ids=["expired", "audience", "issuer", "no-exp", "no-iss", "no-aud", "not-yet"],
)
async def test_claims_are_checked(overrides: dict[str, Any], reason: str) -> None:
    v = await verifier()
    with pytest.raises(InvalidToken, match=reason):
        await v.verify(sign(rsa_key(), "RS256", "k1", **overrides))


async def test_expiry_has_a_small_leeway() -> None:
    v = await verifier()
    await v.verify(sign(rsa_key(), exp=int(time.time()) - 10))  # within the 30 s default
    strict = await verifier(jwt_settings(leeway="0s"))
    with pytest.raises(InvalidToken, match="expired"):
        await strict.verify(sign(rsa_key(), exp=int(time.time()) - 10))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b.c",
        "eyJhbGciOiJSUzI1NiJ9.e30",
        forge({"alg": "none", "typ": "JWT"}, claims()),
        forge({"alg": "None", "kid": "k1"}, claims()),
        forge({"alg": "HS512", "kid": "k1"}, claims(), b"x" * 64),
        forge({"alg": "RS256", "kid": ["k1"]}, claims()),
    ],
    ids=["empty", "garbage", "dots", "no-signature", "none", "None", "hs512", "kid-list"],
)
async def test_garbage_none_and_unlisted_algorithms_are_refused(token: str) -> None:
    v = await verifier()
    with pytest.raises(InvalidToken, match=r"malformed|not accepted|invalid token|bad signature"):
        await v.verify(token)


async def test_algorithm_confusion_hs256_signed_with_the_public_key_is_refused() -> None:
    # An RS256 route: the attacker signs HS256 with the (public) RSA key as the secret.
    pem = public_pem(rsa_key())
    forged = forge({"alg": "HS256", "kid": "k1", "typ": "JWT"}, claims(), hmac_key=pem)
    v = await verifier()
    with pytest.raises(InvalidToken, match="not accepted"):
        await v.verify(forged)
    # Even where HS256 is allowed next to RS256, only the configured secret verifies it.
    both = await verifier(
        jwt_settings(algorithms=["RS256", "HS256"], secret_env="S"), secret=SECRET.encode()
    )
    with pytest.raises(InvalidToken, match="bad signature"):
        await both.verify(forged)


async def test_a_key_is_used_only_for_its_own_algorithm_and_type() -> None:
    # Same kid claimed with the other algorithm: the EC key never verifies RS256 and
    # the RSA key never ES256.
    v = await verifier(source=Source(jwks(public_jwk(rsa_key(), "k1"), public_jwk(ec_key(), "e1"))))
    with pytest.raises(InvalidToken, match="no key"):
        await v.verify(sign(ec_key(), "ES256", "k1"))
    with pytest.raises(InvalidToken, match="no key"):
        await v.verify(sign(rsa_key(), "RS256", "e1"))


def test_symmetric_and_encryption_keys_in_a_jwks_are_ignored() -> None:
    doc = jwks(
        {"kty": "oct", "k": "c2VjcmV0", "kid": "o1"},
        {**public_jwk(rsa_key(), "enc1"), "use": "enc"},
        public_jwk(rsa_key(), "k1"),
        {"kty": "RSA", "kid": "broken"},
    )
    assert [k.kid for k in parse_jwks(json.dumps(doc).encode())] == ["k1"]
    with pytest.raises(ValueError):
        parse_jwks(b'{"nokeys": 1}')


async def test_a_token_without_kid_is_accepted_only_when_one_key_fits() -> None:
    single = await verifier(source=Source(jwks(public_jwk(rsa_key(), "k1"))))
    await single.verify(sign(rsa_key(), kid=None))
    two = await verifier(
        source=Source(jwks(public_jwk(rsa_key(), "k1"), public_jwk(rsa_key("b"), "k2")))
    )
    with pytest.raises(InvalidToken, match="no key"):
        await two.verify(sign(rsa_key(), kid=None))


async def test_an_unknown_kid_triggers_one_refresh_then_a_cooldown() -> None:
    source = Source(jwks(public_jwk(rsa_key(), "k1")))
    clock = FakeClock()
    v = await verifier(source=source, clock=clock)
    assert source.reads == 1
    # Rotation: the new key appears in the source; its first token re-reads once.
    source.doc = jwks(public_jwk(rsa_key(), "k1"), public_jwk(rsa_key("b"), "k2"))
    await v.verify(sign(rsa_key("b"), kid="k2"))
    assert source.reads == 2
    await v.verify(sign(rsa_key("b"), kid="k2"))
    assert source.reads == 2
    # Made-up kids: no re-read within the cooldown, however many arrive.
    for i in range(5):
        with pytest.raises(InvalidToken, match="no key"):
            await v.verify(sign(rsa_key("b"), kid=f"bogus-{i}"))
    assert source.reads == 2
    clock.advance(11)
    with pytest.raises(InvalidToken, match="no key"):
        await v.verify(sign(rsa_key("b"), kid="bogus-late"))
    assert source.reads == 3


async def test_the_jwks_is_re_read_periodically_in_the_background() -> None:
    source = Source(jwks(public_jwk(rsa_key(), "k1")))
    clock = FakeClock()
    keys = JwksKeys(source, 300.0, clock=clock)
    await keys.start()
    await keys.start()  # idempotent: a runtime taking the keys over starts them again
    assert source.reads == 1
    clock.advance(301)
    assert await keys.key_for("k1", "RS256") is not None  # served from the cache at once
    assert source.reads == 1
    for _ in range(20):  # the re-read runs as its own task
        if source.reads == 2:
            break
        await asyncio.sleep(0)
    assert source.reads == 2
    assert await keys.key_for("k1", "RS256") is not None
    assert source.reads == 2  # next one in another 300 s
    await keys.aclose()


async def test_a_closed_jwks_starts_no_background_re_read() -> None:
    """A request still running on a retired runtime must not leave a task behind."""
    source = Source(jwks(public_jwk(rsa_key(), "k1")))
    clock = FakeClock()
    keys = JwksKeys(source, 300.0, clock=clock)
    await keys.start()
    await keys.aclose()
    clock.advance(301)
    before = asyncio.all_tasks()
    assert await keys.key_for("k1", "RS256") is not None  # the cached keys still serve
    assert asyncio.all_tasks() == before
    await asyncio.sleep(0)
    assert source.reads == 1


async def test_a_failing_source_keeps_the_known_keys() -> None:
    source = Source(jwks(public_jwk(rsa_key(), "k1")))
    clock = FakeClock()
    v = await verifier(source=source, clock=clock)
    source.doc = {"broken": True}
    with pytest.raises(InvalidToken, match="no key"):
        await v.verify(sign(rsa_key("b"), kid="k2"))  # triggers a failed re-read
    await v.verify(sign(rsa_key(), kid="k1"))


def test_bearer_token_parsing() -> None:
    assert bearer_token(b"Bearer abc") == "abc"
    assert bearer_token(b"bearer   abc ") == "abc"
    assert bearer_token(b"Basic abc") is None
    assert bearer_token(b"Bearer") is None
    assert bearer_token(None) is None


def test_claim_header_values() -> None:
    assert claim_header_value("user-42") == b"user-42"
    assert claim_header_value(7) == b"7"
    assert claim_header_value(True) == b"true"
    assert claim_header_value(["a", "b"]) == b'["a","b"]'
    assert claim_header_value("Jos\u00e9") == b"Jos%C3%A9"
    assert claim_header_value("a\r\nX-Evil: 1") == b"a%0D%0AX-Evil: 1"
    assert claim_header_value("100%") == b"100%25"
    assert claim_header_value(None) is None


async def test_the_filter_forwards_claims_and_strips_spoofed_headers() -> None:
    settings = jwt_settings(claims_to_headers={"sub": "X-User-Id", "scope": "X-Scope"})
    check = jwt_auth(settings, await verifier(settings))
    token = sign(rsa_key(), kid="k1")
    c = ctx(bearer(token), (b"x-user-id", b"admin"), (b"x-scope", b"everything"))
    assert await check(c) is None
    assert (b"x-user-id", b"user-42") in c.upstream_headers
    assert (b"x-user-id", b"admin") not in c.upstream_headers
    assert not [v for k, v in c.upstream_headers if k == b"x-scope"]  # no such claim
    assert (b"authorization", f"Bearer {token}".encode()) in c.upstream_headers


async def test_the_filter_refuses_with_bearer_challenges() -> None:
    settings = jwt_settings()
    check = jwt_auth(settings, await verifier(settings))
    with pytest.raises(Unauthorized) as missing:
        await check(ctx())
    assert missing.value.headers == [(b"www-authenticate", b'Bearer realm="gateway"')]
    with pytest.raises(Unauthorized) as bad:
        await check(ctx(bearer("garbage")))
    assert bad.value.headers == INVALID
    assert bad.value.detail == "malformed token"


def test_settings_need_a_key_source_for_each_algorithm() -> None:
    with pytest.raises(ValueError, match="needs jwks_file or jwks_url"):
        JwtSettings.model_validate({"algorithms": ["RS256"]})
    with pytest.raises(ValueError, match="HS256 needs secret_env"):
        JwtSettings.model_validate({"algorithms": ["HS256"]})
    with pytest.raises(ValueError, match="exclusive"):
        JwtSettings.model_validate({"jwks_file": "a", "jwks_url": "https://b"})
    with pytest.raises(ValueError):
        JwtSettings.model_validate({"algorithms": ["none"], "jwks_file": "a"})


def test_config_problems_check_the_secret_and_the_jwks_file(tmp_path: Any) -> None:
    def problems(jwt: dict[str, Any], env: dict[str, str]) -> list[str]:
        settings = GatewaySettings.model_validate({"auth": {"jwt": jwt}})
        return config_problems(settings, env)

    hs = {"algorithms": ["HS256"], "secret_env": "S"}
    assert problems(hs, {}) == ["auth.jwt.secret_env: environment variable S is unset or empty"]
    assert "shorter than 32 bytes" in problems(hs, {"S": "short"})[0]
    assert problems(hs, {"S": SECRET}) == []
    missing = str(tmp_path / "missing.json")
    assert "cannot read" in problems({"jwks_file": missing}, {})[0]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "is not a JWKS" in problems({"jwks_file": str(bad)}, {})[0]


class CountingDecode:
    """Counts the signature checks PyJWT makes (`jwt.decode` calls)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = jwt_module.jwt.decode

        def decode(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(jwt_module.jwt, "decode", decode)


async def test_a_verified_token_is_not_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    decode = CountingDecode(monkeypatch)
    v = await verifier()
    token = sign(rsa_key(), "RS256", "k1")
    for _ in range(3):
        assert (await v.verify(token))["sub"] == "user-42"
    assert decode.calls == 1
    await v.verify(sign(rsa_key(), "RS256", "k1", sub="someone-else"))
    assert decode.calls == 2


async def test_a_remembered_token_still_expires() -> None:
    wall = FakeClock(time.time())
    v = await verifier(now=wall)
    token = sign(rsa_key(), exp=int(wall()) + 60)
    await v.verify(token)
    wall.advance(60 + 29)  # inside the 30 s leeway
    await v.verify(token)
    wall.advance(2)
    with pytest.raises(InvalidToken, match="token expired"):
        await v.verify(token)


async def test_refused_tokens_are_never_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    decode = CountingDecode(monkeypatch)
    v = await verifier()
    token = sign(rsa_key(), aud="someone-else")
    for _ in range(2):
        with pytest.raises(InvalidToken, match="wrong audience"):
            await v.verify(token)
    assert decode.calls == 2


async def test_a_re_read_jwks_drops_what_was_remembered() -> None:
    """A key removed from the JWKS stops accepting its tokens at the next re-read."""
    source = Source(jwks(public_jwk(rsa_key(), "k1"), public_jwk(rsa_key("b"), "k2")))
    clock = FakeClock()
    v = await verifier(source=source, clock=clock)
    token = sign(rsa_key("b"), kid="k2")
    await v.verify(token)
    source.doc = jwks(public_jwk(rsa_key(), "k1"))  # k2 revoked
    clock.advance(301)
    await v.verify(token)  # the re-read starts in the background; this one is still served
    for _ in range(20):
        if source.reads == 2:
            break
        await asyncio.sleep(0)
    assert source.reads == 2  # started by a remembered token, without a signature check
    with pytest.raises(InvalidToken, match="no key"):
        await v.verify(token)
    assert (await v.verify(sign(rsa_key(), kid="k1")))["sub"] == "user-42"


async def test_the_remembered_tokens_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jwt_module, "TOKEN_CACHE_SIZE", 3)
    decode = CountingDecode(monkeypatch)
    v = await verifier()
    tokens = [sign(rsa_key(), sub=f"user-{i}") for i in range(4)]
    for token in tokens:
        await v.verify(token)
    assert decode.calls == 4
    await v.verify(tokens[3])  # the newest are kept
    assert decode.calls == 4
    await v.verify(tokens[0])  # the oldest went first
    assert decode.calls == 5
    assert TOKEN_CACHE_SIZE >= 1000  # the real bound
