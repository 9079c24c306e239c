"""JWT over the wire: an RS256 route with a JWKS file (bad tokens of every kind refused,
algorithm confusion included; a key rotated into the file accepted after one re-read;
claims forwarded, spoofed copies dropped), and HS256 from an environment secret next
to ES256 from a JWKS URL."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.integration.edge_support import EchoApp
from tests.integration.harness import GatewayProcess, UpstreamServer
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

INVALID = 'Bearer realm="gateway", error="invalid_token"'


def config(up: UpstreamServer, jwt: dict[str, Any]) -> dict[str, Any]:
    return {
        "auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, **jwt}},
        "upstreams": {"up": {"targets": [up.url]}},
        "routes": [
            {"name": "open", "path": "/open", "upstream": "up"},
            {"name": "secure", "path": "/secure", "upstream": "up", "auth": "jwt"},
        ],
    }


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_rs256_from_a_jwks_file_refuses_bad_tokens_and_picks_up_a_rotated_key(
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    keys_file = tmp_path / "jwks.json"
    keys_file.write_text(json.dumps(jwks(public_jwk(rsa_key(), "k1"))))
    app = EchoApp()
    gw = gateway(
        config(
            upstream(app),
            {
                "algorithms": ["RS256"],
                "jwks_file": str(keys_file),
                "claims_to_headers": {"sub": "X-User-Id", "tenant": "X-Tenant"},
            },
        )
    )
    now = int(time.time())
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        ok = client.get(
            "/secure",
            headers={
                **bearer(sign(rsa_key(), tenant="acme")),
                "x-user-id": "admin",  # a client trying to pass as someone else
            },
        )
        assert ok.status_code == 200, ok.text
        seen = ok.json()["headers"]
        assert seen["x-user-id"] == "user-42"
        assert seen["x-tenant"] == "acme"
        assert seen["authorization"].startswith("Bearer ")

        # Without a valid token the claim headers never reach the upstream, spoofed or not.
        assert client.get("/open", headers={"x-user-id": "admin"}).status_code == 200

        missing = client.get("/secure")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == 'Bearer realm="gateway"'
        assert missing.json()["code"] == "unauthorized"

        bad_tokens = {
            "token expired": sign(rsa_key(), exp=now - 120),
            "wrong audience": sign(rsa_key(), aud="another-api"),
            "wrong issuer": sign(rsa_key(), iss="https://evil.test"),
            "missing claim 'exp'": sign(rsa_key(), exp=None),
            "algorithm 'none' is not accepted": forge({"alg": "none", "kid": "k1"}, claims()),
            "malformed token": "not.a.jwt",
            # HS256 signed with the RS256 public key as the secret: algorithm confusion.
            "algorithm 'HS256' is not accepted": forge(
                {"alg": "HS256", "kid": "k1"}, claims(), hmac_key=public_pem(rsa_key())
            ),
            "bad signature": sign(rsa_key("other"), kid="k1"),
            "algorithm 'ES256' is not accepted": sign(ec_key(), "ES256", kid="k1"),
        }
        for reason, token in bad_tokens.items():
            r = client.get("/secure", headers=bearer(token))
            assert r.status_code == 401, reason
            assert r.headers["www-authenticate"] == INVALID, reason
            assert r.json()["detail"] == reason
        assert client.get("/secure", headers={"authorization": "Basic dTpw"}).status_code == 401

        # Rotation: a new key with a new kid is written into the file; its first token
        # makes the gateway re-read the file once and is accepted.
        keys_file.write_text(
            json.dumps(jwks(public_jwk(rsa_key(), "k1"), public_jwk(rsa_key("b"), "k2")))
        )
        rotated = client.get("/secure", headers=bearer(sign(rsa_key("b"), kid="k2")))
        assert rotated.status_code == 200, rotated.text
        assert client.get("/secure", headers=bearer(sign(rsa_key(), kid="k1"))).status_code == 200
    assert gw.stderr.count("JWKS loaded (unknown kid 'k2')") == 1, gw.stderr
    # Only good tokens got through: the first, the rotated one, k1 after rotation; + /open.
    assert app.requests == 4


def test_hs256_from_an_env_secret_and_es256_from_a_jwks_url(
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    app = EchoApp()
    up = upstream(app)
    app.serve["/.well-known/jwks.json"] = jwks(public_jwk(ec_key(), "e1"))
    gw = gateway(
        config(
            up,
            {
                "algorithms": ["ES256", "HS256"],
                "jwks_url": up.url + "/.well-known/jwks.json",
                "secret_env": "EDGE_TEST_JWT_SECRET",
                "claims_to_headers": {"sub": "X-User-Id"},
            },
        ),
        env={"EDGE_TEST_JWT_SECRET": SECRET},
    )
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        hs = client.get("/secure", headers=bearer(sign(SECRET, "HS256", kid=None, sub="h")))
        assert hs.status_code == 200, hs.text
        assert hs.json()["headers"]["x-user-id"] == "h"
        es = client.get("/secure", headers=bearer(sign(ec_key(), "ES256", kid="e1", sub="e")))
        assert es.status_code == 200, es.text
        assert es.json()["headers"]["x-user-id"] == "e"

        wrong_secret = sign("w" * 40, "HS256", kid=None)
        r = client.get("/secure", headers=bearer(wrong_secret))
        assert r.status_code == 401 and r.json()["detail"] == "bad signature"
        rs = client.get("/secure", headers=bearer(sign(rsa_key(), "RS256", kid="e1")))
        assert rs.status_code == 401
        assert rs.json()["detail"] == "algorithm 'RS256' is not accepted"
    assert app.requests == 2
