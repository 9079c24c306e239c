"""What the gateway writes about a request never carries a credential, and never lets
client input break a log line: every line of stdout and stderr is one JSON object,
with control characters escaped; Authorization, cookies, API keys and JWTs appear
nowhere, on success, on refusal, and on upstream failure, with debug logs on."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable

import httpx

from gateway.ops.logs import AccessLog, JsonFormatter, scrub
from tests.hardening.apps import RecordingApp
from tests.hardening.rawhttp import exchange
from tests.integration.harness import GatewayProcess, UpstreamServer, free_port
from tests.unit.jwtkit import AUDIENCE, ISSUER, SECRET, sign

API_KEY = "k3y-0f-the-kingdom-4242"
COOKIE = "sess10n-c00kie-s3cret"
BASIC = "dXNlcjpwYXNzd29yZC1zM2NyZXQ="
WRONG_KEY = "wr0ng-key-but-still-s3cret"


def test_credentials_and_control_characters_never_reach_the_logs(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    up = upstream(RecordingApp())
    gw = gateway(
        {
            "server": {"log_level": "debug"},
            "auth": {
                "api_keys": {"keys": [API_KEY]},
                "jwt": {
                    "issuer": ISSUER,
                    "audience": AUDIENCE,
                    "algorithms": ["HS256"],
                    "secret_env": "HYGIENE_JWT_SECRET",
                },
            },
            "upstreams": {
                "up": {"targets": [up.url]},
                "dead": {"targets": [f"http://127.0.0.1:{free_port()}"]},
            },
            "routes": [
                {"name": "keyed", "path": "/keyed/{p:path}", "upstream": "up", "auth": "api_key"},
                {"name": "jwt", "path": "/jwt/{p:path}", "upstream": "up", "auth": "jwt"},
                {"name": "dead", "path": "/dead/{rest:path}", "upstream": "dead"},
                {"name": "open", "path": "/{rest:path}", "upstream": "up"},
            ],
        },
        env={"HYGIENE_JWT_SECRET": SECRET},
    )
    token = sign(SECRET, "HS256", kid=None)
    forged = sign("f" * 40, "HS256", kid=None)
    secrets = [API_KEY, WRONG_KEY, COOKIE, BASIC, token, forged, *token.split("."), SECRET]
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        common = {"cookie": f"session={COOKIE}", "proxy-authorization": f"Basic {BASIC}"}
        assert client.get("/keyed/a", headers={"x-api-key": API_KEY, **common}).status_code == 200
        assert client.get("/keyed/a", headers={"x-api-key": WRONG_KEY}).status_code == 401
        auth = {"authorization": f"Bearer {token}", **common}
        assert client.get("/jwt/a", headers=auth).status_code == 200
        refused = client.get("/jwt/a", headers={"authorization": f"Bearer {forged}"})
        assert refused.status_code == 401
        assert client.get("/dead/a", headers=auth).status_code == 502
        # A token in the path or the query, where a careless client puts one.
        assert client.get(f"/reset/{token}", params={"api_key": API_KEY}).status_code == 200
        assert client.get(f"/keyed/{forged}", headers={"x-api-key": WRONG_KEY}).status_code == 401
    # Client input with control characters, as far as the HTTP parser lets it in.
    exchange(gw.port, b"GET /a%0d%0aX-Injected:%201%1b[31m HTTP/1.1\r\nHost: gw\r\n\r\n")
    exchange(gw.port, b"GET /b HTTP/1.1\r\nHost: gw\r\nX-Request-ID: a\x1b[31mb\r\n\r\n")
    exchange(gw.port, b"GET /c HTTP/1.1\r\nHost: g\xffw\r\nX-Request-ID: \xfe\xff\r\n\r\n")
    time.sleep(0.2)
    gw.stop()  # flushes the access log

    out, err = gw.stdout, gw.stderr
    assert out.count("\n") >= 9, out
    for stream in (out, err):
        for line in stream.splitlines():
            assert line == line.strip() and line.isprintable(), repr(line)
            json.loads(line)  # one record, one line
        for secret in secrets:
            assert secret not in stream, f"a credential reached the logs: {secret[:12]}..."
    assert "[jwt]" in out  # the path with the token was logged, without it


def test_formatter_escapes_control_characters_and_masks_credentials() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.hygiene")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlLXMzY3JldA"
        logger.warning(
            "client sent %s with Authorization: Bearer %s\n\x1b[31mred",
            "/p\r\nX-Evil: 1",
            token,
            extra={
                "authorization": "Bearer abc",
                "cookie": "a=b",
                "x-api-key": "k",
                "headers": {"Authorization": "Basic " + BASIC, "accept": "*/*"},
                "note": f"token={token}",
            },
        )
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert text.count("\n") == 1  # one line, whatever the message held
    assert "\x1b" not in text and "\r" not in text.rstrip("\n")
    doc = json.loads(text)
    assert "\n\x1b[31mred" in doc["message"]  # escaped on the wire, intact in the record
    assert token not in text and "abc" not in text and BASIC not in text
    assert doc["authorization"] == doc["cookie"] == doc["x-api-key"] == "***"
    assert doc["headers"] == {"Authorization": "***", "accept": "*/*"}
    assert doc["note"] == "token=[jwt]"


def test_access_log_path_never_keeps_a_jwt() -> None:
    stream = io.StringIO()
    log = AccessLog(stream)
    log.write({"path": "/reset/eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", "status": 200})
    log.write({"path": "/a\nb\x1b", "status": 200})
    log.flush()
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["path"] for line in lines] == ["/reset/[jwt]", "/a\nb\x1b"]
    assert all(line.isprintable() for line in lines)


def test_scrub_leaves_ordinary_text_alone() -> None:
    assert scrub("basic check ok; bearer of news") == "basic check ok; bearer of news"
    assert scrub("GET /v1/users/42") == "GET /v1/users/42"
