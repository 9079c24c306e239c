"""https:// targets (contract: "Protocols: TLS and HTTP/2", upstreams): served by the
gateway's own HTTP/1.1 client over TLS, certificates verified by default (against
`tls.ca_file` here; the system trust store does not know trustme's CA), `server_name`
for SNI and the verified name, a client certificate for upstream mTLS, `verify: false`
only when asked; a certificate that does not verify is a 502 that says so."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.integration.harness import GatewayProcess, UpstreamServer


async def echo(request: Request) -> Response:
    return JSONResponse({"path": request.url.path, "scheme": request.url.scheme})


APP = Starlette(routes=[Route("/{rest:path}", echo)])


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def https_upstream(
    start: Callable[..., UpstreamServer],
    tmp_path: Path,
    ca: trustme.CA,
    *names: str,
    client_ca: trustme.CA | None = None,
) -> str:
    """An https upstream whose certificate (from `ca`) names `names`; its URL."""
    cert = ca.issue_cert(*names)
    cert_path, key_path = tmp_path / "up.pem", tmp_path / "up.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    extra: dict[str, Any] = {}
    if client_ca is not None:
        client_ca.cert_pem.write_to_path(str(tmp_path / "client-ca.pem"))
        extra = {
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "ssl_ca_certs": str(tmp_path / "client-ca.pem"),
        }
    # proxy_headers off: the scheme the app sees is its own connection's, not the
    # X-Forwarded-Proto the gateway sends.
    up = start(
        APP, ssl_certfile=str(cert_path), ssl_keyfile=str(key_path), proxy_headers=False, **extra
    )
    return f"https://127.0.0.1:{up.port}"


def config(target: str, tls: dict[str, Any] | None) -> dict[str, Any]:
    upstream: dict[str, Any] = {"targets": [target], "retries": {"attempts": 0}}
    if tls is not None:
        upstream["tls"] = tls
    return {
        "upstreams": {"up": upstream},
        "routes": [{"name": "r", "path": "/{rest:path}", "upstream": "up"}],
    }


def ca_file(tmp_path: Path, ca: trustme.CA) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def test_an_https_target_is_verified_against_ca_file(
    tmp_path: Path,
    ca: trustme.CA,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    target = https_upstream(upstream, tmp_path, ca, "127.0.0.1")
    gw = gateway(config(target, {"ca_file": ca_file(tmp_path, ca)}))
    r = httpx.get(gw.url + "/hello", timeout=10)
    assert r.status_code == 200
    assert r.json() == {"path": "/hello", "scheme": "https"}


def test_a_certificate_that_does_not_verify_is_a_502_that_says_so(
    tmp_path: Path,
    ca: trustme.CA,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    target = https_upstream(upstream, tmp_path, ca, "127.0.0.1")
    gw = gateway(config(target, None))  # the system trust store does not know this CA
    r = httpx.get(gw.url + "/hello", timeout=10)
    assert r.status_code == 502
    problem = r.json()
    assert problem["code"] == "upstream_unavailable"
    assert "certificate" in problem["detail"] and "did not verify" in problem["detail"]
    assert "127.0.0.1" not in problem["detail"]  # never the target's address


def test_verify_false_accepts_any_certificate(
    tmp_path: Path,
    ca: trustme.CA,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    target = https_upstream(upstream, tmp_path, ca, "elsewhere.test")
    gw = gateway(config(target, {"verify": False}))
    assert httpx.get(gw.url + "/x", timeout=10).status_code == 200


def test_server_name_is_the_name_verified(
    tmp_path: Path,
    ca: trustme.CA,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    target = https_upstream(upstream, tmp_path, ca, "billing.internal")
    trust = ca_file(tmp_path, ca)
    wrong = gateway(config(target, {"ca_file": trust}))  # verified as 127.0.0.1: no
    assert httpx.get(wrong.url + "/x", timeout=10).status_code == 502
    right = gateway(config(target, {"ca_file": trust, "server_name": "billing.internal"}))
    assert httpx.get(right.url + "/x", timeout=10).status_code == 200


def test_a_client_certificate_meets_an_upstream_that_requires_one(
    tmp_path: Path,
    ca: trustme.CA,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    clients = trustme.CA()
    target = https_upstream(upstream, tmp_path, ca, "127.0.0.1", client_ca=clients)
    trust = ca_file(tmp_path, ca)
    anonymous = gateway(config(target, {"ca_file": trust}))
    assert httpx.get(anonymous.url + "/x", timeout=10).status_code == 502
    me = clients.issue_cert("gateway.internal")
    me.cert_chain_pems[0].write_to_path(str(tmp_path / "me.pem"))
    me.private_key_pem.write_to_path(str(tmp_path / "me.key"))
    tls = {"ca_file": trust, "cert": str(tmp_path / "me.pem"), "key": str(tmp_path / "me.key")}
    known = gateway(config(target, tls))
    assert httpx.get(known.url + "/x", timeout=10).status_code == 200
