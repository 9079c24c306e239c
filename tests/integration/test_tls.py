"""TLS termination on the data listener (contract: "Protocols: TLS and HTTP/2"): the
certificate chosen by SNI (wildcards cover one label), `sni_strict`, `min_version`,
mTLS with Envoy's X-Forwarded-Client-Cert, X-Forwarded-Proto https, certificate files
re-read on reload, and `gateway check` naming the line of a bad file. Real handshakes
against the real gateway process, with trustme's test CA."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import yaml
from cryptography import x509
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.sync.client import connect as ws_connect

from tests.integration.harness import GatewayProcess, UpstreamServer


async def echo(request: Request) -> Response:
    return JSONResponse({k: v for k, v in request.headers.items()})


ECHO = Starlette(routes=[Route("/{rest:path}", echo)])


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def pem_files(tmp_path: Path, ca: trustme.CA, name: str, *hosts: str) -> dict[str, str]:
    cert = ca.issue_cert(*hosts)
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    return {"cert": str(cert_path), "key": str(key_path)}


def config(target: str, tls: dict[str, Any]) -> dict[str, Any]:
    return {
        "server": {"tls": tls},
        "upstreams": {"up": {"targets": [target]}},
        "routes": [{"name": "echo", "path": "/{rest:path}", "upstream": "up"}],
    }


def handshake(
    gw: GatewayProcess,
    ca: trustme.CA,
    server_name: str | None,
    *,
    client: trustme.LeafCert | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> x509.Certificate:
    """One handshake with SNI `server_name` (None: no SNI); the certificate served."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = False
    if maximum is not None:
        context.maximum_version = maximum
    if client is not None:
        client.configure_cert(context)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def dns_names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName))


def get(gw: GatewayProcess, ca: trustme.CA, path: str, **kw: Any) -> httpx.Response:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    cert = kw.pop("client", None)
    if cert is not None:
        cert.configure_cert(context)
    with httpx.Client(verify=context, timeout=5) as http:
        return http.get(f"https://localhost:{gw.port}{path}", **kw)


def test_requests_are_served_over_tls_with_x_forwarded_proto_https(
    tmp_path: Path,
    ca: trustme.CA,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    up = upstream(ECHO)
    gw = gateway(config(up.url, {"certificates": [pem_files(tmp_path, ca, "a", "localhost")]}))
    r = get(gw, ca, "/hello", headers={"x-forwarded-client-cert": "Hash=forged"})
    assert r.status_code == 200
    seen = r.json()
    assert seen["x-forwarded-proto"] == "https"
    assert "x-forwarded-client-cert" not in seen  # a client-sent one never passes
    with pytest.raises(httpx.HTTPError):  # cleartext is not served on a TLS listener
        httpx.get(f"http://127.0.0.1:{gw.port}/hello", timeout=2)


def test_the_certificate_is_chosen_by_sni_with_one_label_wildcards(
    tmp_path: Path,
    ca: trustme.CA,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    up = upstream(ECHO)
    first = pem_files(tmp_path, ca, "first", "api.example.test")
    wild = pem_files(tmp_path, ca, "wild", "*.apps.example.test")
    gw = gateway(config(up.url, {"certificates": [first, wild]}))
    assert dns_names(handshake(gw, ca, "one.apps.example.test")) == ["*.apps.example.test"]
    assert dns_names(handshake(gw, ca, "API.example.test")) == ["api.example.test"]
    # A wildcard covers exactly one label: these get the first (default) certificate.
    assert dns_names(handshake(gw, ca, "a.b.apps.example.test")) == ["api.example.test"]
    assert dns_names(handshake(gw, ca, "apps.example.test")) == ["api.example.test"]
    assert dns_names(handshake(gw, ca, None)) == ["api.example.test"]


def test_sni_strict_refuses_unknown_and_absent_names(
    tmp_path: Path,
    ca: trustme.CA,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    up = upstream(ECHO)
    pair = pem_files(tmp_path, ca, "a", "api.example.test")
    gw = gateway(config(up.url, {"certificates": [pair], "sni_strict": True}))
    assert dns_names(handshake(gw, ca, "api.example.test")) == ["api.example.test"]
    for name in ("other.example.test", None):
        # OpenSSL makes an unrecognized_name alert; asyncio's SSL transport closes the
        # connection without sending it, so the client sees the handshake cut off.
        with pytest.raises(OSError):  # ssl.SSLError or ConnectionResetError
            handshake(gw, ca, name)


def test_min_version_refuses_older_clients(
    tmp_path: Path,
    ca: trustme.CA,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    up = upstream(ECHO)
    pair = pem_files(tmp_path, ca, "a", "localhost")
    gw = gateway(config(up.url, {"certificates": [pair], "min_version": "1.3"}))
    handshake(gw, ca, "localhost")  # TLS 1.3 is fine
    with pytest.raises(ssl.SSLError):
        handshake(gw, ca, "localhost", maximum=ssl.TLSVersion.TLSv1_2)


def mtls_gateway(
    tmp_path: Path,
    ca: trustme.CA,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
    client_auth: str,
    app: Starlette = ECHO,
) -> tuple[GatewayProcess, trustme.CA]:
    """A TLS gateway in front of `app` (the echo upstream), verifying client
    certificates against a CA of their own (returned, to issue them)."""
    up = upstream(app)
    clients = trustme.CA()
    clients.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    tls = {
        "certificates": [pem_files(tmp_path, ca, "a", "localhost")],
        "client_auth": client_auth,
        "client_ca": str(tmp_path / "clients.pem"),
    }
    return gateway(config(up.url, tls)), clients


def test_mtls_require_refuses_a_client_without_a_certificate(
    tmp_path: Path,
    ca: trustme.CA,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    gw, clients = mtls_gateway(tmp_path, ca, upstream, gateway, "require")
    with pytest.raises(httpx.HTTPError):
        get(gw, ca, "/x")
    stranger = trustme.CA().issue_cert("intruder@example.test")
    with pytest.raises(httpx.HTTPError):  # a certificate from another CA
        get(gw, ca, "/x", client=stranger)
    alice = clients.issue_cert("alice.example.test", "alice.internal.test")
    r = get(gw, ca, "/x", client=alice)
    assert r.status_code == 200
    xfcc = r.json()["x-forwarded-client-cert"]
    der = ssl.PEM_cert_to_DER_cert(alice.cert_chain_pems[0].bytes().decode())
    subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    assert xfcc == (
        f'Hash={hashlib.sha256(der).hexdigest()};Subject="{subject}"'
        ";DNS=alice.example.test;DNS=alice.internal.test"
    )


def test_mtls_optional_lets_a_client_without_a_certificate_through(
    tmp_path: Path,
    ca: trustme.CA,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    gw, clients = mtls_gateway(tmp_path, ca, upstream, gateway, "optional")
    anonymous = get(gw, ca, "/x", headers={"x-forwarded-client-cert": "Hash=forged"})
    assert anonymous.status_code == 200
    assert "x-forwarded-client-cert" not in anonymous.json()
    with pytest.raises(httpx.HTTPError):  # one that does not verify fails the handshake
        get(gw, ca, "/x", client=trustme.CA().issue_cert("intruder@example.test"))
    bob = clients.issue_cert("bob.example.test")
    seen = get(gw, ca, "/x", client=bob).json()
    assert seen["x-forwarded-client-cert"].endswith(";DNS=bob.example.test")


def test_reload_reads_the_certificate_files_again_and_keeps_the_old_pair_on_error(
    tmp_path: Path,
    ca: trustme.CA,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    up = upstream(ECHO)
    pair = pem_files(tmp_path, ca, "live", "old.example.test")
    gw = gateway(config(up.url, {"certificates": [pair]}))
    assert dns_names(handshake(gw, ca, "x")) == ["old.example.test"]
    # The files change in place: the next reload serves the new pair.
    pem_files(tmp_path, ca, "live", "new.example.test")
    r = httpx.post(gw.admin_url + "/reload", timeout=10)
    assert r.status_code == 200, r.text
    assert dns_names(handshake(gw, ca, "x")) == ["new.example.test"]
    # A key that does not belong to its certificate: the reload fails, the pair stays.
    other = pem_files(tmp_path, ca, "other", "other.example.test")
    Path(pair["key"]).write_bytes(Path(other["key"]).read_bytes())
    r = httpx.post(gw.admin_url + "/reload", timeout=10)
    assert r.status_code == 400
    assert any("does not belong" in e for e in r.json()["errors"])
    assert dns_names(handshake(gw, ca, "x")) == ["new.example.test"]


def test_gateway_check_names_the_line_of_an_unreadable_or_mismatched_file(
    tmp_path: Path, ca: trustme.CA
) -> None:
    good = pem_files(tmp_path, ca, "good", "localhost")
    other = pem_files(tmp_path, ca, "other", "localhost")
    cfg = config(
        "http://127.0.0.1:9",
        {
            "certificates": [
                {"cert": str(tmp_path / "missing.pem"), "key": good["key"]},
                {"cert": good["cert"], "key": other["key"]},
            ],
        },
    )
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    lines = path.read_text().splitlines()
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 2, done.stderr
    missing, mismatched = errors
    number = next(i for i, line in enumerate(lines, 1) if "missing.pem" in line)
    assert missing.startswith(f"{path}:{number}:")
    assert "server.tls.certificates.0.cert: cannot read" in missing
    assert "server.tls.certificates.1.cert" in mismatched
    assert "does not belong" in mismatched


def test_the_access_log_names_the_tls_version(
    tmp_path: Path,
    ca: trustme.CA,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    up = upstream(ECHO)
    gw = gateway(config(up.url, {"certificates": [pem_files(tmp_path, ca, "a", "localhost")]}))
    assert get(gw, ca, "/logged").status_code == 200
    gw.stop()
    records = [json.loads(line) for line in gw.stdout.splitlines() if line.startswith("{")]
    (record,) = [r for r in records if r.get("path") == "/logged"]
    assert record["tls"] == "TLSv1.3"
    assert record["protocol"] == "HTTP/1.1"


def test_the_status_page_shows_the_listeners_tls(
    tmp_path: Path,
    ca: trustme.CA,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    up = upstream(ECHO)
    gw = gateway(config(up.url, {"certificates": [pem_files(tmp_path, ca, "a", "localhost")]}))
    listener = httpx.get(gw.admin_url + "/status.json", timeout=5).json()["process"]["listener"]
    assert listener["protocols"] == ["HTTP/2", "HTTP/1.1", "HTTP/1.0"]
    tls = listener["tls"]
    assert (tls["min_version"], tls["client_auth"], tls["sni_strict"]) == ("TLSv1.2", "none", False)
    (only,) = tls["certificates"]
    assert only["names"] == ["localhost"] and only["not_after"] > 0


def test_garbage_and_a_stalled_handshake_are_dropped_without_harming_others(
    tmp_path: Path,
    ca: trustme.CA,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    up = upstream(ECHO)
    cfg = config(up.url, {"certificates": [pem_files(tmp_path, ca, "a", "localhost")]})
    cfg["server"]["header_timeout"] = "1s"  # bounds the TLS handshake too
    gw = gateway(cfg)
    garbage = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    stalled = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    try:
        garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)  # cleartext, not TLS
        stalled.sendall(b"\x16\x03\x01\x00")  # the first bytes of a ClientHello, then nothing
        assert get(gw, ca, "/meanwhile").status_code == 200  # others are served meanwhile
        assert ends(garbage)  # refused (an alert at most), then closed
        assert ends(stalled)  # closed once the 1 s handshake timeout passed, not 60 s
    finally:
        garbage.close()
        stalled.close()
    assert get(gw, ca, "/after").status_code == 200


def ends(sock: socket.socket, within: float = 5.0) -> bool:
    """Whether the peer closes the connection within `within` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


async def ws_headers(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json(dict(websocket.headers))
    await websocket.close()


def test_a_websocket_upgrade_over_tls_carries_the_client_certificate(
    tmp_path: Path,
    ca: trustme.CA,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    app = Starlette(routes=[WebSocketRoute("/ws", ws_headers)])
    gw, clients = mtls_gateway(tmp_path, ca, upstream, gateway, "optional", app)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    clients.issue_cert("carol.example.test").configure_cert(context)
    forged = [("X-Forwarded-Client-Cert", "Hash=forged")]
    with ws_connect(f"wss://localhost:{gw.port}/ws", ssl=context, additional_headers=forged) as ws:
        seen = json.loads(ws.recv(timeout=5))
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-client-cert"].startswith("Hash=")
    assert seen["x-forwarded-client-cert"].endswith(";DNS=carol.example.test")
