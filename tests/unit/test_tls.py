"""server/tls.py and the `server.tls` block: certificate names against SNI (RFC 6125
wildcards), Envoy's X-Forwarded-Client-Cert format, and the settings' own checks."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from gateway.config.loader import ConfigError, load_config_text
from gateway.config.models import TlsSettings
from gateway.server.tls import (
    Certificate,
    TlsError,
    TlsListener,
    TlsTerminator,
    forwarded_client_cert,
    name_matches,
)


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "www.example.com", False),
        ("*.example.com", "api.example.com", True),
        ("*.example.com", "example.com", False),  # the wildcard needs its one label
        ("*.example.com", "a.b.example.com", False),  # ...and covers only one
        ("*.example.com", ".example.com", False),
        ("a*.example.com", "ab.example.com", False),  # partial wildcards are not names
    ],
)
def test_certificate_names_match_sni(pattern: str, host: str, expected: bool) -> None:
    assert name_matches(pattern, host) is expected


def test_the_forwarded_client_cert_is_envoys_format() -> None:
    leaf = trustme.CA().issue_cert("svc.example.test", "alt.example.test")
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    assert (
        forwarded_client_cert(der)
        == (
            f'Hash={hashlib.sha256(der).hexdigest()};Subject="{subject}"'
            ";DNS=svc.example.test;DNS=alt.example.test"
        ).encode()
    )


def test_a_pair_that_does_not_load_is_a_tls_error(tmp_path: Path) -> None:
    ca = trustme.CA()
    one, two = ca.issue_cert("one.test"), ca.issue_cert("two.test")
    one.cert_chain_pems[0].write_to_path(str(tmp_path / "one.pem"))
    two.private_key_pem.write_to_path(str(tmp_path / "two.key"))
    pair = Certificate(str(tmp_path / "one.pem"), str(tmp_path / "two.key"))
    with pytest.raises(TlsError, match=r"one\.pem"):
        TlsTerminator(TlsListener(certificates=(pair,)))


def test_client_auth_needs_a_client_ca() -> None:
    text = """\
server:
  tls:
    certificates: [{cert: a.pem, key: a.key}]
    client_auth: require
upstreams: {u: {targets: ["http://127.0.0.1:9"]}}
routes: [{name: r, path: /, upstream: u}]
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "gw.yaml")
    (error,) = [e for e in info.value.errors if "client_ca" in e]
    assert error.startswith("gw.yaml:3:")
    assert "client_auth: require needs client_ca" in error


def test_an_unquoted_min_version_is_read_as_the_version() -> None:
    tls = TlsSettings.model_validate(
        {"certificates": [{"cert": "a", "key": "b"}], "min_version": 1.3}
    )
    assert tls.min_version == "1.3"
